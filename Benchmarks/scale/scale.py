#!/usr/bin/env python3
"""Control-plane scale benchmark of tunneld (driven by Benchmarks/scale/run).

Runs inside host namespace A (etcd listens there), puts N flannel leases in a
/8 network with batched transactions, starts `tunneld run --backend host-gw`
in A among them, and measures: start time (to READY and subnet.env), the time
from a put/delete of a lease to the kernel route appearing/disappearing
(p50/p99), a burst of 1,000 lease changes, a new host (namespace B) joining,
RSS and idle CPU. Every wait has a deadline; every process it starts is
stopped by PID in `finally`.
"""

import argparse
import base64
import json
import re
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

def network_config(backend):
    return {"Network": "10.0.0.0/8", "SubnetLen": 24, "Backend": {"Type": backend}}

TXN_OPS = 500          # puts per transaction (etcd started with --max-txn-ops 1000)
KEYS_PER_ETCD_LEASE = 256
LEASE_TTL = 86400      # s: flannel's 24 h


def log(message):
    print(f"[scale {time.strftime('%H:%M:%S')}] {message}", flush=True)


def b64(text):
    return base64.b64encode(text.encode()).decode()


def subnet(index):
    """Subnet `index` of 10.0.0.0/8 in /24s from SubnetMin (10.0.1.0)."""
    n = index + 1
    return f"10.{n >> 8 & 255}.{n & 255}.0/24"


def subnet_key(index):
    return subnet(index).replace("/", "-")


def public_ip(index):
    """A fake host address in 198.18.0.0/15, from 198.18.1.0 up (A and B are .0.1/.0.2)."""
    n = 256 + index
    return f"198.{18 + (n >> 16)}.{n >> 8 & 255}.{n & 255}"


def lease_value(index, backend):
    # flanneld's lease, byte for byte (docs/BACKENDS.md): udp writes no BackendType.
    if backend == "udp":
        return '{"PublicIP":"%s","PublicIPv6":null}' % public_ip(index)
    return '{"PublicIP":"%s","PublicIPv6":null,"BackendType":"%s"}' % (public_ip(index), backend)


def percentile(values, q):
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1)))))
    return ordered[k]


class Etcd:
    def __init__(self, url):
        self.url = url

    def call(self, path, body, timeout=30):
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def grant(self, ttl):
        return self.call("/v3/lease/grant", {"TTL": ttl})["ID"]

    def put(self, key, value, lease=None):
        body = {"key": b64(key), "value": b64(value)}
        if lease:
            body["lease"] = lease
        return int(self.call("/v3/kv/put", body)["header"]["revision"])

    def put_many(self, pairs, lease=None):
        ops = []
        for key, value in pairs:
            put = {"key": b64(key), "value": b64(value)}
            if lease:
                put["lease"] = lease
            ops.append({"request_put": put})
        return int(self.call("/v3/kv/txn", {"success": ops})["header"]["revision"])

    def delete(self, key):
        return int(self.call("/v3/kv/deleterange", {"key": b64(key)})["header"]["revision"])

    def delete_many(self, keys):
        ops = [{"request_delete_range": {"key": b64(k)}} for k in keys]
        return int(self.call("/v3/kv/txn", {"success": ops})["header"]["revision"])

    def delete_prefix(self, prefix):
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        body = self.call("/v3/kv/deleterange", {"key": b64(prefix), "range_end": b64(end)}, timeout=120)
        return int(body["header"]["revision"])

    def compact(self, revision):
        self.call("/v3/kv/compaction", {"revision": revision, "physical": True}, timeout=120)

    def defragment(self):
        self.call("/v3/maintenance/defragment", {}, timeout=120)


