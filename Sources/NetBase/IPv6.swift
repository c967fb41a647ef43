/// An IPv6 address as one 128-bit number (the first group in the top bits).
public struct IPv6Address: Hashable, Comparable, Sendable, CustomStringConvertible, Codable {
    public var value: UInt128

    public init(_ value: UInt128) { self.value = value }

    /// The address of 16 bytes in network order; nil unless there are exactly 16.
    public init?(bytes: some Collection<UInt8>) {
        guard bytes.count == 16 else { return nil }
        var value: UInt128 = 0
        for b in bytes { value = value << 8 | UInt128(b) }
        self.value = value
    }

    /// The 16 bytes in network order, as `sockaddr_in6.sin6_addr` and netlink carry them.
    public var bytes: [UInt8] {
        (0..<16).map { UInt8(truncatingIfNeeded: value >> UInt128(8 * (15 - $0))) }
    }

    /// Parses any text form of RFC 4291 section 2.2: eight groups of one to
    /// four hex digits, one "::" standing for one or more zero groups, and a
    /// dotted quad in place of the last two groups ("::ffff:192.0.2.1").
    /// Hex digits of either case. nil for anything else (zone suffixes
    /// such as "%eth0" and prefix lengths included).
    public init?(_ text: some StringProtocol) {
        guard let value = IPv6Address.parse(text.utf8) else { return nil }
        self.value = value
    }

    /// `init(_:)` over bytes. Not for a hot path: it copies the text once.
    public static func parse(_ bytes: some Collection<UInt8>) -> UInt128? {
        let text = Array(bytes)
        let colon = UInt8(ascii: ":")
        guard text.count >= 2, text.count <= 45 else { return nil }
        // Find the one "::", if any.
        var gap: Int?
        var i = 0
        while i + 1 < text.count {
            if text[i] == colon && text[i + 1] == colon {
                guard gap == nil else { return nil }
                gap = i
                i += 2
                continue
            }
            i += 1
        }
        // Groups of one side; the dotted quad may end the address only.
        func groups(_ part: ArraySlice<UInt8>, last: Bool) -> [UInt32]? {
            if part.isEmpty { return [] }
            var result: [UInt32] = []
            let fields = part.split(separator: colon, omittingEmptySubsequences: false)
            for (n, field) in fields.enumerated() {
                if last && n == fields.count - 1 && field.contains(UInt8(ascii: ".")) {
                    guard let v4 = IPv4Address.parse(field, canonical: true) else { return nil }
                    result.append(v4 >> 16)
                    result.append(v4 & 0xffff)
                    continue
                }
                guard (1...4).contains(field.count) else { return nil }
                var g: UInt32 = 0
                for b in field {
                    guard let h = hexValue(b) else { return nil }
                    g = g << 4 | h
                }
                result.append(g)
            }
            return result
        }
        let head: [UInt32], tail: [UInt32]
        if let gap {
            guard let h = groups(text[..<gap], last: false),
                let t = groups(text[(gap + 2)...], last: true),
                h.count + t.count <= 7
            else { return nil }
            head = h
            tail = t
        } else {
            guard let h = groups(text[...], last: true), h.count == 8 else { return nil }
            head = h
            tail = []
        }
        var value: UInt128 = 0
        for g in head { value = value << 16 | UInt128(g) }
        value <<= UInt128(16 * (8 - head.count))
        var low: UInt128 = 0
        for g in tail { low = low << 16 | UInt128(g) }
        return value | low
    }

    private static func hexValue(_ b: UInt8) -> UInt32? {
        switch b {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return UInt32(b - UInt8(ascii: "0"))
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return UInt32(b - UInt8(ascii: "a") + 10)
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return UInt32(b - UInt8(ascii: "A") + 10)
        default: return nil
        }
    }

    /// The group at `index` (0 is the first, most significant).
    public func group(_ index: Int) -> UInt16 {
        UInt16(truncatingIfNeeded: value >> UInt128(16 * (7 - index)))
    }

    /// RFC 5952 text: lower-case hex without leading zeros; the longest run
    /// of two or more zero groups (the first of equal runs) as "::"; an
    /// IPv4-mapped address (::ffff:0:0/96) ends in a dotted quad. This is
    /// the spelling Go's net.IP prints, so flanneld's keys and tunneld's agree.
    public var description: String {
        if value >> 32 == 0xffff {
            return "::ffff:" + IPv4Address(UInt32(truncatingIfNeeded: value)).description
        }
        var bestStart = -1, bestLength = 0
        var runStart = -1
        for i in 0...8 {
            if i < 8 && group(i) == 0 {
                if runStart < 0 { runStart = i }
            } else if runStart >= 0 {
                if i - runStart > bestLength { bestStart = runStart; bestLength = i - runStart }
                runStart = -1
            }
        }
        if bestLength < 2 { bestStart = -1 }
        var out = ""
        var i = 0
        while i < 8 {
            if i == bestStart {
                out += "::"
                i += bestLength
                continue
            }
            if !out.isEmpty && !out.hasSuffix(":") { out += ":" }
            out += String(group(i), radix: 16)
            i += 1
        }
        return out
    }

    public static func < (lhs: IPv6Address, rhs: IPv6Address) -> Bool { lhs.value < rhs.value }

    public var isLinkLocalUnicast: Bool { value >> 118 == 0x3fa }  // fe80::/10
    public var isMulticast: Bool { value >> 120 == 0xff }
    public var isLoopback: Bool { value == 1 }
    public var isUnspecified: Bool { value == 0 }
    /// Go's `IsGlobalUnicast` for IPv6: not unspecified, loopback, multicast
    /// or link-local (unique local fc00::/7 counts as global, as in Go).
    public var isGlobalUnicast: Bool { !isUnspecified && !isLoopback && !isMulticast && !isLinkLocalUnicast }

