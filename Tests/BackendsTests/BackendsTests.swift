import Backends
import Foundation
import LeaseStore
import Logging
import NetBase
import NetTestSupport
import Netlink
import PeerControl
import Testing

func net(_ text: String) -> IPv4Network { IPv4Network(text, strict: true)! }
func ip(_ text: String) -> IPv4Address { IPv4Address(text)! }

func lease(_ subnet: String, _ publicIP: String, type: String? = nil, mac: String? = nil) -> Lease {
    Lease(
        subnet: net(subnet),
        attributes: LeaseAttributes(
            publicIP: ip(publicIP),
            backendType: type,
            backendData: mac.map { .object(["VNI": .number(1), "VtepMAC": .string($0)]) }
        ),
        expiration: Date().addingTimeInterval(3600),
        revision: 1
    )
}

let logger = Logger(label: "test")

/// A namespace with eth0 (one end of a veth pair) at 198.18.0.1/24: the underlay.
func withUnderlay<T>(_ body: (TestNamespace, RouteSocket, Link, InterfaceAddress) throws -> T) throws -> T {
    try withNamespace { ns in
        try ns.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
        try ns.ip("addr", "add", "198.18.0.1/24", "dev", "eth0")
        try ns.ip("link", "set", "eth0", "up")
        let socket = try ns.socket()
        defer { socket.close() }
        let link = try socket.link(named: "eth0")
        let address = try #require(try socket.addresses().first { $0.index == link.index })
        return try body(ns, socket, link, address)
    }
}

func vxlanConfig(port: Int = 8472, directRouting: Bool = false) throws -> NetworkConfig {
    try NetworkConfig(
        json: #"{"Network":"10.2.0.0/16","Backend":{"Type":"vxlan","Port":\#(port),"DirectRouting":\#(directRouting)}}"#
    )
}

/// The kernel backends against a real kernel, in a namespace of their own.
@Suite(.serialized, .enabled(if: isRoot, needsRootMessage))
struct KernelBackendsTests {
    func vxlan(
        _ socket: RouteSocket,
        _ link: Link,
        _ address: InterfaceAddress,
        config: NetworkConfig? = nil
    ) throws -> VXLANBackend {
        try VXLANBackend(
            host: HostContext(
                config: config ?? vxlanConfig(),
                underlay: link,
                underlayAddress: address,
                publicIP: address.address,
                routeSocket: socket,
                logger: logger
            )
        )
    }

