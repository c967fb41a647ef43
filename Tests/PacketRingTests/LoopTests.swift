import Foundation
import NetBase
import NetTestSupport
import Testing
import UDPEncap

@testable import PacketRing

#if canImport(Glibc)
import Glibc
#endif

/// A data-path loop run on its own thread without root: a SOCK_SEQPACKET
/// socket pair stands in for the TUN (one packet per read or write, like a
/// TUN fd), and the loop's UDP socket is one on loopback. The harnesses of
/// LoopTests and IPv6UnderlayLoopTests add their peers and tables.
class SocketPairLoop: @unchecked Sendable {
    let tunSide: Int32  // the loop's "TUN" fd
    let kernelSide: Int32  // what the kernel would see of the TUN
    let socket: UDPSocket  // the loop's UDP socket
    let thread: DataPathThread

    /// The loop's "TUN" carries a virtio header before every packet, and its
    /// socket uses UDP GSO and GRO.
    let offloads: Bool

    /// Runs a `tier` loop over `socket` and a new socket pair; a dual-stack
    /// socket writes IPv4 peers as IPv4-mapped names, as the daemon's.
    init(
        tier: DataPathTier,
        offloads: Bool,
        socket: UDPSocket,
        forwarder: Forwarder,
        depth: Int,
        mtu: Int,
        busyPollMicroseconds: Int = 0,
        threadName: String
    ) throws {
        self.offloads = offloads
        self.socket = socket
        var fds: [Int32] = [0, 0]
        guard socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue), 0, &fds) == 0 else {
            throw SystemError("socketpair", on: "test", errno: .current)
        }
        tunSide = fds[0]
        kernelSide = fds[1]
        var timeout = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(kernelSide, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var loopOffloads = LoopOffloads.none
        if offloads {
            loopOffloads = LoopOffloads(
                virtioHeader: true,
                segmentation: socket.supportsSegmentation,
                receiveCoalescing: socket.enableReceiveCoalescing()
            )
        }
        var configuration = LoopConfiguration(depth: depth, mtu: mtu, offloads: loopOffloads)
        configuration.busyPollMicroseconds = busyPollMicroseconds
        configuration.dualStackSocket = socket.family == .dualStack
        let loop = try tier.makeLoop(
            forwarder: forwarder,
            tunFD: tunSide,
            udpFD: socket.fd.rawValue,
            configuration: configuration
        )
        thread = DataPathThread(loop: loop, name: threadName)
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

    /// The next datagram `peer` receives (5 s at most).
    func receive(on peer: UDPSocket) -> [UInt8]? {
        var pfd = pollfd(fd: peer.fd.rawValue, events: Int16(POLLIN), revents: 0)
        guard poll(&pfd, 1, 5_000) == 1 else { return nil }
        var buffer = [UInt8](repeating: 0, count: 70_000)
        let n = buffer.withUnsafeMutableBytes { recv(peer.fd.rawValue, $0.baseAddress, $0.count, 0) }
        return n >= 0 ? Array(buffer.prefix(n)) : nil
    }

    /// Sends `datagram` from `from` to the loop's socket on 127.0.0.1.
    func send(_ datagram: [UInt8], from: UDPSocket) {
        var sa = sockaddr_in()
        UDPEndpoint(address: IPv4Address("127.0.0.1")!, port: socket.localEndpoint.port).write(to: &sa)
        _ = datagram.withUnsafeBytes { buf in
            withUnsafePointer(to: &sa) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    sendto(
                        from.fd.rawValue,
                        buf.baseAddress,
                        buf.count,
                        0,
                        $0,
                        socklen_t(MemoryLayout<sockaddr_in>.size)
                    )
                }
            }
        }
    }

    /// Polls a counter until it reaches `value` (bounded: 5 s).
    func waitFor(_ counter: DataPathCounter, _ value: UInt64) async -> Bool {
        for _ in 0..<500 {
            if thread.loop.statistics[counter] >= value { return true }
            try? await Task.sleep(for: .milliseconds(10))
        }
        return false
    }
}

/// The loop with one peer on 127.0.0.1, for the subnet `remote`.
final class LoopHarness: SocketPairLoop, @unchecked Sendable {
    let peer: UDPSocket  // a remote host
    let table: SubnetTable
    let tier: DataPathTier

    static let local = IPv4Network("10.2.1.0/24")!
    static let remote = IPv4Network("10.2.2.0/24")!

