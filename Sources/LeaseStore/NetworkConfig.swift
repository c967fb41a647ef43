import FlannelFiles
import NetBase

/// flannel's network config (`<prefix>/config` in etcd), parsed and checked
/// with flannel's rules (see docs/FLANNEL-COMPAT.md):
///
/// - `SubnetLen` defaults to 24 when `Network` is /22 or larger, to prefix+2
///   for /23…/28; a longer prefix is too small. Given, it must be ≤ 30 and
///   leave room for at least four subnets.
/// - `SubnetMin`/`SubnetMax` default to the second and the last subnet of
///   `Network`; given, they must lie inside it on a `SubnetLen` boundary
///   (and, tunneld's addition, `SubnetMin` ≤ `SubnetMax`).
/// - No `Backend` means udp. Unknown fields are ignored. Field names match
///   case-insensitively, as Go's JSON decoder matches them (`subnetlen`,
///   `backend`, `type`, `vni`, `directRouting`, `port`…); of two spellings of
///   one field in an object, the later one counts, as in flanneld.
public struct NetworkConfig: Sendable, Equatable {
    /// The overlay network; host bits are cleared, as flannel clears them.
    /// In an IPv6-only network (`enableIPv4` false) 0.0.0.0/0
    /// (`IPv4Network.noIPv4`), which is never routed: use `ipv4Network`.
    public var network: IPv4Network
    /// Prefix length of every node's subnet (0 in an IPv6-only network).
    public var subnetLen: Int
    /// The lowest subnet handed out (prefix length `subnetLen`).
    public var subnetMin: IPv4Network
    /// The highest subnet handed out (prefix length `subnetLen`).
    public var subnetMax: IPv4Network
    /// `EnableIPv4` (default true). False makes an IPv6-only network: no
    /// Network is needed (nor read), every lease's IPv4 part is 0.0.0.0/0
    /// (flanneld's key `0.0.0.0-0&fd00:10:244:1::-64`), and `ipv6` is set.
    public var enableIPv4: Bool
    /// `EnableIPv6`: each host also leases an IPv6 subnet (`ipv6`).
    public var enableIPv6: Bool
    /// The IPv6 side of a dual-stack network; nil unless `enableIPv6`.
    public var ipv6: IPv6NetworkConfig?
    /// flannel's `EnableNFTables` (default false): tunneld's masquerade and
    /// forward rules go into an nftables table of its own, through the `nft`
    /// program, instead of iptables chains.
    public var enableNFTables: Bool
    public var backend: BackendConfig
    /// The JSON exactly as stored.
    public var json: String

    /// The smallest useful network: four /30 subnets, the first of which is skipped.
    public static let longestNetworkPrefix = 28
    /// A node needs a subnet with room for a tunnel and a bridge address.
    public static let longestSubnetLen = SubnetEnv.longestSubnetLen

