/// An IPv4 address held in host byte order.
public struct IPv4Address: Hashable, Comparable, Sendable, CustomStringConvertible, Codable {
    public var value: UInt32

    public init(_ value: UInt32) { self.value = value }

    public init(_ a: UInt8, _ b: UInt8, _ c: UInt8, _ d: UInt8) {
        value = UInt32(a) << 24 | UInt32(b) << 16 | UInt32(c) << 8 | UInt32(d)
    }

    /// Parses dotted-quad notation ("10.2.72.1"); nil for anything else.
    /// Octets of up to three digits are read as decimal ("010" is 10).
    public init?(_ text: some StringProtocol) {
        guard let value = IPv4Address.parse(text.utf8, canonical: false) else { return nil }
        self.value = value
    }

    /// Parses dotted-quad bytes in one pass without building strings. With
    /// `canonical`, only the spelling `description` gives is accepted (no
    /// leading zeros: "010" names nothing), as Go's parser and flannel's
    /// lease keys have it.
    @inlinable
    public static func parse(_ bytes: some Collection<UInt8>, canonical: Bool) -> UInt32? {
        var value: UInt32 = 0
        var octet: UInt32 = 0
        var digits = 0
        var dots = 0
        var leadingZero = false
        for b in bytes {
            if b == UInt8(ascii: ".") {
                guard digits > 0, dots < 3 else { return nil }
                value = value << 8 | octet
                octet = 0
                digits = 0
                dots += 1
                continue
            }
            guard b >= UInt8(ascii: "0"), b <= UInt8(ascii: "9"), digits < 3 else { return nil }
            if digits == 0 { leadingZero = b == UInt8(ascii: "0") } else if canonical && leadingZero { return nil }
            octet = octet * 10 + UInt32(b - UInt8(ascii: "0"))
            guard octet <= 255 else { return nil }
            digits += 1
        }
        guard digits > 0, dots == 3 else { return nil }
        return value << 8 | octet
    }

    /// The address in network byte order, as `sockaddr_in.sin_addr.s_addr` wants it.
    public var networkOrder: UInt32 { value.bigEndian }

    public init(networkOrder: UInt32) { value = UInt32(bigEndian: networkOrder) }

    public var description: String {
        "\(value >> 24).\(value >> 16 & 0xff).\(value >> 8 & 0xff).\(value & 0xff)"
    }

    public static func < (lhs: IPv4Address, rhs: IPv4Address) -> Bool { lhs.value < rhs.value }

    public init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        guard let address = IPv4Address(text) else {
            throw DecodingError.dataCorrupted(
                .init(
                    codingPath: decoder.codingPath,
                    debugDescription: "\"\(text)\" is not an IPv4 address (expected a.b.c.d)"
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

/// An IPv4 network in CIDR form; the address is always the network's base
/// (host bits zero).
public struct IPv4Network: Hashable, Sendable, CustomStringConvertible, Codable {
    public let address: IPv4Address
    /// Stored in one byte: a network is 8 bytes, and a table of 60,000
    /// peers keyed by subnet is half the size it would be with an `Int`.
    private let length: UInt8
    public var prefixLength: Int { Int(length) }

    /// Builds a network; host bits of `address` are cleared.
    public init(address: IPv4Address, prefixLength: Int) {
        precondition((0...32).contains(prefixLength), "prefix length \(prefixLength) outside 0...32")
        self.length = UInt8(prefixLength)
        self.address = IPv4Address(address.value & IPv4Network.mask(prefixLength))
    }

    /// Parses "10.2.0.0/16". With `strict`, host bits must be zero.
    public init?(_ text: some StringProtocol, strict: Bool = false) {
        guard
            let network = IPv4Network.parse(
                text.utf8,
                separator: UInt8(ascii: "/"),
                canonical: false,
                strict: strict
            )
        else { return nil }
        self = network
    }

    /// flannel's lease key form, "10.2.72.0-24" (host bits zero).
    public init?(leaseKey text: some StringProtocol) {
        guard
            let network = IPv4Network.parse(
                text.utf8,
                separator: UInt8(ascii: "-"),
                canonical: false,
                strict: true
            )
        else { return nil }
        self = network
    }

    /// Parses `address<separator>length` bytes in one pass: the length is at
    /// most two digits and ≤ 32; with `canonical`, neither the address nor
    /// the length may have a leading zero (only `leaseKey`'s own spelling);
    /// with `strict`, host bits must be zero.
    @inlinable
    public static func parse(
        _ bytes: some Collection<UInt8>,
        separator: UInt8,
        canonical: Bool,
        strict: Bool
    ) -> IPv4Network? {
        guard let cut = bytes.firstIndex(of: separator),
            let address = IPv4Address.parse(bytes[..<cut], canonical: canonical)
        else { return nil }
        let lengthBytes = bytes[bytes.index(after: cut)...]
        var length = 0
        var digits = 0
        for b in lengthBytes {
            guard b >= UInt8(ascii: "0"), b <= UInt8(ascii: "9"), digits < 2 else { return nil }
            if canonical && digits == 1 && length == 0 { return nil }
            length = length * 10 + Int(b - UInt8(ascii: "0"))
            digits += 1
        }
        guard digits > 0, length <= 32 else { return nil }
        if strict && address & ~IPv4Network.mask(length) != 0 { return nil }
        return IPv4Network(address: IPv4Address(address), prefixLength: length)
    }

    public static func mask(_ prefixLength: Int) -> UInt32 {
        prefixLength == 0 ? 0 : UInt32.max << UInt32(32 - prefixLength)
    }

    public var mask: UInt32 { IPv4Network.mask(prefixLength) }
    public var size: UInt64 { UInt64(1) << UInt64(32 - prefixLength) }
    public var lastAddress: IPv4Address { IPv4Address(address.value | ~mask) }
    /// The first host address (base + 1), as flannel puts into FLANNEL_SUBNET.
    public var firstHost: IPv4Address { IPv4Address(address.value &+ 1) }

    public func contains(_ a: IPv4Address) -> Bool { a.value & mask == address.value }
    public func contains(_ n: IPv4Network) -> Bool {
        n.prefixLength >= prefixLength && contains(n.address)
    }
    public func overlaps(_ n: IPv4Network) -> Bool { contains(n.address) || n.contains(address) }

    public var description: String { "\(address)/\(prefixLength)" }
    public var leaseKey: String { "\(address)-\(prefixLength)" }

    public init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        guard let network = IPv4Network(text) else {
            throw DecodingError.dataCorrupted(
                .init(
                    codingPath: decoder.codingPath,
                    debugDescription: "\"\(text)\" is not an IPv4 network (expected a.b.c.d/len)"
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
