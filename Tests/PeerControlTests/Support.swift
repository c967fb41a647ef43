import Foundation
import LeaseStore
import Logging
import NetBase
import NetTestSupport
import PeerControl
import Synchronization

func net(_ text: String) -> IPv4Network {
    guard let n = IPv4Network(text, strict: true) else { fatalError("bad network literal \(text)") }
    return n
}

func ip(_ text: String) -> IPv4Address {
    guard let a = IPv4Address(text) else { fatalError("bad address literal \(text)") }
    return a
}

/// A lease store in memory, with the behaviours PeerSync must cope with
/// under the test's control: failing acquisitions, compaction.
final class MemoryLeaseStore: LeaseStore {
    struct State {
        var config: String?
        var leases: [IPv4Network: Lease] = [:]
        var revision: Int64 = 1
        var events: [LeaseEvent] = []
        /// Events at or below this revision are forgotten (compacted).
        var compactedThrough: Int64 = 0
        var watchers: [UUID: AsyncThrowingStream<LeaseEvent, any Error>.Continuation] = [:]
        /// Acquisitions that fail before one succeeds.
        var failingAcquisitions = 0
        var acquisitionAttempts = 0
        /// Lists (`leases()`) that fail before one succeeds.
        var failingLists = 0
    }
    let state = Mutex(State())
    let location = "memory"

    init(config: String) { state.withLock { $0.config = config } }

    func rawNetworkConfig() async throws -> String? { state.withLock { $0.config } }

    func setNetworkConfig(json: String) async throws -> NetworkConfig {
        let config = try NetworkConfig(json: json)
        state.withLock { $0.config = json }
        return config
    }

    func failNextAcquisitions(_ count: Int) { state.withLock { $0.failingAcquisitions = count } }
    var acquisitionAttempts: Int { state.withLock { $0.acquisitionAttempts } }

    func acquireLease(
        config: NetworkConfig,
        attributes: LeaseAttributes,
        preferred: IPv4Network?,
        preferredIPv6: IPv6Network?
    ) async throws -> Lease {
        let failing = state.withLock { state -> Bool in
            state.acquisitionAttempts += 1
            guard state.failingAcquisitions > 0 else { return false }
            state.failingAcquisitions -= 1
            return true
        }
        if failing { throw LeaseStoreError.io(path: location, reason: "store unavailable (test)") }
        let existing = state.withLock { state in
            state.leases.values.first { $0.attributes.publicIP == attributes.publicIP && config.fits($0.subnet) }
        }
        if let existing { return put(existing.subnet, attributes) }
        let taken = state.withLock { Set($0.leases.keys) }
        if let preferred, config.fits(preferred), !taken.contains(preferred) { return put(preferred, attributes) }
        guard let free = config.subnets.first(where: { !taken.contains($0) }) else {
            throw LeaseStoreError.outOfSubnets(network: config.network, blockedBy: taken.map(\.leaseKey).sorted())
        }
        return put(free, attributes)
    }

    func renewLease(_ lease: Lease) async throws -> Lease {
        guard state.withLock({ $0.leases[lease.subnet] }) != nil else {
            throw LeaseStoreError.leaseNotFound(subnet: lease.subnet)
        }
        return put(lease.subnet, lease.attributes)
    }

    func releaseLease(_ lease: Lease) async throws { delete(lease.subnet) }

    func failNextLists(_ count: Int) { state.withLock { $0.failingLists = count } }

    func leases() async throws -> LeaseSnapshot {
        let failing = state.withLock { state -> Bool in
            guard state.failingLists > 0 else { return false }
            state.failingLists -= 1
            return true
        }
        if failing { throw LeaseStoreError.io(path: location, reason: "list failed (test)") }
        return state.withLock {
            LeaseSnapshot(
                leases: $0.leases.values.sorted { $0.subnet.address < $1.subnet.address },
                revision: $0.revision
            )
        }
    }

    func watchLeases(after revision: Int64) -> AsyncThrowingStream<LeaseEvent, any Error> {
        let (stream, continuation) = AsyncThrowingStream<LeaseEvent, any Error>.makeStream()
        let id = UUID()
        state.withLock { state in
            if revision < state.compactedThrough {
                continuation.finish(
                    throwing: LeaseStoreError.compacted(requested: revision, oldest: state.compactedThrough + 1)
                )
                return
            }
            for event in state.events where event.revision > revision { continuation.yield(event) }
            state.watchers[id] = continuation
        }
        continuation.onTermination = { [weak self] _ in
            _ = self?.state.withLock { $0.watchers.removeValue(forKey: id) }
        }
        return stream
    }

