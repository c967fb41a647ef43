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
        var request = NetlinkRequest(
            type: adding ? RTM_NEWROUTE : RTM_DELROUTE,
            flags: adding ? NLM_F_CREATE | NLM_F_REPLACE : 0
        )
        var header = rtmsg()
        header.rtm_family = UInt8(AF_INET6)
        header.rtm_dst_len = UInt8(route.destination.prefixLength)
        header.rtm_table = RT.mainTable
        if adding {
            header.rtm_protocol = RT.protocolBoot
            header.rtm_scope = RT.scopeUniverse
            header.rtm_type = RT.unicast
            header.rtm_flags = route.onlink ? RT.onlink : 0
        } else {
            // Scope "nowhere", protocol and type 0: match whatever the route has.
            header.rtm_scope = RT.scopeNowhere
        }
        request.append(header: header)
        if route.destination.prefixLength > 0 { request.append(attribute: RT.dst, address: route.destination.address) }
        if route.outputIndex > 0 { request.append(attribute: RT.oif, uint32: UInt32(bitPattern: route.outputIndex)) }
        if let gateway = route.gateway { request.append(attribute: RT.gateway, address: gateway) }
        // No metric deletes whichever metric the route has (the kernel gives
        // IPv6 routes 1024 when none is asked for).
        if let metric = route.metric { request.append(attribute: RT.priority, uint32: metric) }
        return request
    }

    /// The IPv6 unicast routes of the main table (not the local table's, not cached ones).
    public func ipv6Routes() throws -> [IPv6Route] {
        var request = NetlinkRequest(type: RTM_GETROUTE)
        var header = rtmsg()
        header.rtm_family = UInt8(AF_INET6)
        request.append(header: header)
        return try dump(request, operation: "RTM_GETROUTE (dump, IPv6)").compactMap(IPv6Route.init(mainTableMessage:))
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
        guard message.type == UInt16(RTM_NEWROUTE), let header = message.header(rtmsg.self),
            header.rtm_family == UInt8(AF_INET6), header.rtm_type == RT.unicast,
            header.rtm_flags & RT.cloned == 0, header.rtm_dst_len <= 128
        else { return nil }
        let attributes = message.attributes(after: rtmsg.self)
        let table = attributes[type: RT.table]?.uint32 ?? UInt32(header.rtm_table)
        guard table == UInt32(RT.mainTable) else { return nil }
        let destination = attributes[type: RT.dst]?.ipv6Address ?? IPv6Address(0)
        var outputIndex = attributes[type: RT.oif]?.int32 ?? 0
        var gateway = attributes[type: RT.gateway]?.ipv6Address
        var onlink = header.rtm_flags & RT.onlink != 0
        // A multipath route is represented by its first nexthop.
        if outputIndex == 0, let hops = attributes[type: RT.multipath]?.value,
            hops.count >= MemoryLayout<rtnexthop>.size
        {
            let hop = hops.withUnsafeBytes { $0.loadUnaligned(as: rtnexthop.self) }
            outputIndex = hop.rtnh_ifindex
            onlink = onlink || UInt32(hop.rtnh_flags) & RT.onlink != 0
            let end = min(Int(hop.rtnh_len), hops.count)
            if end > MemoryLayout<rtnexthop>.size {
                gateway =
                    gateway
                    ?? NetlinkAttributes(parsing: hops[MemoryLayout<rtnexthop>.size..<end])[type: RT.gateway]?
                    .ipv6Address
            }
        }
        self.init(
            destination: IPv6Network(address: destination, prefixLength: Int(header.rtm_dst_len)),
            outputIndex: outputIndex,
            gateway: gateway,
            onlink: onlink,
            metric: attributes[type: RT.priority]?.uint32
        )
    }
}
