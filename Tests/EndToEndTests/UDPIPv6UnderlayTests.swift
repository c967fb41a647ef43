import Foundation
import Testing

/// The udp backend over the IPv6 underlay (beyond flannel): IPv6 packets
/// between hosts that both have a PublicIPv6 travel in IPv6 datagrams, IPv4
/// packets in IPv4 ones as flannel's; a peer without a PublicIPv6 (a
/// flannel-format lease) gets everything over IPv4; and an IPv6-only network
/// runs on hosts whose underlay has no IPv4 address at all. Which underlay a
/// datagram took is read from iptables/ip6tables counters in the host's
/// namespace.
@Suite(.serialized, .enabled(if: canRunNamespaceTests, namespaceSkipReason))
struct UDPIPv6UnderlayTests {
    static let dualStackConfig =
        #"{"Network":"10.2.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:2::/48","Backend":{"Type":"udp"}}"#
    static let ipv6OnlyConfig =
        #"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:2::/48","Backend":{"Type":"udp"}}"#

    func command(_ lab: Lab, host n: Int, iface: String = "eth0", extra: [String] = []) -> [String] {
        [
            tunneldBinary, "run", "--store-dir", lab.storeDirectory, "--iface", iface,
            "--subnet-file", lab.subnetFile(n), "--device", "tun0",
            "--control-socket", lab.directory.appendingPathComponent("h\(n).sock").path,
        ] + extra
    }

    /// Counting rules (no target) for the datagrams host N sends to the
    /// backend port, one per underlay family (`ipv4` false: a host without IPv4).
    func countUnderlay(_ lab: Lab, host n: Int, ipv4: Bool = true) throws {
        if ipv4 { try lab.exec("h\(n)", ["iptables", "-I", "OUTPUT", "-p", "udp", "--dport", "8285"]) }
        try lab.exec("h\(n)", ["ip6tables", "-I", "OUTPUT", "-p", "udp", "--dport", "8285"])
    }

    /// Sends (a UDP_SEGMENT send passes the firewall as one packet) host N
    /// made to port 8285 over each underlay since the last reset.
    func underlayPackets(_ lab: Lab, host n: Int, ipv4: Bool = true) throws -> (v4: Int, v6: Int) {
        try underlayCounters(lab, host: n, ipv4: ipv4, column: 0)
    }

    /// Bytes host N sent to port 8285 over each underlay since the last reset.
    func underlayBytes(_ lab: Lab, host n: Int, ipv4: Bool = true) throws -> (v4: Int, v6: Int) {
        try underlayCounters(lab, host: n, ipv4: ipv4, column: 1)
    }

    func underlayCounters(_ lab: Lab, host n: Int, ipv4: Bool, column: Int) throws -> (v4: Int, v6: Int) {
        func value(_ tool: String) throws -> Int {
            let listing = try lab.hostOutput(n, [tool, "-L", "OUTPUT", "-v", "-x", "-n"])
            let line = try #require(listing.split(separator: "\n").first { $0.contains("udp dpt:8285") }, "\(listing)")
            return try #require(Int(line.split(separator: " ")[column]), "\(line)")
        }
        return (ipv4 ? try value("iptables") : 0, try value("ip6tables"))
    }

    func resetCounters(_ lab: Lab, host n: Int, ipv4: Bool = true) throws {
        if ipv4 { try lab.exec("h\(n)", ["iptables", "-Z", "OUTPUT"]) }
        try lab.exec("h\(n)", ["ip6tables", "-Z", "OUTPUT"])
    }

