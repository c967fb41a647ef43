import Foundation
import NetBase
import NetTestSupport
import Testing
import UDPEncap
import WireGuard

@testable import Backends

/// Two hosts' engines wired back to back in memory: the wireguard backend's
/// packet logic (steering, staging, handshake, cryptokey routing, drops)
/// without devices or sockets.
@Suite struct WireGuardEngineTests {
    let subnetA = net("10.2.1.0/24")
    let subnetB = net("10.2.2.0/24")
    let endpointA = Endpoint(ipv4: ip("198.18.0.1").value, port: 51820)
    let endpointB = Endpoint(ipv4: ip("198.18.0.2").value, port: 51820)
    let subnetC = net("10.2.3.0/24")
    let endpointC = Endpoint(ipv4: ip("198.18.0.3").value, port: 51820)
    let keyA = PrivateKey.generate()
    let keyB = PrivateKey.generate()

    /// An engine with `key` for IPv4 subnets of /`subnetLength` and IPv6 ones
    /// of /`subnetLength6` (nil: none of that family), without keepalives.
    func engine(
        _ key: PrivateKey,
        psk: PresharedKey = .none,
        subnetLength: Int? = 24,
        subnetLength6: Int? = nil
    ) -> WireGuardEngine {
        WireGuardEngine(
            privateKey: key,
            presharedKey: psk,
            persistentKeepalive: 0,
            subnetLength: subnetLength,
            subnetLength6: subnetLength6
        )
    }

    func engines(psk: PresharedKey = .none) throws -> (WireGuardEngine, WireGuardEngine) {
        let a = engine(keyA, psk: psk)
        let b = engine(keyB, psk: psk)
        try a.setPeer(subnet: subnetB, publicKey: keyB.publicKey, endpoint: endpointB)
        try b.setPeer(subnet: subnetA, publicKey: keyA.publicKey, endpoint: endpointA)
        return (a, b)
    }

    /// A and B as `engines()` gives them, with sessions, and a third host C
    /// (10.2.3.0/24 at 198.18.0.3) that A peers with and has a session with.
    func threeEnginesWithSessions() throws -> (a: WireGuardEngine, b: WireGuardEngine, c: WireGuardEngine) {
        let keyC = PrivateKey.generate()
        let (a, b) = try engines()
        let c = engine(keyC)
        try a.setPeer(subnet: subnetC, publicKey: keyC.publicKey, endpoint: endpointC)
        try c.setPeer(subnet: subnetA, publicKey: keyA.publicKey, endpoint: endpointA)
        try handshake(a, b, first: aToB)
        let aToC = makePacket(source: 0x0A02_0105, destination: 0x0A02_0309)
        try handshake(a, c, first: aToC, endpoints: (endpointA, endpointC))
        return (a, b, c)
    }

    var now: Instant { WireGuardClock.now() }

