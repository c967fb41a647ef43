import CTunnel
import NetBase

#if canImport(Glibc)
import Glibc
#endif

/// An Ethernet (MAC) address, written as Go's `net.HardwareAddr` writes it
/// ("0e:3f:1a:22:9b:c4", lower case), which is how flannel's vxlan leases
/// carry `VtepMAC`.
public struct EthernetAddress: Hashable, Sendable, CustomStringConvertible {
    public let bytes: [UInt8]

    public init?(bytes: [UInt8]) {
        guard bytes.count == 6 else { return nil }
        self.bytes = bytes
    }

    /// Parses "aa:bb:cc:dd:ee:ff" (either case; '-' also accepted as separator).
    public init?(_ text: some StringProtocol) {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        let pieces = parts.count == 6 ? parts : text.split(separator: "-", omittingEmptySubsequences: false)
        guard pieces.count == 6 else { return nil }
        var bytes: [UInt8] = []
        for piece in pieces {
            guard piece.count == 2, let byte = UInt8(piece, radix: 16) else { return nil }
            bytes.append(byte)
        }
        self.bytes = bytes
    }

    public var description: String {
        bytes.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined(separator: ":")
    }
}

/// The settings of a vxlan device that decide whether an existing one can be
/// reused (flannel's test for "the same device").
public struct VXLANSettings: Hashable, Sendable, CustomStringConvertible {
    public var vni: UInt32
    /// Destination UDP port (flannel's default 8472, the kernel's old default).
    public var port: UInt16
    /// The underlay device the tunnel's packets leave by.
    public var underlayIndex: Int32
    /// The source address of the tunnel's packets (the host's public IP).
    public var localAddress: IPv4Address?
    /// The IPv6 source address of an IPv6-underlay device (flannel-v6.<VNI>:
    /// the host's public IPv6); such a device has no `localAddress`.
    public var localIPv6: IPv6Address?
    /// Learning of remote MACs from received packets; flannel turns it off
    /// because it programs every entry itself.
    public var learning: Bool
    /// VXLAN Group Based Policy extension.
    public var gbp: Bool

    public init(
        vni: UInt32,
        port: UInt16,
        underlayIndex: Int32,
        localAddress: IPv4Address?,
        localIPv6: IPv6Address? = nil,
        learning: Bool = false,
        gbp: Bool = false
    ) {
        self.vni = vni
        self.port = port
        self.underlayIndex = underlayIndex
        self.localAddress = localAddress
        self.localIPv6 = localIPv6
        self.learning = learning
        self.gbp = gbp
    }

    public var description: String {
        "id \(vni) dstport \(port) dev #\(underlayIndex)" + (localAddress.map { " local \($0)" } ?? "")
            + (localIPv6.map { " local \($0)" } ?? "")
            + (learning ? "" : " nolearning") + (gbp ? " gbp" : "")
    }
}

/// One neighbour (ARP) or forwarding-database entry of a device.
public struct NeighbourEntry: Hashable, Sendable, CustomStringConvertible {
    public var index: Int32
    /// The IP address: for ARP the neighbour's address, for an FDB entry the
    /// remote tunnel endpoint (NDA_DST).
    public var address: IPv4Address?
    /// The same for an IPv6 neighbour or an FDB entry with an IPv6 remote.
    public var ipv6Address: IPv6Address?
    public var hardwareAddress: EthernetAddress?
    /// NUD_* state bits.
    public var state: UInt16

    public var isPermanent: Bool { state & UInt16(NUD_PERMANENT) != 0 }

    public var description: String {
        "\(address.map(\.description) ?? ipv6Address.map(\.description) ?? "-") lladdr \(hardwareAddress.map(\.description) ?? "-") dev #\(index)"
            + (isPermanent ? " permanent" : "")
    }
}

extension RouteSocket {
    // MARK: - vxlan devices