    @Test func theVXLANLeaseCarriesTheDevicesMACAndARestartKeepsIt() throws {
        try withUnderlay { ns, socket, link, address in
            let first = try vxlan(socket, link, address)
            let attributes = try first.leaseAttributes()
            let mac = try ns.ip("-o", "link", "show", "flannel.1").split(separator: " ")
                .drop { $0 != "link/ether" }.dropFirst().first.map(String.init)
            #expect(
                attributes.flannelJSON
                    == #"{"PublicIP":"198.18.0.1","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":""#
                    + (mac ?? "?") + #""}}"#
            )
            #expect(first.mtu == 1450)
            // A new daemon (same settings) reuses the device and its MAC.
            let again = try vxlan(socket, link, address).leaseAttributes()
            #expect(again == attributes)
            // Other settings: the device is replaced.
            _ = try vxlan(socket, link, address, config: vxlanConfig(port: 4789)).leaseAttributes()
            #expect(try ns.ip("-d", "link", "show", "flannel.1").contains("dstport 4789"))
        }
    }

    @Test func movingToANewSubnetRemovesTheOldAddressFromTheVXLANDevice() throws {
        try withUnderlay { ns, socket, link, address in
            let backend = try vxlan(socket, link, address)
            _ = try backend.leaseAttributes()
            try backend.activate(lease: lease("10.2.5.0/24", "198.18.0.1"))
            #expect(try ns.ip("-o", "-4", "addr", "show", "dev", "flannel.1").contains("10.2.5.0/32"))
            try backend.move(from: lease("10.2.5.0/24", "198.18.0.1"), to: lease("10.2.9.0/24", "198.18.0.1"))
            let addresses = try ns.ip("-o", "-4", "addr", "show", "dev", "flannel.1")
            #expect(addresses.contains("10.2.9.0/32"))
            #expect(!addresses.contains("10.2.5.0"), "\(addresses)")
        }
    }

    @Test func aVXLANPeerGetsARPFDBAndRouteWhichFollowItsUpdatesAndGoWithIt() throws {
        try withUnderlay { ns, socket, link, address in
            let backend = try vxlan(socket, link, address)
            _ = try backend.leaseAttributes()
            try backend.activate(lease: lease("10.2.5.0/24", "198.18.0.1"))
            let peer = lease("10.2.7.0/24", "198.18.0.7", type: "vxlan", mac: "0e:00:00:00:00:07")
            #expect(backend.unusableReason(peer) == nil)
            #expect(
                backend.unusableReason(lease("10.2.8.0/24", "198.18.0.8", type: "vxlan"))?.contains("BackendData")
                    == true
            )
            backend.apply([.added(peer)])
            func fdb() throws -> String { try command(["bridge", "-n", ns.name, "fdb", "show", "dev", "flannel.1"]) }
            #expect(try ns.ip("route", "show", "10.2.7.0/24").contains("via 10.2.7.0 dev flannel.1 onlink"))
            #expect(
                try ns.ip("neigh", "show", "dev", "flannel.1").contains("10.2.7.0 lladdr 0e:00:00:00:00:07 PERMANENT")
            )
            #expect(try fdb().contains("0e:00:00:00:00:07 dst 198.18.0.7 self permanent"))

            // The peer restarted with a new device (MAC) on a new address.
            let moved = lease("10.2.7.0/24", "198.18.0.17", type: "vxlan", mac: "0e:00:00:00:00:17")
            backend.apply([.updated(old: peer, new: moved)])
            #expect(
                try ns.ip("neigh", "show", "dev", "flannel.1").contains("10.2.7.0 lladdr 0e:00:00:00:00:17 PERMANENT")
            )
            #expect(try fdb().contains("0e:00:00:00:00:17 dst 198.18.0.17 self permanent"))
            #expect(try !fdb().contains("0e:00:00:00:00:07"))
            #expect(try ns.ip("route", "show", "10.2.7.0/24").contains("via 10.2.7.0 dev flannel.1 onlink"))

            backend.apply([.removed(moved)])
            #expect(try ns.ip("route", "show", "10.2.7.0/24").isEmpty)
            #expect(try !ns.ip("neigh", "show", "dev", "flannel.1").contains("10.2.7.0"))
            #expect(try !fdb().contains("0e:00:00:00:00:17"))

            // Leaving the network takes the device with it.
            backend.cleanUp(releasing: true)
            #expect(try !ns.ip("-o", "link").contains("flannel.1"))
        }
    }

    @Test func aRestartRemovesTheEntriesOfPeersThatLeftMeanwhileAndKeepsTheOthers() async throws {
        let ns = try TestNamespace()
        defer { ns.remove() }
        try ns.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
        try ns.ip("addr", "add", "198.18.0.1/24", "dev", "eth0")
        try ns.ip("link", "set", "eth0", "up")
        let socket = try ns.socket()
        defer { socket.close() }
        let link = try socket.link(named: "eth0")
        let address = try #require(try socket.addresses().first { $0.index == link.index })
        let stays = lease("10.2.7.0/24", "198.18.0.7", type: "vxlan", mac: "0e:00:00:00:00:07")
        let leaves = lease("10.2.8.0/24", "198.18.0.8", type: "vxlan", mac: "0e:00:00:00:00:08")
        // The first run knew both peers, and stopped keeping its state.
        let before = try vxlan(socket, link, address)
        _ = try before.leaseAttributes()
        try before.activate(lease: lease("10.2.5.0/24", "198.18.0.1"))
        before.apply([.added(stays), .added(leaves)])
        before.cleanUp(releasing: false)
        #expect(try ns.ip("route").contains("10.2.8.0/24 via 10.2.8.0 dev flannel.1 onlink"))

        // The next run's list no longer has 10.2.8.0/24.
        let after = try vxlan(socket, link, address)
        _ = try after.leaseAttributes()
        try after.activate(lease: lease("10.2.5.0/24", "198.18.0.1"))
        after.apply([.added(stays)])
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await after.run() }
            defer { group.cancelAll() }
            let deadline = ContinuousClock.now + .seconds(5)
            while ContinuousClock.now < deadline, try ns.ip("route").contains("10.2.8.0") {
                try await Task.sleep(for: .milliseconds(50))
            }
        }
        let fdb = try command(["bridge", "-n", ns.name, "fdb", "show", "dev", "flannel.1"])
        let neighbours = try ns.ip("neigh", "show", "dev", "flannel.1")
        #expect(try !ns.ip("route").contains("10.2.8.0"))
        #expect(!neighbours.contains("10.2.8.0") && !fdb.contains("0e:00:00:00:00:08"), "\(neighbours)\n\(fdb)")
        #expect(try ns.ip("route").contains("10.2.7.0/24 via 10.2.7.0 dev flannel.1 onlink"))
        #expect(
            neighbours.contains("10.2.7.0 lladdr 0e:00:00:00:00:07 PERMANENT")
                && fdb.contains("0e:00:00:00:00:07 dst 198.18.0.7")
        )
    }

    @Test func directRoutingRoutesPeersOnOurSubnetWithoutTheTunnel() throws {
        try withUnderlay { ns, socket, link, address in
            let backend = try vxlan(socket, link, address, config: vxlanConfig(directRouting: true))
            _ = try backend.leaseAttributes()
            try backend.activate(lease: lease("10.2.5.0/24", "198.18.0.1"))
            backend.apply([
                .added(lease("10.2.7.0/24", "198.18.0.7", type: "vxlan", mac: "0e:00:00:00:00:07")),
                .added(lease("10.2.8.0/24", "198.19.0.8", type: "vxlan", mac: "0e:00:00:00:00:08")),
            ])
            #expect(try ns.ip("route", "show", "10.2.7.0/24").contains("via 198.18.0.7 dev eth0"))
            #expect(try !ns.ip("neigh", "show", "dev", "flannel.1").contains("10.2.7.0"))
            #expect(try ns.ip("route", "show", "10.2.8.0/24").contains("via 10.2.8.0 dev flannel.1 onlink"))
        }
    }

    @Test func hostGatewayRoutesReachablePeersSkipsUnreachableOnesAndRestoresDeletedRoutes() async throws {
        let ns = try TestNamespace()
        defer { ns.remove() }
        try ns.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
        try ns.ip("addr", "add", "198.18.0.1/24", "dev", "eth0")
        try ns.ip("link", "set", "eth0", "up")
        let socket = try ns.socket()
        defer { socket.close() }
        let link = try socket.link(named: "eth0")
        let address = try #require(try socket.addresses().first { $0.index == link.index })
        let config = try NetworkConfig(json: #"{"Network":"10.2.0.0/16","Backend":{"Type":"host-gw"}}"#)
        let backend = try HostGatewayBackend(
            host: HostContext(
                config: config,
                underlay: link,
                underlayAddress: address,
                publicIP: address.address,
                routeSocket: socket,
                logger: logger
            ),
            checkInterval: .milliseconds(100)
        )
        #expect(backend.mtu == 1500)
        #expect(
            try backend.leaseAttributes().flannelJSON
                == #"{"PublicIP":"198.18.0.1","PublicIPv6":null,"BackendType":"host-gw"}"#
        )
        backend.apply([
            .added(lease("10.2.7.0/24", "198.18.0.7", type: "host-gw")),
            .added(lease("10.2.8.0/24", "198.19.0.8", type: "host-gw")),
        ])
        #expect(try ns.ip("route", "show", "10.2.7.0/24").contains("via 198.18.0.7 dev eth0"))
        #expect(try ns.ip("route", "show", "10.2.8.0/24").isEmpty)
        // A route left by an earlier run for a subnet nobody has now.
        try ns.ip("route", "add", "10.2.99.0/24", "via", "198.18.0.99", "dev", "eth0")

        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await backend.run() }
            defer { group.cancelAll() }
            try ns.ip("route", "del", "10.2.7.0/24")
            let deadline = ContinuousClock.now + .seconds(5)
            var restored = false, staleGone = false
            while ContinuousClock.now < deadline && !(restored && staleGone) {
                try await Task.sleep(for: .milliseconds(50))
                restored = try ns.ip("route", "show", "10.2.7.0/24").contains("via 198.18.0.7 dev eth0")
                staleGone = try ns.ip("route", "show", "10.2.99.0/24").isEmpty
            }
            #expect(restored, "the deleted route was not put back")
            #expect(staleGone, "a route to a subnet no peer has was left")
        }
        backend.apply([.removed(lease("10.2.7.0/24", "198.18.0.7", type: "host-gw"))])
        #expect(try ns.ip("route", "show", "10.2.7.0/24").isEmpty)
    }

    @Test func hostGatewayRefusesAPublicIPThatIsNotTheInterfacesAddress() throws {
        try withUnderlay { _, socket, link, address in
            let config = try NetworkConfig(json: #"{"Network":"10.2.0.0/16","Backend":{"Type":"host-gw"}}"#)
            let error = #expect(throws: BackendError.self) {
                try HostGatewayBackend(
                    host: HostContext(
                        config: config,
                        underlay: link,
                        underlayAddress: address,
                        publicIP: ip("203.0.113.9"),
                        routeSocket: socket,
                        logger: logger
                    )
                )
            }
            #expect(error?.description.contains("host-gw needs the public IP to be the address of eth0") == true)
        }
    }

    @Test(.enabled(if: FileManager.default.fileExists(atPath: "/dev/net/tun"), "needs /dev/net/tun"))
    func movingToANewSubnetRemovesTheOldAddressFromTheTUN() throws {
        try withUnderlay { ns, socket, link, address in
            let config = try NetworkConfig(json: #"{"Network":"10.2.0.0/16","Backend":{"Type":"udp","Port":18285}}"#)
            let backend = try UDPBackend(
                host: HostContext(
                    config: config,
                    underlay: link,
                    underlayAddress: address,
                    publicIP: ip("198.18.0.1"),
                    routeSocket: socket,
                    logger: logger
                ),
                options: .init(device: "tun0", datapath: .simple)
            )
            #expect(backend.mtu == 1472)
            // The TUN and the socket are made in the namespace of the thread that opens them.
            try NetworkNamespace.run(inNamespaceAt: ns.path) {
                try backend.activate(lease: lease("10.2.5.0/24", "198.18.0.1"))
            }
            defer { backend.cleanUp(releasing: false) }
            try backend.move(from: lease("10.2.5.0/24", "198.18.0.1"), to: lease("10.2.9.0/24", "198.18.0.1"))
            let addresses = try ns.ip("-o", "-4", "addr", "show", "dev", "tun0")
            #expect(addresses.contains("10.2.9.0/32"))
            #expect(!addresses.contains("10.2.5.0"), "\(addresses)")
        }
    }
}
