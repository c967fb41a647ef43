import CTunnel
import NetBase

#if canImport(Glibc)
import Glibc
#endif

// rtnetlink's constants import with assorted types (Int, Int32, C enums);
// messages carry them as u8/u16/u32.
enum RT {
    static let dst = UInt16(RTA_DST.rawValue)
    static let oif = UInt16(RTA_OIF.rawValue)
    static let gateway = UInt16(RTA_GATEWAY.rawValue)
    static let prefsrc = UInt16(RTA_PREFSRC.rawValue)
    static let priority = UInt16(RTA_PRIORITY.rawValue)
    static let table = UInt16(RTA_TABLE.rawValue)
    static let multipath = UInt16(RTA_MULTIPATH.rawValue)
    static let mainTable = UInt8(RT_TABLE_MAIN.rawValue)
    static let scopeUniverse = UInt8(RT_SCOPE_UNIVERSE.rawValue)
    static let scopeLink = UInt8(RT_SCOPE_LINK.rawValue)
    static let scopeHost = UInt8(RT_SCOPE_HOST.rawValue)
    static let scopeNowhere = UInt8(RT_SCOPE_NOWHERE.rawValue)
    static let unicast = UInt8(RTN_UNICAST)
    static let blackhole = UInt8(RTN_BLACKHOLE)
    static let protocolBoot = UInt8(RTPROT_BOOT)
    static let onlink = UInt32(RTNH_F_ONLINK)
    static let cloned = UInt32(RTM_F_CLONED)
    static let inet = UInt8(AF_INET)
}

extension RouteSocket {
    // MARK: - Links

    /// The index of the device called `name`. The error for a missing device
    /// names it and lists the devices there are.
    public func linkIndex(named name: String) throws -> Int32 {
        try link(named: name).index
    }

    /// The device called `name`.
    public func link(named name: String) throws -> Link {
        let operation = "RTM_GETLINK"
        try RouteSocket.validateInterfaceName(name, operation: operation)
        var request = NetlinkRequest(type: RTM_GETLINK)
        var header = ifinfomsg()
        header.ifi_family = UInt8(AF_UNSPEC)
        request.append(header: header)
        request.append(attribute: IFLA_IFNAME, string: name)
        let replies = try perform(request) { failure in
            let hint =
                failure.errno == .noSuchDevice
                ? "no network interface named \(name); available: \(availableLinkNames())" : nil
            return (operation, name, hint)
        }
        guard let link = replies.lazy.compactMap(Link.init(message:)).first else {
            throw SystemError(operation, on: name, errno: Errno(EPROTO), hint: "the kernel's reply held no link")
        }
        return link
    }

    /// The device with index `index`.
    public func link(index: Int32) throws -> Link {
        guard let link = Link(message: try linkMessage(index: index)) else {
            throw SystemError(
                "RTM_GETLINK",
                on: "ifindex \(index)",
                errno: Errno(EPROTO),
                hint: "the kernel's reply held no link"
            )
        }
        return link
    }

    /// Every device in the namespace, in index order.
    public func links() throws -> [Link] {
        var request = NetlinkRequest(type: RTM_GETLINK)
        var header = ifinfomsg()
        header.ifi_family = UInt8(AF_UNSPEC)
        request.append(header: header)
        return try dump(request, operation: "RTM_GETLINK (dump)").compactMap(Link.init(message:))
            .sorted { $0.index < $1.index }
    }

    public func setLinkUp(index: Int32) throws {
        try setLinkFlags(index: index, up: true)
    }

    public func setLinkDown(index: Int32) throws {
        try setLinkFlags(index: index, up: false)
    }

    private func setLinkFlags(index: Int32, up: Bool) throws {
        var request = NetlinkRequest(type: RTM_NEWLINK)
        var header = ifinfomsg()
        header.ifi_family = UInt8(AF_UNSPEC)
        header.ifi_index = index
        header.ifi_flags = up ? LinkFlags.up : 0
        header.ifi_change = LinkFlags.up
        request.append(header: header)
        try perform(request) { failure in
            let name = linkName(index)
            return ("RTM_NEWLINK \(up ? "up" : "down")", name, hint(failure, index: index))
        }
    }

