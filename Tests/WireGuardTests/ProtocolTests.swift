import Testing

@testable import WireGuard

/// Two interfaces that know each other, and helpers to move messages between them.
final class Pair {
    let alice: WireGuardInterface
    let bob: WireGuardInterface
    let aliceEnd = Endpoint(ipv4: 0xC612_0001, port: 51820)  // 198.18.0.1
    let bobEnd = Endpoint(ipv4: 0xC612_0002, port: 51820)
    let alicesBob: Peer
    let bobsAlice: Peer
    let cipher = CipherContext()
    var clock = Instant.seconds(1000)
    var wall: Int64 = 1_700_000_000

    /// `mtu`: both interfaces' device MTU (padding stops there).
    init(psk: PresharedKey = .none, mtu: Int? = nil) throws {
        alice = WireGuardInterface(privateKey: .generate(), mtu: mtu)
        bob = WireGuardInterface(privateKey: .generate(), mtu: mtu)
        alicesBob = try alice.addPeer(bob.publicKey, presharedKey: psk, endpoint: bobEnd)
        bobsAlice = try bob.addPeer(alice.publicKey, presharedKey: psk)
    }

    func stamp() -> TAI64N {
        wall += 1
        return TAI64N(unixSeconds: wall, nanoseconds: 0)
    }

    /// Alice initiates, Bob responds, Alice completes.
    func handshake() throws {
        let initiation = alice.makeInitiation(for: alicesBob, now: clock, timestamp: stamp())
        guard case .respond(let peer, let response) = bob.receiveHandshake(initiation, from: aliceEnd, now: clock)
        else {
            Issue.record("initiation not accepted"); return
        }
        #expect(peer === bobsAlice)
        guard case .established(let p) = alice.receiveHandshake(response, from: bobEnd, now: clock) else {
            Issue.record("response not accepted"); return
        }
        #expect(p === alicesBob)
    }

    /// Seals `payload` from `from` and returns the message bytes.
    func seal(_ payload: [UInt8], from interface: WireGuardInterface, to peer: Peer) -> (SealOutcome, [UInt8]) {
        var slot = [UInt8](repeating: 0, count: 16 + payload.count + 32)
        slot.replaceSubrange(16..<16 + payload.count, with: payload)
        let outcome = slot.withUnsafeMutableBytes { raw in
            var packet = PacketBuffer(memory: raw, length: payload.count)
            let outcome = withUnsafeMutablePointer(to: &packet) {
                interface.seal(UnsafeMutableBufferPointer(start: $0, count: 1), to: peer, cipher: cipher, now: clock)
            }
            return (outcome, packet.length)
        }
        return (outcome.0, Array(slot[0..<outcome.1]))
    }

    func open(
        _ message: [UInt8],
        at interface: WireGuardInterface,
        from source: Endpoint
    ) -> Result<([UInt8], Received), Rejection> {
        var slot = message
        return slot.withUnsafeMutableBytes { raw in
            var packet = PacketBuffer(memory: raw, length: message.count)
            return interface.open(&packet, from: source, cipher: cipher, now: clock).map { received in
                (Array(raw[16..<16 + received.payloadLength]), received)
            }
        }
    }
}

func rejection<T>(_ r: Result<T, Rejection>) -> Rejection? {
    if case .failure(let e) = r { return e }
    return nil
}

@Suite struct HandshakeTests {
    @Test func twoPeersCompleteAHandshakeAndExchangeData() throws {
        let pair = try Pair(psk: .generate())
        try pair.handshake()
        #expect(pair.alicesBob.current != nil && pair.bobsAlice.next != nil && pair.bobsAlice.current == nil)
        // Bob may not send before Alice's first message confirms the session.
        #expect(pair.seal([1], from: pair.bob, to: pair.bobsAlice).0 == SealOutcome(sealed: 0, wantsHandshake: true))
        let ping = Array(0..<84).map { UInt8($0) }
        let (sealed, message) = pair.seal(ping, from: pair.alice, to: pair.alicesBob)
        #expect(sealed == SealOutcome(sealed: 1, wantsHandshake: false))
        #expect(message.count == 16 + 96 + 16)
        let opened = try pair.open(message, at: pair.bob, from: pair.aliceEnd).get()
        #expect(Array(opened.0.prefix(84)) == ping && opened.0.dropFirst(84).allSatisfy { $0 == 0 })
        #expect(opened.1.peer === pair.bobsAlice)
        #expect(pair.bobsAlice.current != nil && pair.bobsAlice.next == nil)
        let (_, reply) = pair.seal(Array("pong".utf8), from: pair.bob, to: pair.bobsAlice)
        #expect(Array(try pair.open(reply, at: pair.alice, from: pair.bobEnd).get().0.prefix(4)) == Array("pong".utf8))
    }

