import Foundation
import NetBase
import Testing

/// The metrics endpoint and `tunneld status` against running hosts. Every
/// scrape runs inside the host's namespace.
@Suite(.serialized, .enabled(if: canRunNamespaceTests, namespaceSkipReason))
struct MetricsAndStatusTests {
    func controlSocket(_ lab: Lab, _ n: Int) -> String { lab.directory.appendingPathComponent("h\(n).sock").path }

    func hostArguments(_ lab: Lab, _ n: Int) -> [String] {
        ["--store-dir", lab.storeDirectory, "--control-socket", controlSocket(lab, n)]
    }

    func base(_ lab: Lab, _ n: Int) throws -> String {
        try #require(lab.subnetEnv(n)["FLANNEL_SUBNET"]).replacingOccurrences(of: ".1/24", with: ".0/24")
    }

    /// GET `path` from inside host `n`'s namespace: status code and body.
    func get(_ lab: Lab, host n: Int, port: Int, path: String) throws -> (status: Int, body: String) {
        let script = """
            import sys, urllib.request, urllib.error
            try:
                r = urllib.request.urlopen(sys.argv[1], timeout=10); print(r.status); sys.stdout.write(r.read().decode())
            except urllib.error.HTTPError as e:
                print(e.code); sys.stdout.write(e.read().decode())
            """
        let output = try lab.exec("h\(n)", ["python3", "-c", script, "http://127.0.0.1:\(port)\(path)"]).output
        let firstLine = output.prefix { $0 != "\n" }
        return (Int(firstLine) ?? -1, String(output.dropFirst(firstLine.count + 1)))
    }

    /// Prometheus text as series (name with labels, as printed) → value.
    func series(_ text: String) -> [String: Double] {
        var values: [String: Double] = [:]
        for line in text.split(separator: "\n") where !line.hasPrefix("#") {
            guard let space = line.lastIndex(of: " "), let value = Double(line[line.index(after: space)...]) else {
                continue
            }
            values[String(line[..<space])] = value
        }
        return values
    }

    @Test func metricsMoveWithTrafficAndManyScrapesAreAnsweredDespiteASilentClient() throws {
        try Lab.withLocalStore(config: seedConfig) { lab in
            try lab.addHost(1, extra: hostArguments(lab, 1) + ["--healthz-port", "9464"])
            try lab.addHost(2, extra: hostArguments(lab, 2))
            let ping = try lab.ping(from: 1, to: 2)
            #expect(ping.succeeded, "\(ping.output)")

            // flanneld's health check, unchanged.
            let health = try get(lab, host: 1, port: 9464, path: "/healthz")
            #expect(health.status == 200 && health.body == "tunneld is running\n", "\(health)")
            // flanneld's readiness check: 200 once the subnet file is written.
            #expect(FileManager.default.fileExists(atPath: lab.subnetFile(1)))
            let ready = try get(lab, host: 1, port: 9464, path: "/readyz")
            #expect(ready.status == 200 && ready.body == "tunneld is ready\n", "\(ready)")
            #expect(try get(lab, host: 1, port: 9464, path: "/nothing").status == 404)
            // The status route is the control socket's only.
            #expect(try get(lab, host: 1, port: 9464, path: "/status").status == 404)

            let first = try get(lab, host: 1, port: 9464, path: "/metrics")
            #expect(first.status == 200)
            let before = series(first.body)
            #expect(first.body.contains("# TYPE tunneld_packets_total counter"))
            #expect(first.body.contains("# HELP tunneld_dropped_packets_total "))
            #expect(before["tunneld_build_info{version=\"0.1.0\",backend=\"udp\"}"] == 1, "\(first.body)")
            #expect(before["tunneld_peers"] == 1)
            #expect(before["tunneld_table_entries"] == 2, "our subnet and the peer's")
            #expect((before["tunneld_table_generation"] ?? 0) >= 2)
            #expect((before["tunneld_datapath_workers"] ?? 0) >= 1)
            #expect((before["tunneld_lease_expiry_timestamp_seconds"] ?? 0) > Date().timeIntervalSince1970)
            #expect(before["tunneld_peer_changes_total{change=\"added\"}"] == 1)
            #expect(before["tunneld_dropped_packets_total{reason=\"no_route\"}"] != nil)
            // The first echo may meet a host that does not know its peer yet
            // (dropped as no_route, and ping still succeeds): count the replies.
            let replies = Double(ping.output.firstMatch(of: /(\d+) received/)?.1 ?? "0") ?? 0
            #expect(replies >= 1)
            #expect((before["tunneld_packets_total{direction=\"tx\"}"] ?? 0) >= replies, "the echoes went out")
            #expect((before["tunneld_packets_total{direction=\"rx\"}"] ?? 0) >= replies, "the replies came in")
            #expect(before["tunneld_store_compactions_total"] == 0)
            let batches = before.filter { $0.key.hasPrefix("tunneld_datapath_batches_total{size=") }.values.reduce(0, +)
            #expect(batches > 0 && (before["tunneld_datapath_batch_completions_total"] ?? 0) >= batches)

            // A scraper in the host, scraping while 5 MB cross the tunnel:
            // the bytes sent never go back and grow by at least the payload.
            let scrapes = lab.directory.appendingPathComponent("scrapes.txt").path
            let stop = lab.directory.appendingPathComponent("scrapes.stop").path
            let scraper = """
                import os, sys, time, urllib.request
                out, stop = sys.argv[1], sys.argv[2]
                for _ in range(300):
                    text = urllib.request.urlopen('http://127.0.0.1:9464/metrics', timeout=5).read().decode()
                    value = [l.split()[-1] for l in text.splitlines() if l.startswith('tunneld_bytes_total{direction="tx"}')][0]
                    with open(out, 'a') as f: f.write(value + '\\n')
                    if os.path.exists(stop): break
                    time.sleep(0.1)
                """
            let child = try spawn(
                ["ip", "netns", "exec", lab.namespace("h1"), "python3", "-c", scraper, scrapes, stop],
                output: lab.directory.appendingPathComponent("scraper.log").path
            )
            defer { child.terminate() }
            #expect(lab.waitForFile(scrapes), "the scraper wrote nothing: \(lab.log("scraper"))")
            try transfer(lab, from: 1, to: 2, megabytes: 5)
            FileManager.default.createFile(atPath: stop, contents: nil)
            #expect(child.wait(timeout: .seconds(30)) == 0)
            let seen = try String(contentsOfFile: scrapes, encoding: .utf8).split(separator: "\n").compactMap {
                Double($0)
            }
            #expect(seen.count >= 2)
            #expect(zip(seen, seen.dropFirst()).allSatisfy { $0 <= $1 }, "a counter went back: \(seen)")
            #expect((seen.last ?? 0) - (seen.first ?? 0) >= Double(5 << 20), "\(seen)")

            // 20 scrapes at once while one client holds a connection open
            // without sending anything and another sends half a request:
            // every scrape is answered.
            let crowd = """
                import socket, threading, urllib.request
                silent = socket.create_connection(('127.0.0.1', 9464))
                half = socket.create_connection(('127.0.0.1', 9464)); half.sendall(b'GET /metrics HTTP/1.1\\r\\nHost: x\\r\\n')
                results = []
                def scrape(i):
                    path = '/metrics' if i % 2 else '/healthz'
                    try:
                        r = urllib.request.urlopen('http://127.0.0.1:9464' + path, timeout=5)
                        body = r.read().decode()
                        results.append(r.status == 200 and ('tunneld_packets_total' in body or 'running' in body))
                    except Exception as e:
                        results.append(False)
                threads = [threading.Thread(target=scrape, args=(i,)) for i in range(20)]
                [t.start() for t in threads]; [t.join(10) for t in threads]
                print('answered', sum(results), 'of', len(threads))
                silent.close(); half.close()
                """
            let answered = try lab.exec("h1", ["python3", "-c", crowd], timeout: .seconds(60)).output
            #expect(answered.contains("answered 20 of 20"), "\(answered)")
            #expect(try get(lab, host: 1, port: 9464, path: "/healthz").status == 200)
        }
    }

