/// One message slot in the caller's memory (a data-path slab): `memory` is
/// the whole slot, `length` the bytes in use. Sealing reads a payload at
/// `MessageLayout.transportHeaderLength` and leaves a message at 0; opening
/// reads a message at 0 and leaves the payload at the header length. The
/// caller owns the memory; nothing is copied or allocated per packet.
public struct PacketBuffer {
    public var memory: UnsafeMutableRawBufferPointer
    public var length: Int

    public init(memory: UnsafeMutableRawBufferPointer, length: Int) {
        self.memory = memory
        self.length = length
    }
}

/// What a handshake message led to.
public enum HandshakeOutcome {
    /// An initiation was accepted: send `message` (the response) to `peer.endpoint`.
    case respond(Peer, message: [UInt8])
    /// Our initiation was answered: `peer.current` is the new session. Send
    /// data or a keepalive so the responder can use it too.
    case established(Peer)
    /// Under load without a valid mac2: send `message` back to the source.
    case cookieReply(message: [UInt8])
    /// A cookie reply was stored: the next initiation carries mac2.
    case cookieStored(Peer)
    case rejected(Rejection)
}

/// A transport message opened in place.
public struct Received {
    public let peer: Peer
    /// 0 for a keepalive; else the padded payload at the header length.
    public let payloadLength: Int
    /// The initiator's session is near REJECT_AFTER_TIME: start a handshake.
    public let wantsHandshake: Bool
}

/// A payload that lies outside its slot, in two pieces (e.g. a segment's
/// headers and its share of a TUN super-packet's payload): sealing reads it
/// from there, so it is copied and encrypted in one pass. An empty `head`
/// (no base address) means the payload is in the slot, at the header length.
public struct PayloadParts {
    public var head: UnsafeRawBufferPointer
    public var body: UnsafeRawBufferPointer

    public init(head: UnsafeRawBufferPointer, body: UnsafeRawBufferPointer) {
        self.head = head
        self.body = body
    }

    /// In the slot.
    public static var inSlot: PayloadParts {
        PayloadParts(
            head: UnsafeRawBufferPointer(start: nil, count: 0),
            body: UnsafeRawBufferPointer(start: nil, count: 0)
        )
    }

    public var isInSlot: Bool { head.baseAddress == nil }
}

/// Send counters reserved under the caller's lock (`WireGuardInterface.reserve`)
/// for messages sealed outside it (`sealReserved`): a copy of the session's
/// send key, which the holder wipes once the messages are sealed.
public struct SealReservation: Sendable {
    public private(set) var key: Bytes32
    public let remoteIndex: UInt32
    public let firstCounter: UInt64
    /// Messages reserved, from the first payload on.
    public let count: Int
    /// No usable session for the rest, or the session is due for rekey: start a handshake.
    public let wantsHandshake: Bool
    /// The interface's MTU, which padding does not pass (`MessageLayout.paddedLength`).
    public let mtu: Int?

    init(key: Bytes32, remoteIndex: UInt32, firstCounter: UInt64, count: Int, wantsHandshake: Bool, mtu: Int?) {
        self.key = key
        self.remoteIndex = remoteIndex
        self.firstCounter = firstCounter
        self.count = count
        self.wantsHandshake = wantsHandshake
        self.mtu = mtu
    }

    public mutating func wipe() { key.wipe() }
}

/// A transport message that passed the checks before decryption
/// (`WireGuardInterface.prepareOpen`): its session, counter and a copy of
/// the receive key, to decrypt without the lock and complete under it.
public struct OpenTicket {
    public let peer: Peer
    let keypair: Keypair
    private var key: Bytes32
    public let counter: UInt64

    init(peer: Peer, keypair: Keypair, key: Bytes32, counter: UInt64) {
        self.peer = peer
        self.keypair = keypair
        self.key = key
        self.counter = counter
    }

    /// Whether two tickets are of one session (so a batch keeps one key per run).
    public func isSameSession(as other: OpenTicket) -> Bool { keypair === other.keypair }

    /// Authenticates and decrypts the message in `packet` in place (this
    /// ticket's or, for a later message of the same session in one batch,
    /// `counter`); on success `packet.length` is the header and the padded
    /// payload. Touches no state of the interface.
    public func decrypt(_ packet: inout PacketBuffer, counter: UInt64? = nil, cipher: CipherContext) -> Bool {
        let length = packet.length - MessageLayout.transportMinimumLength
        let text = packet.memory.baseAddress! + MessageLayout.transportHeaderLength
        guard
            cipher.open(
                key: key,
                counter: counter ?? self.counter,
                aad: nil,
                text: text,
                length: length,
                tag: text + length
            )
        else { return false }
        packet.length = MessageLayout.transportHeaderLength + length
        return true
    }

    public mutating func wipe() { key.wipe() }
}