    /// Padding rounds a payload up to a multiple of 16 but not past the
    /// device's MTU, as the kernel and wireguard-go do: a full-size packet's
    /// message is then exactly 32 bytes longer, which the MTU's 80 bytes of
    /// overhead allow over an IPv6 underlay (1420 + 32 + 48 = 1500).
    @Test func paddingStopsAtTheDevicesMTU() throws {
        let pair = try Pair(mtu: 1420)
        try pair.handshake()
        let cases: [(payload: Int, padded: Int)] = [
            (1420, 1420), (1419, 1420), (1405, 1408), (1404, 1408), (84, 96), (0, 0),
        ]
        for (payload, padded) in cases {
            let bytes = (0..<payload).map { UInt8(truncatingIfNeeded: $0 &* 7) }
            let (sealed, message) = pair.seal(bytes, from: pair.alice, to: pair.alicesBob)
            #expect(sealed.sealed == 1)
            #expect(message.count == 32 + padded, "a payload of \(payload) bytes")
            let opened = try pair.open(message, at: pair.bob, from: pair.aliceEnd).get()
            #expect(Array(opened.0.prefix(payload)) == bytes && opened.0.dropFirst(payload).allSatisfy { $0 == 0 })
        }
        let messages = cases.reduce(0) { $0 + 32 + $1.padded }
        #expect(pair.alicesBob.bytesSent == UInt64(messages))
        // Without an MTU, multiples of 16; a payload past the MTU is rounded up as without one.
        #expect(MessageLayout.paddedLength(1420) == 1424)
        #expect(MessageLayout.paddedLength(1430, mtu: 1420) == 1440)
    }

    @Test func differentPresharedKeysFailTheResponse() throws {
        let pair = try Pair()
        pair.bobsAlice.presharedKey = .generate()
        let initiation = pair.alice.makeInitiation(for: pair.alicesBob, now: pair.clock, timestamp: pair.stamp())
        guard
            case .respond(_, let response) = pair.bob.receiveHandshake(initiation, from: pair.aliceEnd, now: pair.clock)
        else { Issue.record("initiation not accepted"); return }
        guard
            case .rejected(.decryptionFailed(.response)) = pair.alice.receiveHandshake(
                response,
                from: pair.bobEnd,
                now: pair.clock
            )
        else { Issue.record("response with another PSK accepted"); return }
    }

    @Test func aReplayedInitiationIsRefusedByItsTimestamp() throws {
        let pair = try Pair()
        let initiation = pair.alice.makeInitiation(for: pair.alicesBob, now: pair.clock, timestamp: pair.stamp())
        guard case .respond = pair.bob.receiveHandshake(initiation, from: pair.aliceEnd, now: pair.clock) else {
            Issue.record("first initiation refused"); return
        }
        pair.clock = pair.clock + .seconds(1)
        guard
            case .rejected(.replayedTimestamp) = pair.bob.receiveHandshake(
                initiation,
                from: pair.aliceEnd,
                now: pair.clock
            )
        else { Issue.record("replayed initiation accepted"); return }
    }

    @Test func initiationsCloserThan20msAreRefused() throws {
        let pair = try Pair()
        _ = pair.bob.receiveHandshake(
            pair.alice.makeInitiation(for: pair.alicesBob, now: pair.clock, timestamp: pair.stamp()),
            from: pair.aliceEnd,
            now: pair.clock
        )
        let second = pair.alice.makeInitiation(for: pair.alicesBob, now: pair.clock, timestamp: pair.stamp())
        guard
            case .rejected(.initiationTooSoon) = pair.bob.receiveHandshake(
                second,
                from: pair.aliceEnd,
                now: pair.clock + .milliseconds(5)
            )
        else { Issue.record("flooded initiation accepted"); return }
    }

