import Atomics
@_exported import DataPathCounters

/// Counts of one data-path worker; the published side is atomic.
public final class Statistics: @unchecked Sendable {
    private let published: UnsafeMutablePointer<UnsafeAtomic<UInt64>.Storage>
    /// The worker's private counts; only the owning worker touches them.
    let local: UnsafeMutablePointer<UInt64>

    public init() {
        let n = DataPathCounter.allCases.count
        published = .allocate(capacity: n)
        local = .allocate(capacity: n)
        for i in 0..<n {
            (published + i).initialize(to: .init(0))
            (local + i).initialize(to: 0)
        }
    }

    deinit {
        published.deallocate()
        local.deallocate()
    }

    @inline(__always)
    func add(_ counter: DataPathCounter, _ n: UInt64 = 1) { local[counter.rawValue] &+= n }

    /// One batch of `completions` (≥ 1) handled: its count, its size and its
    /// size class. Once per batch, never per packet.
    @inline(__always)
    func addBatch(completions: Int) {
        let n = max(completions, 1)
        local[DataPathCounter.batches.rawValue] &+= 1
        local[DataPathCounter.batchCompletions.rawValue] &+= UInt64(n)
        // Class k holds sizes 2^k … 2^(k+1) − 1; the last one everything above.
        let sizeClass = min(
            DataPathCounter.batchesOf64Plus.rawValue - DataPathCounter.batchesOf1.rawValue,
            Int.bitWidth - 1 - n.leadingZeroBitCount
        )
        local[DataPathCounter.batchesOf1.rawValue + sizeClass] &+= 1
    }

    /// Makes the worker's counts visible to readers (once per batch).
    @inline(__always)
    func publish() {
        for i in 0..<DataPathCounter.allCases.count {
            UnsafeAtomic<UInt64>(at: published + i).store(local[i], ordering: .relaxed)
        }
    }

    public subscript(counter: DataPathCounter) -> UInt64 {
        UnsafeAtomic<UInt64>(at: published + counter.rawValue).load(ordering: .relaxed)
    }

    /// Every counter summed over `workers`, in `DataPathCounter` order: what the
    /// metrics endpoint and `tunneld status` read (at scrape time, from the
    /// published side; the workers never wait for a reader).
    public static func totals(of workers: [Statistics]) -> [(counter: DataPathCounter, value: UInt64)] {
        DataPathCounter.allCases.map { ($0, total($0, of: workers)) }
    }

    /// All counters that are not zero, for logs.
    public var summary: String { Statistics.summary(of: [self]) }

    /// A counter summed over several workers.
    public static func total(_ counter: DataPathCounter, of workers: [Statistics]) -> UInt64 {
        workers.reduce(0) { $0 &+ $1[counter] }
    }

    /// The non-zero counters summed over several workers, for logs.
    public static func summary(of workers: [Statistics]) -> String {
        DataPathCounter.allCases.compactMap { c in
            let n = total(c, of: workers)
            return n == 0 ? nil : "\(c)=\(n)"
        }.joined(separator: " ")
    }
}