    public init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        guard let address = IPv6Address(text) else {
            throw DecodingError.dataCorrupted(
                .init(
                    codingPath: decoder.codingPath,
                    debugDescription: "\"\(text)\" is not an IPv6 address (expected e.g. fd00:10:244::1)"
                )
            )
        }
        self = address
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}

/// An IPv6 network in CIDR form; the address is always the network's base
/// (host bits zero).
public struct IPv6Network: Hashable, Sendable, CustomStringConvertible, Codable {
    public let address: IPv6Address
    private let length: UInt8
    public var prefixLength: Int { Int(length) }

    /// Builds a network; host bits of `address` are cleared.
    public init(address: IPv6Address, prefixLength: Int) {
        precondition((0...128).contains(prefixLength), "prefix length \(prefixLength) outside 0...128")
        self.length = UInt8(prefixLength)
        self.address = IPv6Address(address.value & IPv6Network.mask(prefixLength))
    }

    /// Parses "fd00:10:244::/48". With `strict`, host bits must be zero.
    public init?(_ text: some StringProtocol, strict: Bool = false) {
        guard let network = IPv6Network.parse(Substring(text).utf8, separator: UInt8(ascii: "/"), strict: strict)
        else { return nil }
        self = network
    }

    /// flannel's lease key form of the IPv6 part, "fd00:10:244:1::-64": only
    /// the canonical spelling (`leaseKey`) names a subnet, so no second key
    /// can name the same one.
    public init?(leaseKey text: some StringProtocol) {
        guard let network = IPv6Network.parse(Substring(text).utf8, separator: UInt8(ascii: "-"), strict: true),
            network.leaseKey.utf8.elementsEqual(text.utf8)
        else { return nil }
        self = network
    }

    /// Parses `address<separator>length`; the length is one to three decimal
    /// digits, ≤ 128. The separator is the last one in the text.
    public static func parse(
        _ bytes: some BidirectionalCollection<UInt8>,
        separator: UInt8,
        strict: Bool
    ) -> IPv6Network? {
        guard let cut = bytes.lastIndex(of: separator),
            let address = IPv6Address.parse(bytes[..<cut])
        else { return nil }
        var length = 0
        var digits = 0
        for b in bytes[bytes.index(after: cut)...] {
            guard b >= UInt8(ascii: "0"), b <= UInt8(ascii: "9"), digits < 3 else { return nil }
            length = length * 10 + Int(b - UInt8(ascii: "0"))
            digits += 1
        }
        guard digits > 0, length <= 128 else { return nil }
        if strict && address & ~IPv6Network.mask(length) != 0 { return nil }
        return IPv6Network(address: IPv6Address(address), prefixLength: length)
    }

    public static func mask(_ prefixLength: Int) -> UInt128 {
        prefixLength == 0 ? 0 : UInt128.max << UInt128(128 - prefixLength)
    }

    public var mask: UInt128 { IPv6Network.mask(prefixLength) }
    public var lastAddress: IPv6Address { IPv6Address(address.value | ~mask) }
    /// The first host address (base + 1), as flannel puts into FLANNEL_IPV6_SUBNET.
    public var firstHost: IPv6Address { IPv6Address(address.value &+ 1) }
    /// The address `offset` after the base; wraps within 128 bits.
    public func address(at offset: UInt128) -> IPv6Address { IPv6Address(address.value &+ offset) }

    /// How many subnets of `prefixLength` (≥ this network's) fit in it,
    /// capped at `UInt64.max` (a /0 holds 2^64 /64s).
    public func subnetCount(prefixLength subnetLength: Int) -> UInt64 {
        precondition(subnetLength >= prefixLength && subnetLength <= 128)
        let bits = subnetLength - prefixLength
        return bits >= 64 ? UInt64.max : UInt64(1) << UInt64(bits)
    }

    /// The `index`-th subnet of `prefixLength` in this network (0 is the first).
    public func subnet(prefixLength subnetLength: Int, index: UInt64) -> IPv6Network {
        precondition(subnetLength >= prefixLength && subnetLength <= 128)
        precondition(
            UInt64(subnetLength - prefixLength) >= 64 || index < UInt64(1) << UInt64(subnetLength - prefixLength),
            "subnet index \(index) outside \(self)"
        )
        let step = subnetLength == 0 ? 0 : UInt128(index) << UInt128(128 - subnetLength)
        return IPv6Network(address: IPv6Address(address.value | step), prefixLength: subnetLength)
    }

    /// The next network of the same length (wraps at the end of the space).
    public var next: IPv6Network {
        let size = prefixLength == 0 ? 0 : UInt128(1) << UInt128(128 - prefixLength)
        return IPv6Network(address: IPv6Address(address.value &+ size), prefixLength: prefixLength)
    }

    public func contains(_ a: IPv6Address) -> Bool { a.value & mask == address.value }
    public func contains(_ n: IPv6Network) -> Bool {
        n.prefixLength >= prefixLength && contains(n.address)
    }
    public func overlaps(_ n: IPv6Network) -> Bool { contains(n.address) || n.contains(address) }

    public var description: String { "\(address)/\(prefixLength)" }
    /// flannel's key form, "fd00:10:244:1::-64".
    public var leaseKey: String { "\(address)-\(prefixLength)" }

    public init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        guard let network = IPv6Network(text) else {
            throw DecodingError.dataCorrupted(
                .init(
                    codingPath: decoder.codingPath,
                    debugDescription: "\"\(text)\" is not an IPv6 network (expected e.g. fd00:10:244::/48)"
                )
            )
        }
        self = network
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}