    /// Asks host `n` for its status (from inside its namespace).
    func status(_ lab: Lab, host n: Int, _ extra: [String] = [], check: Bool = true) throws -> CommandResult {
        try lab.exec(
            "h\(n)",
            [tunneldBinary, "status", "--control-socket", controlSocket(lab, n)] + extra,
            check: check
        )
    }

    func statusJSON(_ lab: Lab, host n: Int, _ extra: [String] = []) throws -> [String: Any] {
        let output = try status(lab, host: n, ["--json"] + extra).output
        let json = try JSONSerialization.jsonObject(with: Data(output.utf8))
        return try #require(json as? [String: Any], "not a JSON object: \(output)")
    }

    @Test func statusOfAThreeHostNetworkAsTableAndJSONFromTheDaemonThenFromTheStore() throws {
        try Lab.withLocalStore(config: seedConfig) { lab in
            for n in 1...3 { try lab.addHost(n, extra: hostArguments(lab, n)) }
            let bases = try (1...3).map { try base(lab, $0) }
            for (n, b) in zip(2...3, bases[1...]) {
                #expect(lab.waitForLog("h1", containing: "peer \(b) → peer 198.18.0.\(n):8285"))
            }
            let ping = try lab.ping(from: 1, to: 2)
            #expect(ping.succeeded, "\(ping.output)")

            let json = try statusJSON(lab, host: 1)
            #expect(json["source"] as? String == "daemon")
            let network = try #require(json["network"] as? [String: Any])
            #expect(network["network"] as? String == "10.2.0.0/16")
            #expect(network["backendType"] as? String == "udp")
            let node = try #require(json["node"] as? [String: Any])
            #expect(node["subnet"] as? String == bases[0])
            #expect(node["publicIP"] as? String == "198.18.0.1")
            #expect(node["interface"] as? String == "eth0")
            let expires = try #require(node["leaseExpires"] as? String)
            #expect((ISO8601DateFormatter().date(from: expires) ?? .distantPast) > Date())
            let peers = try #require(json["peers"] as? [[String: Any]])
            #expect(peers.compactMap { $0["subnet"] as? String }.sorted() == [bases[1], bases[2]].sorted())
            #expect(Set(peers.compactMap { $0["publicIP"] as? String }) == ["198.18.0.2", "198.18.0.3"])
            #expect(peers.allSatisfy { $0["backend"] as? String == "udp" && $0["lastChange"] is String })
            let backend = try #require(json["backend"] as? [String: Any])
            #expect(backend["device"] as? String == "tun0")
            #expect(backend["tableEntries"] as? Int == 3)
            #expect(backend["offloads"] is [String])
            let counters = try #require(json["counters"] as? [String: Any])
            #expect((counters["udp_packets_sent"] as? Int ?? 0) >= 3, "\(counters)")

            let table = try status(lab, host: 1).output
            #expect(table.contains("network: 10.2.0.0/16"), "\(table)")
            #expect(table.contains("node: \(bases[0])"))
            #expect(table.contains("peers: 2"))
            for (n, b) in zip(2...3, bases[1...]) {
                #expect(
                    table.split(separator: "\n").contains {
                        $0.contains(b) && $0.contains("198.18.0.\(n)") && $0.contains("udp")
                    },
                    "\(table)"
                )
            }
            #expect(table.contains("sent to peers:"))
            #expect(table.contains("daemon: running since"))

            // Host 1 stops (keeping its lease): status reads the store.
            try lab.lab("stop", "h1")
            let stored = try statusJSON(
                lab,
                host: 1,
                ["--store-dir", lab.storeDirectory, "--subnet-file", lab.subnetFile(1)]
            )
            #expect(stored["source"] as? String == "store")
            #expect((stored["node"] as? [String: Any])?["subnet"] as? String == bases[0])
            let storedPeers = try #require(stored["peers"] as? [[String: Any]])
            #expect(storedPeers.compactMap { $0["subnet"] as? String }.sorted() == [bases[1], bases[2]].sorted())
            let storedTable = try status(
                lab,
                host: 1,
                [
                    "--store-dir", lab.storeDirectory,
                    "--subnet-file", lab.subnetFile(1),
                ]
            ).output
            #expect(storedTable.contains("daemon: not asked"), "\(storedTable)")
            #expect(storedTable.contains("node: \(bases[0])"))

            // Neither a daemon nor a reachable store: both said, with what to do.
            let neither = try status(lab, host: 1, ["--etcd-endpoints", "http://127.0.0.1:1"], check: false)
            #expect(!neither.succeeded)
            #expect(neither.output.contains("tunneld is not running here"), "\(neither.output)")
            #expect(neither.output.contains("The store could not be read either"))
            #expect(neither.output.contains("--etcd-endpoints"))
        }
    }

    /// vxlan and host-gw export what applies to them: peers, lease, table,
    /// routes put back (no packet series: the kernel carries the packets).
    @Test(arguments: ["host-gw", "vxlan"])
    func kernelBackendsExportPeersLeaseAndTable(backend: String) throws {
        try Lab.withLocalStore(config: backendConfig(#"{"Type":"\#(backend)"}"#)) { lab in
            for n in 1...2 {
                try lab.addHost(
                    n,
                    command: [tunneldBinary, "run", "--iface", "eth0", "--subnet-file", lab.subnetFile(n)]
                        + hostArguments(lab, n) + (n == 1 ? ["--healthz-port", "9464"] : [])
                )
            }
            let peer = try LabLease(lab, host: 2)
            let ping = try lab.ping(from: 1, to: 2)
            #expect(ping.succeeded, "\(ping.output)")

            let json = try statusJSON(lab, host: 1)
            let reported = try #require(json["backend"] as? [String: Any])
            #expect(reported["type"] as? String == backend)
            #expect(reported["device"] as? String == (backend == "vxlan" ? "flannel.1" : nil))
            #expect(reported["tableEntries"] as? Int == 1)
            #expect((json["peers"] as? [[String: Any]])?.first?["backend"] as? String == backend)

            var values = series(try get(lab, host: 1, port: 9464, path: "/metrics").body)
            #expect(values["tunneld_build_info{version=\"0.1.0\",backend=\"\(backend)\"}"] == 1)
            #expect(values["tunneld_peers"] == 1)
            #expect(values["tunneld_table_entries"] == 1)
            #expect((values["tunneld_lease_expiry_timestamp_seconds"] ?? 0) > Date().timeIntervalSince1970)
            #expect(values["tunneld_packets_total{direction=\"tx\"}"] == nil, "the kernel carries \(backend)'s packets")
            #expect(values["tunneld_routes_restored_total"] == 0)

            // Someone deletes the peer's route: put back, and counted.
            try lab.exec("h1", ["ip", "route", "del", peer.subnet])
            #expect(
                try lab.waitUntil(timeout: .seconds(25)) {
                    values = series(try get(lab, host: 1, port: 9464, path: "/metrics").body)
                    return values["tunneld_routes_restored_total"] == 1
                },
                "\(lab.log("h1"))"
            )
            #expect((values["tunneld_table_generation"] ?? 0) >= 1)
        }
    }
}