    init(tier: DataPathTier, offloads: Bool = false, acceptUnknownPeers: Bool = false, depth: Int = 8) throws {
        self.tier = tier
        let loopback = IPv4Address("127.0.0.1")!
        let socket = try UDPSocket(bindAddress: loopback, port: 0)
        peer = try UDPSocket(bindAddress: loopback, port: 0)
        table = try SubnetTable(network: IPv4Network("10.2.0.0/16")!, subnetLength: 24)
        try table.set(Self.local, to: .local)
        try table.set(Self.remote, to: .peer(peer.localEndpoint))
        let forwarder = Forwarder(
            table: table,
            tunAddress: IPv4Address("10.2.1.0")!,
            acceptUnknownPeers: acceptUnknownPeers,
            mtu: 1472
        )
        // The offload loop also polls briefly after each busy turn, as the daemon does.
        try super.init(
            tier: tier,
            offloads: offloads,
            socket: socket,
            forwarder: forwarder,
            depth: depth,
            mtu: 1472,
            busyPollMicroseconds: offloads ? 100 : 0,
            threadName: "test-loop"
        )
    }

    /// The next datagram the peer receives.
    func peerReceive() -> [UInt8]? { receive(on: peer) }

    /// Sends `datagram` from the peer to the loop's socket.
    func send(_ datagram: [UInt8]) { send(datagram, from: peer) }

    /// Sends `datagrams` (all of one length but the last) from the peer in
    /// one UDP_SEGMENT send, so that they arrive as one GRO receive.
    func sendSegmented(_ datagrams: [[UInt8]]) {
        var size = Int32(datagrams[0].count)
        setsockopt(peer.fd.rawValue, Int32(IPPROTO_UDP), 103 /* UDP_SEGMENT */, &size, 4)
        defer {
            var off: Int32 = 0
            setsockopt(peer.fd.rawValue, Int32(IPPROTO_UDP), 103, &off, 4)
        }
        send(datagrams.flatMap { $0 })
    }
}

/// The loops under test: the simple loop; the system-call loop and the
/// io_uring loop, each without and with offloads (a virtio-header TUN and
/// UDP GSO/GRO); and io_uring with a re-armed single read. The io_uring
/// kinds take the tier this kernel offers, as the daemon does: on a kernel
/// without multishot read `uring` runs the single-read loop, and where
/// io_uring is refused the system-call loop.
enum LoopKind: String, CaseIterable, CustomTestStringConvertible, Sendable {
    case simple, syscall, syscallOffloads, uring, uringOffloads, uringSingleReadOffloads
    var testDescription: String { rawValue }

    static let features = URingFeatures.probe()

    var tier: DataPathTier {
        switch self {
        case .simple: .simple
        case .syscall, .syscallOffloads: .syscall
        case .uring, .uringOffloads: DataPathTier.choose(.uring, features: LoopKind.features).tier
        case .uringSingleReadOffloads:
            LoopKind.features.usableWithSingleRead
                ? .uringSingleRead
                : DataPathTier.choose(.uring, features: LoopKind.features).tier
        }
    }

    var offloads: Bool { self == .syscallOffloads || self == .uringOffloads || self == .uringSingleReadOffloads }
    static let withOffloads: [LoopKind] = allCases.filter(\.offloads)

    func harness(acceptUnknownPeers: Bool = false, depth: Int = 8) throws -> LoopHarness {
        try LoopHarness(tier: tier, offloads: offloads, acceptUnknownPeers: acceptUnknownPeers, depth: depth)
    }
}

@Suite(.serialized) struct LoopTests {
    @Test(arguments: LoopKind.allCases)
    func packetsFromTheTunReachThePeerWithTTLDecremented(kind: LoopKind) async throws {
        let h = try kind.harness()
        for i in 0..<100 {
            let p = makePacket(
                source: 0x0A02_0105,
                destination: 0x0A02_0207,
                ttl: 64,
                payload: Array(repeating: UInt8(i), count: 100 + i)
            )
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
            let p = makePacket(
                source: 0x0A02_0207,
                destination: 0x0A02_0105,
                payload: Array(repeating: UInt8(i), count: 50 + i)
            )
            h.send(p)
            #expect(h.readFromTun() == p)
        }
        #expect(await h.waitFor(.tunPacketsWritten, 100))
        try await h.finish()
    }

