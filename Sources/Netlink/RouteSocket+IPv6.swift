import CTunnel
import NetBase

#if canImport(Glibc)
import Glibc
#endif

// IPv6 counterparts of the address, route, neighbour and FDB operations the
// kernel backends use in a dual-stack network. Each request is built by a
// static function so that its encoding is tested without a kernel.

extension RouteSocket {
    // MARK: - Addresses

    /// Assigns `address/prefixLength` to the device without duplicate address
    /// detection (the vxlan device's /128 is usable at once, as an IPv4
    /// address is). Adding an address the device already has is not an error.
    public func addAddress(index: Int32, ipv6 address: IPv6Address, prefixLength: Int) throws {
        let request = try Self.ipv6AddressRequest(
            adding: true,
            index: index,
            address: address,
            prefixLength: prefixLength
        )
        try perform(request, accepting: [.exists]) { failure in
            let name = linkName(index)
            return ("RTM_NEWADDR \(address)/\(prefixLength) dev \(name)", name, hint(failure, index: index))
        }
    }

    /// Removes `address/prefixLength` from the device; one it does not have is not an error.
    public func deleteAddress(index: Int32, ipv6 address: IPv6Address, prefixLength: Int) throws {
        let request = try Self.ipv6AddressRequest(
            adding: false,
            index: index,
            address: address,
            prefixLength: prefixLength
        )
        try perform(request, accepting: [Errno(EADDRNOTAVAIL)]) { failure in
            let name = linkName(index)
            return ("RTM_DELADDR \(address)/\(prefixLength) dev \(name)", name, hint(failure, index: index))
        }
    }

    static func ipv6AddressRequest(
        adding: Bool,
        index: Int32,
        address: IPv6Address,
        prefixLength: Int
    ) throws -> NetlinkRequest {
        guard (0...128).contains(prefixLength) else {
            throw SystemError(
                "\(adding ? "RTM_NEWADDR" : "RTM_DELADDR") \(address)/\(prefixLength)",
                on: "ifindex \(index)",
                errno: .invalid,
                hint: "an IPv6 prefix length is 0 to 128"
            )
        }
        var request = NetlinkRequest(
            type: adding ? RTM_NEWADDR : RTM_DELADDR,
            flags: adding ? NLM_F_CREATE | NLM_F_EXCL : 0
        )
        var header = ifaddrmsg()
        header.ifa_family = UInt8(AF_INET6)
        header.ifa_prefixlen = UInt8(prefixLength)
        header.ifa_flags = adding ? UInt8(IFA_F_NODAD) : 0
        header.ifa_scope = RT.scopeUniverse
        header.ifa_index = UInt32(bitPattern: index)
        request.append(header: header)
        request.append(attribute: IFA_LOCAL, address: address)
        request.append(attribute: IFA_ADDRESS, address: address)
        return request
    }

    // MARK: - Routes

    /// Adds `route` to the main table, replacing a route to the same
    /// destination (and metric), so adding twice is fine.
    public func addRoute(_ route: IPv6Route) throws {
        try perform(Self.ipv6RouteRequest(route, adding: true)) { failure in
            let name = linkName(route.outputIndex)
            return ("RTM_NEWROUTE \(route.description(device: name))", name, hint(failure, index: route.outputIndex))
        }
    }

    /// Removes `route` from the main table; a route that is not there is not an error.
    public func deleteRoute(_ route: IPv6Route) throws {
        try perform(Self.ipv6RouteRequest(route, adding: false), accepting: [Errno(ESRCH), .noSuchFile]) { failure in
            let name = linkName(route.outputIndex)
            return ("RTM_DELROUTE \(route.description(device: name))", name, hint(failure, index: route.outputIndex))
        }
    }

    static func ipv6RouteRequest(_ route: IPv6Route, adding: Bool) -> NetlinkRequest {
        var request = routeRequest(route.destination, adding: adding, onlink: route.onlink)
        if route.outputIndex > 0 { request.append(attribute: RT.oif, uint32: UInt32(bitPattern: route.outputIndex)) }
        if let gateway = route.gateway { request.append(attribute: RT.gateway, address: gateway) }
        // No metric deletes whichever metric the route has (the kernel gives
        // IPv6 routes 1024 when none is asked for).
        if let metric = route.metric { request.append(attribute: RT.priority, uint32: metric) }
        return request
    }

    /// The IPv6 unicast routes of the main table (not the local table's, not cached ones).
    public func ipv6Routes() throws -> [IPv6Route] {
        try routeDump(IPv6Network.self).compactMap(IPv6Route.init(mainTableMessage:))
    }

    // MARK: - Neighbours and the forwarding database