/// How much of a batch was sealed.
public struct SealOutcome: Equatable, Sendable {
    /// Packets sealed, from the start of the batch (the rest need a new session).
    public var sealed: Int
    /// No usable session, or the current one is due for rekey: start a handshake.
    public var wantsHandshake: Bool
}

/// The local end: our static key, the peers, the index table shared by
/// handshakes and sessions, and the cookie secret. Pure: every call gets the
/// time and returns what to send; no sockets, no clock, no threads. Not
/// thread-safe: one caller at a time. Sealing and opening take the caller's
/// `CipherContext` (one per worker thread); the parallel data path reserves
/// send counters under its lock (`reserve`) and seals outside it
/// (`sealReserved`), and opens likewise (`prepareOpen`, `completeOpen`).
public final class WireGuardInterface {
    let privateKey: PrivateKey
    public let publicKey: PublicKey
    let responderHash: Bytes32
    let mac1Key: Bytes32
    let cookieKey: Bytes32
    var cookieSecret = Bytes32()
    var cookieSecretCreated: Instant?
    let handshakeCipher = CipherContext()
    var rateLimiter = HandshakeRateLimiter()

    public private(set) var peers: [PublicKey: Peer] = [:]
    /// The MTU of the device whose packets are sealed: payloads are padded
    /// to a multiple of 16 but not past it. Nil: no limit.
    public let mtu: Int?

    enum IndexEntry {
        case handshake(Peer)
        case keypair(Peer, Keypair)
    }
    var indices: [UInt32: IndexEntry] = [:]

    public init(privateKey: PrivateKey, mtu: Int? = nil) {
        self.privateKey = privateKey
        self.mtu = mtu
        publicKey = privateKey.publicKey
        responderHash = Primitive.hash(Noise.initialHash, publicKey.raw)
        mac1Key = Primitive.hash(Noise.labelMAC1, publicKey.raw)
        cookieKey = Primitive.hash(Noise.labelCookie, publicKey.raw)
    }

    deinit {
        for peer in peers.values { endSessions(of: peer) }
        cookieSecret.wipe()
    }

    // MARK: Peers

    /// Adds a peer, or returns the one with this key. A low-order public key
    /// (no shared secret) is refused.
    @discardableResult
    public func addPeer(
        _ publicKey: PublicKey,
        presharedKey: PresharedKey = .none,
        endpoint: Endpoint? = nil
    )
        throws(KeyError) -> Peer
    {
        if let existing = peers[publicKey] { return existing }
        guard let shared = try? Primitive.dh(privateKey.raw, publicKey.raw) else {
            throw KeyError(
                description: "peer public key \(publicKey) is a low-order point (no shared secret); "
                    + "take the peer's key from `wg pubkey` of its private key"
            )
        }
        let peer = Peer(publicKey: publicKey, presharedKey: presharedKey, staticShared: shared, endpoint: endpoint)
        peers[publicKey] = peer
        return peer
    }

    /// Points `peer` at another endpoint (its configuration changed); its
    /// sessions stay.
    public func setEndpoint(_ endpoint: Endpoint?, of peer: Peer) { peer.endpoint = endpoint }

    /// Removes a peer and zeroes its sessions and handshake.
    public func removePeer(_ publicKey: PublicKey) {
        guard let peer = peers.removeValue(forKey: publicKey) else { return }
        endSessions(of: peer)
    }

    /// Destroys every keypair and the handshake of `peer` (keys zeroed).
    public func endSessions(of peer: Peer) {
        for keypair in [peer.previous, peer.current, peer.next].compactMap({ $0 }) { drop(keypair) }
        peer.previous = nil
        peer.current = nil
        peer.next = nil
        endHandshake(of: peer)
        peer.handshakeAttemptStart = nil
        peer.retransmitAt = nil
        peer.keepaliveAt = nil
        peer.newHandshakeAt = nil
    }

    func drop(_ keypair: Keypair?) {
        guard let keypair else { return }
        if case .keypair(_, let k) = indices[keypair.localIndex], k === keypair {
            indices[keypair.localIndex] = nil
        }
        keypair.destroy()
    }

    func endHandshake(of peer: Peer) {
        if peer.handshake.stage != .none, case .handshake(let p) = indices[peer.handshake.localIndex], p === peer {
            indices[peer.handshake.localIndex] = nil
        }
        peer.handshake.wipe()
    }

    func newIndex(_ entry: IndexEntry) -> UInt32 {
        while true {
            let index = Primitive.randomUInt32()
            if indices[index] == nil {
                indices[index] = entry
                return index
            }
        }
    }

    // MARK: Handshake (whitepaper §5.4.2–§5.4.4)

