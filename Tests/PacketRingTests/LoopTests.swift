#if canImport(Glibc)
import Glibc
#endif
import Foundation
import NetBase
import NetTestSupport
import Testing
import UDPEncap
@testable import PacketRing

/// Drives a data-path loop without root: a SOCK_SEQPACKET socket pair stands
/// in for the TUN (one packet per read or write, like a TUN fd), and UDP
/// sockets on 127.0.0.1 stand in for the peers.
final class LoopHarness: @unchecked Sendable {
    let tunSide: Int32      // the loop's "TUN" fd
    let kernelSide: Int32   // what the kernel would see of the TUN
    let socket: UDPSocket   // the loop's UDP socket
    let peer: UDPSocket     // a remote host
    let table: SubnetTable
    let thread: DataPathThread

    static let local = IPv4Network("10.2.1.0/24")!
    static let remote = IPv4Network("10.2.2.0/24")!

    /// The loop's "TUN" carries a virtio header before every packet, and its
    /// socket uses UDP GSO and GRO.
    let offloads: Bool

    init(simple: Bool, offloads: Bool = false, acceptUnknownPeers: Bool = false, depth: Int = 8) throws {
        self.offloads = offloads
        var fds: [Int32] = [0, 0]
        guard socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue), 0, &fds) == 0 else {
            throw SystemError("socketpair", on: "test", errno: .current)
        }
        tunSide = fds[0]
        kernelSide = fds[1]
        var timeout = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(kernelSide, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        let loopback = IPv4Address("127.0.0.1")!
        socket = try UDPSocket(bindAddress: loopback, port: 0)
        peer = try UDPSocket(bindAddress: loopback, port: 0)
        table = try SubnetTable(network: IPv4Network("10.2.0.0/16")!, subnetLength: 24)
        try table.set(Self.local, to: .local)
        try table.set(Self.remote, to: .peer(peer.localEndpoint))
        let forwarder = Forwarder(table: table, tunAddress: IPv4Address("10.2.1.0")!,
                                  acceptUnknownPeers: acceptUnknownPeers)
        var loopOffloads = LoopOffloads.none
        if offloads {
            loopOffloads = LoopOffloads(virtioHeader: true, segmentation: socket.supportsSegmentation,
                                        receiveCoalescing: socket.enableReceiveCoalescing())
        }
        var configuration = LoopConfiguration(depth: depth, mtu: 1472, offloads: loopOffloads)
        // The offload loop also polls briefly after each busy turn, as the daemon does.
        configuration.busyPollMicroseconds = offloads ? 100 : 0
        let loop: any DataPathLoop = simple
            ? try SyscallLoop(forwarder: forwarder, tunFD: tunSide, udpFD: socket.fd.rawValue, configuration: configuration)
            : try URingLoop(forwarder: forwarder, tunFD: tunSide, udpFD: socket.fd.rawValue, configuration: configuration)
        thread = DataPathThread(loop: loop, name: "test-loop")
    }

    func finish() async throws {
        thread.stop()
        try await thread.wait()
        close(tunSide)
        close(kernelSide)
    }

    /// Writes a packet as the kernel would hand it to the loop: with offloads,
    /// after a virtio header saying there is nothing to do.
    func writeToTun(_ packet: [UInt8]) {
        writeToTunRaw((offloads ? [UInt8](repeating: 0, count: 10) : []) + packet)
    }

    func writeToTunRaw(_ bytes: [UInt8]) {
        _ = bytes.withUnsafeBytes { write(kernelSide, $0.baseAddress, $0.count) }
    }

    /// The next packet the loop wrote into the TUN; with offloads, without
    /// its virtio header, which must say there is nothing to do.
    func readFromTun() -> [UInt8]? {
        guard let bytes = readFromTunRaw() else { return nil }
        guard offloads else { return bytes }
        guard bytes.count >= 10, bytes.prefix(10).allSatisfy({ $0 == 0 }) else { return nil }
        return Array(bytes.dropFirst(10))
    }

    func readFromTunRaw() -> [UInt8]? {
        var buffer = [UInt8](repeating: 0, count: 70_000)
        let n = buffer.withUnsafeMutableBytes { read(kernelSide, $0.baseAddress, $0.count) }
        return n > 0 ? Array(buffer.prefix(n)) : nil
    }

    /// The next datagram the peer receives.
    func peerReceive() -> [UInt8]? {
        var pfd = pollfd(fd: peer.fd.rawValue, events: Int16(POLLIN), revents: 0)
        guard poll(&pfd, 1, 5_000) == 1 else { return nil }
        var buffer = [UInt8](repeating: 0, count: 70_000)
        let n = buffer.withUnsafeMutableBytes { recv(peer.fd.rawValue, $0.baseAddress, $0.count, 0) }
        return n >= 0 ? Array(buffer.prefix(n)) : nil
    }

    /// Sends `datagram` from `from` to the loop's socket.
    func send(_ datagram: [UInt8], from: UDPSocket? = nil) {
        var sa = sockaddr_in()
        socket.localEndpoint.write(to: &sa)
        let fd = (from ?? peer).fd.rawValue
        _ = datagram.withUnsafeBytes { buf in
            withUnsafePointer(to: &sa) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    sendto(fd, buf.baseAddress, buf.count, 0, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
        }
    }

    /// Polls a counter until it reaches `value` (bounded: 5 s).
    func waitFor(_ counter: Counter, _ value: UInt64) async -> Bool {
        for _ in 0..<500 {
            if thread.loop.statistics[counter] >= value { return true }
            try? await Task.sleep(for: .milliseconds(10))
        }
        return false
    }
}

