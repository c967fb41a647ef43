import Foundation
import Testing

/// The wireguard backend with IPv6, laid out as flanneld lays it out by
/// `Mode`: two tunneld hosts in a dual-stack network (separate: flannel-wg
/// and flannel-wg-v6 on ListenPortV6 over the IPv6 underlay; auto: both
/// families on flannel-wg), and an IPv6-only network over the IPv6 underlay
/// (fd18::/64 inside the lab's namespaces).
extension WireGuardBackendTests {
    static func dualStackConfig(mode: String?) -> String {
        let mode = mode.map { #","Mode":"\#($0)""# } ?? ""
        return
            #"{"Network":"10.2.0.0/16","SubnetLen":24,"EnableIPv6":true,"IPv6Network":"fd00:10:2::/48","Backend":{"Type":"wireguard"\#(mode)}}"#
    }

    static let ipv6OnlyConfig =
        #"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:2::/48","Backend":{"Type":"wireguard"}}"#

    /// Host N's lease key, flanneld's dual-stack (or IPv6-only) one.
    func leaseKey(_ lab: Lab, _ n: Int, ipv4: Bool) throws -> String {
        let v6 = try LabLease6(lab, host: n).subnet.replacingOccurrences(of: "/", with: "-")
        let v4 = ipv4 ? try subnet(lab, n).replacingOccurrences(of: "/", with: "-") : "0.0.0.0-0"
        return "/docker/network/subnets/\(v4)&\(v6)"
    }

    /// The stored lease of host N under flanneld's key.
    func leaseValue(_ lab: Lab, _ n: Int, ipv4: Bool) throws -> String {
        try #require(try lab.etcdValue(leaseKey(lab, n, ipv4: ipv4)))
    }

    /// The wg_dropped_ counters of the daemon's stopped lines.
    func dropCounters(_ stopped: [Substring]) -> [Substring] {
        stopped.joined().split(separator: " ").filter { $0.hasPrefix("wg_dropped_") }
    }

    /// The daemons stopped: what they counted, without a drop, and the devices gone.
    func expectCleanStop(_ lab: Lab, devices: [String]) throws {
        try lab.lab("stop", "h1")
        try lab.lab("stop", "h2")
        for n in [1, 2] {
            let log = lab.log("h\(n)")
            #expect(log.contains("wg_packets_opened="), "\(log)")
            // The kernel's MLD reports (to ff02::16) have no peer and are counted apart; nothing else drops.
            let stopped = stoppedLines(log)
            #expect(stopped.count == 1, "\(log)")
            let drops = dropCounters(stopped)
            #expect(drops.allSatisfy { $0.hasPrefix("wg_dropped_multicast=") }, "\(drops)")
            // Full-size messages fit the IPv6 underlay (padding stops at the MTU), so the
            // kernel never refuses a UDP_SEGMENT send.
            #expect(!stopped.joined().contains("wg_udp_segmentation_refused="), "\(stopped)")
            #expect(stopped.joined().contains("wg_udp_segmented_sends="), "\(stopped)")
            for device in devices { #expect(log.contains("removed device \(device)"), "\(log)") }
        }
    }

    @Test func modeSeparateCarriesIPv6OnFlannelWgV6OverTheIPv6Underlay() throws {
        try withLab(config: Self.dualStackConfig(mode: nil)) { lab in
            try addTunneld(lab, 1, ipv6: true)
            try addTunneld(lab, 2, ipv6: true)
            let v6 = [try LabLease6(lab, host: 1), try LabLease6(lab, host: 2)]
            let subnet2 = try subnet(lab, 2)
            let key1 = try publicKey(ofKeyFile: keyFile(lab, 1))

            // flanneld's dual-stack lease: the one key in BackendData and BackendV6Data.
            #expect(
                try leaseValue(lab, 1, ipv4: true)
                    == #"{"PublicIP":"198.18.0.1","PublicIPv6":"fd18::1","BackendType":"wireguard","BackendData":{"PublicKey":"\#(key1)"},"BackendV6Data":{"PublicKey":"\#(key1)"}}"#
            )
            // flannel-wg-v6: the IPv6 subnet's address /128, the IPv6 network's route;
            // flannel-wg keeps IPv4 only.
            let addresses = try lab.hostOutput(1, ["ip", "-6", "addr", "show", "dev", "flannel-wg-v6"])
            #expect(addresses.contains("inet6 \(v6[0].base)/128"), "\(addresses)")
            let route6 = try lab.hostOutput(1, ["ip", "-6", "route", "show", "fd00:10:2::/48"])
            #expect(route6.contains("dev flannel-wg-v6"), "\(route6)")
            let route = try lab.hostOutput(1, ["ip", "route", "show", "10.2.0.0/16"])
            #expect(route.contains("dev flannel-wg "), "\(route)")
            #expect(try lab.hostOutput(1, ["ip", "link", "show", "flannel-wg-v6"]).contains("mtu 1420"))
            // Two sockets, as flanneld's two devices: 51820 on IPv4, 51821 on IPv6.
            let sockets = try lab.hostOutput(1, ["ss", "-ulnH"])
            #expect(sockets.contains("0.0.0.0:51820") && sockets.contains("[::]:51821"), "\(sockets)")

            let subnet1 = try subnet(lab, 1)
            // Each host has the other's peers before the first packet (none is dropped for want of one).
            #expect(
                lab.waitForLog("h1", containing: "peer \(v6[1].subnet) → [fd18::2]:51821"),
                "\(lab.log("h1"))"
            )
            #expect(lab.waitForLog("h1", containing: "peer \(subnet2) → 198.18.0.2:51820"), "\(lab.log("h1"))")
            #expect(lab.waitForLog("h2", containing: "peer \(v6[0].subnet) → [fd18::1]:51821"), "\(lab.log("h2"))")
            #expect(lab.waitForLog("h2", containing: "peer \(subnet1) → 198.18.0.1:51820"), "\(lab.log("h2"))")
            try lab.expectPings(ipv6: true)
            try transfer(lab, from: 1, to: 2, bytes: 20 << 20, ipv6: true)
            try transfer(lab, from: 2, to: 1, bytes: 20 << 20, ipv6: true)

            // Two tunnels in `tunneld status`: one per device, the IPv6 one at [fd18::2]:51821.
            let socket = lab.directory.appendingPathComponent("h1.sock").path
            let status = try lab.exec("h1", [tunneldBinary, "status", "--control-socket", socket]).output
            #expect(status.contains("tunnels: 2"), "\(status)")
            let line6 = status.split(separator: "\n").first { $0.contains(v6[1].subnet) }.map(String.init) ?? ""
            #expect(line6.contains("[fd18::2]:51821") && line6.contains("MiB received"), "\(status)")
            // Each device's offloads: each has its own TUN and socket.
            for device in ["flannel-wg", "flannel-wg-v6"] {
                let offloads = status.split(separator: "\n").first { $0.hasPrefix("  offloads \(device): ") } ?? ""
                #expect(
                    offloads.contains("tun-vnet-hdr") && offloads.contains("udp-gso") && offloads.contains("udp-gro"),
                    "\(status)"
                )
                // TSO6 on the device that carries IPv6 only.
                #expect(offloads.contains("tun-tso6") == (device == "flannel-wg-v6"), "\(status)")
            }
            try expectCleanStop(lab, devices: ["flannel-wg", "flannel-wg-v6"])
            // Full-size IPv6 messages fit the path unfragmented (padding stops at the MTU),
            // so the IPv6 transfers left in UDP_SEGMENT sends.
            // And the containers' IPv6 TCP reached flannel-wg-v6 as TSO6 super-packets.
            for n in [1, 2] {
                #expect(lab.log("h\(n)").contains("wg_udp_segmented_sends="), "\(lab.log("h\(n)"))")
                #expect(lab.log("h\(n)").contains("wg_tun_super_packets_read="), "\(lab.log("h\(n)"))")
            }
        }
    }

    @Test func modeAutoCarriesBothFamiliesOnFlannelWg() throws {
        try withLab(config: Self.dualStackConfig(mode: "auto")) { lab in
            try addTunneld(lab, 1, ipv6: true)
            try addTunneld(lab, 2, ipv6: true)
            let v6 = [try LabLease6(lab, host: 1), try LabLease6(lab, host: 2)]
            let subnet1 = try subnet(lab, 1), subnet2 = try subnet(lab, 2)
            // One device with both addresses and both routes; no flannel-wg-v6.
            let addresses = try lab.hostOutput(1, ["ip", "addr", "show", "dev", "flannel-wg"])
            #expect(
                addresses.contains("inet \(subnet1.replacingOccurrences(of: ".0/24", with: ".0/32"))"),
                "\(addresses)"
            )
            #expect(addresses.contains("inet6 \(v6[0].base)/128"), "\(addresses)")
            let route6 = try lab.hostOutput(1, ["ip", "-6", "route", "show", "fd00:10:2::/48"])
            #expect(route6.contains("dev flannel-wg "), "\(route6)")
            #expect(!(try lab.hostOutput(1, ["ip", "link"]).contains("flannel-wg-v6")))
            // One peer with both subnets; 198.18.0.2 is not private, so auto takes IPv4 as flanneld does.
            #expect(
                lab.waitForLog("h1", containing: "peer \(subnet2) and \(v6[1].subnet) → 198.18.0.2:51820"),
                "\(lab.log("h1"))"
            )
            #expect(
                lab.waitForLog("h2", containing: "peer \(subnet1) and \(v6[0].subnet) → 198.18.0.1:51820"),
                "\(lab.log("h2"))"
            )
            try lab.expectPings(ipv6: true)
            try transfer(lab, from: 1, to: 2, bytes: 20 << 20, ipv6: true)
            try transfer(lab, from: 2, to: 1, megabytes: 5)
            try expectCleanStop(lab, devices: ["flannel-wg"])
        }
    }

    @Test func modeIPv6CarriesBothFamiliesOverTheIPv6Underlay() throws {
        try withLab(config: Self.dualStackConfig(mode: "ipv6")) { lab in
            try startTwoHostsPeeredWithBothSubnets(lab, at: { "[fd18::\($0)]:51820" })
            let sockets = try lab.hostOutput(1, ["ss", "-ulnH"])
            #expect(sockets.contains("[::]:51820") && !sockets.contains("0.0.0.0:51820"), "\(sockets)")
            try lab.expectPings(ipv6: true)
            try transfer(lab, from: 1, to: 2, megabytes: 5)
            try expectCleanStop(lab, devices: ["flannel-wg"])
        }
    }

    /// Two dual-stack tunneld hosts whose flannel-wg has one peer each, for
    /// both of the other's subnets, at `endpoint(other host)`; their IPv6 leases.
    @discardableResult
    func startTwoHostsPeeredWithBothSubnets(_ lab: Lab, at endpoint: (Int) -> String) throws -> [LabLease6] {
        try addTunneld(lab, 1, ipv6: true)
        try addTunneld(lab, 2, ipv6: true)
        let v6 = [try LabLease6(lab, host: 1), try LabLease6(lab, host: 2)]
        for (n, other) in [(1, 2), (2, 1)] {
            let peer = "peer \(try subnet(lab, other)) and \(v6[other - 1].subnet) → \(endpoint(other))"
            #expect(lab.waitForLog("h\(n)", containing: peer), "\(lab.log("h\(n)"))")
        }
        return v6
    }

    /// Host N's UDP datagrams over IPv6 so far, received and sent (its namespace's /proc/net/snmp6).
    func udp6Datagrams(_ lab: Lab, _ n: Int) throws -> Int {
        let snmp6 = try lab.hostOutput(n, ["cat", "/proc/net/snmp6"])
        return snmp6.split(separator: "\n").reduce(0) { sum, line in
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            guard fields.count == 2, ["Udp6InDatagrams", "Udp6OutDatagrams"].contains(fields[0]) else { return sum }
            return sum + (Int(fields[1]) ?? 0)
        }
    }

    /// A dual-stack lease rewritten without BackendV6Data (what a host that
    /// writes only BackendData leaves): as flanneld, the peer keeps its
    /// flannel-wg side and loses its flannel-wg-v6 one, with one warning;
    /// the field back, the IPv6 side is peered again.
    @Test func aLeaseThatLosesItsBackendV6DataKeepsItsIPv4Peer() throws {
        try withLab(config: Self.dualStackConfig(mode: nil)) { lab in
            try addTunneld(lab, 1, ipv6: true)
            try addTunneld(lab, 2, ipv6: true)
            let v6 = [try LabLease6(lab, host: 1), try LabLease6(lab, host: 2)]
            let subnet2 = try subnet(lab, 2)
            let peer6 = "peer \(v6[1].subnet) → [fd18::2]:51821"
            #expect(lab.waitForLog("h1", containing: peer6), "\(lab.log("h1"))")
            let before = try lab.ping6(from: 1, to: 2)
            #expect(before.succeeded, "\(before.output)")

            let key = try leaseKey(lab, 2, ipv4: true)
            let full = try leaseValue(lab, 2, ipv4: true)
            let key2 = try publicKey(ofKeyFile: keyFile(lab, 2))
            let ipv4Side = full.replacingOccurrences(of: #","BackendV6Data":{"PublicKey":"\#(key2)"}"#, with: "")
            try #require(ipv4Side != full, "\(full)")
            try lab.etcdctl(["put", "--ignore-lease", key, ipv4Side])
            let warning =
                "peer \(subnet2) (198.18.0.2): its lease has no BackendV6Data.PublicKey (a wireguard lease carries {\"PublicKey\":\"…\"} there); no peer for \(v6[1].subnet) on flannel-wg-v6 (its IPv4 side is set up on its own"
            #expect(lab.waitForLog("h1", containing: warning), "\(lab.log("h1"))")
            let ping = try lab.ping(from: 1, to: 2)
            #expect(ping.succeeded, "\(ping.output)")
            let gone = try lab.ping6(from: 1, to: 2, count: 1, attempts: 1)
            #expect(!gone.succeeded, "\(gone.output)")
            let socket = lab.directory.appendingPathComponent("h1.sock").path
            let status = try lab.exec("h1", [tunneldBinary, "status", "--control-socket", socket]).output
            #expect(status.contains("tunnels: 1") && !status.contains(v6[1].subnet + " "), "\(status)")

            try lab.etcdctl(["put", "--ignore-lease", key, full])
            let deadline = ContinuousClock.now + .seconds(20)
            while lab.log("h1").components(separatedBy: peer6).count < 3 && ContinuousClock.now < deadline {
                usleep(100_000)
            }
            let after = try lab.ping6(from: 1, to: 2)
            #expect(after.succeeded, "\(after.output)")
            #expect(lab.log("h1").components(separatedBy: warning).count == 2, "said once: \(lab.log("h1"))")
        }
    }

    /// Mode ipv4 in a dual-stack network, as flanneld: flannel-wg carries
    /// both families (one peer per lease with both subnets) and listens on
    /// the IPv4 underlay only; no datagram goes over the IPv6 underlay,
    /// though the hosts have IPv6 addresses there.
    @Test func modeIPv4CarriesBothFamiliesOverTheIPv4UnderlayAlone() throws {
        try withLab(config: Self.dualStackConfig(mode: "ipv4")) { lab in
            let v6 = try startTwoHostsPeeredWithBothSubnets(lab, at: { "198.18.0.\($0):51820" })
            #expect(!(try lab.hostOutput(1, ["ip", "link"]).contains("flannel-wg-v6")))
            let sockets = try lab.hostOutput(1, ["ss", "-ulnH"])
            #expect(sockets.contains("0.0.0.0:51820") && !sockets.contains("[::]:51820"), "\(sockets)")
            let before = [try udp6Datagrams(lab, 1), try udp6Datagrams(lab, 2)]
            for (from, to) in [(1, 2), (2, 1)] {
                let ping6 = try lab.ping6(from: from, to: to)
                #expect(ping6.succeeded, "\(ping6.output)")
                let ping = try lab.ping(from: from, to: to)
                #expect(ping.succeeded, "\(ping.output)")
            }
            try transfer(lab, from: 1, to: 2, bytes: 5 << 20, ipv6: true)
            #expect([try udp6Datagrams(lab, 1), try udp6Datagrams(lab, 2)] == before, "UDP over the IPv6 underlay")
            // The one tunnel stayed at the IPv4 endpoint, and carried the IPv6 transfer.
            let socket = lab.directory.appendingPathComponent("h1.sock").path
            let status = try lab.exec("h1", [tunneldBinary, "status", "--control-socket", socket]).output
            #expect(status.contains("tunnels: 1"), "\(status)")
            let line = status.split(separator: "\n").first { $0.contains(v6[1].subnet) }.map(String.init) ?? ""
            #expect(line.contains("198.18.0.2:51820") && line.contains("MiB sent"), "\(status)")
            try expectCleanStop(lab, devices: ["flannel-wg"])
        }
    }

    /// Rekeying over the IPv6 underlay, as the IPv4 rekey test does it:
    /// host 1 runs WireGuard's clock 24 times as fast (a test hook), so the
    /// flannel-wg-v6 session it initiated is renewed every 5 s while a paced
    /// IPv6 transfer runs for ~12 s; every byte arrives. Only IPv6 is sent,
    /// so every handshake counted is flannel-wg-v6's.
    @Test func rekeyOverTheIPv6UnderlayDuringALongTransferIsSurvived() throws {
        try withLab(config: Self.dualStackConfig(mode: nil)) { lab in
            try addTunneld(lab, 1, prefix: ["env", "TUNNELD_TEST_WIREGUARD_CLOCK_RATE=24"], ipv6: true)
            try addTunneld(lab, 2, ipv6: true)
            #expect(lab.log("h1").contains("WireGuard's timers run 24 times as fast"), "\(lab.log("h1"))")
            let v6 = [try LabLease6(lab, host: 1), try LabLease6(lab, host: 2)]
            let subnet2 = try subnet(lab, 2)
            #expect(lab.waitForLog("h1", containing: "peer \(v6[1].subnet) → [fd18::2]:51821"), "\(lab.log("h1"))")
            #expect(lab.waitForLog("h2", containing: "peer \(v6[0].subnet) → [fd18::1]:51821"), "\(lab.log("h2"))")
            // Host 1 starts the handshake, so it is the side that rekeys.
            let first = try lab.ping6(from: 1, to: 2)
            #expect(first.succeeded, "\(first.output)")
            let before = try counters(lab, 1)["wg_handshakes_completed", default: 0]
            // ~12 s: 48 MiB in 256 KiB chunks every 50 ms.
            try transfer(lab, from: 1, to: 2, bytes: 48 << 20, ipv6: true, pace: (chunk: 256 << 10, seconds: 0.05))
            let after = try counters(lab, 1)
            #expect(after["wg_handshakes_completed", default: 0] >= before + 2, "\(after)")
            #expect(
                after["wg_dropped_bad_mac", default: 0] == 0 && after["wg_dropped_replay", default: 0] == 0,
                "\(after)"
            )
            // The rekeyed session is flannel-wg-v6's, at the IPv6 endpoint; flannel-wg never had one.
            let socket = lab.directory.appendingPathComponent("h1.sock").path
            let json = try lab.exec("h1", [tunneldBinary, "status", "--json", "--control-socket", socket]).output
            let object = try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any]
            let tunnels = (object?["backend"] as? [String: Any])?["tunnels"] as? [[String: Any]] ?? []
            let tunnel6 = tunnels.first { $0["subnet"] as? String == v6[1].subnet }
            #expect(tunnel6?["endpoint"] as? String == "[fd18::2]:51821", "\(json)")
            #expect(tunnel6?["hasSession"] as? Bool == true, "\(json)")
            let tunnel4 = tunnels.first { $0["subnet"] as? String == subnet2 }
            #expect(tunnel4 != nil && tunnel4?["latestHandshake"] == nil, "\(json)")
            let back = try lab.ping6(from: 2, to: 1)
            #expect(back.succeeded, "\(back.output)")
        }
    }

    @Test func anIPv6OnlyNetworkRunsOnFlannelWgV6OverTheIPv6Underlay() throws {
        try withLab(config: Self.ipv6OnlyConfig) { lab in
            try addTunneld(lab, 1, ipv6: true)
            try addTunneld(lab, 2, ipv6: true)
            let v6 = [try LabLease6(lab, host: 1), try LabLease6(lab, host: 2)]
            let key1 = try publicKey(ofKeyFile: keyFile(lab, 1))
            // flanneld's IPv6-only lease: BackendV6Data only.
            #expect(
                try leaseValue(lab, 1, ipv4: false)
                    == #"{"PublicIP":"198.18.0.1","PublicIPv6":"fd18::1","BackendType":"wireguard","BackendV6Data":{"PublicKey":"\#(key1)"}}"#
            )
            // flannel-wg-v6 alone, IPv6 only; no IPv4 socket, no IPv4 address or route.
            let links = try lab.hostOutput(1, ["ip", "link"])
            #expect(links.contains("flannel-wg-v6") && !links.contains("flannel-wg:"), "\(links)")
            let v4 = try lab.hostOutput(1, ["ip", "-4", "addr", "show", "dev", "flannel-wg-v6"])
            #expect(!v4.contains("inet "), "\(v4)")
            let sockets = try lab.hostOutput(1, ["ss", "-ulnH"])
            #expect(sockets.contains("[::]:51821") && !sockets.contains(":51820"), "\(sockets)")
            #expect(
                lab.waitForLog("h1", containing: "peer \(v6[1].subnet) → [fd18::2]:51821"),
                "\(lab.log("h1"))"
            )
            #expect(lab.waitForLog("h2", containing: "peer \(v6[0].subnet) → [fd18::1]:51821"), "\(lab.log("h2"))")
            try lab.expectPings(ipv4: false, ipv6: true)
            try transfer(lab, from: 1, to: 2, bytes: 20 << 20, ipv6: true)
            try transfer(lab, from: 2, to: 1, bytes: 5 << 20, ipv6: true)
            try expectCleanStop(lab, devices: ["flannel-wg-v6"])
        }
    }
}

