import Foundation
import Observability
import Testing

@Suite struct StatusReportTests {
    let now = Date(timeIntervalSince1970: 1_800_000_000)

    @Test func jsonRoundTripsAndNamesFieldsForScripts() throws {
        let report = sampleReport(now: now)
        let bytes = report.json()
        #expect(try StatusReport.decode(json: bytes) == report)
        let object = try #require(try JSONSerialization.jsonObject(with: Data(bytes)) as? [String: Any])
        #expect(object["source"] as? String == "daemon")
        let node = try #require(object["node"] as? [String: Any])
        #expect(node["leaseExpires"] as? String == "2027-01-16T07:53:20Z")
        let peers = try #require(object["peers"] as? [[String: Any]])
        #expect(peers.map { $0["subnet"] as? String } == ["10.2.7.0/24", "10.2.100.0/24"])
        #expect(peers[1]["expires"] == nil, "a reservation has no expiry")
        #expect((object["counters"] as? [String: Any])?["udp_packets_sent"] as? Int == 10)
    }

    @Test func tableShowsNetworkNodePeersAndCounters() {
        let table = sampleReport(now: now).table(now: now)
        let lines = table.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        #expect(lines.first == "network: 10.2.0.0/16")
        #expect(lines.contains("  subnets: /24 from 10.2.1.0 to 10.2.254.0"))
        #expect(lines.contains("  backend: udp (port 8285)"))
        #expect(lines.contains("  daemon: running since 2027-01-15T06:57:55Z (1h2m ago), tunneld 0.1.0"))
        #expect(lines.contains("node: 10.2.5.0/24"))
        #expect(lines.contains("  public ip: 198.18.0.1"))
        #expect(lines.contains("  interface: eth0 (198.18.0.1)"))
        #expect(lines.contains("  lease expires: 2027-01-16T07:53:20Z (in 23h53m)"))
        #expect(lines.contains("  offloads: tun-vnet-hdr, udp-gso"))
        #expect(
            lines.contains("  tier: syscall (io_uring unusable (io_uring_queue_init failed: Operation not permitted))")
        )
        #expect(lines.contains("  table: 3 entries, generation 5"))
        #expect(lines.contains("peers: 2"))
        // Columns line up under their headers.
        let header = try! #require(lines.first { $0.contains("SUBNET") })
        let row = try! #require(lines.first { $0.contains("10.2.100.0/24") })
        #expect(header == "  SUBNET         PUBLIC-IP   BACKEND  LAST-CHANGE  EXPIRES")
        #expect(row == "  10.2.100.0/24  198.18.0.3  udp      5s ago       never (reservation)")
        #expect(lines.contains("  10.2.7.0/24    198.18.0.2  udp      1m30s ago    in 22h13m"))
        #expect(lines.contains("  sent to peers: 10 packets, 13.7 KiB (from 0 TUN reads)"))
        #expect(lines.contains("  batches: 4, 2.2 completions each on average"))
        #expect(lines.contains("  dropped: no_route=2"))
    }

    /// wireguard's mode separate has two devices, each with the offloads it chose.
    @Test func aBackendWithTwoDevicesShowsEachDevicesOffloads() throws {
        var report = sampleReport(now: now)
        report.backend?.offloads = ["tun-vnet-hdr"]
        report.backend?.deviceOffloads = [
            DeviceOffloads(device: "flannel-wg", offloads: ["tun-vnet-hdr", "udp-gso"]),
            DeviceOffloads(device: "flannel-wg-v6", offloads: ["tun-vnet-hdr"]),
        ]
        let lines = report.table(now: now).split(separator: "\n").map(String.init)
        #expect(lines.contains("  offloads flannel-wg: tun-vnet-hdr, udp-gso"), "\(lines)")
        #expect(lines.contains("  offloads flannel-wg-v6: tun-vnet-hdr"), "\(lines)")
        #expect(!lines.contains { $0.hasPrefix("  offloads: ") }, "\(lines)")
        let bytes = report.json()
        #expect(try StatusReport.decode(json: bytes) == report)
        let object = try #require(try JSONSerialization.jsonObject(with: Data(bytes)) as? [String: Any])
        let devices = (object["backend"] as? [String: Any])?["deviceOffloads"] as? [[String: Any]]
        #expect(devices?.map { $0["device"] as? String } == ["flannel-wg", "flannel-wg-v6"])
        // One device: the one line as before, and nothing more in the JSON.
        let single = sampleReport(now: now)
        #expect(single.table(now: now).contains("  offloads: tun-vnet-hdr, udp-gso\n"))
        let plain = try #require(try JSONSerialization.jsonObject(with: Data(single.json())) as? [String: Any])
        #expect((plain["backend"] as? [String: Any])?["deviceOffloads"] == nil)
    }

    @Test func tableFromTheStoreSaysSoAndHasNoDataPath() {
        var report = sampleReport(counters: [:], now: now)
        report.source = .store
        report.startedAt = nil
        report.backend = nil
        report.node = nil
        report.notes = ["no tunneld answers on /run/tunneld/tunneld.sock (No such file or directory)"]
        report.peers[0].lastChange = nil
        let table = report.table(now: now)
        #expect(table.contains("  daemon: not asked (read from the store)\n"))
        #expect(table.contains("node: no lease of this host found\n"))
        #expect(table.contains("rev 14"), "without a daemon, the last change is the lease's revision")
        #expect(!table.contains("data path:"))
        #expect(table.hasSuffix("note: no tunneld answers on /run/tunneld/tunneld.sock (No such file or directory)\n"))
    }

    @Test func anExpiredLeaseSaysHowLongAgo() {
        var report = sampleReport(now: now)
        report.node?.leaseExpires = now.addingTimeInterval(-120)
        #expect(report.table(now: now).contains("  lease expires: 2027-01-15T07:58:00Z (expired 2m0s ago)\n"))
    }
}