    @Test func malformedMessagesAreRejectedWithAReason() throws {
        let pair = try Pair()
        func outcome(_ bytes: [UInt8]) -> Rejection? {
            if case .rejected(let r) = pair.bob.receiveHandshake(bytes, from: pair.aliceEnd, now: pair.clock) {
                return r
            }
            return nil
        }
        #expect(outcome([]) == .empty)
        #expect(outcome([9, 0, 0, 0]) == .unknownType(9))
        #expect(outcome([1, 0, 0, 0]) == .wrongLength(.initiation, 4))
        #expect(outcome([1, 0, 1, 0] + [UInt8](repeating: 0, count: 144)) == .unknownType(1))
        var initiation = pair.alice.makeInitiation(for: pair.alicesBob, now: pair.clock, timestamp: pair.stamp())
        #expect(outcome(Array(initiation.dropLast())) == .wrongLength(.initiation, 147))
        initiation[50] ^= 1  // inside encrypted_static: mac1 no longer verifies
        #expect(outcome(initiation) == .badMAC1)
        // A stranger's initiation (mac1 right, static key unknown).
        let stranger = WireGuardInterface(privateKey: .generate())
        let strangersBob = try stranger.addPeer(pair.bob.publicKey)
        #expect(
            outcome(stranger.makeInitiation(for: strangersBob, now: pair.clock, timestamp: pair.stamp()))
                == .unknownPeer
        )
        // Transport: short, unknown receiver, tampered.
        try pair.handshake()
        let (_, message) = pair.seal([1, 2, 3], from: pair.alice, to: pair.alicesBob)
        #expect(
            rejection(pair.open(Array(message.prefix(31)), at: pair.bob, from: pair.aliceEnd))
                == .wrongLength(.transport, 31)
        )
        var unknown = message
        unknown[4] ^= 0xFF
        #expect(
            rejection(pair.open(unknown, at: pair.bob, from: pair.aliceEnd))
                == .unknownReceiver(
                    UInt32(
                        littleEndian: unknown.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 4, as: UInt32.self) }
                    )
                )
        )
        var tampered = message
        tampered[20] ^= 1
        #expect(rejection(pair.open(tampered, at: pair.bob, from: pair.aliceEnd)) == .decryptionFailed(.transport))
        // The tampered copy did not burn the counter: the real one still opens, once.
        #expect(rejection(pair.open(message, at: pair.bob, from: pair.aliceEnd)) == nil)
        #expect(rejection(pair.open(message, at: pair.bob, from: pair.aliceEnd)) == .replayedCounter(0))
    }

    @Test func aPeerRoamsToTheSourceOfAuthenticatedPackets() throws {
        let pair = try Pair()
        try pair.handshake()
        #expect(pair.bobsAlice.endpoint == pair.aliceEnd)
        let moved = Endpoint(ipv4: 0xC612_0009, port: 40000)
        let (_, message) = pair.seal([7], from: pair.alice, to: pair.alicesBob)
        var forged = message
        forged[30] ^= 1
        _ = pair.open(forged, at: pair.bob, from: Endpoint(ipv4: 0xC612_00FF, port: 1))
        #expect(pair.bobsAlice.endpoint == pair.aliceEnd)
        _ = try pair.open(message, at: pair.bob, from: moved).get()
        #expect(pair.bobsAlice.endpoint == moved)
    }

    @Test func underLoadAnInitiationWithoutMac2GetsACookieAndTheRetryIsAccepted() throws {
        let pair = try Pair()
        let first = pair.alice.makeInitiation(for: pair.alicesBob, now: pair.clock, timestamp: pair.stamp())
        guard
            case .cookieReply(let reply) = pair.bob.receiveHandshake(
                first,
                from: pair.aliceEnd,
                now: pair.clock,
                underLoad: true
            )
        else { Issue.record("no cookie reply under load"); return }
        #expect(reply.count == 64 && reply[0] == 3)
        // No Diffie-Hellman work was done: Bob has no handshake state for Alice.
        #expect(pair.bobsAlice.next == nil && pair.bobsAlice.latestTimestamp == .zero)
        guard case .cookieStored(let peer) = pair.alice.receiveHandshake(reply, from: pair.bobEnd, now: pair.clock)
        else {
            Issue.record("cookie reply not accepted"); return
        }
        #expect(peer === pair.alicesBob)
        pair.clock = pair.clock + .seconds(1)
        let retry = pair.alice.makeInitiation(for: pair.alicesBob, now: pair.clock, timestamp: pair.stamp())
        guard case .respond = pair.bob.receiveHandshake(retry, from: pair.aliceEnd, now: pair.clock, underLoad: true)
        else {
            Issue.record("initiation with mac2 refused"); return
        }
        // The cookie is bound to the source address: from elsewhere it is refused again.
        pair.clock = pair.clock + .seconds(1)
        let elsewhere = pair.alice.makeInitiation(for: pair.alicesBob, now: pair.clock, timestamp: pair.stamp())
        guard
            case .cookieReply = pair.bob.receiveHandshake(
                elsewhere,
                from: Endpoint(ipv4: 0xC612_0077, port: 9),
                now: pair.clock,
                underLoad: true
            )
        else { Issue.record("cookie accepted from another address"); return }
        // A cookie older than COOKIE_REFRESH_TIME is not used.
        #expect(pair.alicesBob.cookieForMAC2(now: pair.clock + Timing.cookieRefreshTime) == nil)
    }

    @Test func underLoadOneAddressGetsAtMost20HandshakesASecond() throws {
        let pair = try Pair()
        let first = pair.alice.makeInitiation(for: pair.alicesBob, now: pair.clock, timestamp: pair.stamp())
        guard
            case .cookieReply(let reply) = pair.bob.receiveHandshake(
                first,
                from: pair.aliceEnd,
                now: pair.clock,
                underLoad: true
            ),
            case .cookieStored = pair.alice.receiveHandshake(reply, from: pair.bobEnd, now: pair.clock)
        else { Issue.record("no cookie"); return }
        // A replayed initiation with a valid mac2: five pass the limiter (and are refused later,
        // as replays or too soon), the sixth in the same instant is refused before any DH.
        let flood = pair.alice.makeInitiation(for: pair.alicesBob, now: pair.clock, timestamp: pair.stamp())
        var outcomes: [Rejection] = []
        for _ in 0..<6 {
            if case .rejected(let r) = pair.bob.receiveHandshake(
                flood,
                from: pair.aliceEnd,
                now: pair.clock,
                underLoad: true
            ) {
                outcomes.append(r)
            } else {
                outcomes.append(.empty)  // accepted
            }
        }
        #expect(outcomes.prefix(5).allSatisfy { $0 != .rateLimited })
        #expect(outcomes.last == .rateLimited)
        // 50 ms later there is credit for one more.
        let later = pair.clock + .milliseconds(50)
        guard case .rejected(let r) = pair.bob.receiveHandshake(flood, from: pair.aliceEnd, now: later, underLoad: true)
        else {
            Issue.record("replayed initiation accepted"); return
        }
        #expect(r == .replayedTimestamp)
        // Not under load, there is no limit.
        let calm = pair.bob.receiveHandshake(flood, from: pair.aliceEnd, now: later, underLoad: false)
        guard case .rejected(.replayedTimestamp) = calm else { Issue.record("got \(calm)"); return }
    }

    @Test func aTamperedCookieReplyIsRejected() throws {
        let pair = try Pair()
        let first = pair.alice.makeInitiation(for: pair.alicesBob, now: pair.clock, timestamp: pair.stamp())
        guard
            case .cookieReply(var reply) = pair.bob.receiveHandshake(
                first,
                from: pair.aliceEnd,
                now: pair.clock,
                underLoad: true
            )
        else { Issue.record("no cookie reply"); return }
        reply[40] ^= 1
        guard
            case .rejected(.decryptionFailed(.cookieReply)) = pair.alice.receiveHandshake(
                reply,
                from: pair.bobEnd,
                now: pair.clock
            )
        else { Issue.record("tampered cookie reply accepted"); return }
    }
}

