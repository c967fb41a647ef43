import Foundation
import Testing

/// IPv6-only networks (`"EnableIPv4": false`), flannel's config put with
/// etcdctl: leases keyed `0.0.0.0-0&<IPv6 subnet>` as flanneld keys them,
/// subnet.env without the IPv4 lines, containers with IPv6 only. host-gw
/// routes via each peer's PublicIPv6; udp carries the IPv6 packets over the
/// IPv4 underlay, flannel0 without an IPv4 address.
@Suite(
    .serialized,
    .enabled(if: canRunNamespaceTests, namespaceSkipReason),
    .enabled(if: etcdIsInstalled, etcdSkipReason)
)
struct IPv6OnlyBackendTests {
    let etcd = EtcdBackendTests()
    let dual = DualStackBackendTests()

    /// flanneld's key of an IPv6-only lease.
    func leaseKey(_ lease: LabLease6) -> String {
        "/docker/network/subnets/0.0.0.0-0&" + lease.subnet.replacingOccurrences(of: "/", with: "-")
    }

    /// What every IPv6-only host has: the file without IPv4 lines, the key
    /// in flanneld's form, no IPv4 route of the overlay.
    func checkHost(_ lab: Lab, host n: Int, lease: LabLease6, value: String) throws {
        let env = try lab.subnetEnv(n)
        #expect(env["FLANNEL_NETWORK"] == nil && env["FLANNEL_SUBNET"] == nil, "\(env)")
        #expect(env["FLANNEL_IPV6_NETWORK"] == "fd00:10:2::/48")
        #expect(env["FLANNEL_MTU"] != nil && env["FLANNEL_IPMASQ"] != nil)
        #expect(try lab.etcdValue(leaseKey(lease)) == value)
        let routes = try lab.hostOutput(n, ["ip", "route"])
        #expect(!routes.contains("flannel0") && !routes.hasPrefix("0.0.0.0"), "\(routes)")
        #expect(routes.contains("default via 198.18.0.254"), "the underlay's default route stays: \(routes)")
    }