    /// The handshake initiation to send to `peer`, with TAI64N `timestamp`
    /// from the wall clock. Starts (or continues) the retry timer.
    public func makeInitiation(for peer: Peer, now: Instant, timestamp: TAI64N) -> [UInt8] {
        // libcrypto's context would otherwise keep the last handshake key until the next message.
        defer { handshakeCipher.wipe() }
        endHandshake(of: peer)
        var message = [UInt8](repeating: 0, count: MessageLayout.initiationLength)
        var state = HandshakeState()
        state.stage = .initiationSent
        state.localIndex = newIndex(.handshake(peer))
        message.withUnsafeMutableBytes { m in
            m[0] = MessageType.initiation.rawValue
            m.storeLittleEndian(state.localIndex, at: 4)
            state.ephemeralPrivate = Primitive.generatePrivateKey()
            let ephemeral = Primitive.publicKey(of: state.ephemeralPrivate)
            ephemeral.withUnsafeBytes {
                m.baseAddress!.advanced(by: 8).copyMemory(from: $0.baseAddress!, byteCount: 32)
            }
            var c = Primitive.kdf(Noise.initialChainingKey, ephemeral, outputs: 1).0
            var h = Primitive.hash(peer.initiatorHash, ephemeral)
            // The peer's key passed addPeer's check, so this DH has a result.
            var es = (try? Primitive.dh(state.ephemeralPrivate, peer.publicKey.raw)) ?? .zero
            var (c1, k, _) = Primitive.kdf(c, es, outputs: 2)
            c = c1
            es.wipe()
            publicKey.raw.withUnsafeBytes {
                m.baseAddress!.advanced(by: 40).copyMemory(from: $0.baseAddress!, byteCount: 32)
            }
            _ = handshakeCipher.seal(
                key: k,
                counter: 0,
                aad: h,
                text: m.baseAddress! + 40,
                length: 32,
                tag: m.baseAddress! + 72
            )
            h = Primitive.hash(h, UnsafeRawBufferPointer(rebasing: m[40..<88]))
            (c1, k, _) = Primitive.kdf(c, peer.staticShared, outputs: 2)
            c = c1
            timestamp.write(to: UnsafeMutableRawBufferPointer(rebasing: m[88..<100]))
            _ = handshakeCipher.seal(
                key: k,
                counter: 0,
                aad: h,
                text: m.baseAddress! + 88,
                length: 12,
                tag: m.baseAddress! + 100
            )
            k.wipe()
            h = Primitive.hash(h, UnsafeRawBufferPointer(rebasing: m[88..<116]))
            state.chainingKey = c
            state.hash = h
            c.wipe()
            addMACs(m, macOffset: 116, mac1Key: peer.mac1Key, peer: peer, now: now)
        }
        peer.handshake = state
        peer.lastSent = now
        if peer.handshakeAttemptStart == nil { peer.handshakeAttemptStart = now }
        var jitter: UInt32 = 0
        Primitive.random(&jitter)
        peer.retransmitAt =
            now + Timing.rekeyTimeout
            + Instant.Span(nanoseconds: Int64(jitter) % (Timing.rekeyTimeoutJitterMax.nanoseconds + 1))
        return message
    }

    /// mac1 (keyed by the receiver's public key) and mac2 (keyed by a fresh
    /// cookie from it, else zero) over the message before each.
    func addMACs(_ m: UnsafeMutableRawBufferPointer, macOffset: Int, mac1Key: Bytes32, peer: Peer, now: Instant) {
        let mac1 = Primitive.mac(mac1Key, UnsafeRawBufferPointer(rebasing: m[0..<macOffset]))
        mac1.withUnsafeBytes { m.baseAddress!.advanced(by: macOffset).copyMemory(from: $0.baseAddress!, byteCount: 16) }
        peer.lastMAC1Sent = mac1
        if let cookie = peer.cookieForMAC2(now: now) {
            let mac2 = Primitive.mac(cookie, UnsafeRawBufferPointer(rebasing: m[0..<(macOffset + 16)]))
            mac2.withUnsafeBytes {
                m.baseAddress!.advanced(by: macOffset + 16).copyMemory(from: $0.baseAddress!, byteCount: 16)
            }
        }
    }

