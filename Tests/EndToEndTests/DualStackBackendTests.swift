import Foundation
import Testing

/// A host's IPv6 subnet, from its subnet.env (FLANNEL_IPV6_SUBNET=fd00:10:2:48::1/64).
struct LabLease6 {
    /// "fd00:10:2:48::/64"
    var subnet: String
    /// "fd00:10:2:48::", the subnet's base: flannel-v6.1's address and the vtep gateway.
    var base: String

    init(_ lab: Lab, host n: Int) throws {
        let value = try #require(try lab.subnetEnv(n)["FLANNEL_IPV6_SUBNET"])
        let parts = value.split(separator: "/")
        try #require(parts.count == 2 && parts[0].hasSuffix("::1"), "FLANNEL_IPV6_SUBNET=\(value) is not X::1/N")
        base = String(parts[0].dropLast())
        subnet = "\(base)/\(parts[1])"
    }
}

/// The address families of the IPv6 tests' networks, as flannel's config
/// names them: both (10.2.0.0/16 and fd00:10:2::/48) or IPv6 only.
enum LabFamilies: String, CustomStringConvertible, Sendable {
    case dualStack = "dual stack"
    case ipv6Only = "IPv6 only"

    var description: String { rawValue }

    /// The config's keys for the networks.
    var configKeys: String {
        switch self {
        case .dualStack: #""Network":"10.2.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:2::/48""#
        case .ipv6Only: #""EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:2::/48""#
        }
    }
}

extension Lab {
    /// Puts flannel's network config for `families` with `backend` (its
    /// object, e.g. `{"Type":"vxlan"}`) and the `extra` keys (e.g.
    /// `"EnableNFTables":true`) at /docker/network/config with etcdctl, as a
    /// deployment does.
    func putNetworkConfig(_ families: LabFamilies, backend: String, extra: String = "") throws {
        let file = directory.appendingPathComponent("flannel-config.json")
        try "{\(families.configKeys),\(extra.isEmpty ? "" : extra + ",")\"Backend\":\(backend)}"
            .write(to: file, atomically: true, encoding: .utf8)
        try etcdctl(["put", "/docker/network/config"], input: file.path)
    }
}

/// IPv6 in dual-stack networks for the kernel backends, the deployment's
/// way: flannel's config put with etcdctl, hosts with an IPv6 underlay
/// (fd18::N/64 beside 198.18.0.N/24), containers with both families.
@Suite(
    .serialized,
    .enabled(if: canRunNamespaceTests, namespaceSkipReason),
    .enabled(if: etcdIsInstalled, etcdSkipReason)
)
struct DualStackBackendTests {
    let etcd = EtcdBackendTests()

    func routes6(_ lab: Lab, host n: Int) throws -> String { try lab.hostOutput(n, ["ip", "-6", "route"]) }

    /// The `ip -6 route` line for `subnet`, if there is one.
    func route6(_ lab: Lab, host n: Int, to subnet: String) throws -> Substring? {
        try routes6(lab, host: n).split(separator: "\n").first { $0.hasPrefix(subnet + " ") }
    }

    /// Starts hosts 1 and 2 with flanneld's flags (and `extra`), with an
    /// IPv6 underlay address each unless `ipv6Underlay` is false; their IPv6 leases.
    @discardableResult
    func addTwoHosts(_ lab: Lab, extra: [String] = [], ipv6Underlay: Bool = true) throws -> [LabLease6] {
        for n in 1...2 {
            try lab.addHost(n, command: etcd.flanneldCommand(lab, host: n, extra: extra), ipv6: ipv6Underlay)
        }
        return [try LabLease6(lab, host: 1), try LabLease6(lab, host: 2)]
    }