@Suite struct ReplayWindowTests {
    @Test func windowRulesHold() {
        var window = ReplayWindow()
        func accept(_ counter: UInt64) -> Bool { window.accept(counter) }
        #expect(accept(0))
        #expect(!accept(0))
        #expect(accept(5000))
        #expect(accept(4999 - 2047))  // inside a 2048 window
        #expect(!accept(5000 - ReplayWindow.size))  // just behind the window
        #expect(accept(5000 - ReplayWindow.size + 1))
        #expect(window.check(4999) && window.check(4998))
        #expect(!window.check(Timing.rejectAfterMessages))
        #expect(ReplayWindow.size >= 2048)
    }

    /// The bitmap against an obviously right model: a set of seen counters.
    @Test func windowMatchesASlowModelOnRandomCounters() {
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<20 {
            var window = ReplayWindow()
            var seen = Set<UInt64>()
            var highest: UInt64 = 0
            var base: UInt64 = 0
            for _ in 0..<5000 {
                base += UInt64.random(in: 0...40, using: &generator)
                let counter = base &- min(base, UInt64.random(in: 0...6000, using: &generator))
                let expected = !seen.contains(counter) && (counter > highest || highest - counter < ReplayWindow.size)
                let accepted = window.accept(counter)
                #expect(accepted == expected)
                if expected {
                    seen.insert(counter)
                    highest = max(highest, counter)
                }
            }
        }
    }
}