    /// Parses and checks `json`; every problem is a `NetworkConfigError` that
    /// names the field, the value and what would be valid.
    public init(json: String) throws(NetworkConfigError) {
        let root: JSONValue
        do {
            root = try JSONValue(parsingAsGoStruct: json)
        } catch {
            throw .invalidJSON(reason: error.description)
        }
        guard case .object = root else {
            throw .notAnObject(found: root.kindName)
        }
        self.json = json

        // EnableIPv4 defaults to true, EnableIPv6 to false.
        enableIPv4 = try Self.bool(root, "EnableIPv4") ?? true
        enableIPv6 = try Self.bool(root, "EnableIPv6") ?? false
        if !enableIPv4 && !enableIPv6 { throw .noAddressFamily }
        enableNFTables = try Self.bool(root, "EnableNFTables") ?? false
        // The IPv6 fields are read (and must be well-formed, as flanneld's
        // JSON decoder wants them) even when EnableIPv6 is false, but only
        // checked against each other when it is true.
        let ipv6Fields = try IPv6NetworkConfig.Fields(root)
        ipv6 = enableIPv6 ? try IPv6NetworkConfig(ipv6Fields) : nil

        guard enableIPv4 else {
            // IPv6-only: flanneld checks no IPv4 field then, but its JSON
            // decoder still wants a Network that is given to be well-formed.
            if let value = Self.present(root.field("Network")) {
                guard case .string(let text) = value, IPv4Network(text) != nil else {
                    throw .invalidValue(
                        field: "Network",
                        value: value.compactText,
                        expected: "a network in CIDR form such as \"10.2.0.0/16\", or leave it out "
                            + "(EnableIPv4 is false, so it is not used)"
                    )
                }
            }
            network = .noIPv4
            subnetLen = 0
            subnetMin = .noIPv4
            subnetMax = .noIPv4
            backend = try BackendConfig(Self.present(root.field("Backend")))
            return
        }

        // Network
        guard let networkValue = Self.present(root.field("Network")) else {
            throw .missingNetwork
        }
        guard case .string(let networkText) = networkValue,
            let parsed = IPv4Network(networkText)
        else {
            throw .invalidValue(
                field: "Network",
                value: networkValue.compactText,
                expected: "a network in CIDR form such as \"10.2.0.0/16\""
            )
        }
        // flannel treats 0.0.0.0/0 as "no Network".
        if parsed.prefixLength == 0 && parsed.address.value == 0 { throw .missingNetwork }
        network = parsed
        let prefix = network.prefixLength

        // SubnetLen (0 or absent: default)
        var length =
            try Self.wholeNumber(
                root,
                "SubnetLen",
                range: 0...Int(Int32.max),
                expected: "a whole number of bits such as 24"
            ) ?? 0
        if length > 0 {
            if length > Self.longestSubnetLen {
                throw .subnetLenTooLong(subnetLen: length)
            }
            if length < prefix + 2 {
                throw .tooFewSubnets(network: network, subnetLen: length)
            }
        } else if prefix > Self.longestNetworkPrefix {
            throw .networkTooSmall(network: network)
        } else if prefix <= 22 {
            length = 24
        } else {
            length = prefix + 2
        }
        subnetLen = length

        // SubnetMin / SubnetMax (absent or 0.0.0.0: default)
        let size = UInt32(truncatingIfNeeded: UInt64(1) << UInt64(32 - length))
        let defaultMin = IPv4Address(network.address.value &+ size)
        let defaultMax = IPv4Address(network.lastAddress.value &- (size &- 1))
        let minAddress = try Self.address(root, "SubnetMin") ?? defaultMin
        let maxAddress = try Self.address(root, "SubnetMax") ?? defaultMax
        for (field, address) in [("SubnetMin", minAddress), ("SubnetMax", maxAddress)]
        where !network.contains(address) {
            throw .outsideNetwork(field: field, address: address, network: network)
        }
        let mask = IPv4Network.mask(length)
        for (field, address) in [("SubnetMin", minAddress), ("SubnetMax", maxAddress)]
        where address.value & mask != address.value {
            throw .notOnBoundary(
                field: field,
                address: address,
                subnetLen: length,
                suggestion: IPv4Address(address.value & mask)
            )
        }
        if minAddress > maxAddress {
            throw .minAboveMax(min: minAddress, max: maxAddress)
        }
        subnetMin = IPv4Network(address: minAddress, prefixLength: length)
        subnetMax = IPv4Network(address: maxAddress, prefixLength: length)

        backend = try BackendConfig(Self.present(root.field("Backend")))
    }

    /// The IPv4 network; nil in an IPv6-only network.
    public var ipv4Network: IPv4Network? { enableIPv4 ? network : nil }

    /// Whether this is an IPv6-only network (`EnableIPv4: false`).
    public var isIPv6Only: Bool { !enableIPv4 }

    /// The networks for log lines and messages: "10.5.0.0/16",
    /// "10.5.0.0/16 and fd00:10:244::/48" or "fd00:10:244::/48".
    public var networksDescription: String {
        let v6 = ipv6.map { "\($0.network)" }
        guard enableIPv4 else { return v6 ?? "(none)" }
        return "\(network)" + (v6.map { " and \($0)" } ?? "")
    }

    /// Whether `subnet` could be handed out under this config: flannel's
    /// compatibility test for reusing a lease or the subnet file's subnet —
    /// prefix length `subnetLen`, between `subnetMin` and `subnetMax`.
    public func fits(_ subnet: IPv4Network) -> Bool {
        subnets.contains(subnet)
    }

