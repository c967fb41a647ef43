import CTunnel
import Glibc
import NetBase
import NetTestSupport
import Testing

@testable import Netlink

/// The bytes of a request as sent, read back as fields.
private struct Sent {
    let bytes: [UInt8]
    init(_ request: NetlinkRequest) { bytes = request.encoded(sequence: 1) }
    func u8(_ at: Int) -> Int { Int(bytes[at]) }
    func u16(_ at: Int) -> Int { Int(bytes[at]) | Int(bytes[at + 1]) << 8 }
    func u32(_ at: Int) -> Int { u16(at) | u16(at + 2) << 16 }
    /// The attributes after a header of `headerSize` bytes.
    func attributes(after headerSize: Int) -> NetlinkAttributes {
        NetlinkAttributes(parsing: bytes[(16 + headerSize)...])
    }
}

/// The IPv6 requests the kernel backends send in a dual-stack network,
/// checked byte by byte (no kernel needed).
@Suite struct IPv6RequestEncodingTests {
    let subnet = IPv6Network("fd00:10:2:48::/64")!
    let vtep = IPv6Address("fd00:10:2:48::")!
    let remote = IPv6Address("fd18::9")!
    let mac = EthernetAddress("8e:41:52:0a:93:2c")!

    @Test func anOnlinkIPv6RouteIsAnAFInet6UnicastRouteOfTheMainTable() {
        let route = IPv6Route(destination: subnet, outputIndex: 7, gateway: vtep, onlink: true)
        let sent = Sent(RouteSocket.ipv6RouteRequest(route, adding: true))
        #expect(sent.u16(4) == RTM_NEWROUTE)
        #expect(sent.u16(6) == Int(NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE))
        // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
        #expect(sent.u8(16) == Int(AF_INET6) && sent.u8(17) == 64)
        #expect(sent.u8(20) == Int(RT_TABLE_MAIN.rawValue) && sent.u8(21) == Int(RTPROT_BOOT))
        #expect(sent.u8(22) == Int(RT_SCOPE_UNIVERSE.rawValue) && sent.u8(23) == Int(RTN_UNICAST))
        #expect(sent.u32(24) == Int(RTNH_F_ONLINK))
        let attributes = sent.attributes(after: MemoryLayout<rtmsg>.size)
        #expect(attributes[type: RTA_DST.rawValue]?.value == subnet.address.bytes)
        #expect(attributes[type: RTA_OIF.rawValue]?.uint32 == 7)
        #expect(attributes[type: RTA_GATEWAY.rawValue]?.value == vtep.bytes)
        #expect(attributes[type: RTA_PRIORITY.rawValue] == nil)
    }

    @Test func deletingAnIPv6RouteMatchesAnyScopeProtocolAndMetric() {
        let route = IPv6Route(destination: subnet, outputIndex: 2, gateway: remote)
        let sent = Sent(RouteSocket.ipv6RouteRequest(route, adding: false))
        #expect(sent.u16(4) == RTM_DELROUTE)
        #expect(sent.u16(6) == Int(NLM_F_REQUEST))
        #expect(sent.u8(16) == Int(AF_INET6))
        #expect(sent.u8(21) == 0 && sent.u8(22) == Int(RT_SCOPE_NOWHERE.rawValue) && sent.u8(23) == 0)
        let attributes = sent.attributes(after: MemoryLayout<rtmsg>.size)
        #expect(attributes[type: RTA_GATEWAY.rawValue]?.ipv6Address == remote)
        #expect(attributes[type: RTA_PRIORITY.rawValue] == nil)
    }

    @Test func aBlackholeRouteHasTheSameShapeInBothFamilies() {
        let v4 = Sent(RouteSocket.blackholeRequest(IPv4Network("10.2.48.0/24")!, metric: .max, adding: true))
        let v6 = Sent(RouteSocket.blackholeRequest(subnet, metric: .max, adding: true))
        for (sent, family, length) in [(v4, AF_INET, 24), (v6, AF_INET6, 64)] {
            #expect(sent.u16(4) == RTM_NEWROUTE)
            #expect(sent.u8(16) == Int(family) && sent.u8(17) == length)
            #expect(sent.u8(20) == Int(RT_TABLE_MAIN.rawValue) && sent.u8(23) == Int(RTN_BLACKHOLE))
            let attributes = sent.attributes(after: MemoryLayout<rtmsg>.size)
            #expect(attributes[type: RTA_PRIORITY.rawValue]?.uint32 == UInt32.max)
            #expect(attributes[type: RTA_OIF.rawValue] == nil && attributes[type: RTA_GATEWAY.rawValue] == nil)
        }
        #expect(v6.attributes(after: MemoryLayout<rtmsg>.size)[type: RTA_DST.rawValue]?.ipv6Address == subnet.address)
        // Deleting names the type, so that a real route to the subnet is never taken with it.
        let deletion = Sent(RouteSocket.blackholeRequest(subnet, metric: .max, adding: false))
        #expect(deletion.u16(4) == RTM_DELROUTE && deletion.u8(23) == Int(RTN_BLACKHOLE))
        #expect(deletion.u8(22) == Int(RT_SCOPE_NOWHERE.rawValue))
    }