    @Test(arguments: LoopKind.allCases)
    func malformedAndForeignDatagramsAreCountedAndDropped(kind: LoopKind) async throws {
        let h = try kind.harness()
        h.send([1, 2, 3])  // too short
        var bad = makePacket(source: 0x0A02_0207, destination: 0x0A02_0105)
        bad[0] = 0x46  // IHL beyond...
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
    @Test(arguments: [LoopKind.uring, .uringOffloads, .uringSingleReadOffloads, .syscallOffloads], [1, 8])
    func aBurstIsMovedInBatches(kind: LoopKind, depth: Int) async throws {
        let h = try kind.harness(depth: depth)
        let burst = 2_000
        // A thread of its own: the cooperative pool may be busy with other
        // suites' blocking waits.
        let sent = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            for i in 0..<burst {
                h.writeToTun(
                    makePacket(
                        source: 0x0A02_0105,
                        destination: 0x0A02_0207,
                        payload: Array(repeating: UInt8(i & 0xff), count: 64)
                    )
                )
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

    /// A genuine peer may send only what is for our own subnet: anything
    /// else would be routed onwards by this host. And no datagram may claim
    /// to come from our own subnet. Both hold with the flannel switch too.
    @Test(arguments: LoopKind.allCases, [false, true])
    func datagramsNotForOurSubnetOrFromItAreCountedAndDropped(kind: LoopKind, acceptUnknownPeers: Bool) async throws {
        let h = try kind.harness(acceptUnknownPeers: acceptUnknownPeers)
        let fromPeer: UInt32 = 0x0A02_0207
        h.send(makePacket(source: fromPeer, destination: 0x0A02_0209))  // the peer's own subnet
        h.send(makePacket(source: fromPeer, destination: 0x0A02_6301))  // a subnet no one holds
        h.send(makePacket(source: fromPeer, destination: 0xC000_0201))  // outside the network (192.0.2.1)
        h.send(makePacket(source: 0x0A02_0177, destination: 0x0A02_0105))  // our own subnet as source
        #expect(await h.waitFor(.droppedNotForUs, 3))
        #expect(await h.waitFor(.droppedLocalSource, 1))
        // Nothing of it reached the TUN: the next packet there is this one.
        let good = makePacket(source: fromPeer, destination: 0x0A02_0105)
        h.send(good)
        #expect(h.readFromTun() == good)
        #expect(await h.waitFor(.tunPacketsWritten, 1))
        #expect(h.thread.loop.statistics[.droppedNotForUs] == 3)
        #expect(h.thread.loop.statistics[.droppedLocalSource] == 1)
        #expect(h.thread.loop.statistics[.tunPacketsWritten] == 1)
        try await h.finish()
    }

    /// With UDP GRO one receive holds many datagrams; each is checked on its
    /// own before it may join a coalesced write.
    @Test(arguments: LoopKind.withOffloads)
    func eachDatagramOfAGROReceiveIsCheckedBeforeCoalescing(kind: LoopKind) async throws {
        let h = try kind.harness()
        let payload = Array(repeating: UInt8(0x5a), count: 200)
        func packet(_ destination: UInt32, source: UInt32 = 0x0A02_0207) -> [UInt8] {
            makePacket(source: source, destination: destination, proto: 1, payload: payload)
        }
        let batch = [
            packet(0x0A02_0105), packet(0x0A02_0209), packet(0x0A02_0106), packet(0xC000_0201),
            packet(0x0A02_0107, source: 0x0A02_0108), packet(0x0A02_0108),
        ]
        h.sendSegmented(batch)
        for expected in [batch[0], batch[2], batch[5]] {
            #expect(h.readFromTun() == expected)
        }
        #expect(await h.waitFor(.droppedNotForUs, 2))
        #expect(await h.waitFor(.droppedLocalSource, 1))
        #expect(await h.waitFor(.tunPacketsWritten, 3))
        #expect(h.thread.loop.statistics[.groReceives] >= 1, "the batch should have arrived as one GRO receive")
        #expect(h.thread.loop.statistics[.tunPacketsWritten] == 3)
        try await h.finish()
    }

    /// A packet bigger than the tunnel's MTU (1472 here) can only come from
    /// a TUN whose MTU was raised by hand: with DF it is answered with
    /// "fragmentation needed" and the tunnel's MTU, without DF dropped;
    /// both counted, neither sent.
    @Test(arguments: LoopKind.allCases)
    func packetsBiggerThanTheTunnelGetFragmentationNeeded(kind: LoopKind) async throws {
        let h = try kind.harness()
        let dontFragment: UInt16 = 0x4000
        let big = makePacket(
            source: 0x0A02_0105,
            destination: 0x0A02_0207,
            payload: Array(repeating: 1, count: 1480),
            fragmentOffset: dontFragment
        )
        h.writeToTun(big)
        let reply = try #require(h.readFromTun())
        #expect(reply[9] == 1 && reply[20] == 3 && reply[21] == 4)
        #expect(Int(reply[26]) << 8 | Int(reply[27]) == 1472, "next-hop MTU")
        #expect(Array(reply[12..<16]) == [10, 2, 2, 0] && Array(reply[16..<20]) == [10, 2, 1, 5])
        #expect(Array(reply[28..<48]) == Array(big.prefix(20)))
        // Without DF: dropped. The next datagram the peer sees is the one after.
        h.writeToTun(
            makePacket(
                source: 0x0A02_0105,
                destination: 0x0A02_0207,
                payload: Array(repeating: 2, count: 1480)
            )
        )
        let fits = makePacket(
            source: 0x0A02_0105,
            destination: 0x0A02_0207,
            payload: Array(repeating: 3, count: 1452),
            fragmentOffset: dontFragment
        )
        h.writeToTun(fits)
        let got = try #require(h.peerReceive())
        #expect(got.count == 1472 && got[20] == 3, "the packet of exactly the MTU goes through")
        #expect(await h.waitFor(.droppedTooBig, 2))
        #expect(h.thread.loop.statistics[.icmpFragmentationNeededSent] == 1)
        #expect(h.thread.loop.statistics[.droppedTooBig] == 2)
        try await h.finish()
    }

    /// A TCP super-packet whose segments would each exceed the MTU (gso_size
    /// from a sender that believes in a larger MTU) gets the same answer.
    @Test(arguments: LoopKind.withOffloads)
    func superPacketsWithSegmentsBiggerThanTheTunnelGetFragmentationNeeded(kind: LoopKind) async throws {
        let h = try kind.harness()
        var tcp = [UInt8](repeating: 0, count: 20)
        tcp[12] = 0x50  // data offset: 20 bytes
        tcp[13] = 0x10  // ACK
        let packet = makePacket(
            source: 0x0A02_0105,
            destination: 0x0A02_0207,
            proto: 6,
            payload: tcp + Array(repeating: 4, count: 2 * 1460),
            fragmentOffset: 0x4000
        )
        // virtio_net_hdr: no flags, GSO_TCPV4, hdr_len 40, gso_size 1460 (little-endian).
        let virtio: [UInt8] = [0, 1, 40, 0, 0xb4, 0x05, 0, 0, 0, 0]
        h.writeToTunRaw(virtio + packet)
        let reply = try #require(h.readFromTun())
        #expect(reply[20] == 3 && reply[21] == 4 && Int(reply[26]) << 8 | Int(reply[27]) == 1472)
        #expect(await h.waitFor(.icmpFragmentationNeededSent, 1))
        #expect(h.thread.loop.statistics[.segmentsMade] == 0)
        try await h.finish()
    }
}

extension LoopTests {
    /// A TCP super-packet read with a virtio header (TSO) leaves as real
    /// IPv4 packets of the segment size, one per datagram, in order — in
    /// UDP_SEGMENT sends where the socket has them — whatever loop moves it.
    @Test(arguments: LoopKind.withOffloads)
    func aTCPSuperPacketLeavesAsOnePacketPerDatagram(kind: LoopKind) async throws {
        let h = try kind.harness()
        var tcp = [UInt8](repeating: 0, count: 20)
        tcp[12] = 0x50  // data offset: 20 bytes
        tcp[13] = 0x18  // PSH, ACK
        let payload = (0..<3500).map { UInt8(truncatingIfNeeded: $0) }
        let packet = makePacket(
            source: 0x0A02_0105,
            destination: 0x0A02_0207,
            proto: 6,
            payload: tcp + payload,
            fragmentOffset: 0x4000
        )
        // virtio_net_hdr: no flags, GSO_TCPV4, hdr_len 40, gso_size 1000 (little-endian).
        let virtio: [UInt8] = [0, 1, 40, 0, 0xe8, 0x03, 0, 0, 0, 0]
        h.writeToTunRaw(virtio + packet)
        var received: [UInt8] = []
        for i in 0..<4 {
            let datagram = try #require(h.peerReceive(), "segment \(i) did not arrive")
            let expectedPayload = i < 3 ? 1000 : 500
            #expect(datagram.count == 40 + expectedPayload)
            #expect(Int(datagram[2]) << 8 | Int(datagram[3]) == datagram.count, "IPv4 total length")
            #expect(datagram[8] == 63, "TTL decremented")
            received += datagram.dropFirst(40)
        }
        #expect(received == payload)
        #expect(await h.waitFor(.udpPacketsSent, 4))
        #expect(h.thread.loop.statistics[.segmentsMade] == 4)
        #expect(h.thread.loop.statistics[.sendErrors] == 0)
        try await h.finish()
    }
}
