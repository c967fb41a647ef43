import Foundation
import Testing

private let etcdInstalled =
    FileManager.default.isExecutableFile(atPath: "/usr/bin/etcd")
    && FileManager.default.isExecutableFile(atPath: "/usr/bin/etcdctl")

/// Benchmarks/scale/run --quick: a tunneld (udp, then host-gw) among 1,000
/// and 5,000 leases. No
/// figure is asserted (timing depends on the machine); what is checked is that
/// every step happened: all peers routed at READY, every single change and
/// every change of the burst seen, the new host joined and got every route.
@Suite(
    .serialized,
    .enabled(
        if: canRunNamespaceTests && etcdInstalled,
        "needs root (network namespaces) and etcd (apt-get install etcd-server etcd-client)"
    )
)
struct ScaleBenchmarkTests {
    @Test(.timeLimit(.minutes(5)))
    func quickScaleBenchmarkCompletesEveryStep() throws {
        let results = FileManager.default.temporaryDirectory
            .appendingPathComponent("tunneld-scale-test-\(getpid())-\(UInt32.random(in: 0..<0xffff))")
        defer { try? FileManager.default.removeItem(at: results) }
        let script = repositoryRoot.appendingPathComponent("Benchmarks/scale/run").path
        let benchmark = try run(
            [script, "--quick", "--tunneld", tunneldBinary, "--results", results.path],
            timeout: .seconds(230),
            check: false
        )
        #expect(benchmark.succeeded, "Benchmarks/scale/run --quick failed:\n\(benchmark.output)")

        let data = try Data(contentsOf: results.appendingPathComponent("results.json"))
        let json = try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        let sizes = try #require(json["results"] as? [[String: Any]])
        #expect(
            sizes.map { "\($0["backend"] ?? "") \($0["hosts"] ?? "")" }
                == ["udp 1000", "udp 5000", "host-gw 1000", "host-gw 5000"]
        )
        for size in sizes {
            let hosts = try #require(size["hosts"] as? Int)
            let name = "\(size["backend"] ?? "") \(hosts)"
            #expect(size["error"] == nil, "\(name): \(size["error"] ?? "")")
            #expect(size["peers_at_ready"] as? Int == hosts, "\(name): every peer in the table at READY")
            if size["backend"] as? String == "host-gw" {
                #expect(size["routes_at_ready"] as? Int == hosts, "\(name): every peer routed at READY")
            }
            #expect(size["samples_missed"] as? Int == 0, "\(name)")
            let put = try #require(size["put_to_route_ms"] as? [String: Any])
            #expect(put["n"] as? Int == 50, "\(name)")
            for burst in ["burst_put", "burst_delete"] {
                let figures = try #require(size[burst] as? [String: Any])
                #expect(figures["all_seen"] as? Bool == true, "\(name): \(burst) incomplete")
            }
            let join = try #require(size["join"] as? [String: Any])
            // The new host has every fake host and the first one as peers.
            #expect(join["peers_at_ready"] as? Int == hosts + 1, "\(name)")
            #expect(join["first_host_route_after_s"] is Double, "\(name): the first host never had the new one")
            #expect(size["rss_mib"] is Double, "\(name)")
        }
        // Nothing left behind: the namespaces carry the run's id.
        let namespaces = try run(["ip", "netns", "list"], check: false).output
        #expect(!namespaces.contains("tdscale-"), "leftover namespaces:\n\(namespaces)")
    }
}