    /// Handles a received initiation, response or cookie reply. `underLoad`
    /// is the caller's judgement (a deep handshake queue): then initiations
    /// and responses need a valid mac2, and get a cookie reply without one,
    /// before any Diffie-Hellman work is done; and each source address gets
    /// at most 20 a second (bursts of 5).
    public func receiveHandshake(
        _ datagram: UnsafeRawBufferPointer,
        from source: Endpoint,
        now: Instant,
        underLoad: Bool = false
    ) -> HandshakeOutcome {
        switch classify(datagram) {
        case .failure(let rejection): return .rejected(rejection)
        case .success(.transport): return .rejected(.unknownType(MessageType.transport.rawValue))
        case .success(.cookieReply): return consumeCookieReply(datagram, now: now)
        case .success(let type):
            let macOffset = type == .initiation ? 116 : 60
            let mac1 = Primitive.mac(mac1Key, UnsafeRawBufferPointer(rebasing: datagram[0..<macOffset]))
            guard mac1.constantTimeEquals(UnsafeRawBufferPointer(rebasing: datagram[macOffset..<(macOffset + 16)]))
            else {
                return .rejected(.badMAC1)
            }
            if underLoad {
                let cookie = currentCookie(for: source, now: now)
                let mac2 = Primitive.mac(cookie, UnsafeRawBufferPointer(rebasing: datagram[0..<(macOffset + 16)]))
                let given = UnsafeRawBufferPointer(rebasing: datagram[(macOffset + 16)..<(macOffset + 32)])
                guard mac2.constantTimeEquals(given) else {
                    return .cookieReply(
                        message: makeCookieReply(datagram, macOffset: macOffset, source: source, now: now)
                    )
                }
                guard rateLimiter.allow(source, now: now) else { return .rejected(.rateLimited) }
            }
            // Only past the MACs: a flood of bad messages costs one keyed hash each.
            defer { handshakeCipher.wipe() }
            return type == .initiation
                ? consumeInitiation(datagram, from: source, now: now)
                : consumeResponse(datagram, from: source, now: now)
        }
    }

    public func receiveHandshake(
        _ datagram: [UInt8],
        from source: Endpoint,
        now: Instant,
        underLoad: Bool = false
    )
        -> HandshakeOutcome
    {
        datagram.withUnsafeBytes { receiveHandshake($0, from: source, now: now, underLoad: underLoad) }
    }

    func consumeInitiation(_ m: UnsafeRawBufferPointer, from source: Endpoint, now: Instant) -> HandshakeOutcome {
        let sender = m.littleEndian(at: 4, as: UInt32.self)
        let ephemeral = Bytes32(copying: UnsafeRawBufferPointer(rebasing: m[8..<40]))
        var c = Primitive.kdf(Noise.initialChainingKey, ephemeral, outputs: 1).0
        var h = Primitive.hash(responderHash, ephemeral)
        guard var es = try? Primitive.dh(privateKey.raw, ephemeral) else { return .rejected(.invalidEphemeral) }
        var (c1, k, _) = Primitive.kdf(c, es, outputs: 2)
        es.wipe()
        c = c1
        var staticKey = (Bytes32(), Bytes16())
        let staticOpened = withUnsafeMutableBytes(of: &staticKey) { s in
            s.copyMemory(from: UnsafeRawBufferPointer(rebasing: m[40..<88]))
            return handshakeCipher.open(
                key: k,
                counter: 0,
                aad: h,
                text: s.baseAddress,
                length: 32,
                tag: s.baseAddress! + 32
            )
        }
        guard staticOpened else { return .rejected(.decryptionFailed(.initiation)) }
        h = Primitive.hash(h, UnsafeRawBufferPointer(rebasing: m[40..<88]))
        guard let peer = peers[PublicKey(raw: staticKey.0)] else { return .rejected(.unknownPeer) }
        (c1, k, _) = Primitive.kdf(c, peer.staticShared, outputs: 2)
        c = c1
        var stamp = (TAI64N.zero.seconds, UInt32(0), Bytes16())
        let stampOpened = withUnsafeMutableBytes(of: &stamp) { s in
            s.copyMemory(from: UnsafeRawBufferPointer(rebasing: m[88..<116]))
            return handshakeCipher.open(
                key: k,
                counter: 0,
                aad: h,
                text: s.baseAddress,
                length: 12,
                tag: s.baseAddress! + 12
            )
        }
        k.wipe()
        guard stampOpened else { return .rejected(.decryptionFailed(.initiation)) }
        let timestamp = withUnsafeBytes(of: &stamp) { TAI64N(raw: $0) }
        h = Primitive.hash(h, UnsafeRawBufferPointer(rebasing: m[88..<116]))
        guard timestamp > peer.latestTimestamp else { return .rejected(.replayedTimestamp) }
        if let last = peer.lastInitiationConsumed, now - last < Timing.initiationMinimumInterval {
            return .rejected(.initiationTooSoon)
        }
        peer.latestTimestamp = timestamp
        peer.lastInitiationConsumed = now
        peer.endpoint = source
        endHandshake(of: peer)
        peer.handshake = HandshakeState(
            stage: .initiationConsumed,
            localIndex: 0,
            remoteIndex: sender,
            chainingKey: c,
            hash: h,
            remoteEphemeral: ephemeral
        )
        c.wipe()
        return .respond(peer, message: makeResponse(for: peer, now: now))
    }