    /// The subnets from `subnetMin` to `subnetMax`, in address order.
    public var subnets: SubnetRange {
        SubnetRange(lowestAddress: subnetMin.address, highestAddress: subnetMax.address, prefixLength: subnetLen)
    }

    // MARK: field readers; null counts as absent, as it does for Go.

    static func present(_ value: JSONValue?) -> JSONValue? {
        if case .null? = value { return nil }
        return value
    }

    static func bool(
        _ object: JSONValue,
        _ name: String,
        prefix: String = ""
    ) throws(NetworkConfigError) -> Bool? {
        guard let value = present(object.field(name)) else { return nil }
        guard case .bool(let b) = value else {
            throw .invalidValue(field: prefix + name, value: value.compactText, expected: "true or false")
        }
        return b
    }

    static func wholeNumber(
        _ object: JSONValue,
        _ name: String,
        prefix: String = "",
        range: ClosedRange<Int>,
        expected: String
    ) throws(NetworkConfigError) -> Int? {
        guard let value = present(object.field(name)) else { return nil }
        guard case .number(let n) = value, n == n.rounded(),
            n >= Double(range.lowerBound), n <= Double(range.upperBound)
        else {
            throw .invalidValue(field: prefix + name, value: value.compactText, expected: expected)
        }
        return Int(n)
    }

    /// An address field where 0.0.0.0 means "use the default", as in flannel.
    static func address(_ object: JSONValue, _ name: String) throws(NetworkConfigError) -> IPv4Address? {
        guard let value = present(object.field(name)) else { return nil }
        guard case .string(let text) = value, let address = IPv4Address(text) else {
            throw .invalidValue(
                field: name,
                value: value.compactText,
                expected: "an address such as \"10.2.1.0\" (without /len)"
            )
        }
        return address.value == 0 ? nil : address
    }
}

/// The `Backend` object of the network config.
public struct BackendConfig: Sendable, Equatable {
    /// Lower-cased backend type; "udp" when the config has no Backend.
    public var type: String
    /// udp: Backend.Port (default 8285); vxlan: Backend.Port (default 8472);
    /// other backends: Backend.Port if given, else 0.
    public var port: UInt16
    /// vxlan: Backend.VNI (default 1); 0 for other backends.
    public var vni: Int
    /// vxlan: Backend.DirectRouting (default false).
    public var directRouting: Bool
    /// vxlan: Backend.MTU, the MTU to count from instead of the underlay
    /// interface's (the device gets MTU − 50, as in flannel); nil: the
    /// interface's.
    public var mtu: Int?
    /// vxlan: Backend.Learning, the device learns where MACs are from the
    /// packets it receives (default false).
    public var learning: Bool
    /// vxlan: Backend.GBP, the group-based policy extension (default false).
    public var gbp: Bool
    /// wireguard: ListenPort, PSK, PersistentKeepaliveInterval, Mode, MTU
    /// (checked here, so `tunneld config set` refuses bad values); nil for
    /// other backends. `port` is its ListenPort.
    public var wireguard: WireGuardConfig?
    /// Every field of the Backend object, as given.
    public var options: [String: JSONValue]

    public static let defaultUDPPort: UInt16 = DataPath.defaultUDPPort
    public static let defaultVXLANPort: UInt16 = 8472
    public static let defaultVNI = 1

    public init(
        type: String,
        port: UInt16,
        vni: Int = 0,
        directRouting: Bool = false,
        mtu: Int? = nil,
        learning: Bool = false,
        gbp: Bool = false,
        wireguard: WireGuardConfig? = nil,
        options: [String: JSONValue] = [:]
    ) {
        self.wireguard = wireguard
        self.type = type
        self.port = port
        self.vni = vni
        self.directRouting = directRouting
        self.mtu = mtu
        self.learning = learning
        self.gbp = gbp
        self.options = options
    }

    /// The lowest Backend.MTU of a vxlan network: its device (MTU − 50)
    /// must carry an IPv4 packet of 68 bytes.
    public static let lowestVXLANMTU = 68 + 50

    /// A Backend field by name, matched as flanneld matches it (any case).
    public func option(_ name: String) -> JSONValue? {
        JSONValue.object(options).field(name)
    }

