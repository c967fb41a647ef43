#if canImport(Glibc)
import Glibc
#endif

/// Turning an IPv6 packet that cannot be forwarded into the ICMPv6 error
/// (RFC 4443) that tells its sender why, in place in the packet's own
/// buffer: the IPv6 twin of `ICMPError`.
public enum ICMPv6Error {
    public enum Kind: Sendable, Equatable {
        /// Type 1 code 0: no peer holds the destination's subnet.
        case noRoute
        /// Type 3 code 0: the hop limit ran out in the tunnel.
        case hopLimitExceeded
        /// Type 2: the packet is bigger than the tunnel carries; `mtu` tells
        /// the sender what fits (IPv6 routers never fragment, so every
        /// too-big packet gets one, whatever its flags).
        case packetTooBig(mtu: UInt32)

        var typeAndCode: (UInt8, UInt8) {
            switch self {
            case .noRoute: (1, 0)
            case .hopLimitExceeded: (3, 0)
            case .packetTooBig: (2, 0)
            }
        }

        /// The ICMPv6 header's second word: unused (0), or the MTU.
        var restOfHeader: UInt32 {
            if case .packetTooBig(let mtu) = self { return mtu }
            return 0
        }
    }

    /// RFC 4443 section 2.4(c): an error must not exceed the minimum IPv6 MTU.
    static let maximumErrorLength = 1280
    static let headersLength = 48  // IPv6 (40) + ICMPv6 (8)

    /// Whether RFC 4443 section 2.4(e) forbids answering this packet: it is
    /// an ICMPv6 error itself (types below 128), or its source cannot be
    /// answered (the unspecified address, multicast). Only the fixed header's
    /// next header is looked at: an ICMPv6 error behind extension headers is
    /// answered, as a packet whose kind cannot be told cheaply.
    @inline(__always)
    public static func mustNotAnswer(_ p: UnsafeRawPointer, length: Int) -> Bool {
        let source = IPv6Header.source(p)
        if source == 0 || source >> 120 == 0xff { return true }
        if IPv6Header.nextHeader(p) == IPv6Header.protocolICMPv6 {
            guard length > IPv6Header.length else { return true }
            return p.load(fromByteOffset: IPv6Header.length, as: UInt8.self) < 128
        }
        return false
    }

    /// Rewrites the valid IPv6 packet of `length` bytes at `p` into an ICMPv6
    /// error from `source` back to the packet's sender, quoting as much of
    /// the packet as fits in 1,280 bytes. `capacity` is the room at `p`.
    /// Returns the new packet's length, or nil when no error may be sent.
    public static func rewrite(
        _ p: UnsafeMutableRawPointer,
        length: Int,
        capacity: Int,
        kind: Kind,
        source: UInt128
    ) -> Int? {
        guard !mustNotAnswer(p, length: length) else { return nil }
        let quoted = min(length, maximumErrorLength - headersLength, capacity - headersLength)
        guard quoted >= IPv6Header.length else { return nil }
        let destination = IPv6Header.source(p)
        memmove(p + headersLength, p, quoted)  // the ranges overlap
        let total = headersLength + quoted

        // IPv6 header: traffic class CS6 (network control, as Linux sends
        // ICMPv6 errors), no flow label, next header ICMPv6, hop limit 64.
        IPv4Header.store32(p, 0, 0x6c00_0000)
        IPv4Header.store16(p, 4, UInt16(total - IPv6Header.length))
        p.storeBytes(of: IPv6Header.protocolICMPv6, toByteOffset: 6, as: UInt8.self)
        p.storeBytes(of: 64, toByteOffset: 7, as: UInt8.self)
        IPv6Header.store128(p, 8, source)
        IPv6Header.store128(p, 24, destination)

        // ICMPv6 header: type, code, checksum (with the pseudo-header), and
        // 4 bytes (unused, or the MTU).
        let icmp = p + IPv6Header.length
        let (type, code) = kind.typeAndCode
        icmp.storeBytes(of: type, toByteOffset: 0, as: UInt8.self)
        icmp.storeBytes(of: code, toByteOffset: 1, as: UInt8.self)
        IPv4Header.store16(icmp, 2, 0)
        IPv4Header.store32(icmp, 4, kind.restOfHeader)
        IPv4Header.store16(
            icmp,
            2,
            IPv6Header.upperLayerChecksum(
                icmp,
                count: total - IPv6Header.length,
                source: source,
                destination: destination,
                nextHeader: IPv6Header.protocolICMPv6
            )
        )
        return total
    }
}
