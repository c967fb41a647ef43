import CTunnel
import Foundation
import NetBase
import NetTestSupport
import Netlink
import Testing

@Suite(.enabled(if: !isRoot, "runs only without root: checks the hint for missing privileges"))
struct RouteSocketWithoutPrivilegeTests {
    /// rtnetlink checks CAP_NET_ADMIN before it looks at the request, so
    /// this changes nothing even where it is allowed (it would fail with
    /// ENODEV then).
    @Test func aChangeWithoutPrivilegeSaysWhatIsNeeded() throws {
        let socket = try RouteSocket()
        let error = #expect(throws: SystemError.self) { try socket.setLinkUp(index: 999_999) }
        #expect(error?.errno == .notPermitted)
        #expect(error?.hint?.contains("run as root or grant CAP_NET_ADMIN") == true)
    }

    @Test func readingNeedsNoPrivilege() throws {
        let socket = try RouteSocket()
        #expect(try socket.links().contains { $0.name == "lo" })
        let error = #expect(throws: SystemError.self) { try socket.linkIndex(named: "tdtest-none0") }
        #expect(error?.errno == .noSuchDevice)
    }
}

/// Each test works in a namespace of its own, through a RouteSocket opened
/// there, and checks the result with `ip -n`.
@Suite(.enabled(if: isRoot, needsRootMessage))
struct RouteSocketTests {
    /// vA and vB, a veth pair, with vA at 198.18.1.1/24 and up.
    @discardableResult
    func withVethPair<T>(_ body: (TestNamespace, RouteSocket, _ vA: Int32, _ vB: Int32) throws -> T) throws -> T {
        try withNamespace { ns in
            try ns.ip("link", "add", "vA", "type", "veth", "peer", "name", "vB")
            try ns.ip("addr", "add", "198.18.1.1/24", "dev", "vA")
            try ns.ip("link", "set", "vA", "up")
            try ns.ip("link", "set", "vB", "up")
            let socket = try ns.socket()
            return try body(ns, socket, try socket.linkIndex(named: "vA"), try socket.linkIndex(named: "vB"))
        }
    }

    @Test func aSocketOpenedInANamespaceSeesOnlyThatNamespace() throws {
        try withNamespace { ns in
            let links = try ns.socket().links()
            #expect(links.map(\.name) == ["lo"])
            #expect(links.first?.index == 1)
            #expect(links.first?.isUp == false)
            #expect(links.first?.mtu == 65536)
        }
    }