@Suite struct TimerTests {
    @Test func anUnansweredInitiationIsRetriedWithJitterAndAbandonedAfterRekeyAttemptTime() throws {
        let pair = try Pair()
        let start = pair.clock
        _ = pair.alice.makeInitiation(for: pair.alicesBob, now: start, timestamp: pair.stamp())
        let deadline = try #require(pair.alicesBob.retransmitAt)
        #expect(
            deadline >= start + Timing.rekeyTimeout
                && deadline <= start + Timing.rekeyTimeout + Timing.rekeyTimeoutJitterMax
        )
        #expect(pair.alice.tick(pair.alicesBob, now: start + .seconds(4)) == [])
        var now = deadline
        var retries = 0
        while true {
            let actions = pair.alice.tick(pair.alicesBob, now: now)
            if actions.contains(.gaveUpHandshake) { break }
            #expect(actions == .sendInitiation)
            retries += 1
            _ = pair.alice.makeInitiation(for: pair.alicesBob, now: now, timestamp: pair.stamp())
            now = try #require(pair.alicesBob.retransmitAt)
        }
        #expect(now - start >= Timing.rekeyAttemptTime)
        #expect(retries >= 16 && retries <= 18)
        #expect(!pair.alicesBob.isHandshaking)
    }

    @Test func theInitiatorRekeysAfterRekeyAfterTimeAndStopsAtRejectAfterTime() throws {
        let pair = try Pair()
        try pair.handshake()
        pair.clock = pair.clock + (Timing.rekeyAfterTime - .seconds(1))
        #expect(pair.seal([1], from: pair.alice, to: pair.alicesBob).0 == SealOutcome(sealed: 1, wantsHandshake: false))
        pair.clock = pair.clock + .seconds(1)
        #expect(pair.seal([1], from: pair.alice, to: pair.alicesBob).0 == SealOutcome(sealed: 1, wantsHandshake: true))
        pair.clock = pair.clock + (Timing.rejectAfterTime - Timing.rekeyAfterTime)
        #expect(pair.seal([1], from: pair.alice, to: pair.alicesBob).0 == SealOutcome(sealed: 0, wantsHandshake: true))
    }

    @Test func theResponderDoesNotRekeyByAgeButRefusesExpiredSessions() throws {
        let pair = try Pair()
        try pair.handshake()
        let (_, first) = pair.seal([1], from: pair.alice, to: pair.alicesBob)
        _ = try pair.open(first, at: pair.bob, from: pair.aliceEnd).get()
        pair.clock = pair.clock + Timing.rekeyAfterTime + .seconds(1)
        #expect(pair.seal([1], from: pair.bob, to: pair.bobsAlice).0 == SealOutcome(sealed: 1, wantsHandshake: false))
        let (_, late) = pair.seal([1], from: pair.alice, to: pair.alicesBob)
        pair.clock = pair.clock + (Timing.rejectAfterTime - Timing.rekeyAfterTime)
        #expect(rejection(pair.open(late, at: pair.bob, from: pair.aliceEnd)) == .expiredKeypair)
    }

    @Test func theInitiatorRekeysOnReceiptNearRejectAfterTime() throws {
        let pair = try Pair()
        try pair.handshake()
        let (_, confirm) = pair.seal([1], from: pair.alice, to: pair.alicesBob)
        _ = try pair.open(confirm, at: pair.bob, from: pair.aliceEnd).get()
        let (_, early) = pair.seal([2], from: pair.bob, to: pair.bobsAlice)
        #expect(try pair.open(early, at: pair.alice, from: pair.bobEnd).get().1.wantsHandshake == false)
        pair.clock = pair.clock + Timing.rekeyOnReceiveAge
        let (_, late) = pair.seal([3], from: pair.bob, to: pair.bobsAlice)
        #expect(try pair.open(late, at: pair.alice, from: pair.bobEnd).get().1.wantsHandshake == true)
    }

    @Test func sendingAtTheMessageLimitsRekeysThenStops() throws {
        let pair = try Pair()
        try pair.handshake()
        let keypair = try #require(pair.alicesBob.current)
        keypair.sendCounter = Timing.rekeyAfterMessages
        #expect(pair.seal([1], from: pair.alice, to: pair.alicesBob).0 == SealOutcome(sealed: 1, wantsHandshake: true))
        keypair.sendCounter = Timing.rejectAfterMessages
        #expect(pair.seal([1], from: pair.alice, to: pair.alicesBob).0 == SealOutcome(sealed: 0, wantsHandshake: true))
    }

    @Test func receivedDataIsAnsweredByAKeepaliveAfterKeepaliveTimeout() throws {
        let pair = try Pair()
        try pair.handshake()
        let (_, data) = pair.seal([1, 2, 3], from: pair.alice, to: pair.alicesBob)
        _ = try pair.open(data, at: pair.bob, from: pair.aliceEnd).get()
        #expect(pair.bob.tick(pair.bobsAlice, now: pair.clock + .seconds(9)) == [])
        #expect(pair.bob.tick(pair.bobsAlice, now: pair.clock + Timing.keepaliveTimeout) == .sendKeepalive)
        // A keepalive is an empty message: 32 bytes, opened as payload 0, and it starts no keepalive back.
        let (_, keepalive) = pair.seal([], from: pair.bob, to: pair.bobsAlice)
        #expect(keepalive.count == 32)
        #expect(try pair.open(keepalive, at: pair.alice, from: pair.bobEnd).get().1.payloadLength == 0)
        #expect(
            pair.alice.tick(pair.alicesBob, now: pair.clock + Timing.keepaliveTimeout).contains(.sendKeepalive) == false
        )
    }

    @Test func dataSentWithoutAnAnswerStartsAHandshakeAfter15s() throws {
        let pair = try Pair()
        try pair.handshake()
        _ = pair.seal([1], from: pair.alice, to: pair.alicesBob)
        #expect(pair.alice.tick(pair.alicesBob, now: pair.clock + .seconds(14)) == [])
        #expect(
            pair.alice.tick(pair.alicesBob, now: pair.clock + Timing.keepaliveTimeout + Timing.rekeyTimeout)
                == .sendInitiation
        )
    }

    @Test func persistentKeepaliveSendsWhenIdle() throws {
        let pair = try Pair()
        try pair.handshake()
        pair.alicesBob.persistentKeepalive = .seconds(25)
        _ = pair.seal([], from: pair.alice, to: pair.alicesBob)
        #expect(pair.alice.tick(pair.alicesBob, now: pair.clock + .seconds(24)) == [])
        #expect(pair.alice.tick(pair.alicesBob, now: pair.clock + .seconds(25)) == .sendKeepalive)
    }

    @Test func rotationKeepsPreviousAndZeroesTheKeysItDrops() throws {
        let pair = try Pair()
        try pair.handshake()
        let first = try #require(pair.alicesBob.current)
        pair.clock = pair.clock + .seconds(1)
        try pair.handshake()
        let second = try #require(pair.alicesBob.current)
        #expect(pair.alicesBob.previous === first && second !== first && !first.keysAreZero)
        pair.clock = pair.clock + .seconds(1)
        try pair.handshake()
        #expect(pair.alicesBob.previous === second)
        #expect(first.isDestroyed && first.keysAreZero)
        let third = try #require(pair.alicesBob.current)
        // Removing the peer (its lease went away) ends every session.
        pair.alice.removePeer(pair.bob.publicKey)
        #expect(second.keysAreZero && third.keysAreZero && pair.alicesBob.current == nil)
    }

    @Test func allKeysAreZeroedAfterThreeRejectAfterTimesWithoutAHandshake() throws {
        let pair = try Pair()
        try pair.handshake()
        let keypair = try #require(pair.alicesBob.current)
        #expect(pair.alice.tick(pair.alicesBob, now: pair.clock + Timing.zeroKeysAfter).contains(.zeroedKeys))
        #expect(keypair.keysAreZero && pair.alicesBob.current == nil)
    }
}

