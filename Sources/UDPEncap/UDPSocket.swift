import CTunnel
import NetBase

#if canImport(Glibc)
import Glibc
#endif

/// A UDP peer address: where a subnet's packets are sent.
public struct UDPEndpoint: Hashable, Sendable, CustomStringConvertible {
    public var address: IPv4Address
    public var port: UInt16

    public init(address: IPv4Address, port: UInt16) {
        self.address = address
        self.port = port
    }

    public var description: String { "\(address):\(port)" }

    /// Fills a `sockaddr_in` for this endpoint.
    @inline(__always)
    public func write(to sa: UnsafeMutablePointer<sockaddr_in>) {
        sa.pointee = sockaddr_in()
        sa.pointee.sin_family = sa_family_t(AF_INET)
        sa.pointee.sin_port = port.bigEndian
        sa.pointee.sin_addr.s_addr = address.networkOrder
    }

    public init(_ sa: sockaddr_in) {
        address = IPv4Address(networkOrder: sa.sin_addr.s_addr)
        port = UInt16(bigEndian: sa.sin_port)
    }
}

/// The udp and wireguard backends' socket: bound to the backend port on
/// every address, non-blocking, with large kernel buffers so bursts are
/// absorbed.
public final class UDPSocket: Sendable {
    /// Which underlays a socket carries.
    public enum Family: Sendable, Equatable {
        /// An AF_INET socket, as flannel's.
        case ipv4
        /// One AF_INET6 socket with IPV6_V6ONLY off that carries both
        /// underlays (IPv4 peers as IPv4-mapped addresses): the udp backend's.
        case dualStack
        /// An AF_INET6 socket with IPV6_V6ONLY on, so that an AF_INET socket
        /// may hold the same port: the wireguard backend's IPv6 underlay.
        case ipv6Only
    }

    public let fd: FileDescriptor
    public let port: UInt16
    /// The family the socket has: `.dualStack` asked of a kernel without
    /// IPv6 (ipv6.disable=1), or with a bind address, gives `.ipv4`.
    public let family: Family