    @Test func openingASocketInAMissingNamespaceSaysHowToCreateIt() {
        let error = #expect(throws: SystemError.self) {
            try RouteSocket(namespacePath: "/var/run/netns/tdtest-none-\(getpid())")
        }
        #expect(error?.errno == .noSuchFile)
        #expect(error?.description.contains("ip netns add") == true)
    }

    @Test func linksShowKindMTUStateAndHardwareAddress() throws {
        try withVethPair { ns, socket, vA, _ in
            try ns.ip("link", "set", "vA", "mtu", "1400")
            let link = try #require(try socket.links().first { $0.name == "vA" })
            #expect(link.index == vA)
            #expect(link.mtu == 1400)
            #expect(link.isUp)
            #expect(link.kind == "veth")
            let mac = try ns.ip("-o", "link", "show", "vA").split(separator: " ").drop { $0 != "link/ether" }
                .dropFirst().first
            #expect(
                link.hardwareAddress?.map { String(format: "%02x", $0) }.joined(separator: ":") == mac.map(String.init)
            )
        }
    }

    @Test func setMTUAndUpDownChangeTheLinkAsIpSeesIt() throws {
        try withVethPair { ns, socket, _, vB in
            try socket.setMTU(index: vB, mtu: 1450)
            try socket.setLinkDown(index: vB)
            var line = try ns.ip("-o", "link", "show", "vB")
            #expect(line.contains("mtu 1450"))
            #expect(!linkFlags(line).contains("UP"))
            #expect(try socket.links().first { $0.index == vB }?.isUp == false)
            try socket.setLinkUp(index: vB)
            line = try ns.ip("-o", "link", "show", "vB")
            #expect(linkFlags(line).contains("UP"))
        }
    }

    @Test func anMTUTheDeviceRefusesGivesItsRange() throws {
        try withVethPair { _, socket, vA, _ in
            let error = #expect(throws: SystemError.self) { try socket.setMTU(index: vA, mtu: 20) }
            #expect(error?.errno == .invalid)
            #expect(error?.object == "vA")
            #expect(error?.operation == "RTM_NEWLINK mtu 20")
            #expect(error?.hint?.contains("from 68 to") == true)
        }
    }

    @Test func aMissingDeviceIsNamedInTheError() throws {
        try withVethPair { _, socket, _, _ in
            let error = #expect(throws: SystemError.self) { try socket.linkIndex(named: "eth9") }
            #expect(error?.errno == .noSuchDevice)
            #expect(error?.object == "eth9")
            let hint = try #require(error?.hint)
            #expect(hint.hasPrefix("no network interface named eth9; available: lo, "))
            #expect(hint.contains("vA") && hint.contains("vB"))

            let byIndex = #expect(throws: SystemError.self) { try socket.setLinkUp(index: 9999) }
            #expect(byIndex?.errno == .noSuchDevice)
            #expect(byIndex?.description.contains("index 9999") == true)
        }
    }

    @Test func deletedLinksAreGone() throws {
        try withVethPair { ns, socket, _, vB in
            try socket.deleteLink(index: vB)
            #expect(try !ns.ip("-o", "link").contains("vB"))
            #expect(try socket.links().map(\.name) == ["lo"])  // the peer vA goes with it
        }
    }

    @Test func addingAnAddressTwiceIsFineAndDeletingItTwiceToo() throws {
        try withVethPair { ns, socket, _, vB in
            let address = IPv4Address("198.18.2.1")!
            try socket.addAddress(index: vB, address: address, prefixLength: 24)
            try socket.addAddress(index: vB, address: address, prefixLength: 24)
            #expect(try ns.ip("-o", "-4", "addr", "show", "dev", "vB").contains("inet 198.18.2.1/24"))
            #expect(
                try socket.addresses().contains { $0.index == vB && $0.address == address && $0.prefixLength == 24 }
            )
            #expect(try socket.addresses().contains { $0.address == IPv4Address("198.18.1.1") && $0.label == "vA" })

            try socket.deleteAddress(index: vB, address: address, prefixLength: 24)
            try socket.deleteAddress(index: vB, address: address, prefixLength: 24)
            #expect(try ns.ip("-o", "-4", "addr", "show", "dev", "vB").isEmpty)
            #expect(try !socket.addresses().contains { $0.index == vB })
        }
    }

    @Test func routesAreAddedReplacedListedAndDeleted() throws {
        try withVethPair { ns, socket, vA, vB in
            let viaGateway = Route(
                destination: IPv4Network("10.2.5.0/24")!,
                outputIndex: vA,
                gateway: IPv4Address("198.18.1.2")
            )
            let onlink = Route(
                destination: IPv4Network("10.2.6.0/24")!,
                outputIndex: vB,
                gateway: IPv4Address("10.2.6.0"),
                onlink: true
            )
            let direct = Route(destination: IPv4Network("10.2.0.0/16")!, outputIndex: vB)
            for route in [viaGateway, onlink, direct, viaGateway] { try socket.addRoute(route) }

            let shown = try ns.ip("-4", "route", "show")
            #expect(shown.contains("10.2.5.0/24 via 198.18.1.2 dev vA"))
            #expect(shown.contains("10.2.6.0/24 via 10.2.6.0 dev vB onlink"))
            #expect(shown.contains("10.2.0.0/16 dev vB scope link"))
            let listed = try socket.routes()
            #expect(listed.contains(viaGateway))
            #expect(listed.contains(onlink))
            #expect(listed.contains(direct))
            #expect(
                listed.contains {
                    $0.destination == IPv4Network("198.18.1.0/24")! && $0.outputIndex == vA
                        && $0.source == IPv4Address("198.18.1.1")
                }
            )

            // Replace: the same destination through another device.
            try socket.addRoute(Route(destination: IPv4Network("10.2.5.0/24")!, outputIndex: vB))
            #expect(try ns.ip("-4", "route", "show", "10.2.5.0/24").hasPrefix("10.2.5.0/24 dev vB"))

            for route in [onlink, direct, onlink] { try socket.deleteRoute(route) }
            let remaining = try ns.ip("-4", "route", "show")
            #expect(!remaining.contains("10.2.6.0"))
            #expect(!remaining.contains("10.2.0.0/16"))
        }
    }

    @Test func aRefusedRouteIsDescribedWithItsDeviceAndTheKernelsReason() throws {
        try withVethPair { _, socket, vA, _ in
            let route = Route(
                destination: IPv4Network("10.2.7.0/24")!,
                outputIndex: vA,
                gateway: IPv4Address("10.9.9.9")
            )
            let error = #expect(throws: SystemError.self) { try socket.addRoute(route) }
            #expect(error?.errno == Errno(ENETUNREACH))
            #expect(error?.operation == "RTM_NEWROUTE 10.2.7.0/24 via 10.9.9.9 dev vA")
            #expect(error?.object == "vA")
            #expect(error?.hint?.contains("use onlink") == true)
            #expect(error?.hint?.contains("kernel says:") == true)
        }
    }

    @Test func aRouteThroughADownDeviceIsRefusedWithAHint() throws {
        try withVethPair { _, socket, _, vB in
            try socket.setLinkDown(index: vB)
            let error = #expect(throws: SystemError.self) {
                try socket.addRoute(Route(destination: IPv4Network("10.2.8.0/24")!, outputIndex: vB))
            }
            #expect(error?.errno == Errno(ENETDOWN))
            #expect(error?.description.contains("vB is down") == true)
        }
    }

    @Test func dumpsSpanningManyDatagramsAreReadToTheEnd() throws {
        try withVethPair { _, socket, vA, _ in
            let routes = (0..<600).map { i in
                Route(
                    destination: IPv4Network(
                        address: IPv4Address(10, 3, UInt8(i / 256), UInt8(i % 256)),
                        prefixLength: 32
                    ),
                    outputIndex: vA
                )
            }
            for route in routes { try socket.addRoute(route) }
            let listed = Set(try socket.routes())
            #expect(routes.allSatisfy(listed.contains))
        }
    }

    @Test func oneSocketServesManyThreadsAtOnce() async throws {
        let ns = try TestNamespace()
        defer { ns.remove() }
        let socket = try ns.socket()
        try await withThrowingTaskGroup(of: Int.self) { group in
            for _ in 0..<8 {
                group.addTask {
                    var seen = 0
                    for _ in 0..<40 { seen += try socket.links().count }
                    return seen
                }
            }
            for try await seen in group { #expect(seen == 40) }
        }
    }

    @Test func theDefaultRouteWithTheLowestMetricGivesTheInterface() throws {
        try withVethPair { ns, socket, vA, vB in
            #expect(try socket.defaultRouteInterfaceIndex() == nil)
            try ns.ip("addr", "add", "198.18.2.1/24", "dev", "vB")
            try ns.ip("route", "add", "default", "via", "198.18.2.2", "dev", "vB", "metric", "200")
            #expect(try socket.defaultRouteInterfaceIndex() == vB)
            try ns.ip("route", "add", "default", "via", "198.18.1.2", "dev", "vA", "metric", "100")
            #expect(try socket.defaultRouteInterfaceIndex() == vA)
        }
    }

    /// The generic builder is enough for what the vxlan backend needs: a
    /// vxlan device (nested IFLA_LINKINFO / IFLA_INFO_DATA) and a permanent
    /// neighbour entry.
    @Test func aVxlanDeviceAndANeighbourCanBeBuiltFromNestedAttributes() throws {
        try withVethPair { ns, socket, vA, _ in
            var create = NetlinkRequest(type: RTM_NEWLINK, flags: NLM_F_CREATE | NLM_F_EXCL)
            create.append(header: ifinfomsg())
            create.append(attribute: IFLA_IFNAME, string: "flannel.1")
            create.append(attribute: IFLA_MTU, uint32: 1450)
            create.appendNested(attribute: IFLA_LINKINFO) { info in
                info.append(attribute: IFLA_INFO_KIND, string: "vxlan")
                info.appendNested(attribute: IFLA_INFO_DATA) { data in
                    data.append(attribute: IFLA_VXLAN_ID, uint32: 1)
                    data.append(attribute: IFLA_VXLAN_LINK, uint32: UInt32(vA))
                    data.append(attribute: IFLA_VXLAN_LOCAL, address: IPv4Address("198.18.1.1")!)
                    data.append(attribute: IFLA_VXLAN_PORT, uint16BigEndian: 8472)
                    data.append(attribute: IFLA_VXLAN_LEARNING, uint8: 0)
                }
            }
            try socket.request(create, operation: "RTM_NEWLINK flannel.1 type vxlan", object: "flannel.1")

            let details = try ns.ip("-d", "-o", "link", "show", "flannel.1")
            #expect(details.contains("mtu 1450"))
            #expect(details.contains("vxlan id 1 local 198.18.1.1 dev vA"))
            #expect(details.contains("dstport 8472"))
            #expect(details.contains("nolearning"))
            let vxlan = try #require(try socket.links().first { $0.name == "flannel.1" })
            #expect(vxlan.kind == "vxlan")
            try socket.setLinkUp(index: vxlan.index)

            var neighbour = NetlinkRequest(type: RTM_NEWNEIGH, flags: NLM_F_CREATE | NLM_F_REPLACE)
            var header = ndmsg()
            header.ndm_family = UInt8(AF_INET)
            header.ndm_ifindex = vxlan.index
            header.ndm_state = UInt16(NUD_PERMANENT)
            neighbour.append(header: header)
            neighbour.append(attribute: NDA_DST, address: IPv4Address("10.2.5.0")!)
            neighbour.append(attribute: NDA_LLADDR, bytes: [0x0a, 0x58, 0x0a, 0x02, 0x05, 0x00])
            try socket.request(neighbour, operation: "RTM_NEWNEIGH 10.2.5.0 dev flannel.1", object: "flannel.1")
            #expect(
                try ns.ip("neigh", "show", "dev", "flannel.1").contains("10.2.5.0 lladdr 0a:58:0a:02:05:00 PERMANENT")
            )

            // Creating it again is refused, and the error is the caller's words.
            let error = #expect(throws: SystemError.self) {
                try socket.request(create, operation: "RTM_NEWLINK flannel.1 type vxlan", object: "flannel.1")
            }
            #expect(error?.errno == .exists)
            #expect(error?.description.hasPrefix("RTM_NEWLINK flannel.1 type vxlan on flannel.1 failed") == true)

            try socket.deleteLink(index: vxlan.index)
            #expect(try !ns.ip("-o", "link").contains("flannel.1"))
        }
    }
}
