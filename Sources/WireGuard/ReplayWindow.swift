/// The receive counter's sliding window (RFC 6479): a ring of 64-bit blocks,
/// the bit of each counter set once it was accepted. Counters more than
/// `size` behind the highest accepted are refused, and so is any counter
/// already seen. Checking does not change the window; only `accept` does,
/// after the message authenticated.
public struct ReplayWindow: Sendable {
    static let blockCount = 64  // a power of two
    static let blockBits = 64
    /// 4032 counters: one block less than the ring, so the block of any
    /// counter inside the window is never a block being reused.
    public static let size: UInt64 = UInt64((blockCount - 1) * blockBits)

    private var blocks = [UInt64](repeating: 0, count: blockCount)
    private var highest: UInt64 = 0

    public init() {}

    /// True when `counter` may be new: not too old, not already seen.
    public func check(_ counter: UInt64) -> Bool {
        guard counter < Timing.rejectAfterMessages else { return false }
        if counter > highest { return true }
        if highest - counter >= Self.size { return false }
        let block = Int(truncatingIfNeeded: counter >> 6) & (Self.blockCount - 1)
        return blocks[block] & (1 << (counter & 63)) == 0
    }

    /// Marks `counter` received; false when it is a replay or too old.
    public mutating func accept(_ counter: UInt64) -> Bool {
        guard check(counter) else { return false }
        if counter > highest {
            let current = highest >> 6
            let target = counter >> 6
            let clear = min(target - current, UInt64(Self.blockCount))
            var i: UInt64 = 1
            while i <= clear {
                blocks[Int(truncatingIfNeeded: current &+ i) & (Self.blockCount - 1)] = 0
                i += 1
            }
            highest = counter
        }
        let block = Int(truncatingIfNeeded: counter >> 6) & (Self.blockCount - 1)
        blocks[block] |= 1 << (counter & 63)
        return true
    }
}
