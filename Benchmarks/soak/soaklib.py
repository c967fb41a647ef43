#!/usr/bin/env python3
"""Helpers of Benchmarks/soak/run: traffic generators, the sampler and the
final analysis. Every loop ends at a deadline given on the command line.

  soaklib.py tcp-recv PORT OUT DEADLINE        receiver: checks the byte pattern
  soaklib.py tcp-send HOST PORT OUT DEADLINE RATE   sender: RATE bytes/s until DEADLINE
  soaklib.py udp-echo PORT DEADLINE             echoes datagrams back
  soaklib.py udp-ping HOST PORT OUT DEADLINE INTERVAL  numbered datagrams, logs replies
  soaklib.py sample DIR TUNNELD DEADLINE INTERVAL  samples h1..h3 into DIR/samples.csv
  soaklib.py report DIR                         prints the summary; exit 1 on a failed check
"""
import csv
import json
import os
import re
import socket
import subprocess
import sys
import time

PATTERN_LEN = 251  # a prime: byte i of the stream is i % 251


def pattern(offset, n):
    base = bytes(range(PATTERN_LEN)) * ((n // PATTERN_LEN) + 2)
    start = offset % PATTERN_LEN
    return base[start:start + n]


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


# ---------------------------------------------------------------- TCP flow
def tcp_recv(port, out, deadline):
    state = {"bytes": 0, "error": None, "eof": False, "max_gap": 0.0, "progress": []}
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(1)
    srv.settimeout(max(1.0, deadline - time.time()))
    try:
        conn, _ = srv.accept()
    except OSError as e:
        state["error"] = f"no connection: {e}"
        write_json(out, state)
        return
    conn.settimeout(1.0)
    last_data = time.time()
    last_write = 0.0
    while time.time() < deadline + 30:
        try:
            data = conn.recv(65536)
        except socket.timeout:
            now = time.time()
            state["max_gap"] = max(state["max_gap"], now - last_data)
            continue
        except OSError as e:
            state["error"] = f"receive failed after {state['bytes']} bytes: {e}"
            break
        now = time.time()
        if not data:
            state["eof"] = True
            break
        state["max_gap"] = max(state["max_gap"], now - last_data)
        last_data = now
        if data != pattern(state["bytes"], len(data)):
            state["error"] = f"corrupt stream at byte {state['bytes']}"
            break
        state["bytes"] += len(data)
        if now - last_write > 2:
            state["progress"].append([round(now, 1), state["bytes"]])
            write_json(out, state)
            last_write = now
    write_json(out, state)


def tcp_send(host, port, out, deadline, rate):
    state = {"bytes": 0, "error": None, "closed": False}
    sock = None
    for _ in range(50):  # routes may still settle: up to ~10 s
        try:
            sock = socket.create_connection((host, port), timeout=2)
            break
        except OSError as e:
            state["error"] = f"connect failed: {e}"
            time.sleep(0.2)
    if sock is None:
        write_json(out, state)
        return
    state["error"] = None
    sock.settimeout(10)
    chunk = 8192
    start = time.time()
    try:
        while time.time() < deadline:
            # Paced: at most `rate` bytes per second on average.
            due = start + state["bytes"] / rate
            if due > time.time():
                time.sleep(min(0.05, due - time.time()))
                continue
            sock.sendall(pattern(state["bytes"], chunk))
            state["bytes"] += chunk
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(30)
        while sock.recv(4096):
            pass
        state["closed"] = True
    except OSError as e:
        state["error"] = f"send failed after {state['bytes']} bytes: {e}"
    finally:
        sock.close()
    write_json(out, state)


# ---------------------------------------------------------------- UDP echo
def udp_echo(port, deadline):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    s.settimeout(1.0)
    while time.time() < deadline + 10:
        try:
            data, peer = s.recvfrom(2048)
        except socket.timeout:
            continue
        s.sendto(data, peer)


def udp_ping(host, port, out, deadline, interval):
    """Sends numbered datagrams; writes "seq sent_time replied(0/1)" lines."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(0.01)
    sent = {}
    replied = set()
    seq = 0
    next_send = time.time()
    while time.time() < deadline + 2:  # 2 s for the last replies
        now = time.time()
        if now >= next_send and now < deadline:
            s.sendto(f"{seq} {now:.3f}".encode() + b"x" * 200, (host, port))
            sent[seq] = now
            seq += 1
            next_send += interval
        try:
            data, _ = s.recvfrom(2048)
            replied.add(int(data.split(b" ")[0]))
        except (socket.timeout, ValueError):
            pass
        except OSError:
            time.sleep(0.01)  # e.g. no route for a moment: counted as a loss
    with open(out, "w") as f:
        for q, t in sorted(sent.items()):
            f.write(f"{q} {t:.3f} {1 if q in replied else 0}\n")


# ---------------------------------------------------------------- sampler
def proc_status(pid):
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            values[key] = rest.strip()
    return values


def sample(lab_dir, tunneld, deadline, interval):
    """Every `interval` s until `deadline`: for each staying daemon (h1..h3)
    RSS, open fds, threads (from /proc) and, from `tunneld status --json`,
    its peers and data-path counters. samples.csv holds the main columns,
    counters.jsonl every counter."""
    path = os.path.join(lab_dir, "samples.csv")
    counters_path = os.path.join(lab_dir, "counters.jsonl")
    with open(path, "w", newline="") as f, open(counters_path, "w") as cf:
        w = csv.writer(f)
        w.writerow(["t", "host", "pid", "rss_kib", "fds", "threads", "peers",
                    "udp_packets_sent", "udp_datagrams_received", "tun_packets_written", "status_ok"])
        start = time.time()
        while time.time() < deadline:
            tick = time.time()
            for n in (1, 2, 3):
                t = round(tick - start, 1)
                try:
                    pid = int(open(os.path.join(lab_dir, f"h{n}.pid")).read().strip())
                    st = proc_status(pid)
                    rss = int(st["VmRSS"].split()[0])
                    threads = int(st["Threads"])
                    fds = len(os.listdir(f"/proc/{pid}/fd"))
                except (OSError, ValueError, KeyError):
                    w.writerow([t, f"h{n}", "", "", "", "", "", "", "", "", 0])
                    continue
                peers = sent = received = written = ""
                ok = 0
                try:
                    r = subprocess.run([tunneld, "status", "--json", "--control-socket",
                                        os.path.join(lab_dir, f"h{n}.sock")],
                                       capture_output=True, text=True, timeout=10)
                    report = json.loads(r.stdout)
                    counters = report.get("counters") or {}
                    cf.write(json.dumps({"t": t, "host": f"h{n}", "counters": counters}) + "\n")
                    peers = len(report.get("peers") or [])
                    sent = counters.get("udp_packets_sent", "")
                    received = counters.get("udp_datagrams_received", "")
                    written = counters.get("tun_packets_written", "")
                    ok = 1 if r.returncode == 0 and report.get("source") == "daemon" else 0
                except (subprocess.TimeoutExpired, ValueError, OSError):
                    pass
                w.writerow([t, f"h{n}", pid, rss, fds, threads, peers, sent, received, written, ok])
            f.flush()
            cf.flush()
            time.sleep(max(0.1, interval - (time.time() - tick)))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "tcp-recv":
        tcp_recv(int(args[0]), args[1], float(args[2]))
    elif cmd == "tcp-send":
        tcp_send(args[0], int(args[1]), args[2], float(args[3]), float(args[4]))
    elif cmd == "udp-echo":
        udp_echo(int(args[0]), float(args[1]))
    elif cmd == "udp-ping":
        udp_ping(args[0], int(args[1]), args[2], float(args[3]), float(args[4]))
    elif cmd == "sample":
        sample(args[0], args[1], float(args[2]), float(args[3]))
    elif cmd == "report":
        from soakreport import report
        sys.exit(report(args[0]))
    else:
        sys.exit(f"soaklib.py: unknown command {cmd}")
