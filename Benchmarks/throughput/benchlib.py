#!/usr/bin/env python3
"""Parsing, statistics and reporting for Benchmarks/throughput/run.

The bash script owns namespaces and processes; this file only reads what the
script saved (iperf3 JSON, ping output, /proc snapshots) and turns it into
samples, medians, ratios, a Markdown table and a JSON report.

Subcommands (all print to stdout, errors to stderr with exit status 2):
  idle-wait   wait (bounded) until /proc/stat shows the machine idle
  subnet-env  read a flannel subnet.env and print the container addressing
  meta        write meta.json (commit, date, kernel, CPU model, settings)
  record      turn one measurement's raw files into a sample (samples.jsonl)
  summarize   medians over rounds, ratios, table on stdout, results.json
"""

import argparse
import datetime
import ipaddress
import json
import os
import re
import statistics
import sys
import time

MODES = ["host-gw", "kernel-vxlan", "tunneld-udp", "tunneld-udp-syscall", "tunneld-udp-uring-single",
         "tunneld-udp-nooffload", "tunneld-udp-simple", "tunneld-vxlan", "tunneld-host-gw",
         "tunneld-wireguard", "wireguard-go",
         "host-gw-v6", "kernel-vxlan-v6", "tunneld-udp-v6", "tunneld-vxlan-v6", "tunneld-host-gw-v6"]
# (reference mode, short name in the table, modes whose cells show that ratio; None: every
# mode of the reference's IP version — the "-v6" modes carry IPv6 between the containers)
REFERENCES = [
    ("host-gw", "hg", None),
    ("kernel-vxlan", "vx", None),
    ("host-gw-v6", "hg", None),
    ("kernel-vxlan-v6", "vx", None),
    # IPv6 inner packets against IPv4 ones on the same udp data path
    ("tunneld-udp", "v4", ("tunneld-udp-v6",)),
    # encryption: tunneld's wireguard against Debian's wireguard-go and against its own plaintext
    ("wireguard-go", "wg", ("tunneld-wireguard",)),
    ("tunneld-udp", "ud", ("tunneld-wireguard",)),
    # the batched data path against the one-packet-per-syscall (flannel-like) one
    ("tunneld-udp-simple", "sm", ("tunneld-udp", "tunneld-udp-syscall", "tunneld-udp-uring-single",
                                  "tunneld-udp-nooffload")),
    # the tiers below io_uring's best against the io_uring path (auto on this kernel)
    ("tunneld-udp", "ur", ("tunneld-udp-syscall", "tunneld-udp-uring-single")),
]
ROLES = ["host1", "host2", "ctr1", "ctr2"]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def fail(message):
    print(f"benchlib: {message}", file=sys.stderr)
    sys.exit(2)


# --------------------------------------------------------------------------
# /proc/stat

def parse_proc_stat_cpu(line):
    """Return the jiffies no task used (idle + iowait + steal) from the aggregate 'cpu' line.

    Busy time is derived from this as wall time × CPUs − unused time. The busy
    columns themselves are tick-sampled and, on a tickless kernel, miss short
    bursts of work (measured here: 0.21 s counted for 1.38 s used by a paced
    iperf3); idle time is accounted exactly on entry/exit of the idle loop.
    """
    fields = line.split()
    if not fields or fields[0] != "cpu":
        raise ValueError(f"not the aggregate cpu line of /proc/stat: {line!r}")
    values = [int(v) for v in fields[1:]]
    values += [0] * (8 - len(values))
    user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
    return idle + iowait + steal


def online_cpus():
    return os.sysconf("SC_NPROCESSORS_ONLN")


def machine_busy_s(wall_s, unused_jiffies):
    return max(0.0, wall_s * online_cpus() - unused_jiffies / CLK_TCK)


def read_proc_stat_cpu():
    with open("/proc/stat") as f:
        t = time.monotonic()
        return t, parse_proc_stat_cpu(f.readline())


def cmd_idle_wait(args):
    """Sample /proc/stat in windows until one is below the threshold or time runs out."""
    start = time.monotonic()
    deadline = start + max(0.0, args.max)
    samples = []
    busy_pct = None
    while True:
        t0, u0 = read_proc_stat_cpu()
        time.sleep(args.window)
        t1, u1 = read_proc_stat_cpu()
        wall = t1 - t0
        busy_pct = 100.0 * machine_busy_s(wall, u1 - u0) / (wall * online_cpus()) if wall > 0 else 0.0
        busy_pct = min(100.0, busy_pct)
        samples.append(round(busy_pct, 1))
        if busy_pct <= args.threshold or time.monotonic() + args.window > deadline:
            break
    waited = time.monotonic() - start
    print(json.dumps({
        "busy_pct": round(busy_pct, 1),
        "quiet": busy_pct <= args.threshold,
        "waited_s": round(waited, 2),
        "threshold_pct": args.threshold,
        "windows_pct": samples[-20:],
    }))


