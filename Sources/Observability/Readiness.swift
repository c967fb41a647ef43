import Synchronization

/// Whether the daemon is ready, for GET /readyz: what it still waits for,
/// set as start-up moves on, and nil once it is ready.
public final class Readiness: Sendable {
    private let state: Mutex<String?>

    /// Not ready: waiting for `first`.
    public init(waitingFor first: String) {
        state = Mutex(first)
    }

    /// What it waits for now; nil when ready.
    public var waitingFor: String? { state.withLock { $0 } }

    /// Still not ready, now waiting for `step`.
    public func waiting(for step: String) {
        state.withLock { $0 = step }
    }

    /// Ready: /readyz answers 200 from now on.
    public func ready() {
        state.withLock { $0 = nil }
    }
}
