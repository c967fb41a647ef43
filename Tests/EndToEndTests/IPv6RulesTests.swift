import Foundation
import Testing

/// What tunneld puts on a host beside the data path, for the IPv6 side of
/// dual-stack and IPv6-only networks: the blackhole route of the IPv6 subnet
/// (-ip-blackhole-route, one per family as flanneld adds them) and the IPv6
/// rules of EnableNFTables' one table, on hosts whose PATH has nft and no
/// iptables. flannel's config is put with etcdctl, as a deployment does.
@Suite(
    .serialized,
    .enabled(if: canRunNamespaceTests, namespaceSkipReason),
    .enabled(if: etcdIsInstalled, etcdSkipReason)
)
struct IPv6RulesTests {
    let etcd = EtcdBackendTests()
    let nft = NFTablesRulesTests()

    func blackholes(_ lab: Lab, _ n: Int, family: String) throws -> String {
        try lab.hostOutput(n, ["ip", family, "route", "show", "type", "blackhole"])
    }

    // MARK: - The blackhole route

    @Test func theIPv6SubnetGetsItsBlackholeRouteBesideTheIPv4OneKeptAndRemovedAlike() throws {
        try etcd.withEtcdLab { lab in
            try lab.putNetworkConfig(.dualStack, backend: #"{"Type":"udp"}"#)
            let flags = ["-ip-blackhole-route", "-iptables-resync=1"]
            try lab.addHost(1, command: etcd.flanneldCommand(lab, host: 1, extra: flags))
            try lab.addHost(2, command: etcd.flanneldCommand(lab, host: 2, extra: flags + ["--release-on-exit"]))
            let v4 = try LabLease(lab, host: 1), v6 = try LabLease6(lab, host: 1)
            let wanted6 = "blackhole \(v6.subnet) dev lo metric 4294967295"
            let wanted4 = "blackhole \(v4.subnet) metric 4294967295"
            #expect(try blackholes(lab, 1, family: "-6").contains(wanted6), "\(lab.log("h1"))")
            #expect(try blackholes(lab, 1, family: "-4").contains(wanted4))
            #expect(lab.log("h1").contains("blackhole route for \(v4.subnet) and \(v6.subnet)"), "\(lab.log("h1"))")
            // The bridge's route to the subnet wins: the container is reached over IPv6.
            let ping6 = try lab.ping6(from: 2, to: 1)
            #expect(ping6.succeeded, "c2 → c1 with h1's IPv6 blackhole route: \(ping6.output)")

            // Removed by someone: put back, the IPv4 one left alone.
            try lab.exec("h1", ["ip", "-6", "route", "del", "blackhole", v6.subnet, "metric", "4294967295"])
            #expect(
                try lab.waitUntil(timeout: .seconds(10)) { try blackholes(lab, 1, family: "-6").contains(wanted6) },
                "not put back: \(lab.log("h1"))"
            )
            #expect(lab.waitForLog("h1", containing: "put back the blackhole route for \(v6.subnet)"))
            #expect(!lab.log("h1").contains("put back the blackhole route for \(v4.subnet)"))

            // Kept over a stop (like the lease); removed when the host leaves the network.
            try lab.lab("stop", "h1")
            #expect(try blackholes(lab, 1, family: "-6").contains(wanted6))
            let h2 = try LabLease6(lab, host: 2)
            #expect(try blackholes(lab, 2, family: "-6").contains("blackhole \(h2.subnet) dev lo"))
            try lab.lab("stop", "h2")
            #expect(lab.log("h2").contains("removed the blackhole route for \(h2.subnet)"), "\(lab.log("h2"))")
            #expect(try blackholes(lab, 2, family: "-6").isEmpty && blackholes(lab, 2, family: "-4").isEmpty)
        }
    }

    @Test func anIPv6OnlyHostBlackholesOnlyItsIPv6Subnet() throws {
        try etcd.withEtcdLab { lab in
            try lab.putNetworkConfig(.ipv6Only, backend: #"{"Type":"host-gw"}"#)
            let flags = ["-ip-blackhole-route", "--release-on-exit"]
            try lab.addHost(1, command: etcd.flanneldCommand(lab, host: 1, extra: flags), ipv6: true)
            try lab.addHost(2, command: etcd.flanneldCommand(lab, host: 2), ipv6: true)
            let v6 = try LabLease6(lab, host: 1)
            #expect(
                try blackholes(lab, 1, family: "-6").contains("blackhole \(v6.subnet) dev lo metric 4294967295"),
                "\(lab.log("h1"))"
            )
            #expect(try blackholes(lab, 1, family: "-4").isEmpty)
            // An address of the subnet that no container has, once the
            // bridge no longer routes the subnet: dropped at h1.
            try lab.exec("h1", ["ip", "-6", "addr", "del", "\(v6.base)1/64", "dev", "cbr0"])
            let unused = "\(v6.base)ff"
            // The kernel answers a route lookup that ends in an IPv6 blackhole
            // with EINVAL (one that finds no route at all: "Network is unreachable").
            let route = try lab.exec("h1", ["ip", "-6", "route", "get", unused], check: false)
            #expect(!route.succeeded && route.output.contains("Invalid argument"), "\(unused): \(route.output)")
            try lab.lab("stop", "h1")
            #expect(try blackholes(lab, 1, family: "-6").isEmpty, "\(lab.log("h1"))")
        }
    }