    /// Writes a lease (as another host or etcdctl would) and tells watchers.
    @discardableResult
    func put(_ subnet: IPv4Network, _ attributes: LeaseAttributes, ttl: TimeInterval = 3600) -> Lease {
        state.withLock { state in
            state.revision += 1
            let lease = Lease(
                subnet: subnet,
                attributes: attributes,
                expiration: Date().addingTimeInterval(ttl),
                revision: state.revision
            )
            state.leases[subnet] = lease
            publish(.put(lease), in: &state)
            return lease
        }
    }

    func delete(_ subnet: IPv4Network) {
        state.withLock { state in
            guard state.leases.removeValue(forKey: subnet) != nil else { return }
            state.revision += 1
            publish(.delete(subnet: subnet, revision: state.revision), in: &state)
        }
    }

    /// Forgets every event so far and breaks running watches, as etcd does
    /// after `etcdctl compact` for a watcher that fell behind.
    func compactAndBreakWatches() {
        // Finished outside the lock: finishing runs a watch's onTermination,
        // which takes the lock to forget the watcher.
        let (broken, oldest) = state.withLock { state in
            state.compactedThrough = state.revision
            state.events.removeAll()
            defer { state.watchers.removeAll() }
            return (Array(state.watchers.values), state.revision + 1)
        }
        for watcher in broken { watcher.finish(throwing: LeaseStoreError.compacted(requested: 0, oldest: oldest)) }
    }

    /// Ends running watches as a store does when its connection drops: without
    /// an error (`error` nil), or with `error`.
    func breakWatches(with error: (any Error)? = nil) {
        let broken = state.withLock { state in
            defer { state.watchers.removeAll() }
            return Array(state.watchers.values)
        }
        for watcher in broken { watcher.finish(throwing: error) }
    }

    /// How many watches are open now.
    var openWatches: Int { state.withLock { $0.watchers.count } }

    /// Changes a lease without telling watchers (as if the event were lost
    /// to compaction).
    func silentlyDelete(_ subnet: IPv4Network) {
        state.withLock { state in
            state.leases[subnet] = nil
            state.revision += 1
        }
    }

    private func publish(_ event: LeaseEvent, in state: inout State) {
        state.events.append(event)
        for (_, watcher) in state.watchers { watcher.yield(event) }
    }
}

/// A backend that records what PeerSync asks of it.
final class RecordingBackend: Backend {
    let type: BackendType
    let mtu = 1400
    let publicIP: IPv4Address
    let unusable: @Sendable (Lease) -> String?
    private let log = Mutex<[PeerChange]>([])
    private let moves = Mutex<[(IPv4Network, IPv4Network)]>([])

    init(
        type: BackendType = .udp,
        publicIP: IPv4Address,
        unusable: @escaping @Sendable (Lease) -> String? = { _ in nil }
    ) {
        self.type = type
        self.publicIP = publicIP
        self.unusable = unusable
    }

    var changes: [PeerChange] { log.withLock { $0 } }
    var moved: [(IPv4Network, IPv4Network)] { moves.withLock { $0 } }

    /// Subnet → public IP, as the backend would have programmed them.
    var peers: [IPv4Network: IPv4Address] {
        var result: [IPv4Network: IPv4Address] = [:]
        for change in changes {
            switch change {
            case .added(let lease), .updated(_, let lease): result[lease.subnet] = lease.attributes.publicIP
            case .removed(let lease): result[lease.subnet] = nil
            }
        }
        return result
    }

    func leaseAttributes() throws -> LeaseAttributes {
        LeaseAttributes(publicIP: publicIP, backendType: type == .udp ? nil : type.rawValue)
    }
    func activate(lease: Lease) throws {}
    func move(from old: Lease, to new: Lease) throws { moves.withLock { $0.append((old.subnet, new.subnet)) } }
    func unusableReason(_ lease: Lease) -> String? { unusable(lease) }
    func apply(_ changes: [PeerChange]) { log.withLock { $0 += changes } }
    func run() async throws {}
    func cleanUp(releasing: Bool) {}
}

/// Waits (bounded) until `condition` holds; returns whether it did.
func eventually(timeout: Duration = .seconds(5), _ condition: () -> Bool) async -> Bool {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
        if condition() { return true }
        try? await Task.sleep(for: .milliseconds(10))
    }
    return condition()
}
