import Backends
import FlannelFiles
import Foundation
import LeaseStore
import Logging
import NetBase
import NetTestSupport
import Netlink
import PeerControl
import Testing

/// A dual-stack lease as flanneld writes it (key `10.2.7.0-24&fd00:10:2:7::-64`),
/// with a vxlan backend's data when `mac`/`mac6` are given.
func dualLease(
    _ subnet: String,
    _ ipv6Subnet: String?,
    _ publicIP: String,
    publicIPv6: String?,
    type: String,
    mac: String? = nil,
    mac6: String? = nil
) -> Lease {
    dualLease(
        subnet,
        ipv6Subnet,
        publicIP,
        publicIPv6: publicIPv6,
        type: type,
        data: mac.map { .object(["VNI": .number(1), "VtepMAC": .string($0)]) },
        data6: mac6.map { .object(["VNI": .number(1), "VtepMAC": .string($0)]) }
    )
}

/// A lease with any backend's data for each side (BackendData, BackendV6Data).
func dualLease(
    _ subnet: String,
    _ ipv6Subnet: String?,
    _ publicIP: String,
    publicIPv6: String?,
    type: String,
    data: JSONValue?,
    data6: JSONValue?
) -> Lease {
    Lease(
        subnet: net(subnet),
        ipv6Subnet: ipv6Subnet.map { IPv6Network($0, strict: true)! },
        attributes: LeaseAttributes(
            publicIP: ip(publicIP),
            publicIPv6: publicIPv6.map { IPv6Address($0)! },
            backendType: type,
            backendData: data,
            backendV6Data: data6
        ),
        expiration: Date().addingTimeInterval(3600),
        revision: 1
    )
}

/// The kernel backends in a dual-stack network, against a real kernel in a
/// namespace of their own: eth0 at 198.18.0.1/24 and fd18::1/64.
@Suite(.serialized, .enabled(if: isRoot, needsRootMessage))
struct DualStackBackendsTests {
    func withDualUnderlay<T>(
        _ body: (TestNamespace, HostContext) throws -> T,
        backend: String,
        extra: String = ""
    )
        throws -> T
    {
        try withUnderlay { ns, socket, link, address in
            try ns.ip("-6", "addr", "add", "fd18::1/64", "dev", "eth0", "nodad")
            let config = try NetworkConfig(
                json:
                    #"{"Network":"10.2.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:2::/48","Backend":{"Type":"\#(backend)"\#(extra)}}"#
            )
            let host = HostContext(
                config: config,
                underlay: link,
                underlayAddress: address,
                publicIP: address.address,
                publicIPv6: IPv6Address("fd18::1"),
                underlayIPv6: try socket.ipv6Addresses().filter {
                    $0.index == link.index && !$0.address.isLinkLocalUnicast
                },
                routeSocket: socket,
                logger: logger
            )
            return try body(ns, host)
        }
    }