    /// Turns IPv6 link-local address generation off (or back on) for a link,
    /// so that a layer-3 tunnel carrying only IPv4 gets no fe80:: address and
    /// the kernel sends no router solicitations or MLD reports through it.
    public func setIPv6LinkLocal(index: Int32, enabled: Bool) throws {
        var request = NetlinkRequest(type: RTM_NEWLINK)
        var header = ifinfomsg()
        header.ifi_family = UInt8(AF_UNSPEC)
        header.ifi_index = index
        request.append(header: header)
        request.appendNested(attribute: IFLA_AF_SPEC) { spec in
            spec.appendNested(attribute: AF_INET6) { inet6 in
                // IN6_ADDR_GEN_MODE_EUI64 = 0, IN6_ADDR_GEN_MODE_NONE = 1
                inet6.append(attribute: IFLA_INET6_ADDR_GEN_MODE, uint8: enabled ? 0 : 1)
            }
        }
        try perform(request) { failure in
            ("RTM_NEWLINK addrgenmode \(enabled ? "eui64" : "none")", linkName(index), hint(failure, index: index))
        }
    }

    public func setMTU(index: Int32, mtu: Int) throws {
        guard mtu > 0, mtu <= Int(Int32.max) else {
            let name = linkName(index)
            throw SystemError(
                "RTM_NEWLINK mtu \(mtu)",
                on: name,
                errno: .invalid,
                hint: "an MTU must be a positive number of bytes"
            )
        }
        try setLinkAttribute(index: index, IFLA_MTU, UInt32(mtu), named: "mtu") { failure in
            guard failure.errno == .invalid, let range = try? mtuRange(index: index) else { return nil }
            return "\(linkName(index)) accepts an MTU from \(range.lowerBound) to \(range.upperBound)"
        }
    }

    /// RTM_NEWLINK with one 32-bit attribute of link `index`. `betterHint`
    /// may replace the generic hint for a failure.
    func setLinkAttribute(
        index: Int32,
        _ attribute: some BinaryInteger,
        _ value: UInt32,
        named name: String,
        betterHint: (NetlinkFailure) -> String? = { _ in nil }
    ) throws {
        var request = NetlinkRequest(type: RTM_NEWLINK)
        var header = ifinfomsg()
        header.ifi_family = UInt8(AF_UNSPEC)
        header.ifi_index = index
        request.append(header: header)
        request.append(attribute: attribute, uint32: value)
        try perform(request) { failure in
            ("RTM_NEWLINK \(name) \(value)", linkName(index), betterHint(failure) ?? hint(failure, index: index))
        }
    }

    public func deleteLink(index: Int32) throws {
        let name = linkName(index)
        var request = NetlinkRequest(type: RTM_DELLINK)
        var header = ifinfomsg()
        header.ifi_family = UInt8(AF_UNSPEC)
        header.ifi_index = index
        request.append(header: header)
        try perform(request) { failure in
            ("RTM_DELLINK", name, hint(failure, index: index))
        }
    }

    // MARK: - Addresses

    /// Assigns `address/prefixLength` to the device. Adding an address the
    /// device already has is not an error.
    public func addAddress(index: Int32, address: IPv4Address, prefixLength: Int) throws {
        try changeAddress(RTM_NEWADDR, index: index, address: address, prefixLength: prefixLength)
    }

    /// Removes `address/prefixLength` from the device. Removing an address
    /// the device does not have is not an error.
    public func deleteAddress(index: Int32, address: IPv4Address, prefixLength: Int) throws {
        try changeAddress(RTM_DELADDR, index: index, address: address, prefixLength: prefixLength)
    }

