import Foundation
import NetBase
import NetTestSupport
import Testing
import UDPEncap

@testable import PacketRing

#if canImport(Glibc)
import Glibc
#endif

/// A UDP socket on [::1] (a peer on the IPv6 underlay, on loopback).
final class LoopbackSocket6 {
    let fd: Int32
    let port: UInt16

    init() throws {
        let fd = socket(AF_INET6, Int32(SOCK_DGRAM.rawValue), 0)
        guard fd >= 0 else { throw SystemError("socket(AF_INET6)", on: "test peer", errno: .current) }
        var name = sockaddr_in6()
        _ = withUnsafeMutableBytes(of: &name) {
            SocketAddress.writeIPv6(1, port: 0, to: $0.baseAddress!)
        }
        var length = socklen_t(MemoryLayout<sockaddr_in6>.size)
        let bound = withUnsafeMutablePointer(to: &name) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0
            }
        }
        guard bound else {
            close(fd)
            throw SystemError("bind [::1]:0", on: "test peer", errno: .current)
        }
        self.fd = fd
        port = UInt16(bigEndian: name.sin6_port)
    }

    deinit { close(fd) }

    var endpoint: UDPEndpoint6 { UDPEndpoint6(address: IPv6Address(1), port: port) }

    /// Sends to `address`:`port` (IPv6; an IPv4-mapped address reaches an IPv4 socket).
    func send(_ datagram: [UInt8], to address: UInt128, port: UInt16) {
        var name = sockaddr_in6()
        let length = withUnsafeMutableBytes(of: &name) {
            SocketAddress.writeIPv6(address, port: port, to: $0.baseAddress!)
        }
        _ = datagram.withUnsafeBytes { buffer in
            withUnsafePointer(to: &name) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    sendto(fd, buffer.baseAddress, buffer.count, 0, $0, length)
                }
            }
        }
    }

    /// The next datagram and who sent it (5 s at most).
    func receive() -> (bytes: [UInt8], from: UnderlaySender?)? {
        var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&pfd, 1, 5_000) == 1 else { return nil }
        var buffer = [UInt8](repeating: 0, count: 70_000)
        var name = sockaddr_in6()
        var length = socklen_t(MemoryLayout<sockaddr_in6>.size)
        let n = buffer.withUnsafeMutableBytes { bytes in
            withUnsafeMutablePointer(to: &name) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    recvfrom(fd, bytes.baseAddress, bytes.count, 0, $0, &length)
                }
            }
        }
        guard n >= 0 else { return nil }
        return (Array(buffer.prefix(n)), withUnsafeBytes(of: &name) { UnderlaySender(name: $0.baseAddress!) })
    }
}

/// Every tier with peers on both underlays, in one process without root: a
/// socket pair stands in for the TUN (as in LoopTests), the loop's socket is
/// a dual-stack one, one peer is on 127.0.0.1 and one on [::1]. Packets go
/// to the underlay their subnet's entry names, and come in only from it.
@Suite(.serialized) struct IPv6UnderlayLoopTests {
    static let local = IPv4Network("10.2.1.0/24")!
    static let overIPv4 = IPv4Network("10.2.2.0/24")!
    static let overIPv6 = IPv4Network("10.2.3.0/24")!  // IPv4 packets over the IPv6 underlay
    static let network6 = IPv6Network("fd00:10:2::/48")!
    static let local6 = IPv6Network("fd00:10:2:1::/64")!
    static let remote6 = IPv6Network("fd00:10:2:3::/64")!

    final class Harness: SocketPairLoop, @unchecked Sendable {
        let peer4: UDPSocket
        let peer6: LoopbackSocket6

        init(kind: LoopKind) throws {
            let socket = try UDPSocket(port: 0, family: .dualStack)
            try #require(socket.family == .dualStack, "this kernel has no IPv6 sockets")
            peer4 = try UDPSocket(bindAddress: IPv4Address("127.0.0.1")!, port: 0)
            peer6 = try LoopbackSocket6()
            let table = try SubnetTable(network: IPv4Network("10.2.0.0/16")!, subnetLength: 24)
            let table6 = try SubnetTable6(
                network: IPv6UnderlayLoopTests.network6,
                subnetLength: 64,
                addresses6: table.addresses6
            )
            try table.set(IPv6UnderlayLoopTests.local, to: .local)
            try table.set(IPv6UnderlayLoopTests.overIPv4, to: .peer(peer4.localEndpoint))
            try table.set(IPv6UnderlayLoopTests.overIPv6, to: .peer6(peer6.endpoint))
            try table6.set(IPv6UnderlayLoopTests.local6, to: .local)
            try table6.set(IPv6UnderlayLoopTests.remote6, to: .peer6(peer6.endpoint))
            let forwarder = Forwarder(table: table, table6: table6, tunAddress: IPv6UnderlayLoopTests.local.address)
            try super.init(
                tier: kind.tier,
                offloads: kind.offloads,
                socket: socket,
                forwarder: forwarder,
                depth: 8,
                mtu: 1452,
                threadName: "test-loop6"
            )
        }

