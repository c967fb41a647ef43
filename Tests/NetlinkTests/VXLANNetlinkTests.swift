import Foundation
import NetBase
import NetTestSupport
import Netlink
import Testing

struct EthernetAddressTests {
    @Test func aMACIsReadInEitherCaseAndWrittenLowerCaseAsGoWritesIt() throws {
        let mac = try #require(EthernetAddress("0E:3F:1a:02:9b:C4"))
        #expect(mac.bytes == [0x0e, 0x3f, 0x1a, 0x02, 0x9b, 0xc4])
        #expect(mac.description == "0e:3f:1a:02:9b:c4")
        #expect(EthernetAddress("0e-3f-1a-02-9b-c4") == mac)
    }

    @Test func somethingElseIsNoMAC() {
        for text in [
            "", "0e:3f:1a:02:9b", "0e:3f:1a:02:9b:c4:00", "0e:3f:1a:02:9b:zz", "e:3f:1a:02:9b:c4", "0e3f1a029bc4",
        ] {
            #expect(EthernetAddress(text) == nil, "\(text)")
        }
        #expect(EthernetAddress(bytes: [1, 2, 3]) == nil)
    }
}

/// vxlan devices, ARP and FDB entries in a namespace of their own, checked
/// with `ip` and `bridge`.
@Suite(.enabled(if: isRoot, needsRootMessage))
struct VXLANNetlinkTests {
    /// eth0 (one end of a veth pair) at 198.18.0.1/24, the underlay, and flannel.1 on it.
    func withVXLAN<T>(_ body: (TestNamespace, RouteSocket, Int32, VXLANSettings) throws -> T) throws -> T {
        try withNamespace { ns in
            try ns.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
            try ns.ip("addr", "add", "198.18.0.1/24", "dev", "eth0")
            try ns.ip("link", "set", "eth0", "up")
            let socket = try ns.socket()
            defer { socket.close() }
            let settings = VXLANSettings(
                vni: 1,
                port: 8472,
                underlayIndex: try socket.linkIndex(named: "eth0"),
                localAddress: IPv4Address("198.18.0.1")
            )
            try socket.createVXLAN(name: "flannel.1", settings: settings, mtu: 1450)
            return try body(ns, socket, try socket.linkIndex(named: "flannel.1"), settings)
        }
    }

    @Test func aVXLANDeviceIsCreatedWithFlannelsSettingsAndReadBack() throws {
        try withVXLAN { ns, socket, index, settings in
            let shown = try ns.ip("-d", "-o", "link", "show", "flannel.1")
            for part in ["mtu 1450", "vxlan id 1", "local 198.18.0.1", "dev eth0", "dstport 8472", "nolearning"] {
                #expect(shown.contains(part), "\(part) missing from \(shown)")
            }
            #expect(try socket.vxlanSettings(index: index) == settings)
            #expect(try socket.link(index: index).kind == "vxlan")
            #expect(try socket.vxlanSettings(index: socket.linkIndex(named: "eth0")) == nil)
            let again = #expect(throws: SystemError.self) {
                try socket.createVXLAN(name: "flannel.1", settings: settings)
            }
            #expect(again?.errno == .exists)
            #expect(again?.hint?.contains("exists already") == true)
        }
    }

    @Test func gbpAndAChosenMACAreCarriedThrough() throws {
        try withNamespace { ns in
            try ns.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
            let socket = try ns.socket()
            defer { socket.close() }
            let settings = VXLANSettings(
                vni: 7,
                port: 4789,
                underlayIndex: try socket.linkIndex(named: "eth0"),
                localAddress: nil,
                gbp: true
            )
            let mac = try #require(EthernetAddress("0e:00:00:00:00:07"))
            try socket.createVXLAN(name: "flannel.7", settings: settings, hardwareAddress: mac)
            let link = try socket.link(named: "flannel.7")
            #expect(link.hardwareAddress == mac.bytes)
            #expect(try socket.vxlanSettings(index: link.index) == settings)
            #expect(try ns.ip("-d", "link", "show", "flannel.7").contains("gbp"))
        }
    }

    @Test func permanentARPAndFDBEntriesAreSetListedAndDeleted() throws {
        try withVXLAN { ns, socket, index, _ in
            let mac = try #require(EthernetAddress("8e:41:52:0a:93:1c"))
            let base = try #require(IPv4Address("10.2.7.0")), remote = try #require(IPv4Address("198.18.0.7"))
            try socket.setNeighbour(index: index, address: base, hardwareAddress: mac)
            try socket.setForwardingEntry(index: index, hardwareAddress: mac, remote: remote)
            // Setting them again replaces, it is no error.
            try socket.setNeighbour(index: index, address: base, hardwareAddress: mac)
            try socket.setForwardingEntry(index: index, hardwareAddress: mac, remote: remote)
            #expect(
                try ns.ip("neigh", "show", "dev", "flannel.1").contains("10.2.7.0 lladdr 8e:41:52:0a:93:1c PERMANENT")
            )
            let fdb = try command(["bridge", "-n", ns.name, "fdb", "show", "dev", "flannel.1"])
            #expect(fdb.contains("8e:41:52:0a:93:1c dst 198.18.0.7 self permanent"), "\(fdb)")
            let neighbours = try socket.neighbours(index: index)
            #expect(neighbours.contains { $0.address == base && $0.hardwareAddress == mac && $0.isPermanent })
            let entries = try socket.forwardingEntries(index: index)
            #expect(entries.contains { $0.address == remote && $0.hardwareAddress == mac })

            try socket.deleteNeighbour(index: index, address: base)
            try socket.deleteForwardingEntry(index: index, hardwareAddress: mac, remote: remote)
            #expect(try !ns.ip("neigh", "show", "dev", "flannel.1").contains("10.2.7.0"))
            #expect(
                try !command(["bridge", "-n", ns.name, "fdb", "show", "dev", "flannel.1"]).contains("8e:41:52:0a:93:1c")
            )
            #expect(try socket.neighbours(index: index).isEmpty)
            // Already gone: not an error.
            try socket.deleteNeighbour(index: index, address: base)
            try socket.deleteForwardingEntry(index: index, hardwareAddress: mac, remote: remote)
        }
    }

    @Test func anOnlinkRouteGoesThroughTheVXLANDevice() throws {
        try withVXLAN { ns, socket, index, _ in
            try socket.addAddress(index: index, address: IPv4Address("10.2.5.0")!, prefixLength: 32)
            try socket.setLinkUp(index: index)
            let route = Route(
                destination: IPv4Network("10.2.7.0/24")!,
                outputIndex: index,
                gateway: IPv4Address("10.2.7.0"),
                onlink: true
            )
            try socket.addRoute(route)
            #expect(try ns.ip("route", "show", "10.2.7.0/24").contains("via 10.2.7.0 dev flannel.1 onlink"))
            #expect(
                try socket.routes().contains {
                    $0.destination == route.destination && $0.onlink && $0.gateway == route.gateway
                }
            )
        }
    }
}