    private func changeAddress(_ type: Int, index: Int32, address: IPv4Address, prefixLength: Int) throws {
        let adding = type == RTM_NEWADDR
        let verb = adding ? "RTM_NEWADDR" : "RTM_DELADDR"
        guard (0...32).contains(prefixLength) else {
            let name = linkName(index)
            throw SystemError(
                "\(verb) \(address)/\(prefixLength) dev \(name)",
                on: name,
                errno: .invalid,
                hint: "an IPv4 prefix length is 0 to 32"
            )
        }
        var request = NetlinkRequest(type: type, flags: adding ? NLM_F_CREATE | NLM_F_EXCL : 0)
        var header = ifaddrmsg()
        header.ifa_family = RT.inet
        header.ifa_prefixlen = UInt8(prefixLength)
        // What `ip addr add` does: loopback addresses get host scope.
        header.ifa_scope = address.value >> 24 == 127 ? RT.scopeHost : RT.scopeUniverse
        header.ifa_index = UInt32(bitPattern: index)
        request.append(header: header)
        request.append(attribute: IFA_LOCAL, address: address)
        request.append(attribute: IFA_ADDRESS, address: address)
        let accepting: Set<Errno> = adding ? [.exists] : [Errno(EADDRNOTAVAIL)]
        try perform(request, accepting: accepting) { failure in
            let name = linkName(index)
            return ("\(verb) \(address)/\(prefixLength) dev \(name)", name, hint(failure, index: index))
        }
    }

    /// Every IPv4 address in the namespace, in the kernel's order (per
    /// device, primary addresses first).
    public func addresses() throws -> [InterfaceAddress] {
        var request = NetlinkRequest(type: RTM_GETADDR)
        var header = ifaddrmsg()
        header.ifa_family = RT.inet
        request.append(header: header)
        return try dump(request, operation: "RTM_GETADDR (dump)").compactMap(InterfaceAddress.init(message:))
    }

    /// Every IPv6 address in the namespace, in the kernel's order.
    public func ipv6Addresses() throws -> [InterfaceIPv6Address] {
        var request = NetlinkRequest(type: RTM_GETADDR)
        var header = ifaddrmsg()
        header.ifa_family = UInt8(AF_INET6)
        request.append(header: header)
        return try dump(request, operation: "RTM_GETADDR (dump, IPv6)").compactMap(InterfaceIPv6Address.init(message:))
    }

    // MARK: - Routes

    /// Adds `route` to the main table, replacing a route to the same
    /// destination (and metric) if there is one, so adding twice is fine.
    public func addRoute(_ route: Route) throws {
        guard route.outputIndex > 0 || route.gateway != nil else {
            throw SystemError(
                "RTM_NEWROUTE \(route)",
                on: "rtnetlink",
                errno: .invalid,
                hint: "a route needs an output device or a gateway"
            )
        }
        // A route without a gateway reaches hosts directly on the link.
        var request = Self.routeRequest(
            route.destination,
            adding: true,
            scope: route.gateway == nil ? RT.scopeLink : RT.scopeUniverse,
            onlink: route.onlink
        )
        Self.appendSelectors(of: route, to: &request)
        if let source = route.source { request.append(attribute: RT.prefsrc, address: source) }
        try perform(request) { failure in
            let name = linkName(route.outputIndex)
            return (
                "RTM_NEWROUTE \(route.description(device: name))", name, routeHint(failure, route: route, device: name)
            )
        }
    }

    /// Removes `route` from the main table. A route that is not there is not
    /// an error.
    public func deleteRoute(_ route: Route) throws {
        var request = Self.routeRequest(route.destination, adding: false)
        Self.appendSelectors(of: route, to: &request)
        try perform(request, accepting: [Errno(ESRCH), .noSuchFile]) { failure in
            let name = linkName(route.outputIndex)
            return ("RTM_DELROUTE \(route.description(device: name))", name, hint(failure, index: route.outputIndex))
        }
    }

    /// The route's device, gateway and metric (the destination is in `routeRequest`'s part).
    private static func appendSelectors(of route: Route, to request: inout NetlinkRequest) {
        if route.outputIndex > 0 { request.append(attribute: RT.oif, uint32: UInt32(bitPattern: route.outputIndex)) }
        if let gateway = route.gateway { request.append(attribute: RT.gateway, address: gateway) }
        if let metric = route.metric { request.append(attribute: RT.priority, uint32: metric) }
    }

    /// The IPv4 unicast routes of the main table.
    public func routes() throws -> [Route] {
        try routeDump(IPv4Network.self).compactMap(Route.init(mainTableMessage:))
    }

    /// The output device of the IPv4 default route (the one with the lowest
    /// metric when there are several); nil when there is none.
    public func defaultRouteInterfaceIndex() throws -> Int32? {
        try defaultRoute()?.outputIndex
    }