    func makeResponse(for peer: Peer, now: Instant) -> [UInt8] {
        var state = peer.handshake
        var message = [UInt8](repeating: 0, count: MessageLayout.responseLength)
        let localIndex = newIndex(.handshake(peer))
        var sendKey = Bytes32()
        var receiveKey = Bytes32()
        message.withUnsafeMutableBytes { m in
            m[0] = MessageType.response.rawValue
            m.storeLittleEndian(localIndex, at: 4)
            m.storeLittleEndian(state.remoteIndex, at: 8)
            var ephemeralPrivate = Primitive.generatePrivateKey()
            let ephemeral = Primitive.publicKey(of: ephemeralPrivate)
            ephemeral.withUnsafeBytes {
                m.baseAddress!.advanced(by: 12).copyMemory(from: $0.baseAddress!, byteCount: 32)
            }
            var c = Primitive.kdf(state.chainingKey, ephemeral, outputs: 1).0
            var h = Primitive.hash(state.hash, ephemeral)
            // The initiator's ephemeral gave a result in consumeInitiation, so these do too.
            var ee = (try? Primitive.dh(ephemeralPrivate, state.remoteEphemeral)) ?? .zero
            c = Primitive.kdf(c, ee, outputs: 1).0
            var se = (try? Primitive.dh(ephemeralPrivate, peer.publicKey.raw)) ?? .zero
            c = Primitive.kdf(c, se, outputs: 1).0
            ee.wipe()
            se.wipe()
            ephemeralPrivate.wipe()
            var (c1, tau, k) = Primitive.kdf(c, peer.presharedKey.raw, outputs: 3)
            c = c1
            h = Primitive.hash(h, tau)
            _ = handshakeCipher.seal(key: k, counter: 0, aad: h, text: nil, length: 0, tag: m.baseAddress! + 44)
            h = Primitive.hash(h, UnsafeRawBufferPointer(rebasing: m[44..<60]))
            addMACs(m, macOffset: 60, mac1Key: peer.mac1Key, peer: peer, now: now)
            let (t1, t2, _) = Primitive.kdf(c, UnsafeRawBufferPointer(start: nil, count: 0), outputs: 2)
            receiveKey = t1
            sendKey = t2
            c.wipe(); tau.wipe(); k.wipe(); h.wipe()
        }
        state.wipe()
        peer.handshake.wipe()
        let keypair = Keypair(
            sendKey: sendKey,
            receiveKey: receiveKey,
            localIndex: localIndex,
            remoteIndex: state.remoteIndex,
            isInitiator: false,
            createdAt: now
        )
        sendKey.wipe()
        receiveKey.wipe()
        indices[localIndex] = .keypair(peer, keypair)
        // The responder may not send with the new session until the
        // initiator's first message on it arrives: it waits as `next`.
        drop(peer.next)
        peer.next = keypair
        peer.lastHandshake = now
        peer.latestHandshake = now
        peer.lastSent = now
        return message
    }

    func consumeResponse(_ m: UnsafeRawBufferPointer, from source: Endpoint, now: Instant) -> HandshakeOutcome {
        let sender = m.littleEndian(at: 4, as: UInt32.self)
        let receiver = m.littleEndian(at: 8, as: UInt32.self)
        guard case .handshake(let peer) = indices[receiver] else { return .rejected(.unknownReceiver(receiver)) }
        guard peer.handshake.stage == .initiationSent, peer.handshake.localIndex == receiver else {
            return .rejected(.unexpectedResponse)
        }
        let state = peer.handshake
        let ephemeral = Bytes32(copying: UnsafeRawBufferPointer(rebasing: m[12..<44]))
        var c = Primitive.kdf(state.chainingKey, ephemeral, outputs: 1).0
        var h = Primitive.hash(state.hash, ephemeral)
        guard var ee = try? Primitive.dh(state.ephemeralPrivate, ephemeral),
            var se = try? Primitive.dh(privateKey.raw, ephemeral)
        else { return .rejected(.invalidEphemeral) }
        c = Primitive.kdf(c, ee, outputs: 1).0
        c = Primitive.kdf(c, se, outputs: 1).0
        ee.wipe()
        se.wipe()
        var (c1, tau, k) = Primitive.kdf(c, peer.presharedKey.raw, outputs: 3)
        c = c1
        h = Primitive.hash(h, tau)
        var tag = Bytes16(copying: UnsafeRawBufferPointer(rebasing: m[44..<60]))
        let opened = withUnsafeMutableBytes(of: &tag) { t in
            handshakeCipher.open(key: k, counter: 0, aad: h, text: nil, length: 0, tag: t.baseAddress!)
        }
        tau.wipe()
        k.wipe()
        guard opened else { return .rejected(.decryptionFailed(.response)) }
        var (sendKey, receiveKey, _) = Primitive.kdf(c, UnsafeRawBufferPointer(start: nil, count: 0), outputs: 2)
        c.wipe()
        h.wipe()
        peer.handshake.wipe()
        let keypair = Keypair(
            sendKey: sendKey,
            receiveKey: receiveKey,
            localIndex: receiver,
            remoteIndex: sender,
            isInitiator: true,
            createdAt: now
        )
        sendKey.wipe()
        receiveKey.wipe()
        indices[receiver] = .keypair(peer, keypair)
        // Rotation: the initiator uses the new session at once; the one it
        // replaces stays as `previous` for messages still in flight.
        if let next = peer.next {
            drop(peer.previous)
            peer.previous = next
            peer.next = nil
        } else {
            drop(peer.previous)
            peer.previous = peer.current
        }
        peer.current = keypair
        peer.endpoint = source
        peer.lastHandshake = now
        peer.latestHandshake = now
        peer.handshakeAttemptStart = nil
        peer.retransmitAt = nil
        return .established(peer)
    }