    @Test func anIPv6NeighbourIsPermanentWithItsAddressAndMAC() {
        let sent = Sent(RouteSocket.ipv6NeighbourRequest(adding: true, index: 9, address: vtep, hardwareAddress: mac))
        #expect(sent.u16(4) == RTM_NEWNEIGH)
        // ndmsg: family, pad×3, ifindex, state, flags, type.
        #expect(sent.u8(16) == Int(AF_INET6) && sent.u32(20) == 9)
        #expect(sent.u16(24) == Int(NUD_PERMANENT) && sent.u8(26) == 0)
        let attributes = sent.attributes(after: MemoryLayout<ndmsg>.size)
        #expect(attributes[type: NDA_DST]?.ipv6Address == vtep)
        #expect(attributes[type: NDA_LLADDR]?.value == mac.bytes)
    }

    @Test func anFDBEntryWithAnIPv6RemoteIsABridgeSelfEntry() {
        let sent = Sent(RouteSocket.ipv6ForwardingRequest(adding: true, index: 9, hardwareAddress: mac, remote: remote))
        #expect(sent.u16(4) == RTM_NEWNEIGH)
        #expect(sent.u8(16) == Int(AF_BRIDGE) && sent.u8(26) == Int(NTF_SELF))
        #expect(sent.u16(24) == Int(NUD_PERMANENT))
        let attributes = sent.attributes(after: MemoryLayout<ndmsg>.size)
        #expect(attributes[type: NDA_LLADDR]?.value == mac.bytes)
        #expect(attributes[type: NDA_DST]?.value.count == 16)
        #expect(attributes[type: NDA_DST]?.ipv6Address == remote)
    }

    @Test func theVTEPAddressIsA128WithoutDuplicateAddressDetection() throws {
        let sent = Sent(try RouteSocket.ipv6AddressRequest(adding: true, index: 4, address: vtep, prefixLength: 128))
        #expect(sent.u16(4) == RTM_NEWADDR)
        // ifaddrmsg: family, prefixlen, flags, scope, index.
        #expect(sent.u8(16) == Int(AF_INET6) && sent.u8(17) == 128 && sent.u8(18) == Int(IFA_F_NODAD))
        #expect(sent.u32(20) == 4)
        let attributes = sent.attributes(after: MemoryLayout<ifaddrmsg>.size)
        #expect(attributes[type: IFA_LOCAL]?.ipv6Address == vtep)
        #expect(attributes[type: IFA_ADDRESS]?.ipv6Address == vtep)
        #expect(throws: SystemError.self) {
            try RouteSocket.ipv6AddressRequest(adding: true, index: 4, address: vtep, prefixLength: 129)
        }
    }

    @Test func aVXLANDeviceWithAnIPv6UnderlayCarriesLocal6() throws {
        var request = NetlinkRequest(type: RTM_NEWLINK)
        request.append(attribute: IFLA_VXLAN_LOCAL6, address: remote)
        let attributes = NetlinkAttributes(parsing: request.encoded(sequence: 1)[16...])
        #expect(attributes[type: IFLA_VXLAN_LOCAL6]?.value == [0xfd, 0x18] + [UInt8](repeating: 0, count: 13) + [9])
    }
}