/// Host 2 as flanneld sets up a dual-stack wireguard host in mode separate,
/// with Debian's wireguard-go: one key for two devices — the IPv4 one on
/// 51820 (its subnet's address /32, the network's route) and the IPv6 one on
/// 51821 (its IPv6 subnet's address /128, the IPv6 network's route) — each
/// with host 1 as its peer over that family's underlay; its dual-stack lease
/// in etcd and its subnet file.
struct WireguardGoDualStackHost {
    let subnet = "10.2.200.0/24"
    let subnet6: String
    let key: String
    let keyFile: String
    let device: String
    let device6: String

    init(_ lab: Lab, peerSubnet6: String) throws {
        // fd00:10:2:c8::/64, or c9 if host 1 holds that one.
        let hex = peerSubnet6.hasPrefix("fd00:10:2:c8::") ? "c9" : "c8"
        subnet6 = "fd00:10:2:\(hex)::/64"
        keyFile = lab.directory.appendingPathComponent("wgkey-2").path
        try run(["bash", "-c", "umask 077; wg genkey > \(keyFile)"])
        key = try run(["bash", "-c", "wg pubkey < \(keyFile)"]).output.trimmingCharacters(in: .whitespacesAndNewlines)
        device = "wg" + lab.name.suffix(9)
        device6 = "w6" + lab.name.suffix(9)
        try """
        FLANNEL_NETWORK=10.2.0.0/16
        FLANNEL_SUBNET=10.2.200.1/24
        FLANNEL_IPV6_NETWORK=fd00:10:2::/48
        FLANNEL_IPV6_SUBNET=fd00:10:2:\(hex)::1/64
        FLANNEL_MTU=1420
        FLANNEL_IPMASQ=false

        """.write(toFile: lab.subnetFile(2), atomically: true, encoding: .utf8)
        let data = #"{"PublicKey":"\#(key)"}"#
        try lab.etcdctl([
            "put", "/docker/network/subnets/10.2.200.0-24&fd00:10:2:\(hex)::-64",
            #"{"PublicIP":"198.18.0.2","PublicIPv6":"fd18::2","BackendType":"wireguard","BackendData":\#(data),"BackendV6Data":\#(data)}"#,
        ])
    }