# --------------------------------------------------------------------------
# subnet.env

def cmd_subnet_env(args):
    try:
        with open(args.file) as f:
            text = f.read()
    except OSError as e:
        fail(f"cannot read subnet file {args.file}: {e.strerror}")
    values = {}
    for line in text.splitlines():
        if "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    subnet_key = "FLANNEL_IPV6_SUBNET" if args.ipv6 else "FLANNEL_SUBNET"
    if subnet_key not in values or "FLANNEL_MTU" not in values:
        fail(f"subnet file {args.file} lacks {subnet_key} or FLANNEL_MTU; it has: "
             f"{', '.join(sorted(values)) or 'nothing'}")
    try:
        if args.ipv6:
            iface = ipaddress.IPv6Interface(values[subnet_key])
        else:
            iface = ipaddress.IPv4Interface(values[subnet_key])
        mtu = int(values["FLANNEL_MTU"])
    except ValueError as e:
        fail(f"subnet file {args.file} has a malformed value: {e}")
    gateway = iface.ip
    container = gateway + 1
    if container not in iface.network or container == iface.network.broadcast_address:
        fail(f"subnet {iface.network} from {args.file} has no room for a container address")
    if not 576 <= mtu <= 9000:
        fail(f"FLANNEL_MTU={mtu} in {args.file} is outside 576…9000")
    # gateway prefixlen container network mtu
    print(gateway, iface.network.prefixlen, container, iface.network, mtu)


# --------------------------------------------------------------------------
# meta.json