    @Test func hostGatewayRunsAnIPv6OnlyNetwork() throws {
        try etcd.withEtcdLab { lab in
            try lab.putNetworkConfig(.ipv6Only, backend: #"{"Type":"host-gw"}"#)
            let v6 = try dual.addTwoHosts(lab)
            #expect(v6[0].subnet != v6[1].subnet)
            for n in 1...2 {
                try checkHost(
                    lab,
                    host: n,
                    lease: v6[n - 1],
                    value: #"{"PublicIP":"198.18.0.\#(n)","PublicIPv6":"fd18::\#(n)","BackendType":"host-gw"}"#
                )
            }
            try dual.expectIPv6RoutesViaPeers(lab, v6)
            try dual.expectContainersReachEachOther(lab, .ipv6Only)

            // A flanneld host-gw lease of an IPv6-only network, as flanneld
            // writes it (no IPv4 address, so PublicIP 0.0.0.0): programmed,
            // and removed with its key.
            let key = "/docker/network/subnets/0.0.0.0-0&fd00:10:2:c8::-64"
            try lab.etcdctl(["put", key, #"{"PublicIP":"0.0.0.0","PublicIPv6":"fd18::9","BackendType":"host-gw"}"#])
            #expect(
                try lab.waitUntil {
                    try dual.route6(lab, host: 1, to: "fd00:10:2:c8::/64")?.contains("via fd18::9 dev eth0") ?? false
                },
                "\((try? dual.routes6(lab, host: 1)) ?? "")\n\(lab.log("h1"))"
            )
            try lab.etcdctl(["del", key])
            #expect(try lab.waitUntil { try dual.route6(lab, host: 1, to: "fd00:10:2:c8::/64") == nil })
            // A plain IPv4 key is no lease of this network: one line, no route.
            try lab.etcdctl([
                "put", "/docker/network/subnets/10.2.5.0-24", #"{"PublicIP":"198.18.0.5","BackendType":"host-gw"}"#,
            ])
            #expect(
                lab.waitForLog(
                    "h1",
                    containing: "lease key 10.2.5.0-24 (PublicIP 198.18.0.5) is no lease of this IPv6-only network"
                ),
                "\(lab.log("h1"))"
            )
            #expect(try !lab.hostOutput(1, ["ip", "route"]).contains("10.2.5.0"))
            let again = try lab.ping6(from: 1, to: 2)
            #expect(again.succeeded, "\(again.output)")
        }
    }

    @Test func udpRunsAnIPv6OnlyNetworkOverTheIPv4Underlay() throws {
        try etcd.withEtcdLab { lab in
            try lab.putNetworkConfig(.ipv6Only, backend: #"{"Type":"udp"}"#)
            // No IPv6 underlay: udp carries IPv6 inside IPv4 datagrams.
            let v6 = try dual.addTwoHosts(lab, extra: ["-ip-masq"], ipv6Underlay: false)
            for n in 1...2 {
                try checkHost(
                    lab,
                    host: n,
                    lease: v6[n - 1],
                    value: #"{"PublicIP":"198.18.0.\#(n)","PublicIPv6":null}"#
                )
            }
            // flannel0: the IPv6 base and the network's route, no IPv4 address.
            let v4Addresses = try lab.hostOutput(1, ["ip", "-4", "addr", "show", "dev", "flannel0"])
            #expect(!v4Addresses.contains("inet "), "\(v4Addresses)")
            let addresses = try lab.hostOutput(1, ["ip", "-6", "addr", "show", "dev", "flannel0"])
            #expect(addresses.contains("\(v6[0].base)/128"), "\(addresses)")
            #expect(
                try dual.route6(lab, host: 1, to: "fd00:10:2::/48")?.contains("dev flannel0") ?? false,
                "\((try? dual.routes6(lab, host: 1)) ?? "")"
            )
            #expect(
                lab.waitForLog("h1", containing: "peer \(v6[1].subnet) → peer 198.18.0.2:8285"),
                "\(lab.log("h1"))"
            )
            try dual.expectContainersReachEachOther(lab, .ipv6Only)
            // -ip-masq: IPv6 rules only.
            let nat6 = try lab.hostOutput(1, ["ip6tables", "-t", "nat", "-S"])
            #expect(nat6.contains("fd00:10:2::/48") && nat6.contains("MASQUERADE"), "\(nat6)")
            let nat4 = try lab.hostOutput(1, ["iptables", "-t", "nat", "-S"])
            #expect(!nat4.contains("MASQUERADE"), "\(nat4)")

            // Stopped and started again: the same IPv6 subnet (from the subnet file / its PublicIP).
            #expect(
                try lab.restartDaemon(2, untilLoggedTwice: "leased \(v6[1].subnet) for 198.18.0.2"),
                "\(lab.log("h2"))"
            )
            let after = try lab.ping6(from: 1, to: 2)
            #expect(after.succeeded, "\(after.output)")
        }
    }

    /// A reservation of an IPv6-only network, put with etcdctl the way
    /// flanneld writes such keys (PublicIP 0.0.0.0): the host with that
    /// PublicIPv6 gets the subnet and routes it, the key stays without a TTL
    /// (rewritten with the host's attributes), `tunneld leases` says so, and
    /// leaving the network with --release-on-exit leaves it in place.
    @Test func aReservationPutWithEtcdctlGoesToTheHostWithItsPublicIPv6() throws {
        try etcd.withEtcdLab { lab in
            try lab.putNetworkConfig(.ipv6Only, backend: #"{"Type":"host-gw"}"#)
            let key = "/docker/network/subnets/0.0.0.0-0&fd00:10:2:c8::-64"
            try lab.etcdctl(["put", key, #"{"PublicIP":"0.0.0.0","PublicIPv6":"fd18::2","BackendType":"host-gw"}"#])
            try lab.addHost(1, command: etcd.flanneldCommand(lab, host: 1), ipv6: true)
            try lab.addHost(
                2,
                command: etcd.flanneldCommand(lab, host: 2, extra: ["--release-on-exit"]),
                ipv6: true
            )
            let v6 = [try LabLease6(lab, host: 1), try LabLease6(lab, host: 2)]
            #expect(v6[1].subnet == "fd00:10:2:c8::/64", "\(lab.log("h2"))")
            #expect(v6[0].subnet != v6[1].subnet)
            #expect(
                try lab.etcdValue(key) == #"{"PublicIP":"198.18.0.2","PublicIPv6":"fd18::2","BackendType":"host-gw"}"#
            )
            let stored = try lab.etcdctl(["get", key, "-w", "json"]).output
            #expect(stored.contains("\"kvs\"") && !stored.contains("\"lease\""), "still no TTL: \(stored)")
            #expect(
                try lab.waitUntil {
                    try dual.route6(lab, host: 1, to: "fd00:10:2:c8::/64")?.contains("via fd18::2 dev eth0") ?? false
                },
                "\((try? dual.routes6(lab, host: 1)) ?? "")"
            )
            let ping6 = try lab.ping6(from: 1, to: 2)
            #expect(ping6.succeeded, "\(ping6.output)")
            let leases = try lab.exec(
                "h1",
                [tunneldBinary, "leases", "-etcd-endpoints=\(labEtcdEndpoint)", "-etcd-prefix=\(seedEtcdPrefix)"]
            ).output
            let line = leases.split(separator: "\n").first { $0.contains("fd00:10:2:c8::/64") }
            #expect(line?.contains("fd18::2") == true && line?.contains("never (reservation)") == true, "\(leases)")
            try lab.lab("stop", "h2")
            #expect(try lab.etcdValue(key) != nil, "a reservation outlives --release-on-exit: \(lab.log("h2"))")
        }
    }
}
