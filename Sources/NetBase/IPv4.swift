/// An IPv4 address held in host byte order.
public struct IPv4Address: Hashable, Comparable, Sendable, CustomStringConvertible, Codable {
    public var value: UInt32

    public init(_ value: UInt32) { self.value = value }

    public init(_ a: UInt8, _ b: UInt8, _ c: UInt8, _ d: UInt8) {
        value = UInt32(a) << 24 | UInt32(b) << 16 | UInt32(c) << 8 | UInt32(d)
    }

    /// Parses dotted-quad notation ("10.2.72.1"); nil for anything else.
    public init?(_ text: some StringProtocol) {
        var parts: [UInt32] = []
        parts.reserveCapacity(4)
        for part in text.split(separator: ".", omittingEmptySubsequences: false) {
            guard !part.isEmpty, part.count <= 3, part.allSatisfy({ $0.isASCII && $0.isNumber }),
                  let n = UInt32(part), n <= 255 else { return nil }
            parts.append(n)
        }
        guard parts.count == 4 else { return nil }
        value = parts[0] << 24 | parts[1] << 16 | parts[2] << 8 | parts[3]
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
            throw DecodingError.dataCorrupted(.init(
                codingPath: decoder.codingPath,
                debugDescription: "\"\(text)\" is not an IPv4 address (expected a.b.c.d)"))
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
    public let prefixLength: Int

    /// Builds a network; host bits of `address` are cleared.
    public init(address: IPv4Address, prefixLength: Int) {
        precondition((0...32).contains(prefixLength), "prefix length \(prefixLength) outside 0...32")
        self.prefixLength = prefixLength
        self.address = IPv4Address(address.value & IPv4Network.mask(prefixLength))
    }

    /// Parses "10.2.0.0/16". With `strict`, host bits must be zero.
    public init?(_ text: some StringProtocol, strict: Bool = false) {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, let address = IPv4Address(parts[0]),
              parts[1].count <= 2, parts[1].allSatisfy({ $0.isASCII && $0.isNumber }),
              let length = Int(parts[1]), (0...32).contains(length) else { return nil }
        if strict && address.value & ~IPv4Network.mask(length) != 0 { return nil }
        self.init(address: address, prefixLength: length)
    }

    /// flannel's lease key form, "10.2.72.0-24".
    public init?(leaseKey text: some StringProtocol) {
        let parts = text.split(separator: "-", omittingEmptySubsequences: false)
        guard parts.count == 2 else { return nil }
        self.init("\(parts[0])/\(parts[1])", strict: true)
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
            throw DecodingError.dataCorrupted(.init(
                codingPath: decoder.codingPath,
                debugDescription: "\"\(text)\" is not an IPv4 network (expected a.b.c.d/len)"))
        }
        self = network
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}