@Suite struct BatchTests {
    /// Eight payloads sealed in place in one slab, then opened in place as a
    /// batch: the data path's shape (header room before, padding and tag after).
    @Test func aBatchSealsAndOpensInPlaceInOneSlab() throws {
        let pair = try Pair()
        try pair.handshake()
        let slotSize = 256
        let count = 8
        let slab = UnsafeMutableRawBufferPointer.allocate(byteCount: slotSize * count, alignment: 64)
        defer { slab.deallocate() }
        let packets = UnsafeMutableBufferPointer<PacketBuffer>.allocate(capacity: count)
        defer { packets.deallocate() }
        for i in 0..<count {
            let slot = UnsafeMutableRawBufferPointer(rebasing: slab[(i * slotSize)..<((i + 1) * slotSize)])
            let length = i * 20  // 0 (a keepalive) to 140
            for j in 0..<length { slot[16 + j] = UInt8(truncatingIfNeeded: i &* 31 &+ j) }
            packets[i] = PacketBuffer(memory: slot, length: length)
        }
        let outcome = pair.alice.seal(packets, to: pair.alicesBob, cipher: pair.cipher, now: pair.clock)
        #expect(outcome == SealOutcome(sealed: count, wantsHandshake: false))
        for i in 0..<count {
            #expect(packets[i].length == 16 + MessageLayout.paddedLength(i * 20) + 16)
            #expect(packets[i].memory[0] == 4)
        }
        // The same slot twice in one batch: the second is a replay.
        let opened = UnsafeMutableBufferPointer<PacketBuffer>.allocate(capacity: count + 1)
        defer { opened.deallocate() }
        _ = opened.initialize(from: packets)
        let copy = UnsafeMutableRawBufferPointer.allocate(byteCount: slotSize, alignment: 64)
        defer { copy.deallocate() }
        copy.copyMemory(from: UnsafeRawBufferPointer(packets[3].memory))
        opened[count] = PacketBuffer(memory: copy, length: packets[3].length)
        let results = UnsafeMutableBufferPointer<Result<Received, Rejection>>.allocate(capacity: count + 1)
        defer { results.deallocate() }
        results.initialize(repeating: .failure(.empty))
        pair.bob.open(opened, from: pair.aliceEnd, cipher: pair.cipher, now: pair.clock, results: results)
        for i in 0..<count {
            let received = try results[i].get()
            #expect(received.payloadLength == MessageLayout.paddedLength(i * 20))
            #expect((0..<(i * 20)).allSatisfy { opened[i].memory[16 + $0] == UInt8(truncatingIfNeeded: i &* 31 &+ $0) })
        }
        #expect(rejection(results[count]) == .replayedCounter(3))
    }