    /// Reads the Backend object; nil means no Backend, which is udp.
    init(_ value: JSONValue?) throws(NetworkConfigError) {
        guard let value else {
            self.init(type: "udp", port: Self.defaultUDPPort)
            return
        }
        guard case .object(let fields) = value else {
            throw .invalidValue(
                field: "Backend",
                value: value.compactText,
                expected: "an object such as {\"Type\": \"udp\"}"
            )
        }
        guard let typeValue = NetworkConfig.present(value.field("Type")) else {
            throw .missingBackendType
        }
        guard case .string(let typeText) = typeValue else {
            throw .invalidValue(
                field: "Backend.Type",
                value: typeValue.compactText,
                expected: "a string such as \"udp\" or \"vxlan\""
            )
        }
        if typeText.isEmpty { throw .missingBackendType }
        let type = typeText.lowercased()
        let port: UInt16
        var vni = 0
        var directRouting = false
        var mtu: Int?
        var learning = false
        var gbp = false
        var wireguard: WireGuardConfig?
        switch type {
        case "udp":
            port = try Self.port(value, default: Self.defaultUDPPort, backend: type, allowZero: false)
        case "vxlan":
            // flannel passes Port 0 to the kernel, which then uses 8472.
            let given = try Self.port(value, default: Self.defaultVXLANPort, backend: type, allowZero: true)
            port = given == 0 ? Self.defaultVXLANPort : given
            vni =
                try NetworkConfig.wholeNumber(
                    value,
                    "VNI",
                    prefix: "Backend.",
                    range: 0...0xFF_FFFF,
                    expected: "a whole number 0…16777215 (default \(Self.defaultVNI))"
                ) ?? Self.defaultVNI
            directRouting = try NetworkConfig.bool(value, "DirectRouting", prefix: "Backend.") ?? false
            mtu = try NetworkConfig.wholeNumber(
                value,
                "MTU",
                prefix: "Backend.",
                range: Self.lowestVXLANMTU...65535,
                expected: "a whole number \(Self.lowestVXLANMTU)…65535, the MTU of the path between hosts "
                    + "(the vxlan device gets 50 less), or leave it out for the interface's MTU"
            )
            learning = try NetworkConfig.bool(value, "Learning", prefix: "Backend.") ?? false
            gbp = try NetworkConfig.bool(value, "GBP", prefix: "Backend.") ?? false
        case "wireguard":
            let settings = try WireGuardConfig(value)
            port = settings.listenPort
            wireguard = settings
        default:
            port = try Self.port(value, default: 0, backend: type, allowZero: true)
        }
        self.init(
            type: type,
            port: port,
            vni: vni,
            directRouting: directRouting,
            mtu: mtu,
            learning: learning,
            gbp: gbp,
            wireguard: wireguard,
            options: fields
        )
    }

    private static func port(
        _ backend: JSONValue,
        default defaultPort: UInt16,
        backend type: String,
        allowZero: Bool
    ) throws(NetworkConfigError) -> UInt16 {
        guard let value = NetworkConfig.present(backend.field("Port")) else { return defaultPort }
        let lowest = allowZero ? 0 : 1
        guard case .number(let n) = value, n == n.rounded(), n >= Double(lowest), n <= 65535 else {
            throw .invalidPort(
                backend: type,
                value: value.compactText,
                defaultPort: defaultPort,
                lowest: lowest
            )
        }
        return UInt16(n)
    }
}

/// A config that flannel (or tunneld) would refuse. Each description names
/// the field, the bad value and what would be valid.
public enum NetworkConfigError: Error, Sendable, Equatable, CustomStringConvertible {
    case invalidJSON(reason: String)
    case notAnObject(found: String)
    case missingNetwork
    case invalidValue(field: String, value: String, expected: String)
    case networkTooSmall(network: IPv4Network)
    case subnetLenTooLong(subnetLen: Int)
    case tooFewSubnets(network: IPv4Network, subnetLen: Int)
    case outsideNetwork(field: String, address: IPv4Address, network: IPv4Network)
    case notOnBoundary(field: String, address: IPv4Address, subnetLen: Int, suggestion: IPv4Address)
    case minAboveMax(min: IPv4Address, max: IPv4Address)
    case noAddressFamily
    case missingIPv6Network
    case ipv6NetworkTooSmall(network: IPv6Network)
    case ipv6SubnetLenTooLong(subnetLen: Int)
    case ipv6TooFewSubnets(network: IPv6Network, subnetLen: Int)
    case ipv6OutsideNetwork(field: String, address: IPv6Address, network: IPv6Network)
    case ipv6NotOnBoundary(field: String, address: IPv6Address, subnetLen: Int, suggestion: IPv6Address)
    case ipv6MinAboveMax(min: IPv6Address, max: IPv6Address)
    case missingBackendType
    case invalidPort(backend: String, value: String, defaultPort: UInt16, lowest: Int)

