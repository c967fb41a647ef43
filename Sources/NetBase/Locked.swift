import Synchronization

/// A value shared between threads or closures, read and replaced under a
/// lock. A class so that closures which capture it share one value (a
/// `Mutex` is not copyable and cannot be captured by an escaping closure).
public final class Locked<Value: Sendable>: Sendable {
    private let mutex: Mutex<Value>

    public init(_ value: Value) { mutex = Mutex(value) }

    public func get() -> Value { mutex.withLock { $0 } }

    public func set(_ value: Value) { mutex.withLock { $0 = value } }

    /// Reads or changes the value in place, holding the lock for `body`.
    public func withLock<Result, E: Error>(
        _ body: (inout sending Value) throws(E) -> sending Result
    ) throws(E) -> sending Result {
        try mutex.withLock(body)
    }
}