    /// A payload in two pieces outside its slot (a segment's headers and its
    /// share of a super-packet) seals to exactly the message the same payload
    /// in the slot seals to, for every split and padding, and opens.
    @Test func aPayloadInPartsSealsLikeTheSamePayloadInItsSlot() throws {
        let pair = try Pair()
        try pair.handshake()
        let slotSize = 256
        let slots = UnsafeMutableRawBufferPointer.allocate(byteCount: slotSize * 2, alignment: 64)
        defer { slots.deallocate() }
        let packets = UnsafeMutableBufferPointer<PacketBuffer>.allocate(capacity: 2)
        defer { packets.deallocate() }
        let parts = UnsafeMutableBufferPointer<PayloadParts>.allocate(capacity: 2)
        defer { parts.deallocate() }
        for (length, split) in [(0, 0), (1, 0), (1, 1), (20, 7), (33, 33), (100, 52), (160, 0)] {
            let payload = (0..<length).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ length) }
            let inSlot = UnsafeMutableRawBufferPointer(rebasing: slots[0..<slotSize])
            let gathered = UnsafeMutableRawBufferPointer(rebasing: slots[slotSize..<(2 * slotSize)])
            inSlot.initializeMemory(as: UInt8.self, repeating: 0xEE)
            gathered.initializeMemory(as: UInt8.self, repeating: 0xEE)
            for (j, byte) in payload.enumerated() { inSlot[16 + j] = byte }
            packets[0] = PacketBuffer(memory: inSlot, length: length)
            packets[1] = PacketBuffer(memory: gathered, length: length)
            try payload.withUnsafeBytes { bytes in
                parts[0] = .inSlot
                parts[1] = PayloadParts(
                    head: UnsafeRawBufferPointer(rebasing: bytes[0..<split]),
                    body: UnsafeRawBufferPointer(rebasing: bytes[split..<length])
                )
                var reservation = try #require(
                    pair.alice.reserve(to: pair.alicesBob, payloads: UnsafeBufferPointer(packets), now: pair.clock)
                )
                defer { reservation.wipe() }
                // Both with one counter: seal each with its own reservation of one.
                let first = WireGuardInterface.sealReserved(
                    UnsafeMutableBufferPointer(rebasing: packets[0..<1]),
                    parts: UnsafeBufferPointer(rebasing: parts[0..<1]),
                    with: reservation,
                    cipher: pair.cipher
                )
                let second = WireGuardInterface.sealReserved(
                    UnsafeMutableBufferPointer(rebasing: packets[1..<2]),
                    parts: UnsafeBufferPointer(rebasing: parts[1..<2]),
                    with: reservation,
                    cipher: pair.cipher
                )
                #expect(first == 1 && second == 1)
            }
            #expect(packets[0].length == packets[1].length)
            #expect(
                Array(inSlot[0..<packets[0].length]) == Array(gathered[0..<packets[1].length]),
                "length \(length) split \(split)"
            )
            var message = packets[1]
            let opened = try pair.bob.open(&message, from: pair.aliceEnd, cipher: pair.cipher, now: pair.clock).get()
            #expect(
                Array(gathered[16..<(16 + length)]) == payload
                    && opened.payloadLength == MessageLayout.paddedLength(length)
            )
        }
    }
}