    // MARK: Cookies (whitepaper §5.4.7)

    /// The cookie of `source`: a MAC of its address and port under a secret
    /// that changes every COOKIE_REFRESH_TIME.
    func currentCookie(for source: Endpoint, now: Instant) -> Bytes16 {
        if cookieSecretCreated.map({ now - $0 >= Timing.cookieRefreshTime }) ?? true {
            Primitive.random(&cookieSecret.storage)
            cookieSecretCreated = now
        }
        return source.withCookieInput { Primitive.mac(cookieSecret, $0) }
    }

    func makeCookieReply(_ m: UnsafeRawBufferPointer, macOffset: Int, source: Endpoint, now: Instant) -> [UInt8] {
        var reply = [UInt8](repeating: 0, count: MessageLayout.cookieReplyLength)
        var cookie = currentCookie(for: source, now: now)
        reply.withUnsafeMutableBytes { r in
            r[0] = MessageType.cookieReply.rawValue
            r.storeLittleEndian(m.littleEndian(at: 4, as: UInt32.self), at: 4)
            var nonce = (Bytes16(), UInt64(0))
            Primitive.random(&nonce)
            withUnsafeBytes(of: &nonce) {
                r.baseAddress!.advanced(by: 8).copyMemory(from: $0.baseAddress!, byteCount: 24)
            }
            cookie.withUnsafeBytes { c in
                Primitive.xseal(
                    key: cookieKey,
                    nonce: UnsafeRawBufferPointer(rebasing: r[8..<32]),
                    plain: c,
                    aad: UnsafeRawBufferPointer(rebasing: m[macOffset..<(macOffset + 16)]),
                    into: UnsafeMutableRawBufferPointer(rebasing: r[32..<64])
                )
            }
        }
        cookie.wipe()
        return reply
    }

    func consumeCookieReply(_ m: UnsafeRawBufferPointer, now: Instant) -> HandshakeOutcome {
        let receiver = m.littleEndian(at: 4, as: UInt32.self)
        let peer: Peer
        switch indices[receiver] {
        case .handshake(let p): peer = p
        case .keypair(let p, _): peer = p
        case nil: return .rejected(.unknownReceiver(receiver))
        }
        guard let mac1 = peer.lastMAC1Sent else { return .rejected(.unexpectedResponse) }
        var cookie = Bytes16()
        let opened = mac1.withUnsafeBytes { aad in
            cookie.withUnsafeMutableBytes { out in
                (try? Primitive.xopen(
                    key: peer.cookieKey,
                    nonce: UnsafeRawBufferPointer(rebasing: m[8..<32]),
                    sealed: UnsafeRawBufferPointer(rebasing: m[32..<64]),
                    aad: aad,
                    into: out
                )) != nil
            }
        }
        guard opened else { return .rejected(.decryptionFailed(.cookieReply)) }
        peer.cookie = (cookie, now)
        return .cookieStored(peer)
    }

    // MARK: Timers (whitepaper §6)

    /// What `peer`'s timers ask for at `now`. Call it by `peer.nextDeadline`
    /// or on a coarse tick.
    public func tick(_ peer: Peer, now: Instant) -> TimerActions {
        var actions: TimerActions = []
        if let at = peer.retransmitAt, now >= at {
            peer.retransmitAt = nil
            if let start = peer.handshakeAttemptStart, now - start >= Timing.rekeyAttemptTime {
                peer.handshakeAttemptStart = nil
                endHandshake(of: peer)
                actions.insert(.gaveUpHandshake)
            } else {
                actions.insert(.sendInitiation)
            }
        }
        if let at = peer.newHandshakeAt, now >= at {
            // Data sent, nothing heard for KEEPALIVE_TIMEOUT + REKEY_TIMEOUT.
            peer.newHandshakeAt = nil
            if !peer.isHandshaking { peer.handshakeAttemptStart = nil }
            actions.insert(.sendInitiation)
        }
        if let at = peer.keepaliveAt, now >= at {
            peer.keepaliveAt = nil
            actions.insert(.sendKeepalive)
        }
        if let interval = peer.persistentKeepalive, peer.current != nil,
            peer.lastSent.map({ now - $0 >= interval }) ?? true
        {
            actions.insert(.sendKeepalive)
        }
        if let last = peer.lastHandshake, now - last >= Timing.zeroKeysAfter {
            endSessions(of: peer)
            peer.lastHandshake = nil
            actions.insert(.zeroedKeys)
        }
        return actions
    }