/// The same requests against a real kernel, in a namespace of their own.
@Suite(.enabled(if: isRoot, needsRootMessage))
struct IPv6NetlinkTests {
    @Test func blackholeRoutesOfBothFamiliesAreAddedListedAndDeletedWithoutTouchingRealRoutes() throws {
        try withNamespace { ns in
            try ns.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
            try ns.ip("addr", "add", "10.2.48.1/24", "dev", "eth0")
            try ns.ip("-6", "addr", "add", "fd00:10:2:48::1/64", "dev", "eth0", "nodad")
            try ns.ip("link", "set", "eth0", "up")
            let socket = try ns.socket()
            defer { socket.close() }
            let v4 = try #require(IPv4Network("10.2.48.0/24")), v6 = try #require(IPv6Network("fd00:10:2:48::/64"))
            for _ in 0..<2 {  // twice: kept, no error
                try socket.addBlackholeRoute(v4, metric: .max)
                try socket.addBlackholeRoute(v6, metric: .max)
            }
            #expect(
                try ns.ip("-6", "route", "show", "type", "blackhole").contains(
                    "blackhole \(v6) dev lo metric 4294967295"
                )
            )
            #expect(try ns.ip("-4", "route", "show", "type", "blackhole").contains("blackhole \(v4) metric 4294967295"))
            #expect(try socket.blackholeRoutes(IPv6Network.self).map(\.destination) == [v6])
            #expect(try socket.blackholeRoutes(IPv6Network.self).map(\.metric) == [.max])
            #expect(try socket.blackholeRoutes(IPv4Network.self).map(\.destination) == [v4])
            // The kernel's unicast routes to the same subnets are not blackhole routes, and stay.
            for _ in 0..<2 {
                try socket.deleteBlackholeRoute(v4, metric: .max)
                try socket.deleteBlackholeRoute(v6, metric: .max)
            }
            #expect(try socket.blackholeRoutes(IPv6Network.self).isEmpty)
            #expect(try socket.blackholeRoutes(IPv4Network.self).isEmpty)
            #expect(try socket.ipv6Routes().contains { $0.destination == v6 && $0.gateway == nil })
            #expect(try socket.routes().contains { $0.destination == v4 && $0.gateway == nil })
        }
    }

    @Test func flannelV6IsMadeWithItsEntriesAndRouteAndReadBack() throws {
        try withNamespace { ns in
            try ns.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
            try ns.ip("-6", "addr", "add", "fd18::1/64", "dev", "eth0", "nodad")
            try ns.ip("link", "set", "eth0", "up")
            let socket = try ns.socket()
            defer { socket.close() }
            let settings = VXLANSettings(
                vni: 1,
                port: 8472,
                underlayIndex: try socket.linkIndex(named: "eth0"),
                localAddress: nil,
                localIPv6: IPv6Address("fd18::1")
            )
            try socket.createVXLAN(name: "flannel-v6.1", settings: settings, mtu: 1430)
            let index = try socket.linkIndex(named: "flannel-v6.1")
            #expect(try socket.vxlanSettings(index: index) == settings)
            #expect(try ns.ip("-d", "link", "show", "flannel-v6.1").contains("local fd18::1 dev eth0"))

            let own = try #require(IPv6Address("fd00:10:2:5::"))
            try socket.addAddress(index: index, ipv6: own, prefixLength: 128)
            try socket.addAddress(index: index, ipv6: own, prefixLength: 128)  // again: no error
            try socket.setLinkUp(index: index)
            #expect(
                try socket.ipv6Addresses().contains { $0.index == index && $0.address == own && $0.prefixLength == 128 }
            )

            let mac = try #require(EthernetAddress("8e:41:52:0a:93:2c"))
            let vtep = try #require(IPv6Address("fd00:10:2:7::")), remote = try #require(IPv6Address("fd18::7"))
            try socket.setNeighbour(index: index, ipv6: vtep, hardwareAddress: mac)
            try socket.setForwardingEntry(index: index, hardwareAddress: mac, remote: remote)
            #expect(
                try ns.ip("-6", "neigh", "show", "dev", "flannel-v6.1").contains(
                    "fd00:10:2:7:: lladdr 8e:41:52:0a:93:2c PERMANENT"
                )
            )
            let fdb = try command(["bridge", "-n", ns.name, "fdb", "show", "dev", "flannel-v6.1"])
            #expect(fdb.contains("8e:41:52:0a:93:2c dst fd18::7 self permanent"), "\(fdb)")
            #expect(
                try socket.ipv6Neighbours(index: index).contains {
                    $0.ipv6Address == vtep && $0.hardwareAddress == mac && $0.isPermanent
                }
            )
            #expect(
                try socket.forwardingEntries(index: index).contains {
                    $0.ipv6Address == remote && $0.hardwareAddress == mac
                }
            )

            let route = IPv6Route(
                destination: try #require(IPv6Network("fd00:10:2:7::/64")),
                outputIndex: index,
                gateway: vtep,
                onlink: true
            )
            try socket.addRoute(route)
            try socket.addRoute(route)  // again: replaced, no error
            let shown = try ns.ip("-6", "route", "show", "fd00:10:2:7::/64")
            #expect(shown.contains("via fd00:10:2:7:: dev flannel-v6.1") && shown.contains("onlink"), "\(shown)")
            let listed = try socket.ipv6Routes().filter { $0.destination == route.destination }
            #expect(listed.count == 1 && listed.first?.gateway == vtep && listed.first?.onlink == true, "\(listed)")
            // The kernel's own route for the /128 (main table, no gateway) is listed as it is; the
            // backends' route keepers own only routes of SubnetLen with a gateway.
            #expect(try socket.ipv6Routes().contains { $0.destination.address == own && $0.gateway == nil })

            try socket.deleteRoute(route)
            try socket.deleteRoute(route)  // gone: no error
            #expect(try ns.ip("-6", "route", "show", "fd00:10:2:7::/64").isEmpty)
            try socket.deleteNeighbour(index: index, ipv6: vtep)
            try socket.deleteForwardingEntry(index: index, hardwareAddress: mac, remote: remote)
            #expect(try socket.ipv6Neighbours(index: index).filter(\.isPermanent).isEmpty)
            #expect(
                try !command(["bridge", "-n", ns.name, "fdb", "show", "dev", "flannel-v6.1"]).contains(
                    "8e:41:52:0a:93:2c"
                )
            )
            try socket.deleteAddress(index: index, ipv6: own, prefixLength: 128)
            #expect(try !socket.ipv6Addresses().contains { $0.address == own })
        }
    }
}