@Suite struct RandomInputTests {
    /// Random datagrams of every type and length are rejected with a reason, never a crash,
    /// and leave the established session working.
    @Test func randomDatagramsAreRejectedAndTheSessionSurvives() throws {
        let pair = try Pair()
        try pair.handshake()
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<3000 {
            let length = [0, 1, 3, 4, 31, 32, 33, 64, 92, 148, 200].randomElement(using: &generator)!
            var datagram = (0..<length).map { _ in UInt8.random(in: 0...255, using: &generator) }
            if length >= 4 {
                datagram[0] = UInt8.random(in: 0...5, using: &generator)
                datagram[1] = 0; datagram[2] = 0; datagram[3] = 0
            }
            if length >= 8, Bool.random(using: &generator),
                let index = pair.bobsAlice.current?.localIndex ?? pair.bobsAlice.next?.localIndex
            {
                // Aim at a live receiver index: the tag check must still refuse it.
                datagram.withUnsafeMutableBytes {
                    $0.storeBytes(of: index.littleEndian, toByteOffset: 4, as: UInt32.self)
                }
            }
            if datagram.first == 4 {
                #expect(rejection(pair.open(datagram, at: pair.bob, from: pair.aliceEnd)) != nil)
            } else {
                // mac1 cannot verify on random bytes, so nothing reaches Diffie-Hellman or a cookie reply.
                let outcome = pair.bob.receiveHandshake(
                    datagram,
                    from: pair.aliceEnd,
                    now: pair.clock,
                    underLoad: Bool.random()
                )
                if case .rejected = outcome {} else { Issue.record("a random datagram was accepted: \(outcome)") }
            }
        }
        let (_, message) = pair.seal([42], from: pair.alice, to: pair.alicesBob)
        #expect(try pair.open(message, at: pair.bob, from: pair.aliceEnd).get().0.first == 42)
    }
}