    // MARK: Transport (whitepaper §5.4.6)

    /// Seals a batch of payloads to `peer` with its current session, in
    /// place. Each packet's payload is at the header length; on return its
    /// `length` is the message's. Every slot needs room for the header,
    /// padding and tag (`MessageLayout.trailerRoom`). An empty payload is a keepalive.
    /// The same as `reserve` followed by `sealReserved` while the caller's lock is held.
    public func seal(
        _ packets: UnsafeMutableBufferPointer<PacketBuffer>,
        to peer: Peer,
        cipher: CipherContext,
        now: Instant
    ) -> SealOutcome {
        guard var reservation = reserve(to: peer, payloads: UnsafeBufferPointer(packets), now: now) else {
            return SealOutcome(sealed: 0, wantsHandshake: !peer.isHandshaking)
        }
        defer { reservation.wipe() }
        let sealed = Self.sealReserved(
            UnsafeMutableBufferPointer(rebasing: packets[0..<reservation.count]),
            with: reservation,
            cipher: cipher
        )
        return SealOutcome(sealed: sealed, wantsHandshake: reservation.wantsHandshake)
    }

    /// Reserves send counters of `peer`'s current session for messages
    /// carrying these payloads (their lengths), in order, and does the session's
    /// bookkeeping (timers, bytes sent) as if they were sent now; the caller
    /// then seals them with `sealReserved`, which needs no lock. Nil without a
    /// usable session. `count` may be less than asked for when the session
    /// reaches REJECT_AFTER_MESSAGES; `wantsHandshake` asks for a new one.
    public func reserve(
        to peer: Peer,
        payloads: UnsafeBufferPointer<PacketBuffer>,
        now: Instant
    ) -> SealReservation? {
        guard let keypair = peer.current, !keypair.isExpired(now: now) else { return nil }
        let first = keypair.sendCounter
        let count = Int(min(UInt64(payloads.count), Timing.rejectAfterMessages - first))
        var bytes: UInt64 = 0
        var sentData = false
        for i in 0..<count {
            let payload = payloads[i].length
            bytes &+= UInt64(MessageLayout.transportMinimumLength + MessageLayout.paddedLength(payload, mtu: mtu))
            if payload > 0 { sentData = true }
        }
        keypair.sendCounter = first + UInt64(count)
        if count > 0 {
            peer.bytesSent &+= bytes
            peer.lastSent = now
            peer.keepaliveAt = nil
            if sentData && peer.newHandshakeAt == nil {
                peer.newHandshakeAt = now + Timing.keepaliveTimeout + Timing.rekeyTimeout
            }
        }
        let due =
            keypair.isInitiator
            && (now - keypair.createdAt >= Timing.rekeyAfterTime || keypair.sendCounter >= Timing.rekeyAfterMessages)
        return SealReservation(
            key: keypair.sendKey,
            remoteIndex: keypair.remoteIndex,
            firstCounter: first,
            count: count,
            wantsHandshake: (due || count < payloads.count) && !peer.isHandshaking,
            mtu: mtu
        )
    }

    /// Seals `packets` (at most `reservation.count`) in place with the
    /// reserved counters, in order; touches no state of the interface, so
    /// workers call it without the lock. Returns how many were sealed (all,
    /// unless libcrypto fails; a counter left unused is a gap the receiver's
    /// window allows).
    /// `parts[i]`, when given and not `.inSlot`, is where packet i's payload
    /// (`packets[i].length` bytes) lies instead of its slot. `packets[0]` is
    /// the reservation's message number `offset` (workers sealing parts of
    /// one reservation each start at their own).
    public static func sealReserved(
        _ packets: UnsafeMutableBufferPointer<PacketBuffer>,
        parts: UnsafeBufferPointer<PayloadParts>? = nil,
        with reservation: SealReservation,
        from offset: Int = 0,
        cipher: CipherContext
    ) -> Int {
        var sealed = 0
        for i in packets.indices.prefix(max(0, reservation.count - offset)) {
            let counter = reservation.firstCounter + UInt64(offset + i - packets.startIndex)
            let payload = packets[i].length
            let padded = MessageLayout.paddedLength(payload, mtu: reservation.mtu)
            let memory = packets[i].memory
            precondition(
                memory.count >= MessageLayout.transportHeaderLength + padded + MessageLayout.tagLength,
                "a packet slot has no room for WireGuard's padding and tag"
            )
            let text = memory.baseAddress! + MessageLayout.transportHeaderLength
            memory.storeLittleEndian(UInt32(MessageType.transport.rawValue), at: 0)
            memory.storeLittleEndian(reservation.remoteIndex, at: 4)
            memory.storeLittleEndian(counter, at: 8)
            if let parts, !parts[i - packets.startIndex].isInSlot {
                let source = parts[i - packets.startIndex]
                precondition(source.head.count + source.body.count == payload, "a payload's parts are not its length")
                guard
                    cipher.seal(
                        key: reservation.key,
                        counter: counter,
                        parts: source,
                        padding: padded - payload,
                        out: text
                    )
                else { break }
            } else {
                if padded > payload {
                    (text + payload).initializeMemory(as: UInt8.self, repeating: 0, count: padded - payload)
                }
                guard
                    cipher.seal(
                        key: reservation.key,
                        counter: counter,
                        aad: nil,
                        text: text,
                        length: padded,
                        tag: text + padded
                    )
                else { break }
            }
            packets[i].length = MessageLayout.transportHeaderLength + padded + MessageLayout.tagLength
            sealed += 1
        }
        return sealed
    }

