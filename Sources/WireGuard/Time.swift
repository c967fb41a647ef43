/// A reading of a monotonic clock, in nanoseconds, passed in by the caller:
/// the protocol never reads a clock, so the timer rules are tested by
/// moving time by hand.
public struct Instant: Sendable, Hashable, Comparable {
    public var nanoseconds: Int64

    public init(nanoseconds: Int64) { self.nanoseconds = nanoseconds }

    public static func seconds(_ s: Double) -> Instant { Instant(nanoseconds: Int64(s * 1e9)) }

    public static func < (a: Instant, b: Instant) -> Bool { a.nanoseconds < b.nanoseconds }
    public static func + (a: Instant, d: Span) -> Instant { Instant(nanoseconds: a.nanoseconds + d.nanoseconds) }
    public static func - (a: Instant, b: Instant) -> Span { Span(nanoseconds: a.nanoseconds - b.nanoseconds) }

    /// A length of time in nanoseconds.
    public struct Span: Sendable, Hashable, Comparable {
        public var nanoseconds: Int64
        public init(nanoseconds: Int64) { self.nanoseconds = nanoseconds }
        public static func seconds(_ s: Int64) -> Span { Span(nanoseconds: s * 1_000_000_000) }
        public static func milliseconds(_ ms: Int64) -> Span { Span(nanoseconds: ms * 1_000_000) }
        public static func < (a: Span, b: Span) -> Bool { a.nanoseconds < b.nanoseconds }
        public static func + (a: Span, b: Span) -> Span { Span(nanoseconds: a.nanoseconds + b.nanoseconds) }
        public static func - (a: Span, b: Span) -> Span { Span(nanoseconds: a.nanoseconds - b.nanoseconds) }
        public static func * (a: Span, n: Int64) -> Span { Span(nanoseconds: a.nanoseconds * n) }
    }
}

/// The whitepaper's constants (§6.1 and §6.4).
public enum Timing {
    public static let rekeyAfterMessages: UInt64 = 1 << 60
    public static let rejectAfterMessages: UInt64 = UInt64.max - (1 << 13)  // 2^64 - 2^13 - 1
    public static let rekeyAfterTime = Instant.Span.seconds(120)
    public static let rejectAfterTime = Instant.Span.seconds(180)
    public static let rekeyAttemptTime = Instant.Span.seconds(90)
    public static let rekeyTimeout = Instant.Span.seconds(5)
    /// The random extra wait before a handshake is retried, at most this long.
    public static let rekeyTimeoutJitterMax = Instant.Span.milliseconds(333)
    public static let keepaliveTimeout = Instant.Span.seconds(10)
    public static let cookieRefreshTime = Instant.Span.seconds(120)
    /// An initiator rekeys when a session it started is this old on receipt
    /// (REJECT_AFTER_TIME − KEEPALIVE_TIMEOUT − REKEY_TIMEOUT), so the new one
    /// is ready before the old expires.
    public static let rekeyOnReceiveAge = rejectAfterTime - keepaliveTimeout - rekeyTimeout
    /// With no new session for this long, every key of the peer is zeroed.
    public static let zeroKeysAfter = rejectAfterTime * 3
    /// Initiations from one peer closer together than this are dropped (a
    /// replayed-but-newer-timestamp flood costs no more than this rate).
    public static let initiationMinimumInterval = Instant.Span.milliseconds(20)
}

/// TAI64N (12 bytes, big-endian): the initiation's timestamp. A responder
/// accepts an initiation only with a timestamp greater than the last it
/// accepted from that peer, so a replayed initiation is refused.
public struct TAI64N: Sendable, Hashable, Comparable {
    public var seconds: UInt64
    public var nanoseconds: UInt32

    /// From the wall clock's Unix time. The nanoseconds are rounded down to
    /// 2^24 ns (~16.8 ms) so the timestamp does not tell the exact clock.
    public init(unixSeconds: Int64, nanoseconds: Int64) {
        seconds = 0x4000_0000_0000_000A &+ UInt64(bitPattern: unixSeconds)
        self.nanoseconds = UInt32(truncatingIfNeeded: nanoseconds) & ~UInt32(0xFF_FFFF)
    }

    init(raw: UnsafeRawBufferPointer) {
        seconds = UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: 0, as: UInt64.self))
        nanoseconds = UInt32(bigEndian: raw.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
    }

    public static let zero = TAI64N(seconds: 0, nanoseconds: 0)

    init(seconds: UInt64, nanoseconds: UInt32) {
        self.seconds = seconds
        self.nanoseconds = nanoseconds
    }

    func write(to raw: UnsafeMutableRawBufferPointer) {
        raw.storeBytes(of: seconds.bigEndian, toByteOffset: 0, as: UInt64.self)
        raw.storeBytes(of: nanoseconds.bigEndian, toByteOffset: 8, as: UInt32.self)
    }

    public static func < (a: TAI64N, b: TAI64N) -> Bool {
        (a.seconds, a.nanoseconds) < (b.seconds, b.nanoseconds)
    }
}
