import NetBase

#if canImport(Glibc)
import Glibc
#endif

/// A UDP peer on the IPv6 underlay: where a subnet's packets are sent when
/// the peer and this host both have a PublicIPv6 (docs/WIRE-FORMAT.md).
public struct UDPEndpoint6: Hashable, Sendable, CustomStringConvertible {
    public var address: IPv6Address
    public var port: UInt16

    public init(address: IPv6Address, port: UInt16) {
        self.address = address
        self.port = port
    }

    public var description: String { "[\(address)]:\(port)" }
}

/// The sender of a received datagram, of either underlay, in one shape: an
/// IPv4 sender is its IPv4-mapped address (::ffff:a.b.c.d), which is how a
/// dual-stack socket reports it anyway. Two numbers, compared without a
/// branch on the family.
public struct UnderlaySender: Equatable, Sendable, CustomStringConvertible {
    public var address: UInt128
    public var port: UInt16

    public init(address: UInt128, port: UInt16) {
        self.address = address
        self.port = port
    }

    @inline(__always)
    public init(ipv4 address: UInt32, port: UInt16) {
        self.address = UnderlaySender.mapped(address)
        self.port = port
    }

    /// ::ffff:a.b.c.d for an IPv4 address (host order).
    @inline(__always)
    public static func mapped(_ ipv4: UInt32) -> UInt128 { 0xffff << 32 | UInt128(ipv4) }

    /// Reads the `sockaddr_in` or `sockaddr_in6` at `name` (what a receive
    /// filled in); nil for any other family.
    @inline(__always)
    public init?(name: UnsafeRawPointer) {
        switch Int32(name.load(as: sa_family_t.self)) {
        case AF_INET:
            self.init(
                ipv4: UInt32(bigEndian: name.loadUnaligned(fromByteOffset: 4, as: UInt32.self)),
                port: UInt16(bigEndian: name.loadUnaligned(fromByteOffset: 2, as: UInt16.self))
            )
        case AF_INET6:
            let high = UInt64(bigEndian: name.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
            let low = UInt64(bigEndian: name.loadUnaligned(fromByteOffset: 16, as: UInt64.self))
            self.init(
                address: UInt128(high) << 64 | UInt128(low),
                port: UInt16(bigEndian: name.loadUnaligned(fromByteOffset: 2, as: UInt16.self))
            )
        default:
            return nil
        }
    }

    public var description: String {
        address >> 32 == 0xffff
            ? "\(IPv4Address(UInt32(truncatingIfNeeded: address))):\(port)"
            : "[\(IPv6Address(address))]:\(port)"
    }
}

/// Socket addresses of the udp data path, written in place into buffers of
/// `capacity` bytes (a `sockaddr_in6`), for sockets of either kind: an
/// AF_INET socket takes a `sockaddr_in`; a dual-stack AF_INET6 socket takes
/// a `sockaddr_in6`, for an IPv4 peer its IPv4-mapped address.
public enum SocketAddress {
    public static let capacity = MemoryLayout<sockaddr_in6>.size

    /// Writes an IPv4 peer (host order); returns the length to send with.
    @inline(__always)
    public static func writeIPv4(
        _ address: UInt32,
        port: UInt16,
        to name: UnsafeMutableRawPointer,
        dualStack: Bool
    ) -> socklen_t {
        if dualStack { return writeIPv6(UnderlaySender.mapped(address), port: port, to: name) }
        name.storeBytes(of: sa_family_t(AF_INET), as: sa_family_t.self)
        name.storeBytes(of: port.bigEndian, toByteOffset: 2, as: UInt16.self)
        name.storeBytes(of: address.bigEndian, toByteOffset: 4, as: UInt32.self)
        name.storeBytes(of: 0, toByteOffset: 8, as: UInt64.self)
        return socklen_t(MemoryLayout<sockaddr_in>.size)
    }

    /// Writes an IPv6 peer; returns the length to send with.
    @inline(__always)
    public static func writeIPv6(_ address: UInt128, port: UInt16, to name: UnsafeMutableRawPointer) -> socklen_t {
        name.storeBytes(of: sa_family_t(AF_INET6), as: sa_family_t.self)
        name.storeBytes(of: port.bigEndian, toByteOffset: 2, as: UInt16.self)
        name.storeBytes(of: 0, toByteOffset: 4, as: UInt32.self)  // flow label
        name.storeBytes(of: UInt64(truncatingIfNeeded: address >> 64).bigEndian, toByteOffset: 8, as: UInt64.self)
        name.storeBytes(of: UInt64(truncatingIfNeeded: address).bigEndian, toByteOffset: 16, as: UInt64.self)
        name.storeBytes(of: 0, toByteOffset: 24, as: UInt32.self)  // scope
        return socklen_t(MemoryLayout<sockaddr_in6>.size)
    }
}