    /// Creates a vxlan device `name` with `settings` and, when given, the MAC
    /// address `hardwareAddress` (otherwise the kernel picks a random one).
    /// Fails with EEXIST when a device of that name exists.
    public func createVXLAN(
        name: String,
        settings: VXLANSettings,
        mtu: Int? = nil,
        hardwareAddress: EthernetAddress? = nil
    ) throws {
        let operation = "RTM_NEWLINK vxlan \(settings)"
        try RouteSocket.validateInterfaceName(name, operation: operation)
        var request = NetlinkRequest(type: RTM_NEWLINK, flags: NLM_F_CREATE | NLM_F_EXCL)
        var header = ifinfomsg()
        header.ifi_family = UInt8(AF_UNSPEC)
        request.append(header: header)
        request.append(attribute: IFLA_IFNAME, string: name)
        if let mtu { request.append(attribute: IFLA_MTU, uint32: UInt32(mtu)) }
        if let hardwareAddress { request.append(attribute: IFLA_ADDRESS, bytes: hardwareAddress.bytes) }
        request.appendNested(attribute: IFLA_LINKINFO) { info in
            info.append(attribute: IFLA_INFO_KIND, string: "vxlan")
            info.appendNested(attribute: IFLA_INFO_DATA) { data in
                data.append(attribute: IFLA_VXLAN_ID, uint32: settings.vni)
                if settings.underlayIndex > 0 {
                    data.append(attribute: IFLA_VXLAN_LINK, uint32: UInt32(bitPattern: settings.underlayIndex))
                }
                if let local = settings.localAddress { data.append(attribute: IFLA_VXLAN_LOCAL, address: local) }
                if let local = settings.localIPv6 { data.append(attribute: IFLA_VXLAN_LOCAL6, address: local) }
                data.append(attribute: IFLA_VXLAN_PORT, uint16BigEndian: settings.port)
                data.append(attribute: IFLA_VXLAN_LEARNING, uint8: settings.learning ? 1 : 0)
                if settings.gbp { data.append(flag: IFLA_VXLAN_GBP) }
            }
        }
        try perform(request) { failure in
            var hint: String?
            switch failure.errno {
            case .exists: hint = "a device named \(name) exists already"
            case Errno(EOPNOTSUPP), Errno(ENOENT):
                hint = "the kernel has no vxlan support (modprobe vxlan)"
            default: break
            }
            return (operation, name, hint)
        }
    }

    /// The vxlan settings of device `index`; nil when it is not a vxlan device.
    public func vxlanSettings(index: Int32) throws -> VXLANSettings? {
        let message = try linkMessage(index: index)
        let info = message.attributes(after: ifinfomsg.self)[type: IFLA_LINKINFO]?.nested
        guard info?[type: IFLA_INFO_KIND]?.string == "vxlan", let data = info?[type: IFLA_INFO_DATA]?.nested else {
            return nil
        }
        return VXLANSettings(
            vni: data[type: IFLA_VXLAN_ID]?.uint32 ?? 0,
            port: data[type: IFLA_VXLAN_PORT]?.uint16BigEndian ?? 0,
            underlayIndex: Int32(bitPattern: data[type: IFLA_VXLAN_LINK]?.uint32 ?? 0),
            localAddress: data[type: IFLA_VXLAN_LOCAL]?.address,
            localIPv6: data[type: IFLA_VXLAN_LOCAL6]?.ipv6Address,
            learning: (data[type: IFLA_VXLAN_LEARNING]?.uint8 ?? 0) != 0,
            gbp: data[type: IFLA_VXLAN_GBP] != nil
        )
    }

    // MARK: - Neighbours (ARP) and the forwarding database

    /// A permanent ARP entry on device `index`: `address` is at `hardwareAddress`
    /// (`ip neigh replace ADDRESS lladdr MAC dev DEV nud permanent`).
    public func setNeighbour(index: Int32, address: IPv4Address, hardwareAddress: EthernetAddress) throws {
        var request = NetlinkRequest(type: RTM_NEWNEIGH, flags: NLM_F_CREATE | NLM_F_REPLACE)
        request.append(header: Self.neighbourHeader(family: UInt8(AF_INET), index: index, flags: 0))
        request.append(attribute: NDA_DST, address: address)
        request.append(attribute: NDA_LLADDR, bytes: hardwareAddress.bytes)
        try perform(request) { failure in
            let name = linkName(index)
            return ("RTM_NEWNEIGH \(address) lladdr \(hardwareAddress) dev \(name)", name, hint(failure, index: index))
        }
    }

