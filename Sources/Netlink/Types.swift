import NetBase

/// A network device as rtnetlink reports it.
public struct Link: Hashable, Sendable, CustomStringConvertible {
    public var name: String
    public var index: Int32
    public var mtu: Int
    /// IFF_* flags (IFF_UP, IFF_RUNNING, IFF_LOWER_UP, …).
    public var flags: UInt32
    /// The device kind from IFLA_INFO_KIND ("veth", "vxlan", "tun", "bridge"…);
    /// nil for devices without one (loopback, most physical NICs).
    public var kind: String?
    /// The link-layer address (IFLA_ADDRESS); nil for devices without one (TUN).
    public var hardwareAddress: [UInt8]?

    public init(
        name: String,
        index: Int32,
        mtu: Int,
        flags: UInt32,
        kind: String? = nil,
        hardwareAddress: [UInt8]? = nil
    ) {
        self.name = name
        self.index = index
        self.mtu = mtu
        self.flags = flags
        self.kind = kind
        self.hardwareAddress = hardwareAddress
    }

    /// Administratively up (IFF_UP).
    public var isUp: Bool { flags & LinkFlags.up != 0 }

    public var description: String {
        var text = "\(index): \(name) mtu \(mtu) \(isUp ? "up" : "down")"
        if let kind { text += " \(kind)" }
        return text
    }
}

/// The IFF_* values this module tests; glibc's net/if.h imports them as Int.
enum LinkFlags {
    static let up: UInt32 = 0x1
}

/// An IPv4 address assigned to a device.
/// An IPv6 address of a device, with the kernel's IFA_F_* flags.
public struct InterfaceIPv6Address: Hashable, Sendable, CustomStringConvertible {
    public var index: Int32
    public var address: IPv6Address
    public var prefixLength: Int
    public var flags: UInt32

    public static let temporary: UInt32 = 0x01  // IFA_F_TEMPORARY
    public static let deprecated: UInt32 = 0x20  // IFA_F_DEPRECATED
    public static let tentative: UInt32 = 0x40  // IFA_F_TENTATIVE
    public static let permanent: UInt32 = 0x80  // IFA_F_PERMANENT

    public init(index: Int32, address: IPv6Address, prefixLength: Int, flags: UInt32 = 0) {
        self.index = index
        self.address = address
        self.prefixLength = prefixLength
        self.flags = flags
    }

    public var description: String { "\(address)/\(prefixLength)" }
}

public struct InterfaceAddress: Hashable, Sendable, CustomStringConvertible {
    public var index: Int32
    public var address: IPv4Address
    public var prefixLength: Int
    /// IFA_LABEL ("eth0", "eth0:1"); nil when the kernel sent none.
    public var label: String?

    public init(index: Int32, address: IPv4Address, prefixLength: Int, label: String? = nil) {
        self.index = index
        self.address = address
        self.prefixLength = prefixLength
        self.label = label
    }

    /// The network the address lives in.
    public var network: IPv4Network { IPv4Network(address: address, prefixLength: prefixLength) }

    public var description: String { "\(address)/\(prefixLength) on ifindex \(index)" }
}

/// An IPv4 unicast route in the main table.
///
/// - `Route(destination: net, outputIndex: tun)`: `<net> dev tun0` (scope link)
/// - `Route(destination: subnet, outputIndex: eth0, gateway: peer)`: `<subnet> via <peer> dev eth0`
/// - `… gateway: base, onlink: true`: `<subnet> via <base> dev flannel.1 onlink`
public struct Route: Hashable, Sendable, CustomStringConvertible {
    public var destination: IPv4Network
    /// The output device's index; 0 when the kernel reported none (a
    /// multipath route or one using a nexthop object).
    public var outputIndex: Int32
    public var gateway: IPv4Address?
    /// RTNH_F_ONLINK: the gateway is reachable on the device even though no
    /// address of the device covers it (vxlan routes).
    public var onlink: Bool
    /// The preferred source address (RTA_PREFSRC).
    public var source: IPv4Address?
    /// RTA_PRIORITY; nil means 0, which is how the kernel reports it.
    public var metric: UInt32?

    public init(
        destination: IPv4Network,
        outputIndex: Int32,
        gateway: IPv4Address? = nil,
        onlink: Bool = false,
        source: IPv4Address? = nil,
        metric: UInt32? = nil
    ) {
        self.destination = destination
        self.outputIndex = outputIndex
        self.gateway = gateway
        self.onlink = onlink
        self.source = source
        self.metric = metric == 0 ? nil : metric
    }

    public var isDefault: Bool { destination.prefixLength == 0 }

    /// The route in `ip route` form, with `device` as the device's name.
    public func description(device: String) -> String {
        var text = isDefault ? "default" : destination.description
        if let gateway { text += " via \(gateway)" }
        text += " dev \(device)"
        if onlink { text += " onlink" }
        if let source { text += " src \(source)" }
        if let metric { text += " metric \(metric)" }
        return text
    }

    public var description: String { description(device: "#\(outputIndex)") }
}

/// An IPv6 unicast route in the main table, in the shapes the kernel
/// backends install: `<subnet> via <peer> dev eth0` (host-gw, DirectRouting)
/// and `<subnet> via <vtep> dev flannel-v6.1 onlink` (vxlan).
public struct IPv6Route: Hashable, Sendable, CustomStringConvertible {
    public var destination: IPv6Network
    /// The output device's index; 0 when the kernel reported none.
    public var outputIndex: Int32
    public var gateway: IPv6Address?
    /// RTNH_F_ONLINK: the gateway is on the device though no address covers it.
    public var onlink: Bool
    /// RTA_PRIORITY; nil when the kernel reported none (it gives IPv6 routes 1024).
    public var metric: UInt32?

    public init(
        destination: IPv6Network,
        outputIndex: Int32,
        gateway: IPv6Address? = nil,
        onlink: Bool = false,
        metric: UInt32? = nil
    ) {
        self.destination = destination
        self.outputIndex = outputIndex
        self.gateway = gateway
        self.onlink = onlink
        self.metric = metric
    }

    /// The route in `ip -6 route` form, with `device` as the device's name.
    public func description(device: String) -> String {
        var text = destination.prefixLength == 0 ? "default" : destination.description
        if let gateway { text += " via \(gateway)" }
        text += " dev \(device)"
        if onlink { text += " onlink" }
        if let metric { text += " metric \(metric)" }
        return text
    }

    public var description: String { description(device: "#\(outputIndex)") }
}