    /// host-gw: each host routes the other's IPv6 subnet via its PublicIPv6 (fd18::N).
    func expectIPv6RoutesViaPeers(_ lab: Lab, _ v6: [LabLease6]) throws {
        for (host, peer) in [(1, 1), (2, 0)] {
            #expect(
                try lab.waitUntil {
                    try route6(lab, host: host, to: v6[peer].subnet)?.contains("via fd18::\(peer + 1) dev eth0")
                        ?? false
                },
                "\((try? routes6(lab, host: host)) ?? "")\n\(lab.log("h\(host)"))"
            )
        }
    }

    /// The containers reach each other both ways over IPv6, and over IPv4
    /// too in a dual-stack network.
    func expectContainersReachEachOther(_ lab: Lab, _ families: LabFamilies) throws {
        for (from, to) in [(1, 2), (2, 1)] {
            let ping6 = try lab.ping6(from: from, to: to)
            #expect(ping6.succeeded, "c\(from) → c\(to) over IPv6: \(ping6.output)")
            if families == .dualStack {
                let ping = try lab.ping(from: from, to: to)
                #expect(ping.succeeded, "c\(from) → c\(to): \(ping.output)")
            }
        }
    }

    func leaseKey(_ lab: Lab, host n: Int) throws -> String {
        let v4 = try LabLease(lab, host: n), v6 = try LabLease6(lab, host: n)
        return "/docker/network/subnets/\(v4.key)&\(v6.subnet.replacingOccurrences(of: "/", with: "-"))"
    }

    @Test func vxlanCarriesIPv6OnFlannelV6WithFlanneldsLeaseAndEntries() throws {
        try etcd.withEtcdLab { lab in
            try lab.putNetworkConfig(.dualStack, backend: #"{"Type":"vxlan"}"#)
            let v6 = try addTwoHosts(lab)
            let v4 = [try LabLease(lab, host: 1), try LabLease(lab, host: 2)]

            // The lease is flanneld's dual-stack vxlan lease: the IPv6 device's MAC in BackendV6Data.
            let mac1 = try lab.vtepMAC(1), mac6 = try lab.vtepMAC(1, device: "flannel-v6.1")
            #expect(mac1 != mac6)
            #expect(
                try lab.etcdValue(leaseKey(lab, host: 1))
                    == #"{"PublicIP":"198.18.0.1","PublicIPv6":"fd18::1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":""#
                    + mac1 + #""},"BackendV6Data":{"VNI":1,"VtepMAC":""# + mac6 + #""}}"#
            )
            // The device: IPv6 underlay, the subnet's base /128, 20 bytes less MTU than flannel.1.
            let details = try lab.hostOutput(1, ["ip", "-d", "link", "show", "flannel-v6.1"])
            #expect(details.contains("vxlan id 1 local fd18::1 dev eth0"), "\(details)")
            #expect(details.contains("mtu 1430") && details.contains("dstport 8472") && details.contains("nolearning"))
            #expect(try lab.hostOutput(1, ["ip", "link", "show", "flannel.1"]).contains("mtu 1450"))
            #expect(try lab.subnetEnv(1)["FLANNEL_MTU"] == "1430")
            let addresses = try lab.hostOutput(1, ["ip", "-6", "addr", "show", "dev", "flannel-v6.1"])
            #expect(addresses.contains("inet6 \(v6[0].base)/128"), "\(addresses)")

            // Each host: neighbour, FDB entry and onlink route for the other's IPv6 subnet.
            for (host, peer) in [(1, 1), (2, 0)] {
                #expect(
                    try lab.waitUntil {
                        try route6(lab, host: host, to: v6[peer].subnet).map {
                            $0.contains("via \(v6[peer].base) dev flannel-v6.1") && $0.contains("onlink")
                        } ?? false
                    },
                    "\((try? routes6(lab, host: host)) ?? "")\n\(lab.log("h\(host)"))"
                )
                let peerMAC = try lab.vtepMAC(peer + 1, device: "flannel-v6.1")
                let neighbours = try lab.hostOutput(host, ["ip", "-6", "neigh", "show", "dev", "flannel-v6.1"])
                #expect(neighbours.contains("\(v6[peer].base) lladdr \(peerMAC) PERMANENT"), "\(neighbours)")
                let fdb = try lab.hostOutput(host, ["bridge", "fdb", "show", "dev", "flannel-v6.1"])
                #expect(fdb.contains("\(peerMAC) dst fd18::\(peer + 1) self permanent"), "\(fdb)")
                #expect(
                    try lab.hostOutput(host, ["ip", "route"]).contains(
                        "\(v4[peer].subnet) via \(v4[peer].base) dev flannel.1 onlink"
                    )
                )
            }

            // Containers reach each other over both families.
            try expectContainersReachEachOther(lab, .dualStack)

            // A route removed behind tunneld's back is put back by its check.
            try lab.exec("h1", ["ip", "-6", "route", "del", v6[1].subnet])
            #expect(
                lab.waitForLog("h1", containing: "restored route \(v6[1].subnet)", timeout: .seconds(30)),
                "\(lab.log("h1"))"
            )
        }
    }

    @Test func aFlanneldDualStackVXLANLeaseGetsIPv6EntriesAndLosesThemWithItsKey() throws {
        try etcd.withEtcdLab { lab in
            try lab.putNetworkConfig(.dualStack, backend: #"{"Type":"vxlan"}"#)
            try lab.addHost(1, command: etcd.flanneldCommand(lab, host: 1), ipv6: true)

            // What a dual-stack flanneld vxlan host at 198.18.0.9 / fd18::9 writes,
            // and an IPv4-only lease beside it (no IPv6 subnet in its key).
            let key = "/docker/network/subnets/10.2.200.0-24&fd00:10:2:c8::-64"
            try lab.etcdctl([
                "put", key,
                #"{"PublicIP":"198.18.0.9","PublicIPv6":"fd18::9","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"8e:41:52:0a:93:1c"},"BackendV6Data":{"VNI":1,"VtepMAC":"8e:41:52:0a:93:2c"}}"#,
            ])
            try lab.etcdctl([
                "put", "/docker/network/subnets/10.2.201.0-24",
                #"{"PublicIP":"198.18.0.10","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"8e:41:52:0a:93:3c"}}"#,
            ])
            #expect(
                try lab.waitUntil {
                    try route6(lab, host: 1, to: "fd00:10:2:c8::/64").map {
                        $0.contains("via fd00:10:2:c8:: dev flannel-v6.1") && $0.contains("onlink")
                    } ?? false
                },
                "\((try? routes6(lab, host: 1)) ?? "")\n\(lab.log("h1"))"
            )
            let neighbours = try lab.hostOutput(1, ["ip", "-6", "neigh", "show", "dev", "flannel-v6.1"])
            #expect(neighbours.contains("fd00:10:2:c8:: lladdr 8e:41:52:0a:93:2c PERMANENT"), "\(neighbours)")
            let fdb = try lab.hostOutput(1, ["bridge", "fdb", "show", "dev", "flannel-v6.1"])
            #expect(fdb.contains("8e:41:52:0a:93:2c dst fd18::9 self permanent"), "\(fdb)")
            // Its IPv4 side as before, and the IPv4-only peer gets only that.
            #expect(
                try lab.waitUntil {
                    try lab.hostOutput(1, ["ip", "route"]).contains("10.2.201.0/24 via 10.2.201.0 dev flannel.1 onlink")
                }
            )
            let routes = try lab.hostOutput(1, ["ip", "route"])
            #expect(routes.contains("10.2.200.0/24 via 10.2.200.0 dev flannel.1 onlink"), "\(routes)")
            #expect(
                try !lab.hostOutput(1, ["bridge", "fdb", "show", "dev", "flannel-v6.1"]).contains("8e:41:52:0a:93:3c")
            )
            #expect(
                try routes6(lab, host: 1).split(separator: "\n").filter {
                    $0.contains("flannel-v6.1") && $0.contains("via")
                }.count == 1
            )

            // The key goes: so do the entries of both families.
            try lab.etcdctl(["del", key])
            #expect(
                try lab.waitUntil { try route6(lab, host: 1, to: "fd00:10:2:c8::/64") == nil },
                "\((try? routes6(lab, host: 1)) ?? "")"
            )
            #expect(
                try !lab.hostOutput(1, ["ip", "-6", "neigh", "show", "dev", "flannel-v6.1"]).contains("fd00:10:2:c8::")
            )
            #expect(
                try !lab.hostOutput(1, ["bridge", "fdb", "show", "dev", "flannel-v6.1"]).contains("8e:41:52:0a:93:2c")
            )
            #expect(
                try lab.waitUntil { try !lab.hostOutput(1, ["ip", "route"]).contains("10.2.200.0/24") }
            )
        }
    }

    @Test func hostGatewayRoutesIPv6ViaEachPeersPublicIPv6() throws {
        try etcd.withEtcdLab { lab in
            try lab.putNetworkConfig(.dualStack, backend: #"{"Type":"host-gw"}"#)
            let v6 = try addTwoHosts(lab)
            #expect(
                try lab.etcdValue(leaseKey(lab, host: 1))
                    == #"{"PublicIP":"198.18.0.1","PublicIPv6":"fd18::1","BackendType":"host-gw"}"#
            )
            #expect(try lab.subnetEnv(1)["FLANNEL_MTU"] == "1500")
            try expectIPv6RoutesViaPeers(lab, v6)
            try expectContainersReachEachOther(lab, .dualStack)

            // flanneld's dual-stack host-gw lease; and one without a PublicIPv6:
            // one line for it, its IPv4 route kept, no IPv6 route.
            let key = "/docker/network/subnets/10.2.200.0-24&fd00:10:2:c8::-64"
            try lab.etcdctl(["put", key, #"{"PublicIP":"198.18.0.9","PublicIPv6":"fd18::9","BackendType":"host-gw"}"#])
            try lab.etcdctl([
                "put", "/docker/network/subnets/10.2.201.0-24&fd00:10:2:c9::-64",
                #"{"PublicIP":"198.18.0.10","PublicIPv6":null,"BackendType":"host-gw"}"#,
            ])
            #expect(
                try lab.waitUntil {
                    try route6(lab, host: 1, to: "fd00:10:2:c8::/64")?.contains("via fd18::9 dev eth0") ?? false
                },
                "\((try? routes6(lab, host: 1)) ?? "")"
            )
            #expect(
                lab.waitForLog(
                    "h1",
                    containing: "peer 10.2.201.0/24 has the IPv6 subnet fd00:10:2:c9::/64 but no PublicIPv6"
                ),
                "\(lab.log("h1"))"
            )
            #expect(
                try lab.waitUntil {
                    try lab.hostOutput(1, ["ip", "route"]).contains("10.2.201.0/24 via 198.18.0.10 dev eth0")
                }
            )
            #expect(try route6(lab, host: 1, to: "fd00:10:2:c9::/64") == nil)

            try lab.etcdctl(["del", key])
            #expect(try lab.waitUntil { try route6(lab, host: 1, to: "fd00:10:2:c8::/64") == nil })
            let ping6 = try lab.ping6(from: 1, to: 2)
            #expect(ping6.succeeded, "\(ping6.output)")
        }
    }

    /// udp (beyond flannel, whose udp backend has no IPv6): the TUN carries
    /// IPv6 packets too, over the IPv4 underlay, to peers whose lease has
    /// an IPv6 subnet; a flannel udp host's plain lease gets IPv4 only.
    /// IPv6 TCP and UDP between containers go through the offloads as IPv4
    /// does: TSO6 and USO super-packets split on the sending host, segments
    /// coalesced into GSO_TCPV6/UDP_L4 writes on the receiving one.
    @Test func udpCarriesIPv6TrafficThroughTheOffloads() throws {
        try etcd.withEtcdLab { lab in
            try lab.putNetworkConfig(.dualStack, backend: #"{"Type":"udp"}"#)
            try addTwoHosts(lab)
            for host in ["h1", "h2"] {
                #expect(
                    lab.log(host).contains("tun csum+tso4+tso6+uso4"),
                    "\(host) should offer TSO6 to the kernel: \(lab.log(host))"
                )
            }
            let ping6 = try lab.ping6(from: 1, to: 2)
            #expect(ping6.succeeded, "\(ping6.output)")
            try offloadWorkout(lab, ipv6: true)
            try lab.lab("stop", "h1")
            try lab.lab("stop", "h2")
            let sender = lab.dataPathCounters("h1"), receiver = lab.dataPathCounters("h2")
            expectTheBulkWentThroughTheOffloads(sender: sender, receiver: receiver)
            #expect(receiver["dropped_spoofed_source", default: 0] == 0, "\(receiver)")
            #expect(receiver["dropped_malformed", default: 0] == 0, "\(receiver)")
        }
    }

    /// Hosts without an IPv6 underlay: IPv6 packets go inside IPv4
    /// datagrams (with one, see UDPIPv6UnderlayTests).
    @Test func udpCarriesIPv6PacketsOverTheIPv4Underlay() throws {
        try etcd.withEtcdLab { lab in
            try lab.putNetworkConfig(.dualStack, backend: #"{"Type":"udp"}"#)
            let v6 = try addTwoHosts(lab, ipv6Underlay: false)
            let v4 = [try LabLease(lab, host: 1), try LabLease(lab, host: 2)]
            // flannel's udp lease (no BackendType) under the dual-stack key.
            let value = try #require(try lab.etcdValue(leaseKey(lab, host: 1)))
            #expect(value.hasPrefix(#"{"PublicIP":"198.18.0.1","PublicIPv6":null"#), "\(value)")
            #expect(!value.contains("BackendType"), "\(value)")
            let addresses = try lab.hostOutput(1, ["ip", "-6", "addr", "show", "dev", "flannel0"])
            #expect(addresses.contains("\(v6[0].base)/128"), "\(addresses)")
            #expect(
                try route6(lab, host: 1, to: "fd00:10:2::/48")?.contains("dev flannel0") ?? false,
                "\((try? routes6(lab, host: 1)) ?? "")"
            )
            #expect(
                lab.waitForLog("h1", containing: "peer \(v4[1].subnet) and \(v6[1].subnet) → peer 198.18.0.2:8285"),
                "\(lab.log("h1"))"
            )
            try expectContainersReachEachOther(lab, .dualStack)
            // Full-size IPv6 packets (the tunnel's MTU, 1472) go through whole.
            let big = try lab.exec(
                "c1",
                ["ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", "-s", "1424", "-M", "do", try lab.containerIPv6(2)],
                timeout: .seconds(30),
                check: false
            )
            #expect(big.succeeded, "\(big.output)")

            // A flannel udp host: a plain IPv4 key, no IPv6 for it.
            try lab.etcdctl([
                "put", "/docker/network/subnets/10.2.200.0-24", #"{"PublicIP":"198.18.0.9","PublicIPv6":null}"#,
            ])
            #expect(
                lab.waitForLog("h1", containing: "peer 10.2.200.0/24 → peer 198.18.0.9:8285"),
                "\(lab.log("h1"))"
            )
            // The peer leaves (stopped, its lease deleted): its IPv6 subnet
            // is unreachable from then on.
            let key2 = try leaseKey(lab, host: 2)
            try lab.lab("stop", "h2")
            try lab.etcdctl(["del", key2])
            #expect(
                lab.waitForLog("h1", containing: "peer \(v4[1].subnet) is gone"),
                "\(lab.log("h1"))"
            )
            let gone = try lab.ping6(from: 1, to: 2, count: 1, attempts: 1)
            #expect(!gone.succeeded, "\(gone.output)")
            // The data path's ICMPv6 error, from the base of the subnet it has no peer for.
            #expect(
                gone.output.contains("From \(v6[1].base)") && gone.output.contains("Destination unreachable"),
                "\(gone.output)"
            )
        }
    }

}
