#if canImport(Glibc)
import Glibc
#endif

/// Turning a packet that cannot be forwarded into the ICMP error that tells
/// its sender why, in place in the packet's own buffer.
public enum ICMPError {
    public enum Kind: Sendable {
        /// Type 3 code 0: no peer holds the destination's subnet (as flannel sends).
        case networkUnreachable
        /// Type 11 code 0: the TTL ran out in the tunnel.
        case timeExceeded
        /// Type 3 code 4 (RFC 1191): the packet has DF set and is bigger
        /// than the tunnel carries; `nextHopMTU` tells the sender the size
        /// that fits, so path-MTU discovery works through the tunnel.
        case fragmentationNeeded(nextHopMTU: UInt16)

        var typeAndCode: (UInt8, UInt8) {
            switch self {
            case .networkUnreachable: (3, 0)
            case .timeExceeded: (11, 0)
            case .fragmentationNeeded: (3, 4)
            }
        }

        /// The ICMP header's second word: unused (0), except the next-hop MTU
        /// in the low 16 bits of "fragmentation needed".
        var restOfHeader: UInt32 {
            if case .fragmentationNeeded(let mtu) = self { return UInt32(mtu) }
            return 0
        }
    }

    static let ipProtocolICMP: UInt8 = 1
    /// RFC 1812: an ICMP error should not exceed 576 bytes.
    static let maximumErrorLength = 576
    static let headersLength = 28  // IPv4 (20) + ICMP (8)

    /// Whether RFC 1122 forbids answering this packet with an ICMP error: it
    /// is an ICMP error itself, a non-first fragment, or from an address that
    /// cannot be answered (0.0.0.0, multicast, broadcast).
    @inline(__always)
    public static func mustNotAnswer(_ p: UnsafeRawPointer) -> Bool {
        if IPv4Header.fragmentOffset(p) != 0 { return true }
        let source = IPv4Header.source(p)
        if source == 0 || source >> 28 == 0xE || source == 0xffff_ffff { return true }
        if IPv4Header.proto(p) == ipProtocolICMP {
            let ihl = IPv4Header.headerLength(p)
            if IPv4Header.totalLength(p) <= ihl { return true }
            // Only queries (echo, timestamp, …) may be answered; errors never.
            switch p.load(fromByteOffset: ihl, as: UInt8.self) {
            case 0, 8, 13, 14, 15, 16, 17, 18: return false
            default: return true
            }
        }
        return false
    }

    /// Rewrites the valid IPv4 packet of `length` bytes at `p` into an ICMP
    /// error from `source` back to the packet's sender, quoting the original
    /// header and as much of its payload as fits in 576 bytes. `capacity` is
    /// the room at `p`. Returns the new packet's length, or nil when no error
    /// may be sent for this packet.
    public static func rewrite(
        _ p: UnsafeMutableRawPointer,
        length: Int,
        capacity: Int,
        kind: Kind,
        source: UInt32
    ) -> Int? {
        guard !mustNotAnswer(p) else { return nil }
        let quoted = min(length, maximumErrorLength - headersLength, capacity - headersLength)
        guard quoted >= IPv4Header.headerLength(p) else { return nil }
        let destination = IPv4Header.source(p)
        memmove(p + headersLength, p, quoted)  // the ranges overlap
        let total = headersLength + quoted

        // IPv4 header: no options, DF clear, TTL 64, protocol ICMP.
        p.storeBytes(of: 0x45, toByteOffset: 0, as: UInt8.self)
        p.storeBytes(of: 0xc0, toByteOffset: 1, as: UInt8.self)  // DSCP CS6 (network control), as Linux sends ICMP errors
        IPv4Header.store16(p, 2, UInt16(total))
        IPv4Header.store32(p, 4, 0)  // id 0, flags 0, fragment offset 0
        p.storeBytes(of: 64, toByteOffset: 8, as: UInt8.self)
        p.storeBytes(of: ipProtocolICMP, toByteOffset: 9, as: UInt8.self)
        IPv4Header.store32(p, 12, source)
        IPv4Header.store32(p, 16, destination)
        IPv4Header.updateChecksum(p)

        // ICMP header: type, code, checksum, 4 bytes (unused, or the next-hop MTU).
        let icmp = p + 20
        let (type, code) = kind.typeAndCode
        icmp.storeBytes(of: type, toByteOffset: 0, as: UInt8.self)
        icmp.storeBytes(of: code, toByteOffset: 1, as: UInt8.self)
        IPv4Header.store16(icmp, 2, 0)
        IPv4Header.store32(icmp, 4, kind.restOfHeader)
        IPv4Header.store16(icmp, 2, IPv4Header.checksum(icmp, count: total - 20))
        return total
    }
}