    /// Removes the ARP entry for `address` on device `index`; a missing entry is not an error.
    public func deleteNeighbour(index: Int32, address: IPv4Address) throws {
        var request = NetlinkRequest(type: RTM_DELNEIGH)
        request.append(header: Self.neighbourHeader(family: UInt8(AF_INET), index: index, flags: 0))
        request.append(attribute: NDA_DST, address: address)
        try perform(request, accepting: [.noSuchFile]) { failure in
            let name = linkName(index)
            return ("RTM_DELNEIGH \(address) dev \(name)", name, hint(failure, index: index))
        }
    }

    /// A permanent forwarding-database entry on vxlan device `index`: frames
    /// for `hardwareAddress` are sent to the tunnel endpoint `remote`
    /// (`bridge fdb replace MAC dev DEV dst REMOTE self permanent`).
    public func setForwardingEntry(index: Int32, hardwareAddress: EthernetAddress, remote: IPv4Address) throws {
        var request = NetlinkRequest(type: RTM_NEWNEIGH, flags: NLM_F_CREATE | NLM_F_REPLACE)
        request.append(header: Self.neighbourHeader(family: UInt8(AF_BRIDGE), index: index, flags: UInt8(NTF_SELF)))
        request.append(attribute: NDA_LLADDR, bytes: hardwareAddress.bytes)
        request.append(attribute: NDA_DST, address: remote)
        try perform(request) { failure in
            let name = linkName(index)
            return (
                "RTM_NEWNEIGH (fdb) \(hardwareAddress) dst \(remote) dev \(name)", name, hint(failure, index: index)
            )
        }
    }

    /// Removes the forwarding-database entry for `hardwareAddress` (to
    /// `remote`) on device `index`; a missing entry is not an error.
    public func deleteForwardingEntry(index: Int32, hardwareAddress: EthernetAddress, remote: IPv4Address?) throws {
        var request = NetlinkRequest(type: RTM_DELNEIGH)
        request.append(header: Self.neighbourHeader(family: UInt8(AF_BRIDGE), index: index, flags: UInt8(NTF_SELF)))
        request.append(attribute: NDA_LLADDR, bytes: hardwareAddress.bytes)
        if let remote { request.append(attribute: NDA_DST, address: remote) }
        try perform(request, accepting: [.noSuchFile]) { failure in
            let name = linkName(index)
            return ("RTM_DELNEIGH (fdb) \(hardwareAddress) dev \(name)", name, hint(failure, index: index))
        }
    }

    /// The IPv4 ARP entries of device `index`.
    public func neighbours(index: Int32) throws -> [NeighbourEntry] {
        try neighbourDump(family: UInt8(AF_INET), index: index, operation: "RTM_GETNEIGH (dump)")
    }

    /// The forwarding-database entries of device `index` that have a remote
    /// endpoint (the vxlan entries tunneld and flanneld program).
    public func forwardingEntries(index: Int32) throws -> [NeighbourEntry] {
        try neighbourDump(family: UInt8(AF_BRIDGE), index: index, operation: "RTM_GETNEIGH (fdb dump)")
            .filter { $0.address != nil || $0.ipv6Address != nil }
    }

    func neighbourDump(family: UInt8, index: Int32, operation: String) throws -> [NeighbourEntry] {
        var request = NetlinkRequest(type: RTM_GETNEIGH)
        request.append(header: Self.neighbourHeader(family: family, index: index, flags: 0, state: 0))
        return try dump(request, operation: operation).compactMap { message -> NeighbourEntry? in
            guard message.type == UInt16(RTM_NEWNEIGH), let header = message.header(ndmsg.self),
                header.ndm_family == family, header.ndm_ifindex == index
            else { return nil }
            let attributes = message.attributes(after: ndmsg.self)
            let destination = attributes[type: NDA_DST]
            return NeighbourEntry(
                index: header.ndm_ifindex,
                address: destination?.address,
                ipv6Address: destination?.ipv6Address,
                hardwareAddress: attributes[type: NDA_LLADDR].flatMap { EthernetAddress(bytes: $0.value) },
                state: header.ndm_state
            )
        }
    }

    static func neighbourHeader(
        family: UInt8,
        index: Int32,
        flags: UInt8,
        state: UInt16 = UInt16(NUD_PERMANENT)
    ) -> ndmsg {
        var header = ndmsg()
        header.ndm_family = family
        header.ndm_ifindex = index
        header.ndm_state = state
        header.ndm_flags = flags
        return header
    }
}