class RouteMonitor:
    """`ip monitor route` in a namespace: when each 10.x route came and went."""

    def __init__(self, namespace):
        self.added = {}
        self.deleted = {}
        self.lock = threading.Condition()
        command = ["ip", "-rcvbuf", "33554432", "monitor", "route"]
        if namespace:
            command = ["ip", "-n", namespace, "-rcvbuf", "33554432", "monitor", "route"]
        self.process = subprocess.Popen(["stdbuf", "-oL"] + command, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        self.overflows = 0
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.process.stdout:
            now = time.monotonic()
            words = line.split()
            if not words:
                continue
            if "No buffer space" in line or "ENOBUFS" in line:
                self.overflows += 1
                continue
            gone = words[0] == "Deleted"
            destination = words[1] if gone and len(words) > 1 else words[0]
            if not destination.startswith("10."):
                continue
            with self.lock:
                (self.deleted if gone else self.added)[destination] = now
                self.lock.notify_all()

    def wait(self, predicate, timeout):
        deadline = time.monotonic() + timeout
        with self.lock:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.lock.wait(min(left, 0.5))
        return True

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()


class LogMonitor:
    """The daemon's log lines as they are written (one write(2) per line):
    `peer 10.x.y.0/24 → …` when a peer enters the table, `peer … is gone`
    when it leaves. Used for the udp backend, whose table is in the process."""

    ADDED = re.compile(r"\bpeer (10\.\d+\.\d+\.\d+/\d+) → ")
    GONE = re.compile(r"\bpeer (10\.\d+\.\d+\.\d+/\d+) is gone")

    def __init__(self):
        self.added = {}
        self.deleted = {}
        self.lock = threading.Condition()
        self.overflows = 0

    def line(self, now, text):
        match = self.ADDED.search(text)
        if match:
            target = self.added
        else:
            match = self.GONE.search(text)
            target = self.deleted
        if not match:
            return
        with self.lock:
            target[match.group(1)] = now
            self.lock.notify_all()

    wait = RouteMonitor.wait

    def stop(self):
        pass


def count_routes(namespace=None):
    command = ["ip", "-4", "route", "show", "root", "10.0.0.0/8"]
    if namespace:
        command = ["ip", "-n", namespace] + command[1:]
    out = subprocess.run(command, capture_output=True, text=True, timeout=60).stdout
    return sum(1 for line in out.splitlines() if line.startswith("10."))


def flush_routes(namespace=None):
    command = ["ip", "-4", "route", "flush", "root", "10.0.0.0/8"]
    if namespace:
        command = ["ip", "-n", namespace] + command[1:]
    subprocess.run(command, capture_output=True, timeout=120)


def proc_cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[11], fields[12]: utime, stime (after the comm field)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_memory_kib(pid):
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line.split(":")[0]] = int(line.split()[1])
    return values.get("VmRSS"), values.get("VmHWM")


