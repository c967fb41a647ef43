import Foundation
import NetBase
import Testing
import UDPEncap

#if canImport(Glibc)
import Glibc
#endif

/// The wireguard backend's IPv6 underlay socket, on loopback (::1) only.
@Suite struct UDPSocketIPv6Tests {
    /// Sends `bytes` from `from` to [::1]:`port`.
    func send(_ bytes: [UInt8], from: UDPSocket, toPort port: UInt16) -> Int {
        var sa = sockaddr_in6()
        sa.sin6_family = sa_family_t(AF_INET6)
        sa.sin6_port = port.bigEndian
        withUnsafeMutableBytes(of: &sa.sin6_addr) { $0[15] = 1 }
        return bytes.withUnsafeBytes { raw in
            withUnsafePointer(to: &sa) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    sendto(
                        from.fd.rawValue,
                        raw.baseAddress,
                        raw.count,
                        0,
                        $0,
                        socklen_t(MemoryLayout<sockaddr_in6>.size)
                    )
                }
            }
        }
    }

    /// The port the kernel gave a socket bound to port 0.
    func port(of socket: UDPSocket) -> UInt16 {
        var sa = sockaddr_in6()
        var length = socklen_t(MemoryLayout<sockaddr_in6>.size)
        _ = withUnsafeMutablePointer(to: &sa) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(socket.fd.rawValue, $0, &length) }
        }
        return UInt16(bigEndian: sa.sin6_port)
    }

    @Test func anIPv6SocketReceivesOverIPv6AndLeavesThePortToAnIPv4One() throws {
        let receiver = try UDPSocket(port: 0, family: .ipv6Only)
        let sender = try UDPSocket(port: 0, family: .ipv6Only)
        defer {
            receiver.close()
            sender.close()
        }
        #expect(receiver.family == .ipv6Only)
        let port = port(of: receiver)
        #expect(port != 0)
        // IPV6_V6ONLY: an IPv4 socket may hold the same port (mode auto's pair).
        let beside = try UDPSocket(bindAddress: IPv4Address("127.0.0.1")!, port: port)
        beside.close()
        #expect(send([1, 2, 3, 4], from: sender, toPort: port) == 4)
        var pfd = pollfd(fd: receiver.fd.rawValue, events: Int16(POLLIN), revents: 0)
        #expect(poll(&pfd, 1, 2000) == 1)
        var buffer = [UInt8](repeating: 0, count: 16)
        let n = buffer.withUnsafeMutableBytes { recv(receiver.fd.rawValue, $0.baseAddress, $0.count, 0) }
        #expect(Array(buffer[0..<max(n, 0)]) == [1, 2, 3, 4])
    }

    @Test func aTakenIPv6PortIsOneErrorNamingListenPortV6() throws {
        let first = try UDPSocket(port: 0, family: .ipv6Only)
        defer { first.close() }
        do {
            let second = try UDPSocket(port: port(of: first), family: .ipv6Only)
            second.close()
            Issue.record("bound a port that was taken")
        } catch {
            #expect("\(error)".contains("ListenPortV6"), "\(error)")
        }
    }

    @Test func aDualStackSocketTakesIPv4AndIPv6AndATakenPortNamesBackendPort() throws {
        let socket = try UDPSocket(port: 0, family: .dualStack)
        defer { socket.close() }
        try #require(socket.family == .dualStack, "this kernel has no IPv6 sockets")
        // IPV6_V6ONLY off: the port is taken for IPv4 too.
        #expect(throws: (any Error).self) {
            try UDPSocket(bindAddress: IPv4Address("127.0.0.1")!, port: port(of: socket)).close()
        }
        do {
            let second = try UDPSocket(port: port(of: socket), family: .dualStack)
            second.close()
            Issue.record("bound a port that was taken")
        } catch {
            #expect("\(error)".contains("Backend.Port") && "\(error)".contains("[::]"), "\(error)")
        }
    }

    @Test func aDualStackSocketWithAnIPv4BindAddressIsAnIPv4One() throws {
        let socket = try UDPSocket(bindAddress: IPv4Address("127.0.0.1")!, port: 0, family: .dualStack)
        defer { socket.close() }
        #expect(socket.family == .ipv4)
        #expect(socket.localEndpoint.address == IPv4Address("127.0.0.1")!)
    }
}
