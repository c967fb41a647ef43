"""The soak's checks on what the run left in its directory (see run):
samples of the staying daemons, the TCP flow's end states, the UDP echo and
ping logs, and the events (etcd restarts, peers joining and leaving).
Prints a summary; returns 1 when a check fails."""
import csv
import json
import os
import re

# Generous bounds: a soak of minutes should show a flat line; these only
# catch growth that would matter over days.
RSS_GROWTH_FACTOR = 1.25      # last third's mean over the first third's…
RSS_GROWTH_SLACK_KIB = 8192   # …plus 8 MiB (allocator and caches settling)
FD_GROWTH = 4                 # more open descriptors at the end than the most at the start
THREAD_GROWTH = 4
TCP_MAX_GAP = 5.0             # s without a byte on the long-lived flow
ETCD_GRACE = 5.0              # s after etcd is healthy again still counted as "during the restart"


def load_events(d):
    events = []
    with open(os.path.join(d, "events.log")) as f:
        for line in f:
            parts = line.split(None, 2)
            if len(parts) >= 2:
                events.append((float(parts[0]), parts[1], parts[2].strip() if len(parts) > 2 else ""))
    return events


def etcd_windows(events, end):
    windows, down = [], None
    for t, kind, _ in events:
        if kind == "etcd-stop":
            down = t
        elif kind == "etcd-healthy" and down is not None:
            windows.append((down - 1.0, t + ETCD_GRACE))
            down = None
    if down is not None:
        windows.append((down - 1.0, end))
    return windows


def in_windows(t, windows):
    return any(a <= t <= b for a, b in windows)


PING_REPLY = re.compile(r"^\[(\d+\.\d+)\].*icmp_seq=(\d+) ttl=")
PING_SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) received")


def ping_losses(path, start, interval):
    """(transmitted, received, send times of the lost requests)."""
    replies = {}
    transmitted = None
    with open(path, errors="replace") as f:
        for line in f:
            m = PING_REPLY.match(line)
            if m:
                replies.setdefault(int(m.group(2)), float(m.group(1)))
            m = PING_SUMMARY.search(line)
            if m:
                transmitted = int(m.group(1))
    if transmitted is None:
        return None
    lost = []
    known = sorted(replies.items())
    for seq in range(1, transmitted + 1):
        if seq in replies:
            continue
        # The send time of a lost request: interpolated from the nearest replies.
        below = [(s, t) for s, t in known if s < seq][-1:]
        above = [(s, t) for s, t in known if s > seq][:1]
        if below:
            t = below[0][1] + (seq - below[0][0]) * interval
        elif above:
            t = above[0][1] - (above[0][0] - seq) * interval
        else:
            t = start + (seq - 1) * interval
        lost.append(t)
    return transmitted, len(replies), lost


def mean(xs):
    return sum(xs) / len(xs) if xs else 0.0