    /// Sends `packets` (IPv4) through `engine` as if read from its TUN:
    /// the datagrams to send, sealed in the batch and as control messages.
    func send(_ packets: [[UInt8]], through engine: WireGuardEngine, workers: CryptoWorkers? = nil) -> [Datagram] {
        let batch = PacketBatch(capacity: packets.count, payloadSize: 1500)
        for (i, packet) in packets.enumerated() {
            let area = batch.payloadArea(i)
            packet.withUnsafeBytes { area.baseAddress!.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
            batch.packets[i].length = packet.count
        }
        batch.count = packets.count
        let control = engine.outgoing(batch, now: now, timestamp: WireGuardClock.timestamp, workers: workers)
        var out: [Datagram] = []
        for i in 0..<batch.count where batch.pass[i] {
            let p = batch.packets[i]
            out.append(
                Datagram(bytes: Array(UnsafeRawBufferPointer(rebasing: p.memory[0..<p.length])), to: batch.endpoints[i])
            )
        }
        return out + control
    }

    /// Delivers datagrams to `engine` from `source`: what it writes to its
    /// TUN, and what it sends back.
    func deliver(
        _ datagrams: [Datagram],
        to engine: WireGuardEngine,
        from source: Endpoint,
        workers: CryptoWorkers? = nil
    ) -> (written: [[UInt8]], replies: [Datagram]) {
        guard !datagrams.isEmpty else { return ([], []) }
        let batch = PacketBatch(capacity: datagrams.count, payloadSize: 1500)
        for (i, d) in datagrams.enumerated() {
            d.bytes.withUnsafeBytes {
                batch.packets[i].memory.baseAddress!.copyMemory(from: $0.baseAddress!, byteCount: $0.count)
            }
            batch.packets[i].length = d.bytes.count
            batch.endpoints[i] = source
        }
        batch.count = datagrams.count
        let replies = engine.incoming(batch, now: now, timestamp: WireGuardClock.timestamp, workers: workers)
        var written: [[UInt8]] = []
        for i in 0..<batch.count where batch.pass[i] {
            let p = batch.packets[i]
            written.append(Array(UnsafeRawBufferPointer(rebasing: p.memory[16..<(16 + p.length)])))
        }
        return (written, replies)
    }

    func counter(_ engine: WireGuardEngine, _ c: WireGuardCounter) -> UInt64 {
        engine.counterValues().first { $0.counter == c }!.value
    }

    /// A's packet waits for the handshake, which A starts; B answers; A then
    /// sends the packet, which B writes to its TUN byte for byte. Each
    /// message goes to the other's address in `endpoints`, the underlay's.
    func handshake(
        _ a: WireGuardEngine,
        _ b: WireGuardEngine,
        first: [UInt8],
        endpoints: (a: Endpoint, b: Endpoint)
    ) throws {
        let initiation = send([first], through: a)
        try #require(initiation.count == 1)
        #expect(initiation[0].bytes.count == MessageLayout.initiationLength && initiation[0].to == endpoints.b)
        let (nothing, response) = deliver(initiation, to: b, from: endpoints.a)
        #expect(nothing.isEmpty)
        try #require(response.count == 1)
        #expect(response[0].to == endpoints.a)
        let (none, staged) = deliver(response, to: a, from: endpoints.b)
        #expect(none.isEmpty)
        try #require(staged.count == 1)
        #expect(staged[0].to == endpoints.b)
        #expect(deliver(staged, to: b, from: endpoints.a).written == [first])
    }

    /// The handshake of A and B at endpointA and endpointB, after which each
    /// has a session for the other's IPv4 subnet.
    func handshake(_ a: WireGuardEngine, _ b: WireGuardEngine, first: [UInt8]) throws {
        try handshake(a, b, first: first, endpoints: (endpointA, endpointB))
        #expect(a.hasSession(subnet: subnetB) && b.hasSession(subnet: subnetA))
    }

    let aToB = makePacket(source: 0x0A02_0105, destination: 0x0A02_0207, payload: Array(repeating: 7, count: 100))

    @Test func aPacketWaitsForTheHandshakeAndArrivesIntact() throws {
        let (a, b) = try engines()
        try handshake(a, b, first: aToB)
        // Now both ways with a session.
        let back = makePacket(source: 0x0A02_0207, destination: 0x0A02_0105, payload: Array(0..<200))
        let reply = send([back], through: b)
        #expect(deliver(reply, to: a, from: endpointB).written == [back])
        #expect(counter(a, .handshakesCompleted) == 1)
    }

    @Test func aPresharedKeyMustMatch() throws {
        let a = engine(keyA, psk: .generate())
        let b = engine(keyB, psk: .generate())
        try a.setPeer(subnet: subnetB, publicKey: keyB.publicKey, endpoint: endpointB)
        try b.setPeer(subnet: subnetA, publicKey: keyA.publicKey, endpoint: endpointA)
        let initiation = send([aToB], through: a)
        let (_, response) = deliver(initiation, to: b, from: endpointA)
        let (_, staged) = deliver(response, to: a, from: endpointB)
        #expect(staged.isEmpty)
        #expect(!a.hasSession(subnet: subnetB))
        #expect(counter(a, .droppedBadMAC) == 1)
    }

    @Test func aTamperedOrReplayedDatagramIsDroppedAndCounted() throws {
        let (a, b) = try engines()
        try handshake(a, b, first: aToB)
        let sealed = send([aToB], through: a)
        try #require(sealed.count == 1)
        var tampered = sealed[0]
        tampered.bytes[40] ^= 1
        #expect(deliver([tampered], to: b, from: endpointA).written.isEmpty)
        #expect(counter(b, .droppedBadMAC) == 1)
        // The genuine one still passes (a failed tag does not mark the counter)…
        #expect(deliver(sealed, to: b, from: endpointA).written == [aToB])
        // …once.
        #expect(deliver(sealed, to: b, from: endpointA).written.isEmpty)
        #expect(counter(b, .droppedReplay) == 1)
        // A handshake message under someone else's key fails its mac1.
        var initiation = [UInt8](repeating: 0, count: MessageLayout.initiationLength)
        initiation[0] = 1
        _ = deliver([Datagram(bytes: initiation, to: endpointB)], to: b, from: endpointA)
        #expect(counter(b, .droppedBadMAC) == 2)
    }

    @Test func aBatchToTwoPeersInterleavedIsSealedInRunsWithConsecutiveCounters() throws {
        let (a, b, c) = try threeEnginesWithSessions()
        // B, B, C, B, C, C: four runs, each peer's counters in order.
        let packets = (0..<6).map { i in
            makePacket(
                source: 0x0A02_0105,
                destination: [1, 1, 0, 1, 0, 0][i] == 1 ? 0x0A02_0207 : 0x0A02_0309,
                payload: Array(repeating: UInt8(i), count: 10 + i)
            )
        }
        let sealed = send(packets, through: a)
        #expect(sealed.map(\.to) == [endpointB, endpointB, endpointC, endpointB, endpointC, endpointC])
        let counters = sealed.map { d in d.bytes[8..<16].reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) } }
        #expect(counters[0] + 1 == counters[1] && counters[1] + 1 == counters[3])
        #expect(counters[2] + 1 == counters[4] && counters[4] + 1 == counters[5])
        let toB = sealed.enumerated().filter { $0.element.to == endpointB }
        let toCAgain = sealed.enumerated().filter { $0.element.to == endpointC }
        #expect(deliver(toB.map(\.element), to: b, from: endpointA).written == toB.map { packets[$0.offset] })
        #expect(deliver(toCAgain.map(\.element), to: c, from: endpointA).written == toCAgain.map { packets[$0.offset] })
        #expect(counter(a, .packetsSealed) == 8)
    }

    @Test func aBatchFromTwoPeersInterleavedIsOpenedEachAgainstItsOwnPeer() throws {
        let (a, b, c) = try threeEnginesWithSessions()
        let fromB = (0..<2).map { makePacket(source: 0x0A02_0207, destination: 0x0A02_0105, payload: [UInt8($0)]) }
        let fromC = (0..<2).map { makePacket(source: 0x0A02_0309, destination: 0x0A02_0105, payload: [UInt8($0)]) }
        let sealedB = send(fromB, through: b), sealedC = send(fromC, through: c)
        try #require(sealedB.count == 2 && sealedC.count == 2)
        // B, C, C, B: three runs, each source checked against its own peer's subnet.
        let (written, _) = deliver([sealedB[0], sealedC[0], sealedC[1], sealedB[1]], to: a, from: endpointB)
        #expect(written == [fromB[0], fromC[0], fromC[1], fromB[1]])
        #expect(counter(a, .droppedSourceNotAllowed) == 0 && counter(a, .droppedNoPeer) == 0)
    }

    @Test func oneBatchHoldingAMessageTwiceAndATamperedOneOpensTheRestOnce() throws {
        let (a, b) = try engines()
        try handshake(a, b, first: aToB)
        let packets = (0..<4).map { i in
            makePacket(source: 0x0A02_0105, destination: 0x0A02_0207, payload: Array(repeating: UInt8(i), count: 50))
        }
        let sealed = send(packets, through: a)
        try #require(sealed.count == 4)
        var tampered = sealed[2]
        tampered.bytes[tampered.bytes.count - 1] ^= 0x80
        // The same message twice passes the window's check before decryption; only one is accepted.
        let (written, _) = deliver([sealed[0], sealed[1], sealed[1], tampered, sealed[3]], to: b, from: endpointA)
        #expect(written == [packets[0], packets[1], packets[3]])
        #expect(counter(b, .droppedReplay) == 1)
        #expect(counter(b, .droppedBadMAC) == 1)
        // The tampered one's counter was not marked: the genuine message still opens.
        #expect(deliver([sealed[2]], to: b, from: endpointA).written == [packets[2]])
    }

    @Test func batchesSealedAndOpenedByWorkerThreadsArriveInOrderAndIntact() throws {
        let (a, b) = try engines()
        try handshake(a, b, first: aToB)
        let sealers = CryptoWorkers(helpers: 1, name: "test-seal")
        let openers = CryptoWorkers(helpers: 3, name: "test-open")
        defer {
            sealers.stop()
            openers.stop()
        }
        for round in 0..<20 {
            let packets = (0..<64).map { i in
                makePacket(
                    source: 0x0A02_0105,
                    destination: 0x0A02_0207,
                    payload: (0..<(20 + (i * 37 + round) % 1300)).map { UInt8(truncatingIfNeeded: $0 &+ i &+ round) }
                )
            }
            var sealed = send(packets, through: a, workers: sealers)
            try #require(sealed.count == 64)
            let counters = sealed.map { d in d.bytes[8..<16].reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) } }
            #expect(zip(counters, counters.dropFirst()).allSatisfy { $0 + 1 == $1 })
            // One message in a helper's chunk is tampered with: only it is dropped.
            sealed[50].bytes[20] ^= 1
            let written = deliver(sealed, to: b, from: endpointA, workers: openers).written
            #expect(written == Array(packets[0..<50] + packets[51...]))
        }
        #expect(counter(b, .droppedBadMAC) == 20)
        #expect(counter(b, .packetsOpened) == 1 + 20 * 63)
    }

    @Test func aFloodOfInitiationsGetsCookieRepliesInsteadOfHandshakeWork() throws {
        let (_, b) = try engines()
        // Initiations with a valid mac1 (anyone who knows B's public key
        // can make them), far more than a second's worth.
        let attacker = WireGuardInterface(privateKey: PrivateKey.generate())
        let peer = try attacker.addPeer(keyB.publicKey)
        let flood = (0..<100).map { _ in
            Datagram(
                bytes: attacker.makeInitiation(for: peer, now: now, timestamp: WireGuardClock.timestamp()),
                to: endpointB
            )
        }
        let (written, replies) = deliver(flood, to: b, from: Endpoint(ipv4: ip("198.18.0.66").value, port: 4000))
        #expect(written.isEmpty)
        let limit = WireGuardEngine.handshakesPerSecondBeforeLoad
        #expect(counter(b, .cookieRepliesSent) == UInt64(100 - limit))
        #expect(replies.count == 100 - limit)
        #expect(replies.allSatisfy { $0.bytes.count == MessageLayout.cookieReplyLength })
        // Below the limit they were handshake work, refused as an unknown peer.
        #expect(counter(b, .droppedHandshake) == UInt64(limit))
    }

    @Test func anInnerSourceOutsideThePeersSubnetIsDropped() throws {
        let (a, b) = try engines()
        try handshake(a, b, first: aToB)
        let spoofed = makePacket(source: 0x0A02_0909, destination: 0x0A02_0207)
        let sealed = send([spoofed], through: a)
        try #require(sealed.count == 1)
        #expect(deliver(sealed, to: b, from: endpointA).written.isEmpty)
        #expect(counter(b, .droppedSourceNotAllowed) == 1)
    }

    @Test func aPacketToNoPeerIsDroppedAndCounted() throws {
        let (a, _) = try engines()
        #expect(send([makePacket(source: 0x0A02_0105, destination: 0x0A02_0707)], through: a).isEmpty)
        #expect(counter(a, .droppedNoPeer) == 1)
    }

    @Test func aRemovedLeaseEndsTheSession() throws {
        let (a, b) = try engines()
        try handshake(a, b, first: aToB)
        let sealed = send([aToB], through: a)
        b.removePeer(subnet: subnetA)
        #expect(!b.hasSession(subnet: subnetA))
        #expect(deliver(sealed, to: b, from: endpointA).written.isEmpty)
        #expect(counter(b, .droppedUnknownReceiver) == 1)
    }

    @Test func aLeaseWithANewKeyReplacesThePeer() throws {
        let (a, b) = try engines()
        try handshake(a, b, first: aToB)
        let newKey = PrivateKey.generate()
        try b.setPeer(subnet: subnetA, publicKey: newKey.publicKey, endpoint: endpointA)
        #expect(b.peerCount == 1)
        #expect(!b.hasSession(subnet: subnetA))
        // The old key's session is gone with it.
        #expect(deliver(send([aToB], through: a), to: b, from: endpointA).written.isEmpty)
    }
}