    /// The IPv4 default route with the lowest metric.
    public func defaultRoute() throws -> Route? {
        try routes().filter { $0.isDefault && $0.outputIndex > 0 }.min { ($0.metric ?? 0) < ($1.metric ?? 0) }
    }

    // MARK: - Helpers for messages

    static func validateInterfaceName(_ name: String, operation: String) throws {
        // IFNAMSIZ is 16 including the NUL.
        guard !name.isEmpty, name.utf8.count < 16, !name.contains("/"), !name.contains(where: \.isWhitespace),
            name != ".", name != ".."
        else {
            throw SystemError(
                operation,
                on: name.isEmpty ? "\"\"" : name,
                errno: .invalid,
                hint: "an interface name is 1 to 15 bytes without '/' or spaces"
            )
        }
    }

    /// The name of device `index`, or "ifindex N" when it cannot be found;
    /// for error messages only.
    public func linkName(_ index: Int32) -> String {
        guard index > 0 else { return "(no device)" }
        return (try? link(index: index))?.name ?? "ifindex \(index)"
    }

    func availableLinkNames() -> String {
        guard let links = try? links(), !links.isEmpty else { return "(none could be listed)" }
        return links.map(\.name).joined(separator: ", ")
    }

    /// The kernel's RTM_NEWLINK description of link `index`.
    func linkMessage(index: Int32) throws -> NetlinkMessage {
        var request = NetlinkRequest(type: RTM_GETLINK)
        var header = ifinfomsg()
        header.ifi_family = UInt8(AF_UNSPEC)
        header.ifi_index = index
        request.append(header: header)
        let replies = try perform(request) { failure in
            ("RTM_GETLINK", "ifindex \(index)", hint(failure, index: index))
        }
        guard let message = replies.first(where: { $0.type == UInt16(RTM_NEWLINK) }) else {
            throw SystemError(
                "RTM_GETLINK",
                on: "ifindex \(index)",
                errno: Errno(EPROTO),
                hint: "the kernel's reply held no link"
            )
        }
        return message
    }

    private func mtuRange(index: Int32) throws -> ClosedRange<Int>? {
        let attributes = try linkMessage(index: index).attributes(after: ifinfomsg.self)
        guard let low = attributes[type: IFLA_MIN_MTU]?.uint32, let high = attributes[type: IFLA_MAX_MTU]?.uint32,
            low <= high
        else { return nil }
        return Int(low)...Int(high)
    }

    func hint(_ failure: NetlinkFailure, index: Int32) -> String? {
        switch failure.errno {
        case .noSuchDevice: return "no network interface with index \(index) in this namespace (was it deleted?)"
        default: return nil
        }
    }

    private func routeHint(_ failure: NetlinkFailure, route: Route, device: String) -> String? {
        switch failure.errno {
        case Errno(ENETUNREACH):
            if let gateway = route.gateway {
                return "gateway \(gateway) is not in a subnet of \(device); add an address covering it, or use onlink"
            }
            return "no address of \(device) covers the destination"
        case Errno(ENETDOWN):
            return "\(device) is down; bring it up before adding routes through it"
        default:
            return hint(failure, index: route.outputIndex)
        }
    }
}

// MARK: - Parsing replies

extension Link {
    init?(message: NetlinkMessage) {
        guard message.type == UInt16(RTM_NEWLINK), let header = message.header(ifinfomsg.self) else { return nil }
        let attributes = message.attributes(after: ifinfomsg.self)
        guard let name = attributes[type: IFLA_IFNAME]?.string else { return nil }
        let kind = attributes[type: IFLA_LINKINFO]?.nested[type: IFLA_INFO_KIND]?.string
        let hardware = attributes[type: IFLA_ADDRESS]?.value
        self.init(
            name: name,
            index: header.ifi_index,
            mtu: Int(attributes[type: IFLA_MTU]?.uint32 ?? 0),
            flags: header.ifi_flags,
            kind: kind,
            hardwareAddress: hardware.flatMap { $0.isEmpty ? nil : $0 }
        )
    }
}