    /// A permanent neighbour entry on device `index`: `address` is at
    /// `hardwareAddress` (`ip -6 neigh replace ADDRESS lladdr MAC dev DEV nud permanent`).
    public func setNeighbour(index: Int32, ipv6 address: IPv6Address, hardwareAddress: EthernetAddress) throws {
        try perform(
            Self.ipv6NeighbourRequest(adding: true, index: index, address: address, hardwareAddress: hardwareAddress)
        ) {
            failure in
            let name = linkName(index)
            return ("RTM_NEWNEIGH \(address) lladdr \(hardwareAddress) dev \(name)", name, hint(failure, index: index))
        }
    }

    /// Removes the neighbour entry for `address` on device `index`; a missing entry is not an error.
    public func deleteNeighbour(index: Int32, ipv6 address: IPv6Address) throws {
        let request = Self.ipv6NeighbourRequest(adding: false, index: index, address: address, hardwareAddress: nil)
        try perform(request, accepting: [.noSuchFile]) { failure in
            let name = linkName(index)
            return ("RTM_DELNEIGH \(address) dev \(name)", name, hint(failure, index: index))
        }
    }

    static func ipv6NeighbourRequest(
        adding: Bool,
        index: Int32,
        address: IPv6Address,
        hardwareAddress: EthernetAddress?
    ) -> NetlinkRequest {
        var request = NetlinkRequest(
            type: adding ? RTM_NEWNEIGH : RTM_DELNEIGH,
            flags: adding ? NLM_F_CREATE | NLM_F_REPLACE : 0
        )
        request.append(header: neighbourHeader(family: UInt8(AF_INET6), index: index, flags: 0))
        request.append(attribute: NDA_DST, address: address)
        if let hardwareAddress { request.append(attribute: NDA_LLADDR, bytes: hardwareAddress.bytes) }
        return request
    }

    /// The IPv6 neighbour entries of device `index`.
    public func ipv6Neighbours(index: Int32) throws -> [NeighbourEntry] {
        try neighbourDump(family: UInt8(AF_INET6), index: index, operation: "RTM_GETNEIGH (dump, IPv6)")
    }

    /// A permanent forwarding-database entry on vxlan device `index` whose
    /// tunnel endpoint is the IPv6 address `remote`
    /// (`bridge fdb replace MAC dev DEV dst REMOTE self permanent`).
    public func setForwardingEntry(index: Int32, hardwareAddress: EthernetAddress, remote: IPv6Address) throws {
        try perform(
            Self.ipv6ForwardingRequest(adding: true, index: index, hardwareAddress: hardwareAddress, remote: remote)
        ) { failure in
            let name = linkName(index)
            return (
                "RTM_NEWNEIGH (fdb) \(hardwareAddress) dst \(remote) dev \(name)", name, hint(failure, index: index)
            )
        }
    }

    /// Removes the forwarding-database entry for `hardwareAddress` to
    /// `remote` on device `index`; a missing entry is not an error.
    public func deleteForwardingEntry(index: Int32, hardwareAddress: EthernetAddress, remote: IPv6Address) throws {
        let request = Self.ipv6ForwardingRequest(
            adding: false,
            index: index,
            hardwareAddress: hardwareAddress,
            remote: remote
        )
        try perform(request, accepting: [.noSuchFile]) { failure in
            let name = linkName(index)
            return (
                "RTM_DELNEIGH (fdb) \(hardwareAddress) dst \(remote) dev \(name)", name, hint(failure, index: index)
            )
        }
    }

    static func ipv6ForwardingRequest(
        adding: Bool,
        index: Int32,
        hardwareAddress: EthernetAddress,
        remote: IPv6Address
    ) -> NetlinkRequest {
        var request = NetlinkRequest(
            type: adding ? RTM_NEWNEIGH : RTM_DELNEIGH,
            flags: adding ? NLM_F_CREATE | NLM_F_REPLACE : 0
        )
        request.append(header: neighbourHeader(family: UInt8(AF_BRIDGE), index: index, flags: UInt8(NTF_SELF)))
        request.append(attribute: NDA_LLADDR, bytes: hardwareAddress.bytes)
        request.append(attribute: NDA_DST, address: remote)
        return request
    }
}

extension IPv6Route {
    /// A unicast, non-cloned IPv6 route of the main table; nil for others.
    init?(mainTableMessage message: NetlinkMessage) {
        guard let route = message.mainTableRoute(IPv6Network.self, type: RT.unicast) else { return nil }
        let hop = route.firstHop
        self.init(
            destination: route.destination,
            outputIndex: hop.outputIndex,
            gateway: hop.gatewayAttributes[type: RT.gateway]?.ipv6Address,
            onlink: hop.onlink,
            metric: route.attributes[type: RT.priority]?.uint32
        )
    }
}
