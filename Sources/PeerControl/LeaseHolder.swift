import LeaseStore
import Synchronization

/// The lease this node holds; changed by renewal and re-acquisition.
public final class LeaseHolder: Sendable {
    private let state: Mutex<Lease>
    public init(_ lease: Lease) { state = Mutex(lease) }
    public var lease: Lease { state.withLock { $0 } }
    public func replace(_ lease: Lease) { state.withLock { $0 = lease } }
}
