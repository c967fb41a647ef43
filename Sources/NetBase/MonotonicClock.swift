#if canImport(Glibc)
import Glibc
#endif

/// CLOCK_MONOTONIC in nanoseconds: the data path's busy-poll deadlines.
@inline(__always)
public func monotonicNanoseconds() -> UInt64 {
    var t = timespec()
    clock_gettime(CLOCK_MONOTONIC, &t)
    return UInt64(t.tv_sec) &* 1_000_000_000 &+ UInt64(t.tv_nsec)
}

/// Seconds on the monotonic clock, for bounding loops in time.
public func monotonicSeconds() -> Double {
    Double(monotonicNanoseconds()) / 1e9
}
