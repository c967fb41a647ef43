import Offload

/// Reading and changing IPv6 headers in place, on raw packet memory: the
/// udp backend carries IPv6 inner packets of a dual-stack network the way
/// it carries IPv4 ones (the raw packet as the UDP payload). Nothing here
/// allocates or traps on malformed input.
public enum IPv6Header {
    /// The fixed header; extension headers, if any, follow it.
    public static let length = 40
    /// Next-header value of ICMPv6.
    public static let protocolICMPv6: UInt8 = 58

    @inlinable @inline(__always)
    public static func load64(_ p: UnsafeRawPointer, _ offset: Int) -> UInt64 {
        UInt64(IPv4Header.load32(p, offset)) << 32 | UInt64(IPv4Header.load32(p, offset + 4))
    }

    @inlinable @inline(__always)
    public static func load128(_ p: UnsafeRawPointer, _ offset: Int) -> UInt128 {
        UInt128(load64(p, offset)) << 64 | UInt128(load64(p, offset + 8))
    }

    @inlinable @inline(__always)
    public static func store128(_ p: UnsafeMutableRawPointer, _ offset: Int, _ v: UInt128) {
        for i in 0..<4 {
            IPv4Header.store32(p, offset + 4 * i, UInt32(truncatingIfNeeded: v >> (96 - 32 * UInt128(i))))
        }
    }

    @inlinable @inline(__always) public static func source(_ p: UnsafeRawPointer) -> UInt128 { load128(p, 8) }
    @inlinable @inline(__always) public static func destination(_ p: UnsafeRawPointer) -> UInt128 { load128(p, 24) }
    @inlinable @inline(__always) public static func payloadLength(_ p: UnsafeRawPointer) -> Int {
        Int(IPv4Header.load16(p, 4))
    }
    @inlinable @inline(__always) public static func nextHeader(_ p: UnsafeRawPointer) -> UInt8 {
        p.load(fromByteOffset: 6, as: UInt8.self)
    }
    @inlinable @inline(__always) public static func hopLimit(_ p: UnsafeRawPointer) -> UInt8 {
        p.load(fromByteOffset: 7, as: UInt8.self)
    }

    /// Decrements the hop limit (IPv6 has no header checksum to patch). The
    /// caller has checked that it is above 1.
    @inlinable @inline(__always)
    public static func decrementHopLimit(_ p: UnsafeMutableRawPointer) {
        p.storeBytes(of: hopLimit(p) &- 1, toByteOffset: 7, as: UInt8.self)
    }

    /// Checks that `length` bytes at `p` hold a well-formed IPv6 packet: at
    /// least the fixed header, version 6, and a payload length that fits
    /// (0, a jumbogram's, is refused: no tunnel carries one). Returns the
    /// packet's length (which may be shorter than `length` when the
    /// datagram carries padding).
    @inlinable @inline(__always)
    public static func validate(_ p: UnsafeRawPointer, length: Int) -> Result<Int, PacketDefect> {
        guard length >= Self.length else { return .failure(.tooShort) }
        guard p.load(fromByteOffset: 0, as: UInt8.self) >> 4 == 6 else { return .failure(.notIPv6) }
        let payload = payloadLength(p)
        guard payload > 0, Self.length + payload <= length else { return .failure(.badPayloadLength) }
        return .success(Self.length + payload)
    }

    /// The Internet checksum of an upper-layer message of `count` bytes at
    /// `message` with the IPv6 pseudo-header (RFC 8200 section 8.1) of
    /// `source`, `destination` and `nextHeader`: 0 over a message whose
    /// checksum field is right.
    @inlinable
    public static func upperLayerChecksum(
        _ message: UnsafeRawPointer,
        count: Int,
        source: UInt128,
        destination: UInt128,
        nextHeader: UInt8
    ) -> UInt16 {
        let pseudo = Checksum.pseudoHeader6(
            source: source,
            destination: destination,
            nextHeader: nextHeader,
            length: count
        )
        return Checksum.compute(message, count: count, initial: pseudo)
    }
}