    /// Opens one transport message in place: receiver index, counter window
    /// (checked before decryption, marked only after authentication), tag.
    /// On success the payload is at the header length and the sender's
    /// endpoint becomes `source` (roaming). The same as `prepareOpen`,
    /// `OpenTicket.decrypt` and `completeOpen` under the caller's lock.
    public func open(
        _ packet: inout PacketBuffer,
        from source: Endpoint,
        cipher: CipherContext,
        now: Instant
    )
        -> Result<Received, Rejection>
    {
        var ticket: OpenTicket
        switch prepareOpen(UnsafeRawBufferPointer(rebasing: packet.memory[0..<packet.length]), now: now) {
        case .failure(let rejection): return .failure(rejection)
        case .success(let t): ticket = t
        }
        defer { ticket.wipe() }
        guard ticket.decrypt(&packet, cipher: cipher) else { return .failure(.decryptionFailed(.transport)) }
        return completeOpen(ticket, packet: &packet, from: source, now: now)
    }

    /// The checks before decryption: a transport message of ours (type,
    /// length, receiver index of a live session) whose counter the window
    /// still accepts. The ticket holds a copy of the receive key, for
    /// decrypting without the lock; the caller wipes it.
    public func prepareOpen(_ m: UnsafeRawBufferPointer, now: Instant) -> Result<OpenTicket, Rejection> {
        switch classify(m) {
        case .failure(let rejection): return .failure(rejection)
        case .success(.transport): break
        case .success(let type): return .failure(.unknownType(type.rawValue))
        }
        let receiver = m.littleEndian(at: 4, as: UInt32.self)
        guard case .keypair(let peer, let keypair) = indices[receiver] else {
            return .failure(.unknownReceiver(receiver))
        }
        let counter = m.littleEndian(at: 8, as: UInt64.self)
        guard !keypair.isDestroyed, now - keypair.createdAt < Timing.rejectAfterTime else {
            return .failure(.expiredKeypair)
        }
        guard keypair.replay.check(counter) else { return .failure(.replayedCounter(counter)) }
        return .success(OpenTicket(peer: peer, keypair: keypair, key: keypair.receiveKey, counter: counter))
    }

    /// After `ticket.decrypt` authenticated the message: marks the counter
    /// (a second copy decrypted meanwhile is refused here), confirms a new
    /// session, follows the sender's endpoint and runs the timers.
    public func completeOpen(
        _ ticket: OpenTicket,
        counter: UInt64? = nil,
        packet: inout PacketBuffer,
        from source: Endpoint,
        now: Instant
    ) -> Result<Received, Rejection> {
        let peer = ticket.peer
        let keypair = ticket.keypair
        // The session may have ended while the message was decrypted.
        guard !keypair.isDestroyed else { return .failure(.expiredKeypair) }
        let counter = counter ?? ticket.counter
        guard keypair.replay.accept(counter) else { return .failure(.replayedCounter(counter)) }
        if peer.next === keypair {
            // The initiator used the new session: it is confirmed.
            drop(peer.previous)
            peer.previous = peer.current
            peer.current = keypair
            peer.next = nil
        }
        let length = packet.length - MessageLayout.transportHeaderLength
        peer.endpoint = source
        peer.newHandshakeAt = nil
        peer.bytesReceived &+= UInt64(packet.length + MessageLayout.tagLength)
        if length > 0 && peer.keepaliveAt == nil { peer.keepaliveAt = now + Timing.keepaliveTimeout }
        let wants =
            peer.current === keypair && keypair.isInitiator && !peer.isHandshaking
            && now - keypair.createdAt >= Timing.rekeyOnReceiveAge
        return .success(Received(peer: peer, payloadLength: length, wantsHandshake: wants))
    }

    /// Opens a batch from one source; `results[i]` says what became of `packets[i]`.
    public func open(
        _ packets: UnsafeMutableBufferPointer<PacketBuffer>,
        from source: Endpoint,
        cipher: CipherContext,
        now: Instant,
        results: UnsafeMutableBufferPointer<Result<Received, Rejection>>
    ) {
        precondition(results.count >= packets.count)
        for i in packets.indices {
            results[i] = open(&packets[i], from: source, cipher: cipher, now: now)
        }
    }
}