    public var description: String {
        switch self {
        case .invalidJSON(let reason):
            return "network config is not valid JSON: \(reason)"
        case .notAnObject(let found):
            return "network config must be a JSON object such as {\"Network\": \"10.2.0.0/16\"}, not \(found)"
        case .missingNetwork:
            return "please define a correct Network parameter in the flannel config, "
                + "such as \"Network\": \"10.2.0.0/16\""
        case .invalidValue(let field, let value, let expected):
            return "\(field) \(value) is not valid: use \(expected)"
        case .networkTooSmall(let network):
            return "Network is too small. Minimum useful network prefix is /28 "
                + "(Network is \(network)): use a network of /28 or larger"
        case .subnetLenTooLong(let subnetLen):
            return "SubnetLen must be less than /31 (SubnetLen is \(subnetLen)): use 30 or less, "
                + "or leave it out for the default"
        case .tooFewSubnets(let network, let subnetLen):
            return "Network must be able to accommodate at least four subnets "
                + "(Network \(network) with SubnetLen \(subnetLen)): "
                + (network.prefixLength + 2 <= NetworkConfig.longestSubnetLen
                    ? "use SubnetLen \(network.prefixLength + 2) or more, or a larger Network"
                    : "use a Network of /\(NetworkConfig.longestNetworkPrefix) or larger")
        case .outsideNetwork(let field, let address, let network):
            return "\(field) \(address) is not in the range of the Network \(network): "
                + "use an address from \(network.address) to \(network.lastAddress), "
                + "or leave \(field) out for the default"
        case .notOnBoundary(let field, let address, let subnetLen, let suggestion):
            return "\(field) \(address) is not on a SubnetLen (/\(subnetLen)) boundary: use \(suggestion)"
        case .minAboveMax(let min, let max):
            return "SubnetMin \(min) is above SubnetMax \(max): SubnetMin must not be above SubnetMax"
        case .noAddressFamily:
            return "EnableIPv4 and EnableIPv6 are both false, so the network has no addresses: "
                + "remove EnableIPv4 (IPv4 with Network, the default), or set EnableIPv6 to true "
                + "with an IPv6Network such as \"fd00:10:244::/48\" (IPv6-only)"
        case .missingIPv6Network:
            return "please define a correct IPv6Network parameter in the flannel config: EnableIPv6 is true, "
                + "so IPv6Network must be a network such as \"fd00:10:244::/48\" (or set EnableIPv6 to false)"
        case .ipv6NetworkTooSmall(let network):
            return
                "IPv6Network is too small. Minimum useful network prefix is /\(IPv6NetworkConfig.longestNetworkPrefix) "
                + "(IPv6Network is \(network)): use a network of /\(IPv6NetworkConfig.longestNetworkPrefix) or larger, "
                + "such as a /48 or /56 (each host gets a /64)"
        case .ipv6SubnetLenTooLong(let subnetLen):
            return "IPv6SubnetLen must be less than /127 (IPv6SubnetLen is \(subnetLen)): use 126 or less "
                + "(64 is usual), or leave it out for the default"
        case .ipv6TooFewSubnets(let network, let subnetLen):
            return "IPv6Network must be able to accommodate at least four subnets "
                + "(IPv6Network \(network) with IPv6SubnetLen \(subnetLen)): "
                + (network.prefixLength + 2 <= IPv6NetworkConfig.longestSubnetLen
                    ? "use IPv6SubnetLen \(network.prefixLength + 2) or more, or a larger IPv6Network"
                    : "use an IPv6Network of /\(IPv6NetworkConfig.longestNetworkPrefix) or larger")
        case .ipv6OutsideNetwork(let field, let address, let network):
            return "\(field) \(address) is not in the range of the IPv6Network \(network): "
                + "use an address from \(network.address) to \(network.lastAddress), "
                + "or leave \(field) out for the default"
        case .ipv6NotOnBoundary(let field, let address, let subnetLen, let suggestion):
            return "\(field) \(address) is not on an IPv6SubnetLen (/\(subnetLen)) boundary: use \(suggestion)"
        case .ipv6MinAboveMax(let min, let max):
            return "IPv6SubnetMin \(min) is above IPv6SubnetMax \(max): IPv6SubnetMin must not be above IPv6SubnetMax"
        case .missingBackendType:
            return "Backend.Type is missing: set it, e.g. \"Backend\": {\"Type\": \"udp\"}, "
                + "or remove Backend (which means udp)"
        case .invalidPort(let backend, let value, let defaultPort, let lowest):
            return "Backend.Port \(value) is not valid for the \(backend) backend: "
                + "use a whole number \(lowest)…65535"
                + (defaultPort != 0 ? " (default \(defaultPort))" : "")
        }
    }
}