    /// Starts both wireguard-go processes (the host's command runs the IPv4
    /// one; the IPv6 one is started in the host's namespace, and goes with
    /// it when the lab is destroyed) and configures them. Returns the IPv6
    /// one's PID.
    func start(_ lab: Lab, peerKey: String, peerSubnet: String, peerSubnet6: String) throws -> String {
        try lab.addHost(2, command: ["env", "WG_PROCESS_FOREGROUND=1", "wireguard-go", device], ipv6: true)
        let log6 = lab.directory.appendingPathComponent("wireguard-go-v6.log").path
        let pid = try lab.exec(
            "h2",
            [
                "bash", "-c",
                "WG_PROCESS_FOREGROUND=1 setsid wireguard-go \(device6) </dev/null >\(log6) 2>&1 & echo $!",
            ]
        ).output.trimmingCharacters(in: .whitespacesAndNewlines)
        WireguardGoHost.waitForControlSocket(device)
        WireguardGoHost.waitForControlSocket(device6)
        try WireguardGoHost.configure(
            lab,
            device: device,
            keyFile: keyFile,
            peerKey: peerKey,
            allowedIPs: peerSubnet,
            address: "10.2.200.0"
        )
        try WireguardGoHost.configure(
            lab,
            device: device6,
            keyFile: keyFile,
            port: 51821,
            peerKey: peerKey,
            endpoint: "[fd18::1]:51821",
            allowedIPs: peerSubnet6,
            address: String(subnet6.dropLast(3)),
            ipv6: true
        )
        return pid
    }
}