/// The loops under test: the simple loop, io_uring without offloads, and
/// io_uring with a virtio-header TUN and UDP GSO/GRO.
enum LoopKind: String, CaseIterable, CustomTestStringConvertible, Sendable {
    case simple, uring, uringOffloads
    var testDescription: String { rawValue }
    func harness(acceptUnknownPeers: Bool = false, depth: Int = 8) throws -> LoopHarness {
        try LoopHarness(simple: self == .simple, offloads: self == .uringOffloads,
                        acceptUnknownPeers: acceptUnknownPeers, depth: depth)
    }
}

@Suite(.serialized) struct LoopTests {
    @Test(arguments: LoopKind.allCases)
    func packetsFromTheTunReachThePeerWithTTLDecremented(kind: LoopKind) async throws {
        let h = try kind.harness()
        for i in 0..<100 {
            let p = makePacket(source: 0x0A02_0105, destination: 0x0A02_0207, ttl: 64,
                               payload: Array(repeating: UInt8(i), count: 100 + i))
            h.writeToTun(p)
            let got = try #require(h.peerReceive(), "datagram \(i) did not arrive")
            var expected = p
            expected[8] = 63
            expected.withUnsafeMutableBytes { IPv4Header.updateChecksum($0.baseAddress!) }
            #expect(got == expected)
        }
        #expect(await h.waitFor(.udpPacketsSent, 100))
        try await h.finish()
    }

    @Test(arguments: LoopKind.allCases)
    func datagramsFromTheOwningPeerReachTheTun(kind: LoopKind) async throws {
        let h = try kind.harness()
        for i in 0..<100 {
            let p = makePacket(source: 0x0A02_0207, destination: 0x0A02_0105,
                               payload: Array(repeating: UInt8(i), count: 50 + i))
            h.send(p)
            #expect(h.readFromTun() == p)
        }
        #expect(await h.waitFor(.tunPacketsWritten, 100))
        try await h.finish()
    }

    @Test(arguments: LoopKind.allCases)
    func malformedAndForeignDatagramsAreCountedAndDropped(kind: LoopKind) async throws {
        let h = try kind.harness()
        h.send([1, 2, 3])                                        // too short
        var bad = makePacket(source: 0x0A02_0207, destination: 0x0A02_0105)
        bad[0] = 0x46                                            // IHL beyond...
        bad[10] ^= 0xff
        h.send(bad)
        h.send(makePacket(source: 0x0A02_6307, destination: 0x0A02_0105))  // no peer owns 10.2.99.0/24
        let stranger = try UDPSocket(bindAddress: IPv4Address("127.0.0.1")!, port: 0)
        h.send(makePacket(source: 0x0A02_0207, destination: 0x0A02_0105), from: stranger)  // not the owner
        #expect(await h.waitFor(.droppedMalformed, 2))
        #expect(await h.waitFor(.droppedUnknownPeer, 1))
        #expect(await h.waitFor(.droppedSpoofedSource, 1))
        // The loop still forwards afterwards.
        let good = makePacket(source: 0x0A02_0207, destination: 0x0A02_0105)
        h.send(good)
        #expect(h.readFromTun() == good)
        try await h.finish()
    }

    @Test(arguments: LoopKind.allCases)
    func withTheFlannelSwitchAnySenderIsAccepted(kind: LoopKind) async throws {
        let h = try kind.harness(acceptUnknownPeers: true)
        let p = makePacket(source: 0x0A02_6307, destination: 0x0A02_0105)
        h.send(p)
        #expect(h.readFromTun() == p)
        try await h.finish()
    }

    @Test(arguments: LoopKind.allCases)
    func unroutableAndExpiringPacketsComeBackAsICMP(kind: LoopKind) async throws {
        let h = try kind.harness()
        h.writeToTun(makePacket(source: 0x0A02_0105, destination: 0x0A02_6307))
        let unreachable = try #require(h.readFromTun())
        #expect(unreachable[9] == 1 && unreachable[20] == 3 && unreachable[21] == 0)
        h.writeToTun(makePacket(source: 0x0A02_0105, destination: 0x0A02_0207, ttl: 1))
        let expired = try #require(h.readFromTun())
        #expect(expired[9] == 1 && expired[20] == 11)
        #expect(await h.waitFor(.icmpUnreachableSent, 1))
        #expect(await h.waitFor(.icmpTimeExceededSent, 1))
        try await h.finish()
    }

    /// With one buffer per direction the multishot read runs out of buffers
    /// on every burst and must be armed again as buffers come back.
    @Test(arguments: [LoopKind.uring, .uringOffloads], [1, 8])
    func aBurstIsMovedInBatches(kind: LoopKind, depth: Int) async throws {
        let h = try kind.harness(depth: depth)
        let burst = 2_000
        // A thread of its own: the cooperative pool may be busy with other
        // suites' blocking waits.
        let sent = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            for i in 0..<burst {
                h.writeToTun(makePacket(source: 0x0A02_0105, destination: 0x0A02_0207,
                                        payload: Array(repeating: UInt8(i & 0xff), count: 64)))
            }
            sent.signal()
        }
        var received = 0
        while received < burst, h.peerReceive() != nil { received += 1 }
        sent.wait()
        #expect(received == burst)
        #expect(await h.waitFor(.udpPacketsSent, UInt64(burst)))
        // Fewer turns of the loop than completions means completions were
        // handled in batches (with one buffer there is nothing to batch).
        if depth > 1 { #expect(h.thread.loop.statistics[.batches] < UInt64(2 * burst)) }
        // And the way back still works after the burst.
        let back = makePacket(source: 0x0A02_0207, destination: 0x0A02_0105)
        h.send(back)
        #expect(h.readFromTun() == back)
        try await h.finish()
    }
}