extension InterfaceAddress {
    init?(message: NetlinkMessage) {
        // A prefix above 32 is not an IPv4 address; `network` would trap on it.
        guard message.type == UInt16(RTM_NEWADDR), let header = message.header(ifaddrmsg.self),
            header.ifa_family == RT.inet, header.ifa_prefixlen <= 32
        else { return nil }
        let attributes = message.attributes(after: ifaddrmsg.self)
        // IFA_LOCAL is the address itself; IFA_ADDRESS is the peer on
        // point-to-point links and equals IFA_LOCAL elsewhere.
        guard let address = attributes[type: IFA_LOCAL]?.address ?? attributes[type: IFA_ADDRESS]?.address else {
            return nil
        }
        self.init(
            index: Int32(bitPattern: header.ifa_index),
            address: address,
            prefixLength: Int(header.ifa_prefixlen),
            label: attributes[type: IFA_LABEL]?.string
        )
    }
}

extension InterfaceIPv6Address {
    init?(message: NetlinkMessage) {
        guard message.type == UInt16(RTM_NEWADDR), let header = message.header(ifaddrmsg.self),
            header.ifa_family == UInt8(AF_INET6), header.ifa_prefixlen <= 128
        else { return nil }
        let attributes = message.attributes(after: ifaddrmsg.self)
        guard let bytes = attributes[type: IFA_LOCAL]?.value ?? attributes[type: IFA_ADDRESS]?.value,
            let address = IPv6Address(bytes: bytes)
        else { return nil }
        // IFA_FLAGS (32 bits) supersedes the header's 8 when the kernel sends it.
        let flags = attributes[type: UInt16(IFA_FLAGS)]?.uint32 ?? UInt32(header.ifa_flags)
        self.init(
            index: Int32(bitPattern: header.ifa_index),
            address: address,
            prefixLength: Int(header.ifa_prefixlen),
            flags: flags
        )
    }
}

extension Route {
    /// A unicast, non-cloned IPv4 route of the main table; nil for others.
    init?(mainTableMessage message: NetlinkMessage) {
        guard let route = message.mainTableRoute(IPv4Network.self, type: RT.unicast) else { return nil }
        let hop = route.firstHop
        self.init(
            destination: route.destination,
            outputIndex: hop.outputIndex,
            gateway: hop.gatewayAttributes[type: RT.gateway]?.address,
            onlink: hop.onlink,
            source: route.attributes[type: RT.prefsrc]?.address,
            metric: route.attributes[type: RT.priority]?.uint32
        )
    }
}

// MARK: - Route lookup

extension RouteSocket {
    /// What `ip route get <destination>` answers: the device the kernel would
    /// send a packet for `destination` out of, and the source address it
    /// would give it (flanneld's `-iface-can-reach`).
    public func routeLookup(to destination: IPv4Address) throws -> (outputIndex: Int32, source: IPv4Address?) {
        var request = NetlinkRequest(type: RTM_GETROUTE)
        var header = rtmsg()
        header.rtm_family = RT.inet
        header.rtm_dst_len = 32
        request.append(header: header)
        request.append(attribute: RT.dst, address: destination)
        let replies = try perform(request) { failure in
            let hint: String? =
                switch failure.errno {
                case Errno(ENETUNREACH): "no route reaches \(destination); add one or choose the interface with --iface"
                case .invalid: "\(destination) cannot be routed to (a broadcast or multicast address?)"
                default: nil
                }
            return ("route get \(destination)", destination.description, hint)
        }
        guard let message = replies.first(where: { $0.type == UInt16(RTM_NEWROUTE) }),
            let reply = message.header(rtmsg.self)
        else {
            throw SystemError(
                "route get \(destination)",
                on: destination.description,
                errno: Errno(EPROTO),
                hint: "the kernel's reply held no route"
            )
        }
        guard reply.rtm_type == RT.unicast || reply.rtm_type == UInt8(RTN_LOCAL) else {
            throw SystemError(
                "route get \(destination)",
                on: destination.description,
                errno: Errno(ENETUNREACH),
                hint:
                    "the route to \(destination) is not a unicast route (type \(reply.rtm_type): blackhole, unreachable or prohibit?)"
            )
        }
        let attributes = message.attributes(after: rtmsg.self)
        guard let index = attributes[type: RT.oif]?.int32, index > 0 else {
            throw SystemError(
                "route get \(destination)",
                on: destination.description,
                errno: Errno(EPROTO),
                hint: "the kernel's answer names no output device"
            )
        }
        return (index, attributes[type: RT.prefsrc]?.address)
    }
}