class Daemon:
    """One `tunneld run` with NOTIFY_SOCKET, so READY is seen the moment it is sent."""

    def __init__(self, args, name, namespace, iface, endpoint, prefix, workdir, backend):
        self.name = name
        self.monitor = LogMonitor()
        self.subnet_file = os.path.join(workdir, f"{name}.env")
        self.log_path = os.path.join(workdir, f"{name}.log")
        for path in (self.subnet_file,):
            if os.path.exists(path):
                os.unlink(path)
        notify_path = os.path.join(workdir, f"{name}.notify")
        if os.path.exists(notify_path):
            os.unlink(notify_path)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(notify_path)
        env = dict(os.environ, NOTIFY_SOCKET=notify_path)
        for key in list(env):
            if key.startswith("FLANNELD_"):
                del env[key]
        command = ["ip", "netns", "exec", namespace, args.tunneld, "run", "--backend", backend,
                   "--etcd-endpoints", endpoint, "--etcd-prefix", prefix, "--iface", iface,
                   "--subnet-file", self.subnet_file, "--log-level", args.log_level]
        self.log_file = open(self.log_path, "w")
        self.started = time.monotonic()
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                        text=True, errors="replace")
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        with open(os.path.join(args.pid_dir, f"{name}.pid"), "w") as f:
            f.write(str(self.process.pid))
        self.pid = self.process.pid   # `ip netns exec` execs tunneld: same PID

    def _read(self):
        try:
            for line in self.process.stdout:
                self.monitor.line(time.monotonic(), line)
                self.log_file.write(line)
            self.log_file.flush()
        except ValueError:
            # stop() gave up waiting for the rest of a long log and closed
            # the file; what was read is written.
            pass

    def peers_at_ready(self):
        """The peer count of the `tunneld ready: …, N peer(s)` line."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            self.log_file.flush()
            with open(self.log_path, errors="replace") as f:
                for line in f:
                    match = re.search(r"tunneld ready: .*, (\d+) peer\(s\)", line)
                    if match:
                        return int(match.group(1))
            time.sleep(0.1)
        return None

    def wait_ready(self, timeout):
        """Seconds from start to READY=1, or None."""
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return None
            self.notify.settimeout(max(0.05, min(1.0, deadline - time.monotonic())))
            try:
                message = self.notify.recv(4096).decode(errors="replace")
            except socket.timeout:
                continue
            if "READY=1" in message.split("\n"):
                return time.monotonic() - self.started
        return None

    def subnet(self):
        with open(self.subnet_file) as f:
            for line in f:
                if line.startswith("FLANNEL_SUBNET="):
                    address, length = line.strip().split("=", 1)[1].split("/")
                    parts = address.split(".")
                    return f"{parts[0]}.{parts[1]}.{parts[2]}.0/{length}"
        return None

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        # A start among 60,000 hosts logs 60,000 lines at debug: give the
        # reader time to get through the pipe before the file is closed.
        self.reader.join(60)
        self.notify.close()
        self.log_file.close()


def measure_size(args, etcd, backend, size, workdir):
    result = {"backend": backend, "hosts": size}
    prefix = f"/scale-{backend}-{size}/network"
    subnets_prefix = prefix + "/subnets/"
    etcd.put(prefix + "/config", json.dumps(network_config(backend), separators=(",", ":")))

    # --- load: N leases in batched transactions, one etcd lease per 256 keys
    started = time.monotonic()
    shared_lease = None
    batch = []
    for i in range(size):
        if i % KEYS_PER_ETCD_LEASE == 0 or shared_lease is None:
            if batch:
                etcd.put_many(batch, shared_lease)
                batch = []
            shared_lease = etcd.grant(LEASE_TTL)
        batch.append((subnets_prefix + subnet_key(i), lease_value(i, backend)))
        if len(batch) >= TXN_OPS:
            etcd.put_many(batch, shared_lease)
            batch = []
    if batch:
        etcd.put_many(batch, shared_lease)
    result["load_s"] = round(time.monotonic() - started, 2)
    log(f"{backend} {size}: {size} leases put in {result['load_s']} s")

    route_monitor = RouteMonitor(None) if backend != "udp" else None
    daemon_a = None
    daemon_b = None
    try:
        # --- start among N leases
        daemon_a = Daemon(args, f"a-{backend}-{size}", args.ns_a, "ul-a", args.endpoint_a, prefix, workdir, backend)
        # Kernel backends: the route in the kernel; udp: the daemon's own table, as its log reports it.
        monitor = route_monitor or daemon_a.monitor
        ready = daemon_a.wait_ready(args.start_timeout + size / 500)
        if ready is None:
            raise RuntimeError(f"tunneld did not become ready among {size} leases; see {daemon_a.log_path}")
        result["start_to_ready_s"] = round(ready, 3)
        result["subnet_env_written"] = os.path.exists(daemon_a.subnet_file)
        own_a = daemon_a.subnet()
        result["peers_at_ready"] = daemon_a.peers_at_ready()
        if backend != "udp":
            result["routes_at_ready"] = count_routes()
        log(f"{backend} {size}: ready after {ready:.2f} s with {result['peers_at_ready']} peers; own subnet {own_a}")
        time.sleep(1)

        # --- put/delete → route, one at a time
        put_lat, del_lat, misses = [], [], 0
        sample_lease = etcd.grant(LEASE_TTL)
        for k in range(args.samples):
            index = size + 1000 + k
            destination = subnet(index)
            t0 = time.monotonic()
            etcd.put(subnets_prefix + subnet_key(index), lease_value(index, backend), sample_lease)
            if monitor.wait(lambda: monitor.added.get(destination, 0) >= t0, 10):
                put_lat.append(monitor.added[destination] - t0)
            else:
                misses += 1
            t1 = time.monotonic()
            etcd.delete(subnets_prefix + subnet_key(index))
            if monitor.wait(lambda: monitor.deleted.get(destination, 0) >= t1, 10):
                del_lat.append(monitor.deleted[destination] - t1)
            else:
                misses += 1
        ms = lambda v: None if v is None else round(v * 1000, 2)
        result["put_to_route_ms"] = {"p50": ms(percentile(put_lat, 50)), "p99": ms(percentile(put_lat, 99)),
                                     "max": ms(max(put_lat) if put_lat else None), "n": len(put_lat)}
        result["delete_to_route_ms"] = {"p50": ms(percentile(del_lat, 50)), "p99": ms(percentile(del_lat, 99)),
                                        "max": ms(max(del_lat) if del_lat else None), "n": len(del_lat)}
        result["samples_missed"] = misses
        log(f"{backend} {size}: put→route p50 {result['put_to_route_ms']['p50']} ms p99 {result['put_to_route_ms']['p99']} ms; "
            f"delete→gone p50 {result['delete_to_route_ms']['p50']} ms p99 {result['delete_to_route_ms']['p99']} ms")

        # --- burst: 1,000 lease changes (10 transactions of 100 puts), then 1,000 deletes
        burst = [size + 3000 + k for k in range(args.burst)]
        destinations = [subnet(i) for i in burst]
        sent = {}
        t0 = time.monotonic()
        for start in range(0, len(burst), 100):
            chunk = burst[start:start + 100]
            sent_at = time.monotonic()
            etcd.put_many([(subnets_prefix + subnet_key(i), lease_value(i, backend)) for i in chunk], sample_lease)
            for i in chunk:
                sent[subnet(i)] = sent_at
        complete = monitor.wait(lambda: all(monitor.added.get(d, 0) >= sent[d] for d in destinations),
                                args.burst_timeout)
        if not complete:
            # The monitor may have dropped events (socket overflow): ask the kernel.
            present = count_routes()
            log(f"{backend} {size}: burst: monitor incomplete; {present} routes present")
        latencies = [monitor.added[d] - sent[d] for d in destinations if monitor.added.get(d, 0) >= sent[d]]
        last = max((monitor.added[d] for d in destinations if d in monitor.added), default=None)
        result["burst_put"] = {"changes": len(burst), "all_seen": complete,
                               "last_route_after_s": None if last is None else round(last - t0, 3),
                               "p50_ms": ms(percentile(latencies, 50)), "p99_ms": ms(percentile(latencies, 99))}
        t0 = time.monotonic()
        for start in range(0, len(burst), 100):
            chunk = burst[start:start + 100]
            sent_at = time.monotonic()
            etcd.delete_many([subnets_prefix + subnet_key(i) for i in chunk])
            for i in chunk:
                sent[subnet(i)] = sent_at
        complete = monitor.wait(lambda: all(monitor.deleted.get(d, 0) >= sent[d] for d in destinations),
                                args.burst_timeout)
        last = max((monitor.deleted[d] for d in destinations if d in monitor.deleted), default=None)
        latencies = [monitor.deleted[d] - sent[d] for d in destinations if monitor.deleted.get(d, 0) >= sent[d]]
        result["burst_delete"] = {"changes": len(burst), "all_seen": complete,
                                  "last_route_after_s": None if last is None else round(last - t0, 3),
                                  "p50_ms": ms(percentile(latencies, 50)), "p99_ms": ms(percentile(latencies, 99))}
        log(f"{backend} {size}: burst of {len(burst)} puts: last route after {result['burst_put']['last_route_after_s']} s; "
            f"deletes: last gone after {result['burst_delete']['last_route_after_s']} s")

        # --- a new host joins (namespace B)
        daemon_b = Daemon(args, f"b-{backend}-{size}", args.ns_b, "ul-b", args.endpoint_b, prefix, workdir, backend)
        ready_b = daemon_b.wait_ready(args.start_timeout + size / 500)
        if ready_b is None:
            raise RuntimeError(f"the joining tunneld did not become ready; see {daemon_b.log_path}")
        own_b = daemon_b.subnet()
        seen = monitor.wait(lambda: own_b in monitor.added, 30)
        result["join"] = {"ready_s": round(ready_b, 3),
                          "peers_at_ready": daemon_b.peers_at_ready(),
                          "first_host_route_after_s": round(monitor.added[own_b] - daemon_b.started, 3) if seen else None}
        log(f"{backend} {size}: new host ready after {ready_b:.2f} s ({own_b}); first host routes to it after "
            f"{result['join']['first_host_route_after_s']} s")
        daemon_b.stop()
        daemon_b = None

        # --- idle: CPU over a quiet window, memory
        time.sleep(2)
        cpu0, wall0 = proc_cpu_seconds(daemon_a.pid), time.monotonic()
        time.sleep(args.idle)
        cpu1, wall1 = proc_cpu_seconds(daemon_a.pid), time.monotonic()
        rss, hwm = proc_memory_kib(daemon_a.pid)
        result["idle_cpu_percent"] = round(100 * (cpu1 - cpu0) / (wall1 - wall0), 2)
        result["idle_window_s"] = args.idle
        result["rss_mib"] = round(rss / 1024, 1)
        result["peak_rss_mib"] = round(hwm / 1024, 1)
        result["log_lines"] = sum(1 for _ in open(daemon_a.log_path, errors="replace"))
        result["monitor_overflows"] = monitor.overflows
        log(f"{backend} {size}: idle CPU {result['idle_cpu_percent']} % over {args.idle} s; RSS {result['rss_mib']} MiB "
            f"(peak {result['peak_rss_mib']} MiB)")
    finally:
        for daemon in (daemon_b, daemon_a):
            if daemon:
                daemon.stop()
        if route_monitor:
            route_monitor.stop()
        flush_routes()
        flush_routes(args.ns_b)
        revision = etcd.delete_prefix(f"/scale-{backend}-{size}/")
        try:
            etcd.compact(revision)
            etcd.defragment()
        except Exception as error:  # noqa: BLE001 - cleanup goes on
            log(f"compaction after {size}: {error}")
    return result


def render(results, meta):
    lines = [f"tunneld control-plane scale, {meta['when']}, {meta['cpus']} CPUs, etcd {meta['etcd']}, "
             f"{meta['samples']} single changes, burst of {meta['burst']:,}",
             "",
             "| backend | hosts | start→READY | put→in table p50 / p99 | delete→out p50 / p99 "
             "| single changes missed | burst puts / deletes (last in/out) | join: READY / seen by the first "
             "| RSS (peak) | idle CPU |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['hosts']:,} | failed: {r['error']} ||||||||")
            continue
        lines.append(
            f"| {r['backend']} | {r['hosts']:,} | {r['start_to_ready_s']:.2f} s "
            f"| {r['put_to_route_ms']['p50']} / {r['put_to_route_ms']['p99']} ms "
            f"| {r['delete_to_route_ms']['p50']} / {r['delete_to_route_ms']['p99']} ms "
            # each single change is a put and a delete, each timed; one not seen within 10 s is missed
            f"| {r['samples_missed']} of {2 * meta['samples']} "
            f"| {r['burst_put']['last_route_after_s']} s / {r['burst_delete']['last_route_after_s']} s "
            f"| {r['join']['ready_s']:.2f} s / {r['join']['first_host_route_after_s']} s "
            f"| {r['rss_mib']} MiB ({r['peak_rss_mib']}) | {r['idle_cpu_percent']} % |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", required=True)
    parser.add_argument("--backends", default="udp,host-gw")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--idle", type=float, default=20)
    parser.add_argument("--start-timeout", type=float, default=60)
    parser.add_argument("--burst-timeout", type=float, default=60)
    parser.add_argument("--tunneld", required=True)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--ns-a", required=True)
    parser.add_argument("--ns-b", required=True)
    parser.add_argument("--endpoint-a", required=True)
    parser.add_argument("--endpoint-b", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--pid-dir", required=True)
    parser.add_argument("--results", required=True)
    parser.add_argument("--etcd-version", default="")
    args = parser.parse_args()

    # SIGTERM (from `timeout` or the wrapper's trap) unwinds through the finally blocks.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    etcd = Etcd(args.endpoint_a)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    meta = {"when": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "etcd": args.etcd_version,
            "tunneld": args.tunneld, "samples": args.samples, "burst": args.burst, "idle_s": args.idle}
    results = []
    failed = False
    for backend in args.backends.split(","):
        for size in sizes:
            try:
                results.append(measure_size(args, etcd, backend, size, args.workdir))
            except Exception as error:  # noqa: BLE001 - report and go on with the next size
                log(f"{backend} {size}: FAILED: {error}")
                results.append({"backend": backend, "hosts": size, "error": str(error)})
                failed = True
            with open(os.path.join(args.results, "results.json"), "w") as f:
                json.dump({"meta": meta, "results": results}, f, indent=2)
    summary = render(results, meta)
    with open(os.path.join(args.results, "summary.md"), "w") as f:
        f.write(summary)
    print()
    print(summary)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
