import CTunnel
import NetBase

#if canImport(Glibc)
import Glibc
#endif

// What the route code of both address families shares: a route request's
// header and destination, a dumped route message's family/table/type check
// and its first nexthop, and blackhole routes. Each family's route type
// (`Route`, `IPv6Route`) keeps only what differs (scope, source address).

/// A route destination in one address family, as rtnetlink carries it.
public protocol RouteDestination: Hashable, Sendable, CustomStringConvertible {
    /// AF_INET or AF_INET6, as `rtm_family` holds it.
    static var routeFamily: UInt8 { get }
    /// 32 or 128.
    static var maximumPrefixLength: Int { get }
    /// "IPv4" or "IPv6", for operation names in errors.
    static var familyName: String { get }
    var prefixLength: Int { get }
    /// Appends the network's address as attribute `type`.
    func appendAddress(to request: inout NetlinkRequest, attribute type: UInt16)
    /// The destination of a route message: its RTA_DST (nil for a default
    /// route) and `rtm_dst_len`; nil when the attribute is malformed.
    init?(routeDestination attribute: NetlinkAttribute?, prefixLength: Int)
}

extension IPv4Network: RouteDestination {
    public static var routeFamily: UInt8 { RT.inet }
    public static var maximumPrefixLength: Int { 32 }
    public static var familyName: String { "IPv4" }

    public func appendAddress(to request: inout NetlinkRequest, attribute type: UInt16) {
        request.append(attribute: type, address: address)
    }

    public init?(routeDestination attribute: NetlinkAttribute?, prefixLength: Int) {
        guard prefixLength <= 32 else { return nil }
        guard let attribute else {
            self.init(address: IPv4Address(0), prefixLength: prefixLength)
            return
        }
        guard let address = attribute.address else { return nil }
        self.init(address: address, prefixLength: prefixLength)
    }
}

extension IPv6Network: RouteDestination {
    public static var routeFamily: UInt8 { UInt8(AF_INET6) }
    public static var maximumPrefixLength: Int { 128 }
    public static var familyName: String { "IPv6" }

    public func appendAddress(to request: inout NetlinkRequest, attribute type: UInt16) {
        request.append(attribute: type, address: address)
    }

    public init?(routeDestination attribute: NetlinkAttribute?, prefixLength: Int) {
        guard prefixLength <= 128 else { return nil }
        guard let attribute else {
            self.init(address: IPv6Address(0), prefixLength: prefixLength)
            return
        }
        guard let address = attribute.ipv6Address else { return nil }
        self.init(address: address, prefixLength: prefixLength)
    }
}

extension RouteSocket {
    /// An RTM_NEWROUTE (create, or replace a route to the same destination
    /// and metric) or RTM_DELROUTE for `destination` in the main table: the
    /// header and RTA_DST; the caller appends the rest.
    ///
    /// A deletion sets scope "nowhere" and protocol 0, which match whatever
    /// the route has; its type is matched only when it is not unicast, so
    /// that deleting a blackhole route never takes a real route to the same
    /// destination with it.
    static func routeRequest<Destination: RouteDestination>(
        _ destination: Destination,
        adding: Bool,
        type: UInt8 = RT.unicast,
        scope: UInt8 = RT.scopeUniverse,
        onlink: Bool = false
    ) -> NetlinkRequest {
        var request = NetlinkRequest(
            type: adding ? RTM_NEWROUTE : RTM_DELROUTE,
            flags: adding ? NLM_F_CREATE | NLM_F_REPLACE : 0
        )
        var header = rtmsg()
        header.rtm_family = Destination.routeFamily
        header.rtm_dst_len = UInt8(destination.prefixLength)
        header.rtm_table = RT.mainTable
        if adding {
            header.rtm_protocol = RT.protocolBoot
            header.rtm_scope = scope
            header.rtm_type = type
            header.rtm_flags = onlink ? RT.onlink : 0
        } else {
            header.rtm_scope = RT.scopeNowhere
            if type != RT.unicast { header.rtm_type = type }
        }
        request.append(header: header)
        if destination.prefixLength > 0 { destination.appendAddress(to: &request, attribute: RT.dst) }
        return request
    }

    /// Every route message of `family`, of every table.
    func routeDump<Destination: RouteDestination>(_ family: Destination.Type) throws -> [NetlinkMessage] {
        var request = NetlinkRequest(type: RTM_GETROUTE)
        var header = rtmsg()
        header.rtm_family = family.routeFamily
        request.append(header: header)
        let operation = family == IPv4Network.self ? "RTM_GETROUTE (dump)" : "RTM_GETROUTE (dump, \(family.familyName))"
        return try dump(request, operation: operation)
    }