    /// Opens and binds the socket. `bindAddress` applies to `.ipv4` (and
    /// makes `.dualStack` an AF_INET socket); the AF_INET6 ones bind `[::]`.
    /// `reusePort` lets several sockets (one per data-path worker) share the
    /// port; the kernel spreads flows over them.
    public init(
        bindAddress: IPv4Address = IPv4Address(0),
        port: UInt16,
        reusePort: Bool = false,
        family requested: Family = .ipv4,
        bufferBytes: Int32 = 8 << 20
    ) throws {
        precondition(
            requested != .ipv6Only || bindAddress.value == 0,
            "an IPv6-only UDPSocket binds [::]; it takes no IPv4 bindAddress"
        )
        let flags = Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue)
        var family = requested == .dualStack && bindAddress.value != 0 ? .ipv4 : requested
        var raw: Int32 = family == .ipv4 ? socket(AF_INET, flags, 0) : socket(AF_INET6, flags, 0)
        if raw < 0 && family == .dualStack && errno == EAFNOSUPPORT {
            // No IPv6 in this kernel: the IPv4 underlay only, as flannel.
            family = .ipv4
            raw = socket(AF_INET, flags, 0)
        }
        guard raw >= 0 else {
            let e = Errno.current
            throw SystemError(
                family == .ipv4 ? "socket(AF_INET, SOCK_DGRAM)" : "socket(AF_INET6, SOCK_DGRAM)",
                on: "udp port \(port)",
                errno: e,
                hint: family == .ipv6Only && e == Errno(EAFNOSUPPORT)
                    ? "the kernel has no IPv6 (boot without ipv6.disable=1)" : nil
            )
        }
        let fd = FileDescriptor(taking: raw)
        let object = family == .ipv4 ? "udp \(bindAddress):\(port)" : "udp [::]:\(port)"
        do {
            if family != .ipv4 {
                // Whatever net.ipv6.bindv6only says: dual stack is both
                // underlays, IPv6-only leaves IPv4 to an AF_INET socket.
                let v6Only: Int32 = family == .ipv6Only ? 1 : 0
                try UDPSocket.setOption(raw, Int32(IPPROTO_IPV6), IPV6_V6ONLY, v6Only, "IPV6_V6ONLY", object)
            }
            if reusePort {
                try UDPSocket.setOption(raw, SOL_SOCKET, SO_REUSEPORT, 1, "SO_REUSEPORT", object)
            }
            // SO_*BUFFORCE passes the rmem_max/wmem_max limits when we hold
            // CAP_NET_ADMIN; without it fall back to what the limits allow.
            for (force, plain, name) in [
                (SO_RCVBUFFORCE, SO_RCVBUF, "SO_RCVBUF"), (SO_SNDBUFFORCE, SO_SNDBUF, "SO_SNDBUF"),
            ] {
                if (try? UDPSocket.setOption(raw, SOL_SOCKET, force, bufferBytes, name, object)) == nil {
                    try UDPSocket.setOption(raw, SOL_SOCKET, plain, bufferBytes, name, object)
                }
            }
            var name = sockaddr_in6()
            let length = withUnsafeMutableBytes(of: &name) { buffer in
                family == .ipv4
                    ? SocketAddress.writeIPv4(bindAddress.value, port: port, to: buffer.baseAddress!, dualStack: false)
                    : SocketAddress.writeIPv6(0, port: port, to: buffer.baseAddress!)
            }
            let rc = withUnsafePointer(to: &name) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(raw, $0, length) }
            }
            guard rc == 0 else {
                let e = Errno.current
                let hint =
                    family == .ipv6Only
                    ? "another process (flanneld or tunneld?) already uses udp port \(port) on IPv6; stop it or set Backend.ListenPortV6 (mode separate) or Backend.ListenPort"
                    : "another process (flanneld or tunneld?) already uses udp port \(port); stop it or set Backend.Port"
                throw SystemError("bind", on: object, errno: e, hint: e == Errno(EADDRINUSE) ? hint : nil)
            }
        } catch {
            fd.close()
            throw error
        }
        self.fd = fd
        self.port = port
        self.family = family
    }

    static func setOption(
        _ fd: Int32,
        _ level: Int32,
        _ name: Int32,
        _ value: Int32,
        _ optionName: String,
        _ object: String
    ) throws {
        var v = value
        guard setsockopt(fd, level, name, &v, socklen_t(MemoryLayout<Int32>.size)) == 0 else {
            throw SystemError("setsockopt \(optionName)", on: object, errno: .current)
        }
    }

    /// Asks the kernel to hand several datagrams of one sender back in one
    /// receive (UDP_GRO, Linux 5.0), with their size in a control message.
    /// Returns false when the kernel does not offer it: each receive then
    /// returns one datagram, which the data path handles the same way.
    public func enableReceiveCoalescing() -> Bool {
        (try? UDPSocket.setOption(fd.rawValue, ctunnel_SOL_UDP, ctunnel_UDP_GRO, 1, "UDP_GRO", "udp port \(port)"))
            != nil
    }

    /// Whether one send may carry many equal datagrams (UDP_SEGMENT, Linux
    /// 4.18): probed by reading the option, which older kernels refuse.
    public var supportsSegmentation: Bool {
        var value: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        return getsockopt(fd.rawValue, ctunnel_SOL_UDP, ctunnel_UDP_SEGMENT, &value, &length) == 0
    }

    /// The address and port an AF_INET socket is bound to (a dual-stack
    /// socket's port, with 0.0.0.0).
    public var localEndpoint: UDPEndpoint {
        var name = sockaddr_in6()
        var len = socklen_t(MemoryLayout<sockaddr_in6>.size)
        _ = withUnsafeMutablePointer(to: &name) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd.rawValue, $0, &len) }
        }
        let sender = withUnsafeBytes(of: &name) { UnderlaySender(name: $0.baseAddress!) }
        guard let sender, sender.address >> 32 == 0xffff else {
            return UDPEndpoint(address: IPv4Address(0), port: sender?.port ?? 0)
        }
        return UDPEndpoint(address: IPv4Address(UInt32(truncatingIfNeeded: sender.address)), port: sender.port)
    }

    public func close() { fd.close() }
}