extension WireGuardBackendTests {
    @Test(.enabled(if: wireguardGoIsInstalled, wireguardGoSkipReason))
    func tunneldAndADualStackWireguardGoHostConfiguredLikeFlanneldAreEachOthersPeers() throws {
        try withLab(config: Self.dualStackConfig(mode: nil)) { lab in
            try addTunneld(lab, 1, ipv6: true)
            let subnet1 = try subnet(lab, 1), v6 = try LabLease6(lab, host: 1)
            let key1 = try publicKey(ofKeyFile: keyFile(lab, 1))
            let go = try WireguardGoDualStackHost(lab, peerSubnet6: v6.subnet)
            let pid = try go.start(lab, peerKey: key1, peerSubnet: subnet1, peerSubnet6: v6.subnet)
            // Ours, and still that process: stopped before the lab goes (which would kill it too).
            defer {
                _ = try? run(
                    ["bash", "-c", "[ \"$(cat /proc/\(pid)/comm 2>/dev/null)\" = wireguard-go ] && kill \(pid)"],
                    check: false
                )
            }
            #expect(lab.waitForLog("h1", containing: "peer \(go.subnet) → 198.18.0.2:51820, key \(go.key)"))
            #expect(
                lab.waitForLog(
                    "h1",
                    containing: "peer \(go.subnet6) → [fd18::2]:51821, key \(go.key) on flannel-wg-v6"
                ),
                "\(lab.log("h1"))"
            )
            // wireguard-go starts the IPv6 handshake, tunneld the IPv4 one.
            try lab.expectPings(ipv4: false, ipv6: true, pairs: [(2, 1), (1, 2)])
            try lab.expectPings()
            let handshakes = try lab.exec("h2", ["wg", "show", go.device6, "latest-handshakes"]).output
            #expect(handshakes.contains(key1) && !handshakes.contains("\t0\n"), "\(handshakes)")
            let endpoints = try lab.exec("h2", ["wg", "show", go.device6, "endpoints"]).output
            #expect(endpoints.contains("[fd18::1]:51821"), "\(endpoints)")
            try transfer(lab, from: 1, to: 2, bytes: 20 << 20, ipv6: true)
            try transfer(lab, from: 2, to: 1, bytes: 20 << 20, ipv6: true)
            try lab.lab("stop", "h1")
            let stopped = stoppedLines(lab.log("h1"))
            let drops = dropCounters(stopped)
            #expect(drops.allSatisfy { $0.hasPrefix("wg_dropped_multicast=") }, "\(drops)")
            // Full-size messages fit the IPv6 underlay (padding stops at the MTU), so the
            // kernel never refuses a UDP_SEGMENT send.
            #expect(!stopped.joined().contains("wg_udp_segmentation_refused="), "\(stopped)")
            #expect(stopped.joined().contains("wg_udp_segmented_sends="), "\(stopped)")
        }
    }
}