/// The subnets from SubnetMin to SubnetMax, in address order: index 0 is
/// SubnetMin. Membership and index lookup are O(1).
public struct SubnetRange: RandomAccessCollection, Sendable, Equatable {
    /// Base address of the first subnet (SubnetMin).
    public let lowestAddress: IPv4Address
    /// Base address of the last subnet (SubnetMax).
    public let highestAddress: IPv4Address
    public let prefixLength: Int

    public init(lowestAddress: IPv4Address, highestAddress: IPv4Address, prefixLength: Int) {
        self.lowestAddress = lowestAddress
        self.highestAddress = highestAddress
        self.prefixLength = prefixLength
    }

    private var shift: UInt32 { UInt32(32 - prefixLength) }

    public var startIndex: Int { 0 }
    public var endIndex: Int {
        highestAddress < lowestAddress ? 0 : Int((highestAddress.value - lowestAddress.value) >> shift) + 1
    }

    public subscript(position: Int) -> IPv4Network {
        precondition(position >= 0 && position < endIndex, "subnet index \(position) out of range")
        return IPv4Network(
            address: IPv4Address(lowestAddress.value + UInt32(position) << shift),
            prefixLength: prefixLength
        )
    }

    /// The position of `subnet`, if it is one of these subnets.
    public func index(of subnet: IPv4Network) -> Int? {
        guard subnet.prefixLength == prefixLength,
            subnet.address >= lowestAddress, subnet.address <= highestAddress
        else { return nil }
        return Int((subnet.address.value - lowestAddress.value) >> shift)
    }

    public func contains(_ subnet: IPv4Network) -> Bool { index(of: subnet) != nil }
}

/// The IPv6 side of a dual-stack network config, with flannel's rules
/// (pkg/subnet/config.go, read for behaviour):
///
/// - `IPv6Network` is required when `EnableIPv6` is true ("::/0" counts as
///   missing, as in flannel).
/// - `IPv6SubnetLen` defaults to 64 when the network is /62 or larger, to
///   prefix+2 for /63…/124; a longer prefix is too small. Given, it must be
///   ≤ 126 and leave room for at least four subnets.
/// - `IPv6SubnetMin`/`IPv6SubnetMax` default to the second and the last
///   subnet; given ("::" means default), they must lie inside the network on
///   an `IPv6SubnetLen` boundary (and, tunneld's addition, min ≤ max).
public struct IPv6NetworkConfig: Sendable, Equatable {
    public var network: IPv6Network
    public var subnetLen: Int
    public var subnetMin: IPv6Network
    public var subnetMax: IPv6Network

    /// Each subnet needs four addresses (/126) and the network four subnets.
    public static let longestNetworkPrefix = 124
    public static let longestSubnetLen = 126
    /// What a host gets when the network is large enough.
    public static let defaultSubnetLen = 64

    /// The IPv6 fields as given, each well-formed or absent.
    struct Fields {
        var network: IPv6Network?
        var subnetLen: Int
        var subnetMin: IPv6Address?
        var subnetMax: IPv6Address?