    @Test func dualStackVXLANMakesFlannelV6AndWritesItsMACAsFlanneldDoes() throws {
        try withDualUnderlay(
            { ns, host in
                let backend = try VXLANBackend(host: host)
                #expect(backend.deviceNames == ["flannel.1", "flannel-v6.1"])
                #expect(backend.mtu == 1430)
                let attributes = try backend.leaseAttributes()
                func mac(_ device: String) throws -> String {
                    try ns.ip("-o", "link", "show", device).split(separator: " ").drop { $0 != "link/ether" }
                        .dropFirst()
                        .first.map(String.init) ?? "?"
                }
                #expect(
                    attributes.flannelJSON
                        == #"{"PublicIP":"198.18.0.1","PublicIPv6":"fd18::1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":""#
                        + (try mac("flannel.1")) + #""},"BackendV6Data":{"VNI":1,"VtepMAC":""#
                        + (try mac("flannel-v6.1"))
                        + #""}}"#
                )
                let details = try ns.ip("-d", "link", "show", "flannel-v6.1")
                #expect(details.contains("mtu 1430") && details.contains("local fd18::1 dev eth0"), "\(details)")
                #expect(try ns.ip("link", "show", "flannel.1").contains("mtu 1450"))
                // A restart reuses both devices and their MACs.
                #expect(try VXLANBackend(host: host).leaseAttributes() == attributes)

                let own = dualLease(
                    "10.2.5.0/24",
                    "fd00:10:2:5::/64",
                    "198.18.0.1",
                    publicIPv6: "fd18::1",
                    type: "vxlan"
                )
                try backend.activate(lease: own)
                #expect(try ns.ip("-6", "addr", "show", "dev", "flannel-v6.1").contains("inet6 fd00:10:2:5::/128"))
                let moved = dualLease(
                    "10.2.6.0/24",
                    "fd00:10:2:6::/64",
                    "198.18.0.1",
                    publicIPv6: "fd18::1",
                    type: "vxlan"
                )
                try backend.move(from: own, to: moved)
                let addresses = try ns.ip("-6", "addr", "show", "dev", "flannel-v6.1")
                #expect(addresses.contains("fd00:10:2:6::/128") && !addresses.contains("fd00:10:2:5::"), "\(addresses)")

                backend.cleanUp(releasing: true)
                #expect(try !ns.ip("-o", "link").contains("flannel"))
            },
            backend: "vxlan"
        )
    }

    @Test func aDualStackVXLANPeerGetsBothFamiliesAnIPv4OnlyPeerOnlyIPv4() throws {
        try withDualUnderlay(
            { ns, host in
                let backend = try VXLANBackend(host: host)
                _ = try backend.leaseAttributes()
                try backend.activate(
                    lease: dualLease(
                        "10.2.5.0/24",
                        "fd00:10:2:5::/64",
                        "198.18.0.1",
                        publicIPv6: "fd18::1",
                        type: "vxlan"
                    )
                )
                let dual = dualLease(
                    "10.2.7.0/24",
                    "fd00:10:2:7::/64",
                    "198.19.0.7",
                    publicIPv6: "fd19::7",
                    type: "vxlan",
                    mac: "0e:00:00:00:00:07",
                    mac6: "0e:00:00:00:06:07"
                )
                let v4only = lease("10.2.8.0/24", "198.19.0.8", type: "vxlan", mac: "0e:00:00:00:00:08")
                let noV6Data = dualLease(
                    "10.2.9.0/24",
                    "fd00:10:2:9::/64",
                    "198.19.0.9",
                    publicIPv6: "fd19::9",
                    type: "vxlan",
                    mac: "0e:00:00:00:00:09"
                )
                backend.apply([.added(dual), .added(v4only), .added(noV6Data)])
                func fdb6() throws -> String {
                    try command(["bridge", "-n", ns.name, "fdb", "show", "dev", "flannel-v6.1"])
                }
                let route = try ns.ip("-6", "route", "show", "fd00:10:2:7::/64")
                #expect(route.contains("via fd00:10:2:7:: dev flannel-v6.1") && route.contains("onlink"), "\(route)")
                #expect(
                    try ns.ip("-6", "neigh", "show", "dev", "flannel-v6.1").contains(
                        "fd00:10:2:7:: lladdr 0e:00:00:00:06:07 PERMANENT"
                    )
                )
                #expect(try fdb6().contains("0e:00:00:00:06:07 dst fd19::7 self permanent"))
                #expect(try ns.ip("route", "show", "10.2.7.0/24").contains("via 10.2.7.0 dev flannel.1 onlink"))
                // IPv4 only for the IPv4-only peer and for the one without BackendV6Data.
                #expect(try ns.ip("route", "show", "10.2.8.0/24").contains("dev flannel.1 onlink"))
                #expect(try ns.ip("route", "show", "10.2.9.0/24").contains("dev flannel.1 onlink"))
                #expect(try ns.ip("-6", "route", "show", "fd00:10:2:9::/64").isEmpty)
                #expect(try !fdb6().contains("0e:00:00:00:00:08") && !fdb6().contains("0e:00:00:00:00:09"))

                // The peer restarts with a new IPv6 device MAC and address.
                let moved = dualLease(
                    "10.2.7.0/24",
                    "fd00:10:2:7::/64",
                    "198.19.0.7",
                    publicIPv6: "fd19::17",
                    type: "vxlan",
                    mac: "0e:00:00:00:00:07",
                    mac6: "0e:00:00:00:06:17"
                )
                backend.apply([.updated(old: dual, new: moved)])
                #expect(try fdb6().contains("0e:00:00:00:06:17 dst fd19::17 self permanent"))
                #expect(try !fdb6().contains("0e:00:00:00:06:07"))
                #expect(try ns.ip("-6", "route", "show", "fd00:10:2:7::/64").contains("dev flannel-v6.1"))

                backend.apply([.removed(moved)])
                #expect(try ns.ip("-6", "route", "show", "fd00:10:2:7::/64").isEmpty)
                #expect(try !ns.ip("-6", "neigh", "show", "dev", "flannel-v6.1").contains("fd00:10:2:7::"))
                #expect(try !fdb6().contains("0e:00:00:00:06:17"))
                #expect(try ns.ip("route", "show", "10.2.7.0/24").isEmpty)
            },
            backend: "vxlan"
        )
    }

    @Test func directRoutingRoutesIPv6PeersOnOurLinkWithoutTheTunnel() throws {
        try withDualUnderlay(
            { ns, host in
                let backend = try VXLANBackend(host: host)
                _ = try backend.leaseAttributes()
                try backend.activate(
                    lease: dualLease(
                        "10.2.5.0/24",
                        "fd00:10:2:5::/64",
                        "198.18.0.1",
                        publicIPv6: "fd18::1",
                        type: "vxlan"
                    )
                )
                backend.apply([
                    .added(
                        dualLease(
                            "10.2.7.0/24",
                            "fd00:10:2:7::/64",
                            "198.18.0.7",
                            publicIPv6: "fd18::7",
                            type: "vxlan",
                            mac: "0e:00:00:00:00:07",
                            mac6: "0e:00:00:00:06:07"
                        )
                    ),
                    .added(
                        dualLease(
                            "10.2.8.0/24",
                            "fd00:10:2:8::/64",
                            "198.19.0.8",
                            publicIPv6: "fd19::8",
                            type: "vxlan",
                            mac: "0e:00:00:00:00:08",
                            mac6: "0e:00:00:00:06:08"
                        )
                    ),
                ])
                #expect(try ns.ip("-6", "route", "show", "fd00:10:2:7::/64").contains("via fd18::7 dev eth0"))
                #expect(try !ns.ip("-6", "neigh", "show", "dev", "flannel-v6.1").contains("fd00:10:2:7::"))
                #expect(
                    try ns.ip("-6", "route", "show", "fd00:10:2:8::/64").contains("via fd00:10:2:8:: dev flannel-v6.1")
                )
            },
            backend: "vxlan",
            extra: #","DirectRouting":true"#
        )
    }

    @Test func hostGatewayRoutesIPv6ViaPublicIPv6AndSkipsPeersWithoutOne() throws {
        try withDualUnderlay(
            { ns, host in
                let backend = try HostGatewayBackend(host: host)
                #expect(
                    try backend.leaseAttributes().flannelJSON
                        == #"{"PublicIP":"198.18.0.1","PublicIPv6":"fd18::1","BackendType":"host-gw"}"#
                )
                let dual = dualLease(
                    "10.2.7.0/24",
                    "fd00:10:2:7::/64",
                    "198.18.0.7",
                    publicIPv6: "fd18::7",
                    type: "host-gw"
                )
                let noPublicIPv6 = dualLease(
                    "10.2.8.0/24",
                    "fd00:10:2:8::/64",
                    "198.18.0.8",
                    publicIPv6: nil,
                    type: "host-gw"
                )
                let offLink = dualLease(
                    "10.2.9.0/24",
                    "fd00:10:2:9::/64",
                    "198.18.0.9",
                    publicIPv6: "fd19::9",
                    type: "host-gw"
                )
                let v4only = lease("10.2.10.0/24", "198.18.0.10", type: "host-gw")
                backend.apply([.added(dual), .added(noPublicIPv6), .added(offLink), .added(v4only)])
                #expect(try ns.ip("-6", "route", "show", "fd00:10:2:7::/64").contains("via fd18::7 dev eth0"))
                #expect(try ns.ip("-6", "route", "show", "fd00:10:2:8::/64").isEmpty)
                #expect(try ns.ip("-6", "route", "show", "fd00:10:2:9::/64").isEmpty)
                for (subnet, gateway) in [
                    ("10.2.7.0/24", "198.18.0.7"), ("10.2.8.0/24", "198.18.0.8"), ("10.2.9.0/24", "198.18.0.9"),
                    ("10.2.10.0/24", "198.18.0.10"),
                ] {
                    #expect(try ns.ip("route", "show", subnet).contains("via \(gateway) dev eth0"), "\(subnet)")
                }
                backend.apply([.removed(dual)])
                #expect(try ns.ip("-6", "route", "show", "fd00:10:2:7::/64").isEmpty)
                #expect(try ns.ip("route", "show", "10.2.7.0/24").isEmpty)
                backend.cleanUp(releasing: true)
                #expect(try !ns.ip("-6", "route").contains("fd00:10:2:"))
            },
            backend: "host-gw"
        )
    }

    @Test func aRestartRemovesTheIPv6EntriesOfPeersThatLeftMeanwhileAndPutsBackADeletedRoute() async throws {
        let ns = try TestNamespace()
        defer { ns.remove() }
        try ns.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
        try ns.ip("addr", "add", "198.18.0.1/24", "dev", "eth0")
        try ns.ip("-6", "addr", "add", "fd18::1/64", "dev", "eth0", "nodad")
        try ns.ip("link", "set", "eth0", "up")
        let socket = try ns.socket()
        defer { socket.close() }
        let link = try socket.link(named: "eth0")
        let address = try #require(try socket.addresses().first { $0.index == link.index })
        let host = HostContext(
            config: try NetworkConfig(
                json:
                    #"{"Network":"10.2.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:2::/48","Backend":{"Type":"vxlan"}}"#
            ),
            underlay: link,
            underlayAddress: address,
            publicIP: address.address,
            publicIPv6: IPv6Address("fd18::1"),
            underlayIPv6: try socket.ipv6Addresses().filter { $0.index == link.index },
            routeSocket: socket,
            logger: logger
        )
        let own = dualLease("10.2.5.0/24", "fd00:10:2:5::/64", "198.18.0.1", publicIPv6: "fd18::1", type: "vxlan")
        let stays = dualLease(
            "10.2.7.0/24",
            "fd00:10:2:7::/64",
            "198.19.0.7",
            publicIPv6: "fd19::7",
            type: "vxlan",
            mac: "0e:00:00:00:00:07",
            mac6: "0e:00:00:00:06:07"
        )
        let leaves = dualLease(
            "10.2.8.0/24",
            "fd00:10:2:8::/64",
            "198.19.0.8",
            publicIPv6: "fd19::8",
            type: "vxlan",
            mac: "0e:00:00:00:00:08",
            mac6: "0e:00:00:00:06:08"
        )
        let before = try VXLANBackend(host: host)
        _ = try before.leaseAttributes()
        try before.activate(lease: own)
        before.apply([.added(stays), .added(leaves)])
        before.cleanUp(releasing: false)
        #expect(try ns.ip("-6", "route", "show", "fd00:10:2:8::/64").contains("dev flannel-v6.1"))

        let after = try VXLANBackend(host: host, checkInterval: .milliseconds(100))
        _ = try after.leaseAttributes()
        try after.activate(lease: own)
        after.apply([.added(stays)])
        func fdb6() throws -> String { try command(["bridge", "-n", ns.name, "fdb", "show", "dev", "flannel-v6.1"]) }
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await after.run() }
            defer { group.cancelAll() }
            var deadline = ContinuousClock.now + .seconds(5)
            while ContinuousClock.now < deadline, try !ns.ip("-6", "route", "show", "fd00:10:2:8::/64").isEmpty {
                try await Task.sleep(for: .milliseconds(50))
            }
            // A route deleted behind its back is put back by the check.
            try ns.ip("-6", "route", "del", "fd00:10:2:7::/64")
            deadline = ContinuousClock.now + .seconds(5)
            while ContinuousClock.now < deadline, try ns.ip("-6", "route", "show", "fd00:10:2:7::/64").isEmpty {
                try await Task.sleep(for: .milliseconds(50))
            }
        }
        #expect(try ns.ip("-6", "route", "show", "fd00:10:2:8::/64").isEmpty)
        #expect(try !ns.ip("-6", "neigh", "show", "dev", "flannel-v6.1").contains("fd00:10:2:8::"))
        #expect(try !fdb6().contains("0e:00:00:00:06:08"))
        #expect(try ns.ip("-6", "route", "show", "fd00:10:2:7::/64").contains("via fd00:10:2:7:: dev flannel-v6.1"))
        #expect(try fdb6().contains("0e:00:00:00:06:07 dst fd19::7 self permanent"))
        #expect(
            try ns.ip("-6", "neigh", "show", "dev", "flannel-v6.1").contains(
                "fd00:10:2:7:: lladdr 0e:00:00:00:06:07 PERMANENT"
            )
        )
    }
}
