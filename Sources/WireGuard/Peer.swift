/// One direction-pair of transport keys from a completed handshake, with its
/// send counter and receive window. The keys live here and nowhere else;
/// `destroy` zeroes them when the session ends (rotation, expiry, removal).
public final class Keypair {
    var sendKey: Bytes32
    var receiveKey: Bytes32
    public let localIndex: UInt32
    public let remoteIndex: UInt32
    /// True on the side that sent the initiation: only it rekeys by age.
    public let isInitiator: Bool
    public let createdAt: Instant
    /// The counter of the next message sealed.
    public internal(set) var sendCounter: UInt64 = 0
    var replay = ReplayWindow()
    public private(set) var isDestroyed = false

    init(
        sendKey: Bytes32,
        receiveKey: Bytes32,
        localIndex: UInt32,
        remoteIndex: UInt32,
        isInitiator: Bool,
        createdAt: Instant
    ) {
        self.sendKey = sendKey
        self.receiveKey = receiveKey
        self.localIndex = localIndex
        self.remoteIndex = remoteIndex
        self.isInitiator = isInitiator
        self.createdAt = createdAt
    }

    /// Zeroes both keys; the keypair then refuses to seal or open.
    func destroy() {
        sendKey.wipe()
        receiveKey.wipe()
        isDestroyed = true
    }

    deinit { destroy() }

    /// Whether the keys still exist (for tests of zeroing): both all zero after `destroy`.
    public var keysAreZero: Bool { sendKey.isZero && receiveKey.isZero }

    func isExpired(now: Instant) -> Bool {
        isDestroyed || now - createdAt >= Timing.rejectAfterTime || sendCounter >= Timing.rejectAfterMessages
    }
}

/// The handshake in progress with a peer: Noise's chaining key and hash, our
/// ephemeral key and theirs. Wiped once the handshake ends either way.
struct HandshakeState {
    enum Stage { case none, initiationSent, initiationConsumed }
    var stage = Stage.none
    var localIndex: UInt32 = 0
    var remoteIndex: UInt32 = 0
    var chainingKey = Bytes32()
    var hash = Bytes32()
    var ephemeralPrivate = Bytes32()
    var remoteEphemeral = Bytes32()

    mutating func wipe() {
        chainingKey.wipe()
        hash.wipe()
        ephemeralPrivate.wipe()
        remoteEphemeral.wipe()
        stage = .none
    }
}

/// What the timers ask the caller to do now (whitepaper §6).
public struct TimerActions: OptionSet, Sendable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    /// Send a handshake initiation (`WireGuardInterface.makeInitiation`).
    public static let sendInitiation = TimerActions(rawValue: 1)
    /// Send a keepalive (an empty transport message).
    public static let sendKeepalive = TimerActions(rawValue: 2)
    /// REKEY_ATTEMPT_TIME passed without a response: the attempt was dropped
    /// (packets waiting for a session should be dropped too).
    public static let gaveUpHandshake = TimerActions(rawValue: 4)
    /// No new session for 3 × REJECT_AFTER_TIME: every key was zeroed.
    public static let zeroedKeys = TimerActions(rawValue: 8)
}

/// A configured peer: its static key, optional pre-shared key, endpoint, the
/// handshake in progress, its sessions (previous, current, next) and timers.
/// Not thread-safe: the caller serializes calls per peer.
public final class Peer {
    public let publicKey: PublicKey
    var presharedKey: PresharedKey
    /// Where to send; updated from every authenticated packet (roaming).
    public internal(set) var endpoint: Endpoint?
    /// Sends a keepalive when nothing was sent for this long (flannel's PersistentKeepaliveInterval).
    public var persistentKeepalive: Instant.Span?

    // Precomputed once per peer (whitepaper §5.4.2): HASH(H0 || S_pub_r),
    // DH(S_priv_i, S_pub_r), and the keys of the MACs and cookies it checks.
    let initiatorHash: Bytes32
    var staticShared: Bytes32
    let mac1Key: Bytes32
    let cookieKey: Bytes32

    var handshake = HandshakeState()
    var latestTimestamp = TAI64N.zero
    var lastInitiationConsumed: Instant?
    var cookie: (value: Bytes16, receivedAt: Instant)?
    var lastMAC1Sent: Bytes16?

    public internal(set) var previous: Keypair?
    public internal(set) var current: Keypair?
    public internal(set) var next: Keypair?

    // Timers: each an optional deadline the caller's tick compares to now.
    var handshakeAttemptStart: Instant?
    var retransmitAt: Instant?
    var keepaliveAt: Instant?
    var newHandshakeAt: Instant?
    var lastSent: Instant?
    public internal(set) var lastHandshake: Instant?
    /// When a handshake with this peer last completed; unlike `lastHandshake`
    /// it is not cleared when the keys are zeroed (what `wg show` calls the
    /// latest handshake).
    public internal(set) var latestHandshake: Instant?
    /// Bytes of transport messages sealed to and opened from this peer (`wg
    /// show`'s transfer, without the handshake messages).
    public internal(set) var bytesSent: UInt64 = 0
    public internal(set) var bytesReceived: UInt64 = 0

    init(publicKey: PublicKey, presharedKey: PresharedKey, staticShared: Bytes32, endpoint: Endpoint?) {
        self.publicKey = publicKey
        self.presharedKey = presharedKey
        self.staticShared = staticShared
        self.endpoint = endpoint
        initiatorHash = Primitive.hash(Noise.initialHash, publicKey.raw)
        mac1Key = Primitive.hash(Noise.labelMAC1, publicKey.raw)
        cookieKey = Primitive.hash(Noise.labelCookie, publicKey.raw)
    }

    deinit {
        staticShared.wipe()
        presharedKey.raw.wipe()
        handshake.wipe()
    }

    /// True while an initiation of ours waits for its response.
    public var isHandshaking: Bool { handshake.stage == .initiationSent }

    /// When the caller should call `WireGuardInterface.tick` next at the latest.
    public var nextDeadline: Instant? {
        [
            retransmitAt, keepaliveAt, newHandshakeAt, lastHandshake.map { $0 + Timing.zeroKeysAfter },
            persistentKeepalive.flatMap { p in lastSent.map { $0 + p } },
        ].compactMap { $0 }.min()
    }

    func cookieForMAC2(now: Instant) -> Bytes16? {
        guard let cookie, now - cookie.receivedAt < Timing.cookieRefreshTime else { return nil }
        return cookie.value
    }
}

/// Noise_IKpsk2's constants (whitepaper §5.4).
enum Noise {
    static let construction = "Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
    static let identifier = "WireGuard v1 zx2c4 Jason@zx2c4.com"
    static let labelMAC1 = "mac1----"
    static let labelCookie = "cookie--"
    /// C0 = HASH(CONSTRUCTION).
    static let initialChainingKey: Bytes32 = {
        var c = construction
        return c.withUTF8 { Primitive.hash(UnsafeRawBufferPointer($0)) }
    }()
    /// H0 = HASH(C0 || IDENTIFIER).
    static let initialHash: Bytes32 = {
        var i = identifier
        return i.withUTF8 { Primitive.hash(initialChainingKey, UnsafeRawBufferPointer($0)) }
    }()
}
