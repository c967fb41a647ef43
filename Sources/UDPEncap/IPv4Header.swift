import Offload

/// Reading and changing IPv4 headers in place, on raw packet memory.
///
/// flannel's udp wire format is the raw IPv4 packet as the UDP payload, so
/// everything the data path needs to know about a packet is in its IPv4
/// header. These functions never allocate and never trap on malformed input:
/// they report what is wrong as a `PacketDefect`.
public enum IPv4Header {
    public static let minimumLength = 20

    @inlinable @inline(__always)
    public static func load16(_ p: UnsafeRawPointer, _ offset: Int) -> UInt16 {
        UInt16(p.load(fromByteOffset: offset, as: UInt8.self)) << 8
            | UInt16(p.load(fromByteOffset: offset + 1, as: UInt8.self))
    }

    @inlinable @inline(__always)
    public static func store16(_ p: UnsafeMutableRawPointer, _ offset: Int, _ v: UInt16) {
        p.storeBytes(of: UInt8(v >> 8), toByteOffset: offset, as: UInt8.self)
        p.storeBytes(of: UInt8(truncatingIfNeeded: v), toByteOffset: offset + 1, as: UInt8.self)
    }

    @inlinable @inline(__always)
    public static func load32(_ p: UnsafeRawPointer, _ offset: Int) -> UInt32 {
        UInt32(load16(p, offset)) << 16 | UInt32(load16(p, offset + 2))
    }

    @inlinable @inline(__always)
    public static func store32(_ p: UnsafeMutableRawPointer, _ offset: Int, _ v: UInt32) {
        store16(p, offset, UInt16(v >> 16))
        store16(p, offset + 2, UInt16(truncatingIfNeeded: v))
    }

    @inlinable @inline(__always) public static func source(_ p: UnsafeRawPointer) -> UInt32 { load32(p, 12) }
    @inlinable @inline(__always) public static func destination(_ p: UnsafeRawPointer) -> UInt32 { load32(p, 16) }
    @inlinable @inline(__always) public static func ttl(_ p: UnsafeRawPointer) -> UInt8 {
        p.load(fromByteOffset: 8, as: UInt8.self)
    }
    @inlinable @inline(__always) public static func proto(_ p: UnsafeRawPointer) -> UInt8 {
        p.load(fromByteOffset: 9, as: UInt8.self)
    }
    @inlinable @inline(__always) public static func headerLength(_ p: UnsafeRawPointer) -> Int {
        Int(p.load(fromByteOffset: 0, as: UInt8.self) & 0x0f) * 4
    }
    @inlinable @inline(__always) public static func totalLength(_ p: UnsafeRawPointer) -> Int { Int(load16(p, 2)) }
    /// Whether the Don't Fragment flag is set.
    @inlinable @inline(__always) public static func dontFragment(_ p: UnsafeRawPointer) -> Bool {
        load16(p, 6) & 0x4000 != 0
    }
    /// Fragment offset in 8-byte units (0 for the first or only fragment).
    @inlinable @inline(__always) public static func fragmentOffset(_ p: UnsafeRawPointer) -> Int {
        Int(load16(p, 6) & 0x1fff)
    }

    /// Checks that `length` bytes at `p` hold a well-formed IPv4 packet: long
    /// enough, version 4, a header length of at least 20 bytes that fits, a
    /// total length between the header length and `length`, and a correct
    /// header checksum. On success returns the packet's total length (which
    /// may be shorter than `length` when the datagram carries padding).
    @inlinable @inline(__always)
    public static func validate(_ p: UnsafeRawPointer, length: Int) -> Result<Int, PacketDefect> {
        guard length >= minimumLength else { return .failure(.tooShort) }
        let first = p.load(fromByteOffset: 0, as: UInt8.self)
        guard first >> 4 == 4 else { return .failure(.notIPv4) }
        let ihl = Int(first & 0x0f) * 4
        guard ihl >= minimumLength, ihl <= length else { return .failure(.badHeaderLength) }
        let total = totalLength(p)
        guard total >= ihl, total <= length else { return .failure(.badTotalLength) }
        guard checksum(p, count: ihl) == 0 else { return .failure(.badChecksum) }
        return .success(total)
    }

    /// The Internet checksum (RFC 1071) of `count` bytes; 0 over a header
    /// that includes a correct checksum field. (Offload's `Checksum`, which
    /// sums 8 bytes per step.)
    @inlinable @inline(__always)
    public static func checksum(_ p: UnsafeRawPointer, count: Int, initial: UInt32 = 0) -> UInt16 {
        Checksum.compute(p, count: count, initial: UInt64(initial))
    }

    /// Recomputes the header checksum from scratch.
    @inlinable
    public static func updateChecksum(_ p: UnsafeMutableRawPointer) {
        store16(p, 10, 0)
        store16(p, 10, checksum(p, count: headerLength(p)))
    }

    /// Decrements the TTL by one and patches the header checksum
    /// incrementally (RFC 1624): the 16-bit word holding TTL drops by 0x0100,
    /// so the one's-complement checksum rises by 0x0100 with end-around carry.
    /// The caller has checked that TTL > 1.
    @inlinable @inline(__always)
    public static func decrementTTL(_ p: UnsafeMutableRawPointer) {
        p.storeBytes(of: ttl(p) &- 1, toByteOffset: 8, as: UInt8.self)
        var sum = UInt32(load16(p, 10)) &+ 0x0100
        sum = (sum & 0xffff) &+ (sum >> 16)
        store16(p, 10, UInt16(truncatingIfNeeded: sum))
    }
}

/// Why a packet was not forwarded. Each has its own counter.
@frozen
public enum PacketDefect: Int, Error, Sendable, CaseIterable, CustomStringConvertible {
    case tooShort
    case notIPv4
    case badHeaderLength
    case badTotalLength
    case badChecksum
    case notIPv6
    /// IPv6: a payload length of 0 (a jumbogram) or beyond the datagram.
    case badPayloadLength

    public var description: String {
        switch self {
        case .tooShort: "shorter than an IPv4 header"
        case .notIPv4: "IP version is not 4"
        case .badHeaderLength: "header length below 20 bytes or beyond the packet"
        case .badTotalLength: "total length below the header length or beyond the datagram"
        case .badChecksum: "header checksum mismatch"
        case .notIPv6: "IP version is not 6"
        case .badPayloadLength: "IPv6 payload length 0 (jumbogram) or beyond the datagram"
        }
    }
}