    // MARK: - Blackhole routes

    /// The destinations of the main table's blackhole routes of the family
    /// of `Destination`, with their metrics (0 when the kernel gives none).
    public func blackholeRoutes<Destination: RouteDestination>(
        _ family: Destination.Type
    ) throws -> [(destination: Destination, metric: UInt32)] {
        try routeDump(family).compactMap { message in
            guard let route = message.mainTableRoute(family, type: RT.blackhole) else { return nil }
            return (route.destination, route.attributes[type: RT.priority]?.uint32 ?? 0)
        }
    }

    /// Adds (or keeps) `blackhole <destination> metric <metric>` in the main table.
    public func addBlackholeRoute(_ destination: some RouteDestination, metric: UInt32) throws {
        try changeBlackholeRoute(destination, metric: metric, adding: true)
    }

    /// Removes `blackhole <destination> metric <metric>`; one that is not
    /// there is not an error.
    public func deleteBlackholeRoute(_ destination: some RouteDestination, metric: UInt32) throws {
        try changeBlackholeRoute(destination, metric: metric, adding: false)
    }

    static func blackholeRequest(_ destination: some RouteDestination, metric: UInt32, adding: Bool) -> NetlinkRequest {
        var request = routeRequest(destination, adding: adding, type: RT.blackhole)
        if metric > 0 { request.append(attribute: RT.priority, uint32: metric) }
        return request
    }

    private func changeBlackholeRoute(_ destination: some RouteDestination, metric: UInt32, adding: Bool) throws {
        let request = Self.blackholeRequest(destination, metric: metric, adding: adding)
        let text = "blackhole \(destination)" + (metric > 0 ? " metric \(metric)" : "")
        try perform(request, accepting: adding ? [] : [Errno(ESRCH), .noSuchFile]) { _ in
            (adding ? "RTM_NEWROUTE \(text)" : "RTM_DELROUTE \(text)", "rtnetlink", nil)
        }
    }
}

/// A dumped route of one family in the main table, of the type asked for.
struct MainTableRoute<Destination: RouteDestination> {
    let header: rtmsg
    let attributes: NetlinkAttributes
    let destination: Destination

    /// The output device, whether the route is onlink, and the nexthop's
    /// own attributes (where a multipath route keeps its gateway): from the
    /// route, or for a multipath route from its first nexthop, which
    /// represents it.
    var firstHop: (outputIndex: Int32, onlink: Bool, gatewayAttributes: NetlinkAttributes) {
        let outputIndex = attributes[type: RT.oif]?.int32 ?? 0
        let onlink = header.rtm_flags & RT.onlink != 0
        guard outputIndex == 0, let hops = attributes[type: RT.multipath]?.value,
            hops.count >= MemoryLayout<rtnexthop>.size
        else { return (outputIndex, onlink, attributes) }
        let hop = hops.withUnsafeBytes { $0.loadUnaligned(as: rtnexthop.self) }
        let end = min(Int(hop.rtnh_len), hops.count)
        // The route's own RTA_GATEWAY, if any, comes before the nexthop's.
        var gateway = attributes
        if attributes[type: RT.gateway] == nil, end > MemoryLayout<rtnexthop>.size {
            gateway = NetlinkAttributes(parsing: hops[MemoryLayout<rtnexthop>.size..<end])
        }
        return (hop.rtnh_ifindex, onlink || UInt32(hop.rtnh_flags) & RT.onlink != 0, gateway)
    }
}

extension NetlinkMessage {
    /// The non-cloned route of `family` in the main table whose type is
    /// `type`; nil for any other message.
    func mainTableRoute<Destination: RouteDestination>(
        _ family: Destination.Type,
        type: UInt8
    ) -> MainTableRoute<Destination>? {
        guard self.type == UInt16(RTM_NEWROUTE), let header = header(rtmsg.self),
            header.rtm_family == family.routeFamily, header.rtm_type == type,
            header.rtm_flags & RT.cloned == 0
        else { return nil }
        let attributes = attributes(after: rtmsg.self)
        let table = attributes[type: RT.table]?.uint32 ?? UInt32(header.rtm_table)
        guard table == UInt32(RT.mainTable),
            let destination = Destination(
                routeDestination: attributes[type: RT.dst],
                prefixLength: Int(header.rtm_dst_len)
            )
        else { return nil }
        return MainTableRoute(header: header, attributes: attributes, destination: destination)
    }
}