    @Test func ipv6PacketsTakeTheIPv6UnderlayAndIPv4PacketsTheIPv4One() throws {
        try Lab.withLocalStore(config: Self.dualStackConfig) { lab in
            for n in 1...2 { try lab.addHost(n, command: command(lab, host: n), ipv6: true) }
            let v4 = [try LabLease(lab, host: 1), try LabLease(lab, host: 2)]
            let v6 = [try LabLease6(lab, host: 1), try LabLease6(lab, host: 2)]
            #expect(
                lab.waitForLog(
                    "h1",
                    containing: "peer \(v4[1].subnet) → peer 198.18.0.2:8285, \(v6[1].subnet) → peer [fd18::2]:8285"
                ),
                "\(lab.log("h1"))"
            )
            // The IPv6 underlay's header is 20 bytes longer: 1500 − 48.
            #expect(try lab.subnetEnv(1)["FLANNEL_MTU"] == "1452")
            for n in 1...2 { try countUnderlay(lab, host: n) }

            for (from, to) in [(1, 2), (2, 1)] {
                try resetCounters(lab, host: from)
                let ping6 = try lab.ping6(from: from, to: to)
                #expect(ping6.succeeded, "\(ping6.output)")
                let afterPing6 = try underlayPackets(lab, host: from)
                #expect(afterPing6.v6 >= 3 && afterPing6.v4 == 0, "h\(from) ping6: \(afterPing6)")

                try resetCounters(lab, host: from)
                let ping = try lab.ping(from: from, to: to)
                #expect(ping.succeeded, "\(ping.output)")
                let afterPing = try underlayPackets(lab, host: from)
                #expect(afterPing.v4 >= 3 && afterPing.v6 == 0, "h\(from) ping: \(afterPing)")
            }
            // Full-size IPv6 packets (the tunnel's MTU, 1452) go through whole.
            let big = try lab.exec(
                "c1",
                ["ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", "-s", "1404", "-M", "do", try lab.containerIPv6(2)],
                timeout: .seconds(30),
                check: false
            )
            #expect(big.succeeded, "\(big.output)")
            try resetCounters(lab, host: 1)
            try transfer(lab, from: 1, to: 2, bytes: 8 << 20, ipv6: true)
            let bulk = try underlayBytes(lab, host: 1)
            #expect(bulk.v6 > 8 << 20 && bulk.v4 == 0, "IPv6 transfer, bytes: \(bulk)")

            try lab.lab("stop", "h1")
            try lab.lab("stop", "h2")
            let receiver = lab.dataPathCounters("h2")
            #expect(receiver["dropped_spoofed_source", default: 0] == 0, "\(receiver)")
            #expect(receiver["dropped_unknown_peer", default: 0] == 0, "\(receiver)")
        }
    }

    /// A host with no IPv6 underlay writes flannel's lease (PublicIPv6
    /// null): a host that has one still reaches it over IPv4, both families.
    @Test func aPeerWithoutAPublicIPv6GetsItsIPv6PacketsOverIPv4() throws {
        try Lab.withLocalStore(config: Self.dualStackConfig) { lab in
            try lab.addHost(1, command: command(lab, host: 1), ipv6: true)
            try lab.addHost(2, command: command(lab, host: 2), ipv6: false)
            let v4 = [try LabLease(lab, host: 1), try LabLease(lab, host: 2)]
            let v6 = [try LabLease6(lab, host: 1), try LabLease6(lab, host: 2)]
            #expect(
                lab.waitForLog("h1", containing: "peer \(v4[1].subnet) and \(v6[1].subnet) → peer 198.18.0.2:8285"),
                "\(lab.log("h1"))"
            )
            #expect(
                lab.waitForLog("h2", containing: "peer \(v4[0].subnet) and \(v6[0].subnet) → peer 198.18.0.1:8285"),
                "\(lab.log("h2"))"
            )
            try countUnderlay(lab, host: 1)
            try lab.expectPings(ipv4: false, ipv6: true)
            try resetCounters(lab, host: 1)
            try transfer(lab, from: 1, to: 2, bytes: 4 << 20, ipv6: true)
            let bulk = try underlayBytes(lab, host: 1)
            #expect(bulk.v4 > 4 << 20 && bulk.v6 == 0, "IPv6 transfer to a peer without PublicIPv6, bytes: \(bulk)")
        }
    }

    /// A host with only an IPv6 underlay and one with only IPv4 share no
    /// underlay: each says so in one line naming both sides' addresses and
    /// programs nothing for the other; nothing crosses.
    @Test func hostsWithNoUnderlayInCommonSayWhyInOneLine() throws {
        try Lab.withLocalStore(config: Self.ipv6OnlyConfig) { lab in
            // -iface by IPv6 address, as flanneld's -iface takes an address.
            try lab.addHost(1, command: command(lab, host: 1, iface: "fd18::1"), ipv6Only: true)
            try lab.addHost(2, command: command(lab, host: 2), ipv6: false)
            let v6 = [try LabLease6(lab, host: 1), try LabLease6(lab, host: 2)]
            #expect(
                lab.waitForLog(
                    "h2",
                    containing:
                        "peer subnet \(v6[0].subnet) is unreachable over udp: the peer has PublicIPv6 fd18::1 and this host PublicIP 198.18.0.2, no underlay in common; give this host an IPv6 address (-public-ipv6)"
                ),
                "\(lab.log("h2"))"
            )
            #expect(
                lab.waitForLog(
                    "h1",
                    containing:
                        "peer subnet \(v6[1].subnet) is unreachable over udp: the peer has PublicIP 198.18.0.2 and this host PublicIPv6 fd18::1, no underlay in common"
                ),
                "\(lab.log("h1"))"
            )
            let ping6 = try lab.ping6(from: 1, to: 2, attempts: 2)
            #expect(!ping6.succeeded, "\(ping6.output)")
        }
    }

    /// Hosts whose underlay has only IPv6 addresses (fd18::N/64, no
    /// 198.18.0.N): PublicIP 0.0.0.0 as flanneld writes it, everything over
    /// the IPv6 underlay, in the default tier (io_uring where the kernel
    /// has it), the system-call tier and flannel's simple loop.
    @Test(arguments: [[], ["--datapath", "syscall"], ["--datapath", "simple"]])
    func anIPv6OnlyNetworkRunsOnHostsWithOnlyAnIPv6Underlay(datapath: [String]) throws {
        try Lab.withLocalStore(config: Self.ipv6OnlyConfig) { lab in
            for n in 1...2 {
                try lab.addHost(n, command: command(lab, host: n, extra: datapath), ipv6Only: true)
            }
            let tier = datapath.last ?? "auto"
            #expect(
                lab.log("h1").contains(
                    tier == "simple" ? "simple data path" : tier == "syscall" ? "system-call" : "data path"
                ),
                "\(lab.log("h1"))"
            )
            let addresses = try lab.hostOutput(1, ["ip", "-4", "addr", "show", "dev", "eth0"])
            #expect(!addresses.contains("inet "), "\(addresses)")
            #expect(
                lab.log("h1").contains("public IP none (IPv6 underlay only), public IPv6 fd18::1"),
                "\(lab.log("h1"))"
            )
            let v6 = [try LabLease6(lab, host: 1), try LabLease6(lab, host: 2)]
            #expect(v6[0].subnet != v6[1].subnet)
            #expect(
                lab.waitForLog("h1", containing: "peer \(v6[1].subnet) → peer [fd18::2]:8285"),
                "\(lab.log("h1"))"
            )
            for n in 1...2 { try countUnderlay(lab, host: n, ipv4: false) }
            try lab.expectPings(ipv4: false, ipv6: true)
            try transfer(lab, from: 1, to: 2, bytes: (tier == "simple" ? 2 : 8) << 20, ipv6: true)
            try transfer(lab, from: 2, to: 1, bytes: 1 << 20, port: 5202, ipv6: true)
            #expect(try underlayBytes(lab, host: 1, ipv4: false).v6 > (tier == "simple" ? 2 : 8) << 20)

            // Started again: the same subnet, found by its PublicIPv6 (every
            // such host's PublicIP is 0.0.0.0).
            #expect(
                try lab.restartDaemon(2, untilLoggedTwice: "leased \(v6[1].subnet) for 0.0.0.0"),
                "\(lab.log("h2"))"
            )
            let after = try lab.ping6(from: 1, to: 2)
            #expect(after.succeeded, "\(after.output)")
        }
    }
}