def report(d):
    meta = json.load(open(os.path.join(d, "meta.json")))
    events = load_events(d)
    windows = etcd_windows(events, meta["traffic_end"] + 30)
    failures = []
    lines = []

    def check(ok, text):
        lines.append(f"  [{'ok' if ok else 'FAIL'}] {text}")
        if not ok:
            failures.append(text)

    # ------------------------------------------------------------ samples
    rows = list(csv.DictReader(open(os.path.join(d, "samples.csv"))))
    lines.append("samples (every %ss; full table in %s):" % (meta["sample_interval"], os.path.join(d, "samples.csv")))
    lines.append("  %7s %4s %8s %4s %7s %5s %10s %10s" % ("t(s)", "host", "RSS(KiB)", "fds", "threads", "peers", "udp_sent", "tun_wrote"))
    ticks = sorted({float(r["t"]) for r in rows})
    step = max(1, -(-len(ticks) // 12))  # at most ~12 ticks shown, always the last
    shown_ticks = set(ticks[::step]) | set(ticks[-1:])
    for r in rows:
        if float(r["t"]) in shown_ticks:
            lines.append("  %7s %4s %8s %4s %7s %5s %10s %10s" % (r["t"], r["host"], r["rss_kib"], r["fds"], r["threads"],
                                                               r["peers"], r["udp_packets_sent"], r["tun_packets_written"]))
    lines.append("memory curve (RSS in MiB at 0, 25, 50, 75, 100 % of the run):")
    for host in ("h1", "h2", "h3"):
        rss = [int(r["rss_kib"]) for r in rows if r["host"] == host and r["rss_kib"]]
        if rss:
            points = [rss[min(len(rss) - 1, (len(rss) - 1) * q // 4)] / 1024 for q in range(5)]
            lines.append(f"  {host}: " + " → ".join(f"{p:.1f}" for p in points))
    lines.append("checks:")
    # A sample is missed when its tick has no row for the host (the sampler
    # was late or failed) or a row without a live daemon.
    interval = float(meta["sample_interval"])
    expected = round((ticks[-1] - ticks[0]) / interval) + 1 if ticks else 0
    for host in ("h1", "h2", "h3"):
        hr = [r for r in rows if r["host"] == host]
        alive = [r for r in hr if r["pid"]]
        check(len(hr) >= 6 and len(alive) == len(hr),
              f"{host}: alive in all {len(hr)} samples ({len(hr) - len(alive)} without a daemon; "
              f"{max(0, expected - len(alive))} of {expected} expected samples missed)")
        pids = {r["pid"] for r in alive}
        check(len(pids) == 1, f"{host}: one process throughout (pids {sorted(pids)})")
        if len(alive) < 3:
            continue
        third = len(alive) // 3
        first, last = alive[:third], alive[-third:]
        rss_first = mean([int(r["rss_kib"]) for r in first])
        rss_last = mean([int(r["rss_kib"]) for r in last])
        bound = rss_first * RSS_GROWTH_FACTOR + RSS_GROWTH_SLACK_KIB
        check(rss_last <= bound,
              f"{host}: RSS first third {rss_first / 1024:.1f} MiB → last third {rss_last / 1024:.1f} MiB "
              f"({(rss_last - rss_first) / 1024:+.1f} MiB; bound {bound / 1024:.1f} MiB)")
        fd_first = max(int(r["fds"]) for r in first)
        fd_last = max(int(r["fds"]) for r in last)
        check(fd_last <= fd_first + FD_GROWTH, f"{host}: open fds {fd_first} → {fd_last} (bound +{FD_GROWTH})")
        th_first = max(int(r["threads"]) for r in first)
        th_last = max(int(r["threads"]) for r in last)
        check(th_last <= th_first + THREAD_GROWTH, f"{host}: threads {th_first} → {th_last} (bound +{THREAD_GROWTH})")
        status_ok = sum(int(r["status_ok"]) for r in alive)
        check(status_ok >= 0.9 * len(alive), f"{host}: `tunneld status --json` answered by the daemon in {status_ok}/{len(alive)} samples")
        written = [int(r["tun_packets_written"]) for r in alive if r["tun_packets_written"]]
        check(len(written) >= 2 and written[-1] > written[0],
              f"{host}: data-path counter tun_packets_written kept rising ({written[0] if written else '-'} → {written[-1] if written else '-'})")

    # ------------------------------------------------------------ subnets
    for host, before in meta["subnets"].items():
        after = ""
        try:
            for line in open(os.path.join(d, f"{host}.env")):
                if line.startswith("FLANNEL_SUBNET="):
                    after = line.strip().split("=", 1)[1]
        except OSError:
            pass
        check(after == before, f"{host}: subnet unchanged ({before} → {after or 'none'})")

    # ------------------------------------------------------------ TCP flow
    try:
        recv = json.load(open(os.path.join(d, "tcp-recv.json")))
        send = json.load(open(os.path.join(d, "tcp-send.json")))
    except (OSError, ValueError) as e:
        check(False, f"long-lived TCP flow c1 → c2: no result ({e})")
    else:
        ok = (send.get("error") is None and recv.get("error") is None and send.get("closed")
              and recv.get("eof") and recv["bytes"] == send["bytes"] and send["bytes"] > 0)
        check(ok, "long-lived TCP flow c1 → c2 survived: sent %d B, received %d B (every byte checked), %s%s%s"
              % (send.get("bytes", 0), recv.get("bytes", 0),
                 "closed cleanly" if send.get("closed") and recv.get("eof") else "NOT closed cleanly",
                 f"; sender: {send['error']}" if send.get("error") else "",
                 f"; receiver: {recv['error']}" if recv.get("error") else ""))
        check(recv.get("max_gap", 99) <= TCP_MAX_GAP,
              f"TCP bytes kept flowing: longest gap {recv.get('max_gap', 0):.1f} s (bound {TCP_MAX_GAP:.0f} s)")

    # ------------------------------------------------------------ UDP echo
    try:
        udp = [line.split() for line in open(os.path.join(d, "udp-ping.txt"))]
    except OSError:
        udp = []
    lost = [float(t) for _, t, r in udp if r == "0"]
    outside = [t for t in lost if not in_windows(t, windows)]
    check(len(udp) > 0 and not outside,
          f"UDP echo c1 → c3: {len(udp)} sent, {len(lost)} lost ({len(lost) - len(outside)} during etcd restarts, {len(outside)} outside)")
    # Forwarding does not use etcd: the window excused above is for the
    # control plane (leases, peers changing), not for the data path between
    # hosts whose leases stay. Checked on its own, so that a loss there is
    # named as what it is.
    data_path_lost = {"UDP echo c1 → c3": (sum(1 for _, t, _ in udp if in_windows(float(t), windows)),
                                           len(lost) - len(outside))}

    # ------------------------------------------------------------ ping
    for name in meta["pings"]:
        result = ping_losses(os.path.join(d, f"{name}.txt"), meta["traffic_start"], meta["ping_interval"])
        if result is None:
            check(False, f"{name}: no ping summary")
            continue
        tx, rx, lost = result
        outside = [t for t in lost if not in_windows(t, windows)]
        check(tx > 0 and not outside,
              f"{name}: {tx} sent, {tx - rx} lost ({len(lost) - len(outside)} during etcd restarts, {len(outside)} outside)")
        data_path_lost[name] = (None, len(lost) - len(outside))
    in_restarts = sum(n for _, n in data_path_lost.values())
    check(in_restarts == 0,
          "data path during etcd restarts (nothing excused: forwarding does not use etcd): "
          + ", ".join(f"{name} {n} lost" + (f" of {sent}" if sent is not None else "")
                      for name, (sent, n) in data_path_lost.items()))

    # ------------------------------------------------------------ churn
    kinds = [k for _, k, _ in events]
    joins, leaves, kills = kinds.count("join"), kinds.count("leave"), kinds.count("kill")
    restarts = kinds.count("etcd-healthy")
    check(joins > 0 and leaves + kills > 0 and restarts > 0,
          f"churn happened: {joins} joins, {leaves} leaves (--release-on-exit), {kills} kill -9, {restarts} etcd restarts")
    down = sum(b - a - 1.0 - ETCD_GRACE for a, b in windows)
    lines.append(f"  etcd was down {down:.0f} s in all")

    text = "\n".join(lines)
    with open(os.path.join(d, "summary.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 1 if failures else 0