extension WireGuardBackendTests {
    /// An IPv4-only host in a dual-stack network — a flanneld started
    /// without IPv6, played by wireguard-go set up as flanneld sets up an
    /// IPv4 host: a plain lease key (10.2.200.0-24), BackendData alone.
    /// flanneld peers such a lease on flannel-wg alone; so does tunneld, and
    /// says so once; flannel-wg-v6 gets no peer for it.
    @Test(.enabled(if: wireguardGoIsInstalled, wireguardGoSkipReason))
    func anIPv4OnlyLeaseInADualStackNetworkIsAnIPv4PeerAlone() throws {
        try withLab(config: Self.dualStackConfig(mode: nil)) { lab in
            try addTunneld(lab, 1, ipv6: true)
            let subnet1 = try subnet(lab, 1)
            let go = try WireguardGoHost(lab, peerSubnet: subnet1, peerKey: try publicKey(ofKeyFile: keyFile(lab, 1)))
            try go.start(lab)
            let plainKey = go.subnet.replacingOccurrences(of: "/", with: "-")
            let line =
                "peer \(go.subnet) → 198.18.0.2:51820, key \(go.key) on flannel-wg; its lease (\(plainKey)) has no IPv6 subnet: IPv4 only"
            #expect(lab.waitForLog("h1", containing: line), "\(lab.log("h1"))")
            for (from, to) in [(2, 1), (1, 2)] {
                let ping = try lab.ping(from: from, to: to)
                #expect(ping.succeeded, "\(ping.output)")
            }
            try transfer(lab, from: 1, to: 2, megabytes: 5)
            let log = lab.log("h1")
            #expect(log.components(separatedBy: line).count == 2, "said once: \(log)")
            #expect(!log.contains("cannot be used"), "\(log)")
            let socket = lab.directory.appendingPathComponent("h1.sock").path
            let status = try lab.exec("h1", [tunneldBinary, "status", "--control-socket", socket]).output
            #expect(status.contains("tunnels: 1"), "\(status)")
        }
    }
}