@Suite struct WireGuardKeyFileTests {
    func scratch() -> String {
        NSTemporaryDirectory() + "tunneld-wgkey-\(UUID().uuidString)"
    }

    @Test func anAbsentKeyFileIsCreatedReadOnlyAndReadBack() throws {
        let dir = scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/sub/wgkey"
        let (key, created) = try WireGuardKeyFile.loadOrCreate(at: path)
        #expect(created)
        let attributes = try FileManager.default.attributesOfItem(atPath: path)
        #expect((attributes[.posixPermissions] as? Int) == 0o400)
        let text = try String(contentsOfFile: path, encoding: .utf8)
        #expect(text.count == 44 && !text.hasSuffix("\n"))
        let (again, createdAgain) = try WireGuardKeyFile.loadOrCreate(at: path)
        #expect(!createdAgain)
        #expect(again.publicKey == key.publicKey)
    }

    @Test func aKeyFromWgGenkeyWithANewlineIsRead() throws {
        let dir = scratch()
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let key = PrivateKey.generate()
        try (key.base64 + "\n").write(toFile: dir + "/wgkey", atomically: true, encoding: .utf8)
        #expect(try WireGuardKeyFile.loadOrCreate(at: dir + "/wgkey").key.publicKey == key.publicKey)
    }

    @Test func aMalformedKeyFileIsOneClearError() throws {
        let dir = scratch()
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try "not a key".write(toFile: dir + "/wgkey", atomically: true, encoding: .utf8)
        do {
            _ = try WireGuardKeyFile.loadOrCreate(at: dir + "/wgkey")
            Issue.record("a malformed key file was accepted")
        } catch {
            let text = "\(error)"
            #expect(text.contains("the WireGuard key file \(dir)/wgkey does not hold a private key"))
            #expect(text.contains("wg genkey >"))
        }
    }

    @Test func theEnvironmentNamesTheFile() {
        #expect(WireGuardKeyFile.path(environment: [:]) == "/run/flannel/wgkey")
        #expect(WireGuardKeyFile.path(environment: ["WIREGUARD_KEY_FILE": "/etc/k"]) == "/etc/k")
    }
}