    // MARK: - EnableNFTables

    /// Runs host N with the PATH holding only nft; its container has an
    /// IPv6 address and the host fd18::N beside 198.18.0.N.
    func addNFTHost(_ lab: Lab, _ n: Int, masquerade: Bool) throws {
        let path = try nft.nftOnlyPath(lab)
        try lab.addHost(
            n,
            command: ["env", "PATH=\(path)"]
                + etcd.flanneldCommand(lab, host: n, extra: (masquerade ? ["-ip-masq"] : []) + ["-iptables-resync=1"]),
            ipv6: true
        )
    }

    /// Checks that h1's table masquerades c1's IPv6 traffic leaving the
    /// network (seen as h1's fd18::1 at h2) and not its traffic to c2.
    func checkIPv6Masquerade(_ lab: Lab) throws {
        let outside = try UDPBackendTests().sourceSeen(lab, listener: "h2", at: "fd18::2", sender: "c1")
        #expect(outside == "fd18::1", "IPv6 traffic leaving the network should be masqueraded, seen from \(outside)")
        let c1 = try lab.containerIPv6(1)
        let inside = try UDPBackendTests().sourceSeen(lab, listener: "c2", at: try lab.containerIPv6(2), sender: "c1")
        #expect(inside == c1, "IPv6 traffic within the network keeps its address, seen from \(inside)")
    }

    @Test func aDualStackNetworksTableHoldsTheRulesOfBothFamiliesWithoutIptables() throws {
        try etcd.withEtcdLab { lab in
            try lab.putNetworkConfig(.dualStack, backend: #"{"Type":"host-gw"}"#, extra: #""EnableNFTables":true"#)
            try addNFTHost(lab, 1, masquerade: true)
            try addNFTHost(lab, 2, masquerade: false)
            let v4 = try LabLease(lab, host: 1), v6 = try LabLease6(lab, host: 1)
            let table = try #require(try nft.table(lab, "h1"), "\(lab.log("h1"))")
            for (k, network, subnet, multicast) in [
                ("ip", "10.2.0.0/16", v4.subnet, "224.0.0.0/4"), ("ip6", "fd00:10:2::/48", v6.subnet, "ff00::/8"),
            ] {
                #expect(table.contains("\(k) saddr \(network) \(k) daddr \(network) return"), "\(table)")
                #expect(table.contains("\(k) saddr \(network) \(k) daddr != \(multicast) masquerade"), "\(table)")
                #expect(table.contains("\(k) saddr != \(network) \(k) daddr \(subnet) return"), "\(table)")
                #expect(
                    table.contains("\(k) saddr \(network) accept") && table.contains("\(k) daddr \(network) accept")
                )
            }
            // Nothing through ip6tables or iptables.
            #expect(!(try lab.exec("h1", ["ip6tables-save"]).output.contains("TUNNELD")))
            #expect(!(try lab.exec("h1", ["iptables-save"]).output.contains("TUNNELD")))
            try checkIPv6Masquerade(lab)
            let outside4 = try UDPBackendTests().sourceSeen(lab, listener: "h2", at: "198.18.0.2", sender: "c1")
            #expect(outside4 == "198.18.0.1", "IPv4 leaving the network, seen from \(outside4)")

            // The IPv6 rules flushed: the table comes back whole.
            try lab.exec("h1", ["nft", "flush", "chain", "inet", "tunneld", "postrouting"])
            #expect(try nft.eventually { try nft.table(lab, "h1") == table }, "h1's flushed chain was not put back")
            try lab.lab("stop", "h1")
            #expect(try nft.table(lab, "h1") == nil)
        }
    }

    @Test func anIPv6OnlyNetworksTableHoldsOnlyIPv6RulesWithoutIptables() throws {
        try etcd.withEtcdLab { lab in
            try lab.putNetworkConfig(.ipv6Only, backend: #"{"Type":"host-gw"}"#, extra: #""EnableNFTables":true"#)
            try addNFTHost(lab, 1, masquerade: true)
            try addNFTHost(lab, 2, masquerade: false)
            let v6 = try LabLease6(lab, host: 1)
            let table = try #require(try nft.table(lab, "h1"), "\(lab.log("h1"))")
            #expect(table.contains("ip6 saddr != fd00:10:2::/48 ip6 daddr \(v6.subnet) return"), "\(table)")
            #expect(table.contains("ip6 saddr fd00:10:2::/48 ip6 daddr != ff00::/8 masquerade"), "\(table)")
            #expect(!table.contains("ip saddr") && !table.contains("ip daddr"), "no IPv4 rules: \(table)")
            let forward = try #require(try nft.table(lab, "h2"))
            #expect(forward.contains("ip6 daddr fd00:10:2::/48 accept") && !forward.contains("chain postrouting"))
            let ping6 = try lab.ping6(from: 1, to: 2)
            #expect(ping6.succeeded, "\(ping6.output)")
            try checkIPv6Masquerade(lab)
            try lab.lab("stop", "h1")
            #expect(try nft.table(lab, "h1") == nil)
        }
    }
}