        init(_ root: JSONValue) throws(NetworkConfigError) {
            network = nil
            if let value = NetworkConfig.present(root.field("IPv6Network")) {
                guard case .string(let text) = value, let parsed = IPv6Network(text) else {
                    throw .invalidValue(
                        field: "IPv6Network",
                        value: value.compactText,
                        expected: "an IPv6 network in CIDR form such as \"fd00:10:244::/48\""
                    )
                }
                // Its subnets would be printed with dots (::ffff:10.0.0.0), which
                // flannel's lease key pattern does not match: no lease could be read.
                if parsed.overlaps(Self.ipv4Mapped) && !(parsed.prefixLength == 0) {
                    throw .invalidValue(
                        field: "IPv6Network",
                        value: value.compactText,
                        expected: "a network outside ::ffff:0:0/96 (IPv4-mapped addresses), "
                            + "such as \"fd00:10:244::/48\""
                    )
                }
                network = parsed
            }
            subnetLen =
                try NetworkConfig.wholeNumber(
                    root,
                    "IPv6SubnetLen",
                    range: 0...Int(Int32.max),
                    expected: "a whole number of bits such as 64"
                ) ?? 0
            subnetMin = try Self.address(root, "IPv6SubnetMin")
            subnetMax = try Self.address(root, "IPv6SubnetMax")
        }

        static let ipv4Mapped = IPv6Network(address: IPv6Address(0xffff_0000_0000), prefixLength: 96)

        /// "::" means "use the default", as in flannel.
        static func address(_ object: JSONValue, _ name: String) throws(NetworkConfigError) -> IPv6Address? {
            guard let value = NetworkConfig.present(object.field(name)) else { return nil }
            guard case .string(let text) = value, let address = IPv6Address(text) else {
                throw .invalidValue(
                    field: name,
                    value: value.compactText,
                    expected: "an IPv6 address such as \"fd00:10:244:1::\" (without /len)"
                )
            }
            return address.isUnspecified ? nil : address
        }
    }

    public init(network: IPv6Network, subnetLen: Int, subnetMin: IPv6Network, subnetMax: IPv6Network) {
        self.network = network
        self.subnetLen = subnetLen
        self.subnetMin = subnetMin
        self.subnetMax = subnetMax
    }

    init(_ fields: Fields) throws(NetworkConfigError) {
        guard let network = fields.network, !(network.prefixLength == 0 && network.address.isUnspecified) else {
            throw .missingIPv6Network
        }
        self.network = network
        let prefix = network.prefixLength
        var length = fields.subnetLen
        if length > 0 {
            if length > Self.longestSubnetLen { throw .ipv6SubnetLenTooLong(subnetLen: length) }
            if length < prefix + 2 { throw .ipv6TooFewSubnets(network: network, subnetLen: length) }
        } else if prefix > Self.longestNetworkPrefix {
            throw .ipv6NetworkTooSmall(network: network)
        } else if prefix <= Self.defaultSubnetLen - 2 {
            length = Self.defaultSubnetLen
        } else {
            length = prefix + 2
        }
        subnetLen = length
        let size = UInt128(1) << UInt128(128 - length)
        let minAddress = fields.subnetMin ?? IPv6Address(network.address.value &+ size)
        let maxAddress = fields.subnetMax ?? IPv6Address(network.lastAddress.value &- (size &- 1))
        for (field, address) in [("IPv6SubnetMin", minAddress), ("IPv6SubnetMax", maxAddress)]
        where !network.contains(address) {
            throw .ipv6OutsideNetwork(field: field, address: address, network: network)
        }
        let mask = IPv6Network.mask(length)
        for (field, address) in [("IPv6SubnetMin", minAddress), ("IPv6SubnetMax", maxAddress)]
        where address.value & mask != address.value {
            throw .ipv6NotOnBoundary(
                field: field,
                address: address,
                subnetLen: length,
                suggestion: IPv6Address(address.value & mask)
            )
        }
        if minAddress > maxAddress { throw .ipv6MinAboveMax(min: minAddress, max: maxAddress) }
        subnetMin = IPv6Network(address: minAddress, prefixLength: length)
        subnetMax = IPv6Network(address: maxAddress, prefixLength: length)
    }

    /// Whether `subnet` could be handed out: flannel's compatibility test
    /// for reusing a lease — IPv6SubnetLen, between IPv6SubnetMin and Max.
    public func fits(_ subnet: IPv6Network) -> Bool {
        subnet.prefixLength == subnetLen && subnet.address >= subnetMin.address && subnet.address <= subnetMax.address
    }
}
