/// Handshake messages per source address under load: a token bucket per
/// address (20 a second, bursts of 5), so a sender that proved its address
/// with a cookie still cannot make us do more than that many Diffie-Hellman
/// computations a second.
struct HandshakeRateLimiter {
    static let perSecond: Int64 = 20
    static let burst: Int64 = 5
    static let cost = 1_000_000_000 / perSecond  // nanoseconds of credit per message
    static let maximum = cost * burst
    /// Past this many addresses, those idle for a second are forgotten.
    static let pruneAbove = 4096

    struct Key: Hashable {
        let address: Bytes16
        let isIPv6: Bool
    }

    private var buckets: [Key: (credit: Int64, last: Instant)] = [:]

    mutating func allow(_ source: Endpoint, now: Instant) -> Bool {
        let key = Key(address: source.address, isIPv6: source.isIPv6)
        guard let bucket = buckets[key] else {
            if buckets.count >= Self.pruneAbove {
                buckets = buckets.filter { now - $0.value.last < .seconds(1) }
            }
            buckets[key] = (Self.maximum - Self.cost, now)
            return true
        }
        var credit = min(Self.maximum, bucket.credit + max(0, (now - bucket.last).nanoseconds))
        let allowed = credit >= Self.cost
        if allowed { credit -= Self.cost }
        buckets[key] = (credit, now)
        return allowed
    }
}