def cmd_meta(args):
    cpu_model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    meta = {
        "commit": args.commit,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "kernel": os.uname().release,
        "cpu_model": cpu_model,
        "cpus": os.cpu_count(),
        "iperf3": args.iperf3_version,
        "tunneld_bin": args.tunneld_bin,
        "settings": json.loads(args.settings),
    }
    with open(args.out, "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


# --------------------------------------------------------------------------
# snapshots written by the bash script

def stat_fields(stat):
    """Fields of a /proc/<pid>/stat line after the command name; [0] is field 3 (state)."""
    return stat.rsplit(")", 1)[1].split()


def parse_cpu_snapshot(path):
    """Snapshot lines written by the script's snap_cpu:
    't <epoch>', 'stat <cpu line>', 'self <stat of the script>',
    'pid <pid> <stat line>|gone' (tunnel daemons), 'proc <pid> <stat line>'
    (iperf3 server, ksoftirqd threads)."""
    snap = {"t": None, "unused": None, "children": None, "pids": {}, "procs": {}}
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            kind, _, rest = line.partition(" ")
            if kind == "t":
                snap["t"] = float(rest)
            elif kind == "stat":
                snap["unused"] = parse_proc_stat_cpu(rest)
            elif kind == "self":
                f_ = stat_fields(rest)
                snap["children"] = int(f_[13]) + int(f_[14])   # cutime + cstime
            elif kind in ("pid", "proc"):
                pid, _, stat = rest.partition(" ")
                target = snap["pids"] if kind == "pid" else snap["procs"]
                if stat == "gone" or ")" not in stat:
                    target[pid] = None
                else:
                    f_ = stat_fields(stat)
                    target[pid] = int(f_[11]) + int(f_[12])     # utime + stime
    return snap


def cpu_delta(before_path, after_path):
    b = parse_cpu_snapshot(before_path)
    a = parse_cpu_snapshot(after_path)
    wall = a["t"] - b["t"]
    out = {
        "wall_s": round(wall, 4),
        "cpu_machine_s": machine_busy_s(wall, a["unused"] - b["unused"]),
        "cpu_tunnel_s": None,
        "cpu_procs_s": None,
        "tunnel_pids_lost": [],
    }
    tunnel = 0
    if b["pids"]:
        for pid, before in b["pids"].items():
            after = a["pids"].get(pid)
            if before is None or after is None:
                out["tunnel_pids_lost"].append(pid)
                continue
            tunnel += after - before
        out["cpu_tunnel_s"] = tunnel / CLK_TCK
    if b["children"] is not None and a["children"] is not None:
        # client (reaped children of the script) + server + ksoftirqd + tunnel
        procs = a["children"] - b["children"] + tunnel
        for pid, before in b["procs"].items():
            after = a["procs"].get(pid)
            if before is not None and after is not None:
                procs += after - before
        out["cpu_procs_s"] = procs / CLK_TCK
    return out


def parse_counter_snapshot(path):
    """Sections: '@@ns ROLE', '@@link' (ip -s -j link), '@@snmp', '@@qdisc' (tc -s -j), '@@softnet'."""
    sections = {}
    role = None
    current = None
    with open(path) as f:
        for line in f:
            if line.startswith("@@ns "):
                role = line.split()[1]
                continue
            if line.startswith("@@"):
                current = (role if line.strip() != "@@softnet" else "machine", line.strip()[2:])
                sections.setdefault(current, [])
                continue
            if current is not None:
                sections[current].append(line)
    counters = {}
    for (role, kind), lines in sections.items():
        text = "".join(lines)
        if kind == "link":
            try:
                links = json.loads(text) if text.strip() else []
            except json.JSONDecodeError:
                links = []
            for link in links:
                name = link.get("ifname", "?")
                stats = link.get("stats64") or link.get("stats") or {}
                for direction in ("rx", "tx"):
                    for field, value in (stats.get(direction) or {}).items():
                        if isinstance(value, int) and field in ("dropped", "errors", "over_errors",
                                                                 "fifo_errors", "missed", "packets"):
                            counters[f"{role}/{name}/{direction}_{field}"] = value
        elif kind == "snmp":
            rows = [l.split() for l in lines if l.strip()]
            for i in range(0, len(rows) - 1, 2):
                head, vals = rows[i], rows[i + 1]
                if head[0] in ("Udp:", "UdpLite:") and vals[0] == head[0]:
                    for key, value in zip(head[1:], vals[1:]):
                        if key in ("InErrors", "RcvbufErrors", "SndbufErrors", "NoPorts",
                                   "InDatagrams", "OutDatagrams"):
                            counters[f"{role}/{head[0].rstrip(':')}/{key}"] = int(value)
        elif kind == "qdisc":
            try:
                qdiscs = json.loads(text) if text.strip() else []
            except json.JSONDecodeError:
                qdiscs = []
            for q in qdiscs:
                if "drops" in q:
                    key = f"{role}/{q.get('dev', '?')}/qdisc_{q.get('kind', '?')}_{q.get('handle', '')}_drops"
                    counters[key] = counters.get(key, 0) + int(q["drops"])
        elif kind == "softnet":
            dropped = 0
            squeezed = 0
            for l in lines:
                cols = l.split()
                if len(cols) >= 3:
                    dropped += int(cols[1], 16)
                    squeezed += int(cols[2], 16)
            counters["machine/softnet/backlog_dropped"] = dropped
            counters["machine/softnet/time_squeeze"] = squeezed
    return counters


def counter_delta(before_path, after_path):
    b = parse_counter_snapshot(before_path)
    a = parse_counter_snapshot(after_path)
    delta = {}
    for key, value in a.items():
        if key in b:
            d = value - b[key]
            if d:
                delta[key] = d
    drop_sites = {k: v for k, v in delta.items()
                  if not k.endswith(("_packets", "/InDatagrams", "/OutDatagrams", "time_squeeze"))}
    iface_drops = sum(v for k, v in drop_sites.items()
                      if k.endswith(("_dropped", "_drops", "_errors", "_missed"))
                      and "/Udp" not in k and not k.startswith("machine/"))
    rcvbuf = sum(v for k, v in drop_sites.items() if k.endswith("/RcvbufErrors"))
    udp_in_errors = sum(v for k, v in drop_sites.items() if k.endswith("/InErrors"))
    return {
        "iface_drops": iface_drops,
        "udp_rcvbuf_errors": rcvbuf,
        "udp_in_errors": udp_in_errors,
        "softnet_drops": delta.get("machine/softnet/backlog_dropped", 0),
        "drop_sites": drop_sites,
        "ctr2_eth0_rx_packets": delta.get("ctr2/eth0/rx_packets", 0),
    }


# --------------------------------------------------------------------------
# record one measurement

def load_iperf(path):
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        return None, f"iperf3 output {path} unreadable: {e}"
    if data.get("error"):
        return data, f"iperf3: {data['error']}"
    if "end" not in data:
        return data, "iperf3 output has no 'end' section (the test did not finish)"
    return data, None


# The IP and TCP headers (without options) that a full-size segment carries at
# the container MTU: IPv4 20 + TCP 20, IPv6 40 + TCP 20.
TCP_HEADERS = {False: 40, True: 60}


def tcp_metrics(data, mtu, ipv6=False):
    end = data["end"]
    received = end.get("sum_received", {})
    sent = end.get("sum_sent", {})
    seconds = received.get("seconds") or sent.get("seconds") or 0
    mss_payload = max(1, mtu - TCP_HEADERS[ipv6])
    return {
        "gbps": received.get("bits_per_second", 0) / 1e9,
        "sender_gbps": sent.get("bits_per_second", 0) / 1e9,
        "retransmits": sent.get("retransmits"),
        "bytes_received": received.get("bytes", 0),
        "seconds": seconds,
        # TCP "packets" are counted as full-size segments at the container MTU
        # (GRO/TSO make per-skb counters meaningless for this).
        "delivered_pkts": received.get("bytes", 0) / mss_payload,
    }


def udp_metrics(data, payload):
    end = data["end"]
    received = end.get("sum_received") or end.get("sum") or {}
    sent = end.get("sum_sent") or end.get("sum") or {}
    seconds = received.get("seconds") or sent.get("seconds") or 0
    sent_pkts = received.get("packets", sent.get("packets", 0))
    lost = received.get("lost_packets", 0)
    # Received datagrams: bytes / payload where available, else sent − lost.
    if received.get("bytes") is not None and "sum_received" in end:
        delivered = received["bytes"] // payload
    else:
        delivered = max(0, sent_pkts - lost)
    return {
        "rx_pps": delivered / seconds if seconds else 0.0,
        "tx_pps": sent.get("packets", 0) / seconds if seconds else 0.0,
        "loss_pct": received.get("lost_percent", 0.0),
        "sent_pkts": sent.get("packets", 0),
        "lost_pkts": lost,
        "delivered_pkts": delivered,
        "seconds": seconds,
    }


def ping_metrics(path):
    with open(path) as f:
        text = f.read()
    rtts = [float(m) for m in re.findall(r"time=([0-9.]+) ms", text)]
    m = re.search(r"(\d+) packets transmitted, (\d+) received", text)
    if not m:
        return None, "ping printed no summary line"
    sent, received = int(m.group(1)), int(m.group(2))
    if not rtts:
        return None, f"ping got no replies ({sent} sent)"
    rtts.sort()
    # nearest-rank percentile
    p99 = rtts[max(0, min(len(rtts) - 1, -(-99 * len(rtts) // 100) - 1))]
    return {
        "min_ms": rtts[0],
        "avg_ms": sum(rtts) / len(rtts),
        "p99_ms": p99,
        "max_ms": rtts[-1],
        "sent": sent,
        "received": received,
        "loss_pct": 100.0 * (sent - received) / sent if sent else 100.0,
    }, None


def cmd_record(args):
    sample = {
        "round": args.round,
        "mode": args.mode,
        "test": args.test,
        "idle": json.loads(args.idle) if args.idle else None,
        "rc": args.rc,
        "mtu": args.mtu,
        "error": None,
        "metrics": {},
    }
    metrics = sample["metrics"]
    error = None
    if args.test in ("tcp1", "tcp4", "cpu-tcp"):
        data, error = load_iperf(args.raw)
        if error is None:
            metrics.update(tcp_metrics(data, args.mtu, ipv6=is_v6(args.mode)))
            if metrics["gbps"] <= 0:
                error = "TCP test delivered no data"
    elif args.test in ("udp64", "cpu-udp"):
        data, error = load_iperf(args.raw)
        if error is None:
            metrics.update(udp_metrics(data, args.payload))
            if metrics["delivered_pkts"] <= 0:
                error = "UDP test delivered no datagrams"
    elif args.test == "ping":
        result, error = ping_metrics(args.raw)
        if result:
            metrics.update(result)
    else:
        fail(f"unknown test {args.test!r}")
    if error is None and args.rc != 0:
        error = f"client exited with status {args.rc}"
    if args.cpu_before and args.cpu_after:
        cpu = cpu_delta(args.cpu_before, args.cpu_after)
        metrics["cpu_machine_s"] = cpu["cpu_machine_s"]
        metrics["cpu_tunnel_s"] = cpu["cpu_tunnel_s"]
        metrics["cpu_procs_s"] = cpu["cpu_procs_s"]
        metrics["wall_s"] = cpu["wall_s"]
        if cpu["tunnel_pids_lost"]:
            error = error or f"tunnel process(es) {', '.join(cpu['tunnel_pids_lost'])} exited during the test"
        if args.test == "cpu-udp" and args.target and metrics.get("seconds"):
            metrics["load_reached_pct"] = 100.0 * metrics["rx_pps"] / args.target
        if args.test == "cpu-tcp" and args.target and metrics.get("gbps") is not None:
            metrics["load_reached_pct"] = 100.0 * metrics["gbps"] * 1e9 / args.target
        if args.test in ("cpu-udp", "cpu-tcp") and metrics.get("delivered_pkts"):
            n = metrics["delivered_pkts"]
            metrics["machine_us_per_pkt"] = cpu["cpu_machine_s"] * 1e6 / n
            metrics["procs_us_per_pkt"] = (cpu["cpu_procs_s"] * 1e6 / n
                                           if cpu["cpu_procs_s"] is not None else None)
            metrics["tunnel_us_per_pkt"] = (cpu["cpu_tunnel_s"] * 1e6 / n
                                            if cpu["cpu_tunnel_s"] is not None else None)
    if args.ctr_before and args.ctr_after:
        drops = counter_delta(args.ctr_before, args.ctr_after)
        sample["drop_sites"] = drops.pop("drop_sites")
        metrics.update(drops)
    sample["error"] = error
    with open(os.path.join(args.results, "samples.jsonl"), "a") as f:
        f.write(json.dumps(sample) + "\n")
    print(progress_line(sample))


def progress_line(s):
    m = s["metrics"]
    idle = s["idle"] or {}
    head = f"  round {s['round']} {s['mode']:<18} {s['test']:<8}"
    busy = f"  [busy {idle.get('busy_pct', '?')}%{'' if idle.get('quiet', True) else ' NOT QUIET'}]"
    if s["error"]:
        return f"{head} FAILED: {s['error']}{busy}"
    t = s["test"]
    if t in ("tcp1", "tcp4"):
        body = f"{m['gbps']:.2f} Gbit/s, {m['retransmits']} retransmits"
    elif t == "udp64":
        body = f"{m['rx_pps'] / 1000:.1f} kpps received, loss {m['loss_pct']:.1f}%"
    elif t == "ping":
        body = f"rtt min/avg/p99 {m['min_ms']:.3f}/{m['avg_ms']:.3f}/{m['p99_ms']:.3f} ms"
    else:
        tun = m.get("tunnel_us_per_pkt")
        procs = m.get("procs_us_per_pkt")
        body = (f"{m['machine_us_per_pkt']:.2f} µs/pkt machine"
                + (f", {procs:.2f} µs/pkt test procs" if procs is not None else "")
                + (f", {tun:.2f} µs/pkt tunnel" if tun is not None else ""))
    return f"{head} {body}{busy}"


# --------------------------------------------------------------------------
# summary

# (test, metric, label, unit, scale)
ROWS = [
    ("tcp1", "gbps", "TCP 1 stream", "Gbit/s", 1),
    ("tcp4", "gbps", "TCP 4 streams", "Gbit/s", 1),
    ("udp64", "rx_pps", "UDP 64 B received", "kpps", 1e-3),
    ("udp64", "loss_pct", "UDP 64 B loss", "%", 1),
    ("ping", "min_ms", "RTT min", "ms", 1),
    ("ping", "avg_ms", "RTT avg", "ms", 1),
    ("ping", "p99_ms", "RTT p99", "ms", 1),
    ("cpu-udp", "load_reached_pct", "UDP 64 B fixed rate: share of target delivered", "%", 1),
    ("cpu-tcp", "load_reached_pct", "TCP fixed rate: share of target delivered", "%", 1),
    ("cpu-udp", "machine_us_per_pkt", "CPU/pkt machine, UDP 64 B fixed rate", "µs", 1),
    ("cpu-udp", "procs_us_per_pkt", "CPU/pkt test procs, UDP 64 B fixed rate", "µs", 1),
    ("cpu-udp", "tunnel_us_per_pkt", "CPU/pkt tunnel procs, UDP 64 B fixed rate", "µs", 1),
    ("cpu-tcp", "machine_us_per_pkt", "CPU/pkt machine, TCP fixed rate", "µs", 1),
    ("cpu-tcp", "procs_us_per_pkt", "CPU/pkt test procs, TCP fixed rate", "µs", 1),
    ("cpu-tcp", "tunnel_us_per_pkt", "CPU/pkt tunnel procs, TCP fixed rate", "µs", 1),
    ("tcp1", "cpu_machine_s", "CPU s machine during TCP 1", "s", 1),
    ("tcp1", "cpu_tunnel_s", "CPU s tunnel procs during TCP 1", "s", 1),
    ("tcp4", "cpu_machine_s", "CPU s machine during TCP 4", "s", 1),
    ("tcp4", "cpu_tunnel_s", "CPU s tunnel procs during TCP 4", "s", 1),
    ("udp64", "cpu_machine_s", "CPU s machine during UDP 64 B", "s", 1),
    ("udp64", "cpu_tunnel_s", "CPU s tunnel procs during UDP 64 B", "s", 1),
    ("tcp1", "retransmits", "TCP 1 retransmits", "", 1),
    ("tcp4", "retransmits", "TCP 4 retransmits", "", 1),
    ("udp64", "udp_rcvbuf_errors", "UDP 64 B rcvbuf errors (all ns)", "", 1),
    ("udp64", "iface_drops", "UDP 64 B iface/qdisc drops (all ns)", "", 1),
    ("udp64", "softnet_drops", "UDP 64 B softnet backlog drops", "", 1),
    ("tcp4", "iface_drops", "TCP 4 iface/qdisc drops (all ns)", "", 1),
]


def fmt(value):
    """Three significant digits; whole numbers from 1000 up."""
    if value is None:
        return "–"
    v = float(value)
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:.0f}"
    return f"{v:.3g}"


def fmt_ratio(r):
    if r is None:
        return "–"
    return f"{r:.2f}" if abs(r) < 10 else fmt(r)


def ratio(value, ref):
    if value is None or ref is None or ref == 0:
        return None
    return value / ref


def load_samples(results):
    path = os.path.join(results, "samples.jsonl")
    samples = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    samples.append(json.loads(line))
    return samples


def load_modes(results):
    modes = {}
    path = os.path.join(results, "modes.tsv")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t", 2)
                if len(parts) == 3:
                    mode, status, reason = parts
                    # a later line for the same mode wins (e.g. ok → skipped)
                    modes[mode] = {"status": status, "reason": reason}
    return modes


def quiet_rounds(samples):
    """(test, round) pairs where every mode measured that test after a quiet check."""
    ok = {}
    for s in samples:
        key = (s["test"], s["round"])
        quiet = bool(s["idle"] and s["idle"].get("quiet"))
        ok[key] = ok.get(key, True) and quiet
    return {k for k, v in ok.items() if v}


def summarize(samples, modes_run, quiet_only):
    keep = quiet_rounds(samples) if quiet_only else None
    usable = [s for s in samples if s["error"] is None
              and (keep is None or (s["test"], s["round"]) in keep)]
    table = {}
    for test, metric, label, unit, scale in ROWS:
        key = f"{test}.{metric}"
        per_mode = {}
        for mode in modes_run:
            values = [s["metrics"].get(metric) for s in usable
                      if s["mode"] == mode and s["test"] == test]
            values = [v for v in values if v is not None]
            per_mode[mode] = {
                "median": statistics.median(values) if values else None,
                "n": len(values),
                "values": values,
            }
        for mode in modes_run:
            entry = per_mode[mode]
            for ref, _, _ in REFERENCES:
                entry[f"vs_{ref.replace('-', '_')}"] = ratio(
                    entry["median"], per_mode.get(ref, {}).get("median"))
        table[key] = {"label": label, "unit": unit, "scale": scale, "modes": per_mode}
    # where packets were dropped: per site, over all usable measurements of a
    # mode and test (a measurement without the counter counts as 0)
    runs = {}
    for s in usable:
        runs.setdefault((s["mode"], s["test"]), []).append(s.get("drop_sites") or {})
    drop_sites = {}
    for (mode, test), measured in sorted(runs.items()):
        names = sorted({site for m in measured for site in m})
        if not names:
            continue
        drop_sites.setdefault(mode, {})[test] = {}
        for site in names:
            values = [m.get(site, 0) for m in measured]
            drop_sites[mode][test][site] = {
                "median": statistics.median(values),
                "max": max(values),
                "nonzero": sum(1 for v in values if v),
                "n": len(values),
            }
    busy = {}
    for mode in modes_run:
        values = [s["idle"]["busy_pct"] for s in samples if s["mode"] == mode and s.get("idle")]
        quiet = [s for s in samples if s["mode"] == mode and s.get("idle") and s["idle"].get("quiet")]
        mode_samples = [s for s in samples if s["mode"] == mode]
        busy[mode] = {
            "median_busy_before_pct": statistics.median(values) if values else None,
            "max_busy_before_pct": max(values) if values else None,
            "quiet_measurements": len(quiet),
            "measurements": len(mode_samples),
            "failed_measurements": sum(1 for s in mode_samples if s["error"]),
        }
    return {"quiet_only": quiet_only, "metrics": table, "drop_sites": drop_sites, "busy": busy,
            "used_samples": len(usable), "total_samples": len(samples)}


def is_v6(mode):
    return mode.endswith("-v6")


def render_table(summary, modes_run, meta):
    lines = []
    header = ["metric", "unit"] + modes_run
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---", "---"] + ["---:"] * len(modes_run)) + "|")
    for key, row in summary["metrics"].items():
        cells = []
        if all(row["modes"][m]["median"] is None for m in modes_run):
            continue
        for mode in modes_run:
            e = row["modes"][mode]
            if e["median"] is None:
                cells.append("–")
                continue
            parts = []
            for ref, short, shown_for in REFERENCES:
                if ref == mode or ref not in modes_run or row["modes"][ref]["median"] is None:
                    continue
                if shown_for is not None and mode not in shown_for:
                    continue
                if shown_for is None and is_v6(ref) != is_v6(mode):
                    continue
                r = e[f"vs_{ref.replace('-', '_')}"]
                parts.append(f"{short} {fmt_ratio(r)}")
            value = fmt(e["median"] * row["scale"])
            cells.append(value + (f" ({', '.join(parts)})" if parts else ""))
        lines.append(f"| {row['label']} | {row['unit']} | " + " | ".join(cells) + " |")
    busy_cells = []
    for mode in modes_run:
        b = summary["busy"][mode]
        med = b["median_busy_before_pct"]
        busy_cells.append(f"{fmt(med) if med is not None else '–'} % ({b['quiet_measurements']}/"
                          f"{b['measurements']} quiet)")
    lines.append("| machine busy before measuring (median) | | " + " | ".join(busy_cells) + " |")
    return "\n".join(lines)


def render_drop_sites(summary):
    out = []
    for mode, tests in summary["drop_sites"].items():
        for test, sites in tests.items():
            # RcvbufErrors are counted in InErrors too: show InErrors only when it adds something
            items = []
            for site, v in sites.items():
                twin = sites.get(site[:-len("InErrors")] + "RcvbufErrors") if site.endswith("/InErrors") else None
                if v["max"] == 0 or (twin is not None and twin == v):
                    continue
                text = f"{site} {fmt(v['median'])}"
                if v["nonzero"] < v["n"]:
                    text += f" (nonzero in {v['nonzero']} of {v['n']}, max {fmt(v['max'])})"
                items.append(text)
            if items:
                out.append(f"- {mode} / {test}: " + "; ".join(items))
    return "\n".join(out)


def render_report(meta, modes, summary, modes_run, interrupted):
    s = meta.get("settings", {})
    head = [
        f"- Date {meta['date']} · commit {meta['commit']} · kernel {meta['kernel']} · "
        f"CPU {meta['cpu_model']} ×{meta['cpus']} · iperf3 {meta.get('iperf3', '?')}",
        f"- Rounds {s.get('rounds')} · saturating tests {s.get('duration')} s · fixed loads "
        f"{s.get('load_duration')} s (UDP 64 B at {s.get('udp_rate')} pkt/s, TCP at "
        f"{s.get('tcp_rate_mbit')} Mbit/s) · {s.get('pings')} pings every {s.get('ping_interval')} s"
        + (" · smoke" if s.get("smoke") else "")
        + (f" · tunneld run … {s['tunneld_args']}" if s.get("tunneld_args") else "")
        + (" · quiet rounds only" if summary["quiet_only"] else ""),
    ]
    if interrupted:
        head.append("- **The run did not finish: partial results.**")
    for mode, info in modes.items():
        if info["status"] != "ok":
            head.append(f"- {mode}: {info['status']} — {info['reason']}")
    text = "\n".join(head) + "\n\n" + render_table(summary, modes_run, meta) + "\n"
    text += ("\nCells: median over rounds; (hg x, vx y, sm z, ur w) = ratio to host-gw, to kernel-vxlan, "
             "(tunneld-udp modes only) to tunneld-udp-simple, and (the syscall and uring-single tiers) to "
             "tunneld-udp, the io_uring path; the -v6 modes carry IPv6 between the containers and "
             "their hg/vx are host-gw-v6/kernel-vxlan-v6, and (v4 x) on tunneld-udp-v6 is its ratio to "
             "tunneld-udp's IPv4; (wg x, ud y) on tunneld-wireguard: ratio to wireguard-go and to tunneld-udp "
             "(for throughput higher is better, for latency/CPU/drops lower is better).\n")
    drops = render_drop_sites(summary)
    if drops:
        text += ("\nWhere packets were dropped (counters that moved; median over the rounds, "
                 "a round without the counter counting as 0):\n\n" + drops + "\n")
    return text


DOC_BEGIN = "<!-- BEGIN LATEST RESULTS (written by Benchmarks/throughput/run --update-docs) -->"
DOC_END = "<!-- END LATEST RESULTS -->"


def update_docs(path, report, note):
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        fail(f"cannot read {path} to update it: {e.strerror}")
    if DOC_BEGIN not in text or DOC_END not in text:
        fail(f"{path} lacks the markers {DOC_BEGIN!r} … {DOC_END!r}; add them where the table goes")
    before, rest = text.split(DOC_BEGIN, 1)
    _, after = rest.split(DOC_END, 1)
    block = DOC_BEGIN + "\n\n" + (f"> {note}\n\n" if note else "") + report.rstrip() + "\n\n" + DOC_END
    with open(path + ".tmp", "w") as f:
        f.write(before + block + after)
    os.replace(path + ".tmp", path)


def cmd_summarize(args):
    results = args.results
    try:
        with open(os.path.join(results, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        fail(f"cannot read {results}/meta.json: {e}")
    samples = load_samples(results)
    modes = load_modes(results)
    # Columns: modes that ran fine, plus modes that failed later but still
    # delivered good measurements in earlier rounds (their status is shown).
    measured = {s["mode"] for s in samples if s["error"] is None}
    known = MODES + [m for m in modes if m not in MODES]
    modes_run = [m for m in known
                 if (m in modes and modes[m]["status"] == "ok") or m in measured]
    summary = summarize(samples, modes_run, args.quiet_only)
    if args.quiet_only and summary["used_samples"] == 0 and samples:
        print("benchlib: --quiet-only: no round was quiet in every mode; the table is empty. "
              "Run again on a quieter machine or raise --idle-threshold.", file=sys.stderr)
    report = render_report(meta, modes, summary, modes_run, args.interrupted)
    result = {"meta": meta, "modes": modes, "interrupted": args.interrupted,
              "summary": summary, "samples": samples}
    with open(os.path.join(results, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    with open(os.path.join(results, "summary.md"), "w") as f:
        f.write(report)
    print(report)
    if args.update_docs:
        update_docs(args.update_docs, report, args.docs_note)
        print(f"updated {args.update_docs}")
    if args.check:
        # Used by --smoke / --strict: every mode that ran must have produced
        # every test it was asked for, without failures.
        problems = []
        tests = args.check.split(",")
        for mode in modes_run:
            for test in tests:
                got = [s for s in samples if s["mode"] == mode and s["test"] == test]
                if not got:
                    problems.append(f"{mode}/{test}: no measurement")
                elif any(s["error"] for s in got):
                    problems.append(f"{mode}/{test}: " + "; ".join(s["error"] for s in got if s["error"]))
        if not modes_run:
            problems.append("no mode ran")
        if problems:
            print("benchlib: check failed:\n  " + "\n  ".join(problems), file=sys.stderr)
            sys.exit(1)


# --------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(prog="benchlib.py")
    sub = p.add_subparsers(dest="cmd", required=True)

    a = sub.add_parser("idle-wait")
    a.add_argument("--max", type=float, default=10.0)
    a.add_argument("--threshold", type=float, default=20.0)
    a.add_argument("--window", type=float, default=0.5)
    a.set_defaults(func=cmd_idle_wait)

    a = sub.add_parser("subnet-env")
    a.add_argument("file")
    a.add_argument("--ipv6", action="store_true", help="the IPv6 subnet (FLANNEL_IPV6_SUBNET) instead")
    a.set_defaults(func=cmd_subnet_env)

    a = sub.add_parser("meta")
    a.add_argument("--out", required=True)
    a.add_argument("--commit", required=True)
    a.add_argument("--iperf3-version", default="?")
    a.add_argument("--tunneld-bin", default="")
    a.add_argument("--settings", default="{}")
    a.set_defaults(func=cmd_meta)

    a = sub.add_parser("record")
    a.add_argument("--results", required=True)
    a.add_argument("--round", type=int, required=True)
    a.add_argument("--mode", required=True)
    a.add_argument("--test", required=True)
    a.add_argument("--raw", required=True)
    a.add_argument("--rc", type=int, default=0)
    a.add_argument("--mtu", type=int, required=True)
    a.add_argument("--payload", type=int, default=64)
    a.add_argument("--target", type=float, default=0.0,
                   help="fixed-load target: packets/s (cpu-udp) or bits/s (cpu-tcp)")
    a.add_argument("--idle", default="")
    a.add_argument("--cpu-before", default="")
    a.add_argument("--cpu-after", default="")
    a.add_argument("--ctr-before", default="")
    a.add_argument("--ctr-after", default="")
    a.set_defaults(func=cmd_record)

    a = sub.add_parser("summarize")
    a.add_argument("--results", required=True)
    a.add_argument("--quiet-only", action="store_true")
    a.add_argument("--interrupted", action="store_true")
    a.add_argument("--update-docs", default="")
    a.add_argument("--docs-note", default="")
    a.add_argument("--check", default="", help="comma-separated tests every mode must have passed")
    a.set_defaults(func=cmd_summarize)

    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