        var port: UInt16 { socket.localEndpoint.port }

        func counter(_ c: DataPathCounter) async -> UInt64 {
            try? await Task.sleep(for: .milliseconds(200))
            return thread.loop.statistics[c]
        }
    }

    static func address6(_ subnet: IPv6Network, _ host: UInt128) -> UInt128 { subnet.address.value | host }

    @Test(arguments: LoopKind.allCases)
    func eachPacketTakesTheUnderlayOfItsSubnetsEntry(kind: LoopKind) async throws {
        let h = try Harness(kind: kind)
        for i in 0..<20 {
            let p6 = makePacket6(
                source: Self.address6(Self.local6, 5),
                destination: Self.address6(Self.remote6, 7),
                hopLimit: 64,
                payload: Array(repeating: UInt8(i), count: 60 + i)
            )
            h.writeToTun(p6)
            let got = try #require(h.peer6.receive(), "IPv6 packet \(i) did not reach [::1]")
            var expected = p6
            expected[7] = 63
            #expect(got.bytes == expected)
            #expect(got.from == UnderlaySender(address: 1, port: h.port), "sent from [::1]:\(h.port)")

            let p4 = makePacket(
                source: 0x0A02_0105,
                destination: 0x0A02_0207,
                payload: Array(repeating: UInt8(i), count: 40)
            )
            h.writeToTun(p4)
            let got4 = try #require(h.receive(on: h.peer4), "IPv4 packet \(i) did not reach 127.0.0.1")
            #expect(got4.count == p4.count && got4[8] == 63)

            // An IPv4 packet for the subnet whose peer is on the IPv6 underlay.
            let p4over6 = makePacket(source: 0x0A02_0105, destination: 0x0A02_0307, payload: [UInt8(i)])
            h.writeToTun(p4over6)
            let got4over6 = try #require(h.peer6.receive(), "IPv4 packet \(i) did not reach [::1]")
            #expect(got4over6.bytes.count == p4over6.count && got4over6.bytes[8] == 63)
        }
        try await h.finish()
    }

    @Test(arguments: LoopKind.allCases)
    func datagramsAreAcceptedOnlyOverTheUnderlayTheEntryNames(kind: LoopKind) async throws {
        let h = try Harness(kind: kind)
        let fromRemote6 = makePacket6(
            source: Self.address6(Self.remote6, 7),
            destination: Self.address6(Self.local6, 5)
        )
        // From [::1], the peer of remote6: written into the TUN.
        h.peer6.send(fromRemote6, to: 1, port: h.port)
        #expect(h.readFromTun() == fromRemote6)
        // From 10.2.2.0/24's peer on 127.0.0.1 (as IPv4-mapped, to the dual-stack socket): accepted.
        let fromOverIPv4 = makePacket(source: 0x0A02_0207, destination: 0x0A02_0105)
        h.send(fromOverIPv4, from: h.peer4)
        #expect(h.readFromTun() == fromOverIPv4)
        // The same IPv6 packet from 127.0.0.1, and an IPv4 packet of the
        // IPv4-underlay subnet from [::1]: the wrong underlay, dropped.
        h.send(fromRemote6, from: h.peer4)
        h.peer6.send(fromOverIPv4, to: 1, port: h.port)
        // The IPv4 packet of the subnet whose peer is on [::1]: accepted from there.
        let fromOverIPv6 = makePacket(source: 0x0A02_0307, destination: 0x0A02_0105)
        h.peer6.send(fromOverIPv6, to: 1, port: h.port)
        #expect(h.readFromTun() == fromOverIPv6, "only the last of the three may arrive")
        #expect(await h.counter(.droppedSpoofedSource) == 2)
        try await h.finish()
    }
}
