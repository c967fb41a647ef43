import Dispatch
import FlannelFiles
import Foundation
import Logging
import NetBase
import Synchronization

/// The embedded lease store for one machine: a directory that several
/// tunneld processes share — also from different network namespaces, since
/// they share the file system.
///
/// Layout of `directory`:
/// - `config.json` — the network config, verbatim.
/// - `subnets/10.2.72.0-24` — one record per lease:
///   `{"Revision":7,"Expiration":"2026-03-01T12:00:00.250Z","Value":{"PublicIP":"198.18.0.1","PublicIPv6":null}}`
///   where `Value` is flannel's lease value byte for byte; no `Expiration`
///   means a reservation. A file holding just a flannel value (as one would
///   `etcdctl put`) is read as a reservation.
/// - `events.log` — one JSON line per change (revision, PUT/DELETE, key,
///   value), the last `compactionKeep` of them.
/// - `revision` — the current revision, the oldest revision in events.log and
///   the earliest expiration; watchers poll this small file.
/// - `pending` — present only while (or if a crash interrupted) an update:
///   the journal of its changes, redone by the next process that locks.
/// - `lock` — every update (and every read that may expire leases) holds
///   `flock(LOCK_EX)` on it; every file is replaced atomically
///   (temporary file, fsync, rename).
///
/// Revisions are consecutive: each change (a lease created, renewed,
/// released, or expired) takes the next one. Expired leases are deleted, with
/// a DELETE event, by whoever next takes the lock.
public final class LocalLeaseStore: LeaseStore {
    public let directory: String
    public let leaseTTL: Duration
    public let compactionKeep: Int
    /// How often a watch looks at the revision file when nothing happens.
    public static let pollInterval: Duration = .milliseconds(150)

    private let logger: Logger
    /// Blocking file work (flock waits included) runs here, not on the
    /// cooperative thread pool.
    private let queue = DispatchQueue(label: "tunneld.leasestore", attributes: .concurrent)
    /// Corrupt entries already logged, so each is reported once.
    private let reported = Mutex<Set<String>>([])

    var configPath: String { directory + "/config.json" }
    var subnetsPath: String { directory + "/subnets" }
    var eventsPath: String { directory + "/events.log" }
    var statePath: String { directory + "/revision" }
    var pendingPath: String { directory + "/pending" }
    var lockPath: String { directory + "/lock" }

    /// Opens (creating, mode 0700) the store in `directory`.
    public convenience init(
        directory: String,
        leaseTTL: Duration = .seconds(24 * 3600),
        compactionKeep: Int = 1000,
        logger: Logger = Logger(label: "tunneld.leasestore")
    ) throws {
        try self.init(
            directory: directory,
            leaseTTL: leaseTTL,
            compactionKeep: compactionKeep,
            logger: logger,
            clock: { .now }
        )
    }

    /// The time source: the wall clock, or a test's clock so that expiry can
    /// be tested without racing a real one on a loaded machine.
    let clock: @Sendable () -> Timestamp

    init(
        directory: String,
        leaseTTL: Duration,
        compactionKeep: Int,
        logger: Logger,
        clock: @escaping @Sendable () -> Timestamp
    ) throws {
        self.clock = clock
        precondition(compactionKeep >= 1, "compactionKeep must be at least 1")
        precondition(leaseTTL > .zero, "leaseTTL must be positive")
        var path = directory
        while path.count > 1 && path.hasSuffix("/") { path.removeLast() }
        self.directory = path
        self.leaseTTL = leaseTTL
        self.compactionKeep = compactionKeep
        self.logger = logger
        do {
            try FileIO.makeDirectories(path, mode: 0o700)
            try FileIO.makeDirectories(path + "/subnets", mode: 0o700)
        } catch {
            throw error.asStoreError
        }
    }

    public var location: String { "local \(directory)" }

    // MARK: LeaseStore

    public func rawNetworkConfig() async throws -> String? {
        try await run { [configPath] () throws(FileError) -> String? in
            try FileIO.read(configPath).map { String(decoding: $0, as: UTF8.self) }
        }
    }

    @discardableResult
    public func setNetworkConfig(json: String) async throws -> NetworkConfig {
        let config = try NetworkConfig(json: json)
        try await run {
            try self.exclusive { _ in
                try FileIO.writeAtomically(self.configPath, Array(json.utf8))
            }
        }
        logger.info("stored network config", metadata: ["store": "\(location)", "network": "\(config.network)"])
        return config
    }

    public func acquireLease(
        config: NetworkConfig,
        attributes: LeaseAttributes,
        preferred: IPv4Network?,
        preferredIPv6: IPv6Network?
    ) async throws -> Lease {
        let (lease, how) = try await run {
            try self.exclusive { tx -> (Lease, String) in
                let scan = try tx.scan()
                var generator = SystemRandomNumberGenerator()
                let choice = try SubnetChooser.choose(
                    config: config,
                    leases: scan.leases.map(\.lease),
                    host: attributes,
                    preferred: preferred,
                    preferredIPv6: preferredIPv6,
                    occupied: scan.occupied,
                    using: &generator
                )
                for old in choice.obsolete {
                    self.logger.info(
                        "deleting our lease that no longer fits the network config",
                        metadata: ["subnet": "\(old.primarySubnet)"]
                    )
                    tx.delete(key: old.key, subnet: old.subnet)
                }
                switch choice.source {
                case .existingLease(let existing):
                    guard let stored = scan.leases.first(where: { $0.key == existing.key }) else {
                        preconditionFailure("chooser returned a lease that was not listed")
                    }
                    if stored.expiration == nil {
                        if stored.attributes == attributes { return (stored.lease, "reservation") }
                        return (
                            tx.put(
                                key: stored.key,
                                subnet: stored.subnet,
                                attributes: attributes,
                                expiration: nil
                            ).lease, "reservation"
                        )
                    }
                    return (
                        tx.put(
                            key: stored.key,
                            subnet: stored.subnet,
                            attributes: attributes,
                            expiration: tx.now.adding(self.leaseTTL)
                        ).lease, "existing lease"
                    )
                case .preferred, .free:
                    // Create-if-absent: the lock makes the check and the write one step.
                    for (index, subnet) in choice.candidates.enumerated() {
                        // Both families in the one locked step.
                        let key = LeaseKey.key(for: subnet, ipv6: choice.ipv6Candidate(index))
                        guard !tx.isTaken(key) else { continue }
                        let how = subnet == preferred ? "previous subnet" : "free subnet"
                        return (
                            tx.put(
                                key: key,
                                subnet: subnet,
                                attributes: attributes,
                                expiration: tx.now.adding(self.leaseTTL)
                            ).lease, how
                        )
                    }
                    throw LeaseStoreError.outOfSubnets(
                        network: config.network,
                        blockedBy: choice.candidates.map(\.leaseKey)
                    )
                }
            }
        }
        logger.info(
            "acquired lease",
            metadata: [
                "subnet": "\(lease.primarySubnet)", "ipv6Subnet": "\(lease.ipv6Subnet.map(\.description) ?? "none")",
                "publicIP": "\(attributes.publicIP)", "how": "\(how)",
            ]
        )
        return lease
    }

    public func renewLease(_ lease: Lease) async throws -> Lease {
        try await run {
            try self.exclusive { tx -> Lease in
                try tx.expireIfDue()
                guard let stored = try tx.read(lease),
                    stored.attributes.belongs(to: lease.attributes)
                else {
                    throw LeaseStoreError.leaseNotFound(subnet: lease.subnet)
                }
                if let expiration = stored.expiration, expiration <= tx.now {
                    tx.delete(key: stored.key, subnet: stored.subnet)
                    throw LeaseStoreError.leaseNotFound(subnet: lease.subnet)
                }
                guard stored.expiration != nil else { return stored.lease }
                return tx.put(
                    key: stored.key,
                    subnet: stored.subnet,
                    attributes: lease.attributes,
                    expiration: tx.now.adding(self.leaseTTL)
                ).lease
            }
        }
    }

    /// Deletes `lease` if it is still held by its PublicIP. A reservation is
    /// left in place (it is the operator's; see `deleteLease(subnet:)`), and
    /// a lease already gone is not an error.
    public func releaseLease(_ lease: Lease) async throws {
        try await run {
            try self.exclusive { tx in
                try tx.expireIfDue()
                guard let stored = try tx.read(lease),
                    stored.attributes.belongs(to: lease.attributes)
                else { return }
                if stored.expiration == nil {
                    self.logger.info("not releasing a reservation", metadata: ["subnet": "\(lease.primarySubnet)"])
                    return
                }
                tx.delete(key: stored.key, subnet: stored.subnet)
            }
        }
    }

    /// All unexpired leases and reservations, sorted by subnet. Entries that
    /// cannot be read are left out and listed in `skipped` (and logged once).
    public func leases() async throws -> LeaseSnapshot {
        try await run {
            try self.exclusive { tx -> LeaseSnapshot in
                let scan = try tx.scan()
                return LeaseSnapshot(
                    leases: scan.leases.map(\.lease),
                    revision: tx.state.revision,
                    skipped: scan.skipped,
                    unreadableKeys: scan.unreadableKeys,
                    malformedKeys: scan.malformedKeys
                )
            }
        }
    }

    /// Changes after `revision`, in order, by polling: a read of the small
    /// revision file every `pollInterval`, the log only when it moved. The
    /// stream is pulled — it polls only while its consumer waits for the next
    /// event, so there is no task to leak, and it ends (without error) when
    /// that consumer's task is cancelled.
    public func watchLeases(after revision: Int64) -> AsyncThrowingStream<LeaseEvent, any Error> {
        let cursor = WatchCursor(after: revision)
        return AsyncThrowingStream(unfolding: { [self] in
            while !Task.isCancelled {
                if let event = cursor.next() { return event }
                let after = cursor.after
                let events = try await self.run { try self.poll(after: after) }
                if events.isEmpty {
                    do {
                        try await Task.sleep(for: Self.pollInterval)
                    } catch {
                        return nil
                    }
                } else {
                    cursor.add(events)
                }
            }
            return nil
        })
    }

    // MARK: operator tools

    /// Reserves `subnet` (with `ipv6Subnet` in a dual-stack network; in an
    /// IPv6-only one `subnet` is `.noIPv4`) for the host `attributes`
    /// names: a lease that never expires, which acquireLease hands to that
    /// host (like a key put into etcd without a lease; see
    /// `LeaseAttributes.belongs(to:)`). Replaces whatever that key held;
    /// a dual-stack or IPv6-only key is flanneld's, `<IPv4 part>&<IPv6 part>`.
    @discardableResult
    public func reserve(
        _ subnet: IPv4Network,
        ipv6Subnet: IPv6Network? = nil,
        attributes: LeaseAttributes
    ) async throws -> Lease {
        try await run {
            try self.exclusive { tx -> Lease in
                try tx.expireIfDue()
                let key: String
                if let ipv6Subnet {
                    key = LeaseKey.key(for: subnet, ipv6: ipv6Subnet)
                } else {
                    // A corrupt entry in the way is simply replaced.
                    key = try tx.findKey(subnet) ?? subnet.leaseKey
                }
                return tx.put(key: key, subnet: subnet, attributes: attributes, expiration: nil).lease
            }
        }
    }

    /// Deletes the lease or reservation for `subnet` (and `ipv6Subnet`, which
    /// an IPv6-only network's keys are told apart by), whoever holds it
    /// (like `etcdctl del`). Returns false if there was none.
    @discardableResult
    public func deleteLease(subnet: IPv4Network, ipv6Subnet: IPv6Network? = nil) async throws -> Bool {
        try await run {
            try self.exclusive { tx -> Bool in
                try tx.expireIfDue()
                // By key, so that a corrupt entry can be deleted too.
                let key: String
                if let ipv6Subnet {
                    key = LeaseKey.key(for: subnet, ipv6: ipv6Subnet)
                    guard tx.isTaken(key) else { return false }
                } else {
                    guard let found = try tx.findKey(subnet) else { return false }
                    key = found
                }
                tx.delete(key: key, subnet: subnet)
                return true
            }
        }
    }

    // MARK: running and locking

    /// Runs blocking file work off the cooperative pool; file errors come
    /// back as `LeaseStoreError.io` naming the file.
    private func run<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { continuation in
            queue.async {
                do {
                    continuation.resume(returning: try body())
                } catch let error as FileError {
                    continuation.resume(throwing: error.asStoreError)
                } catch {
                    continuation.resume(throwing: error)
                }
            }
        }
    }

    /// Holds the exclusive lock around `body`: first finishes an update a
    /// crashed process left, then runs `body` and commits its changes —
    /// also when `body` throws, so expiries it found are not lost.
    func exclusive<T>(_ body: (Transaction) throws -> T) throws -> T {
        let lock = try FileLock(path: lockPath, exclusive: true)
        defer { lock.unlock() }
        try finishPendingUpdate()
        let tx = Transaction(store: self, state: try loadState(), now: clock())
        let result: T
        do {
            result = try body(tx)
        } catch {
            try commit(tx)
            throw error
        }
        try commit(tx)
        return result
    }

    /// Reads the revision file; if it is missing, recovers the revision from
    /// events.log and the lease files so that revisions never go backwards.
    private func loadState() throws -> StoreState {
        if let bytes = try FileIO.read(statePath) {
            return try StoreState(parsing: bytes, path: statePath)
        }
        var state = StoreState()
        if let log = try FileIO.read(eventsPath) {
            let changes = StoreChange.parseLog(log, path: eventsPath)
            state.revision = changes.map(\.revision).max() ?? 0
            state.oldest = changes.first?.revision ?? 1
        }
        for name in try FileIO.list(subnetsPath) where LeaseKey.subnet(fromKey: name) != nil {
            let path = subnetsPath + "/" + name
            if let bytes = try? FileIO.read(path), let subnet = LeaseKey.subnet(fromKey: name),
                let stored = try? StoredLease(record: bytes, key: name, subnet: subnet, path: path)
            {
                state.revision = max(state.revision, stored.revision)
            }
        }
        // Unknown: scan at the first chance.
        state.nextExpiry = Timestamp(milliseconds: 0)
        if state.revision > 0 {
            // Written at once (we hold the lock), so that watchers find it again.
            try FileIO.writeAtomically(statePath, Array(state.text.utf8))
            logger.warning(
                "revision file was missing; recovered revision \(state.revision)",
                metadata: ["file": "\(statePath)"]
            )
        }
        return state
    }

    /// Redoes the changes of an update that was interrupted after writing its
    /// journal. Changes at or below the committed revision are already
    /// applied and are skipped, which makes this safe to repeat.
    private func finishPendingUpdate() throws {
        guard let journal = try FileIO.read(pendingPath) else { return }
        var state = try loadState()
        let todo = StoreChange.parseLog(journal, path: pendingPath).filter { $0.revision > state.revision }
        if let last = todo.last {
            for change in todo { try apply(change) }
            state.oldest = try rewriteLog(adding: todo, fallbackOldest: state.oldest)
            state.revision = last.revision
            state.nextExpiry = Timestamp(milliseconds: 0)
            try FileIO.writeAtomically(statePath, Array(state.text.utf8))
            logger.warning(
                "finished an update interrupted by a process that stopped mid-write",
                metadata: ["revisions": "\(todo[0].revision)...\(last.revision)"]
            )
        }
        try FileIO.remove(pendingPath)
        FileIO.syncDirectory(directory)
    }

    /// Journal, apply, log, then publish the revision: a reader that sees
    /// revision R in the revision file finds every change up to R applied
    /// and logged.
    private func commit(_ tx: Transaction) throws {
        guard !tx.changes.isEmpty else {
            if tx.state != tx.original {
                try FileIO.writeAtomically(statePath, Array(tx.state.text.utf8))
            }
            return
        }
        let lines = Array(tx.changes.map(\.line).joined().utf8)
        try FileIO.writeAtomically(pendingPath, lines)
        for change in tx.changes { try apply(change) }
        try FileIO.append(eventsPath, lines)
        var state = tx.state
        if state.revision - state.oldest + 1 > Int64(compactionKeep) {
            state.oldest = try rewriteLog(adding: [], fallbackOldest: state.revision + 1)
        }
        try FileIO.writeAtomically(statePath, Array(state.text.utf8))
        try FileIO.remove(pendingPath)
        FileIO.syncDirectory(directory)
        for change in tx.changes {
            if case .delete(_, let subnet, _) = change, tx.expired.contains(subnet) {
                logger.info("lease expired", metadata: ["subnet": "\(subnet)"])
            }
        }
    }

    private func apply(_ change: StoreChange) throws {
        switch change {
        case .put(let stored):
            try FileIO.writeAtomically(subnetsPath + "/" + stored.key, Array(stored.recordJSON.utf8))
        case .delete(let key, _, _):
            try FileIO.remove(subnetsPath + "/" + key)
            FileIO.syncDirectory(subnetsPath)
        }
    }

    /// Rewrites events.log with its readable events plus `adding` (those
    /// beyond its last revision), keeping the last `compactionKeep`.
    /// Returns the oldest revision kept.
    private func rewriteLog(adding: [StoreChange], fallbackOldest: Int64) throws -> Int64 {
        var kept = try FileIO.read(eventsPath).map { StoreChange.parseLog($0, path: eventsPath) } ?? []
        let tail = kept.last?.revision ?? 0
        kept += adding.filter { $0.revision > tail }
        if kept.count > compactionKeep { kept.removeFirst(kept.count - compactionKeep) }
        try FileIO.writeAtomically(eventsPath, Array(kept.map(\.line).joined().utf8))
        return kept.first?.revision ?? fallbackOldest
    }

    // MARK: watching

    /// One poll of a watch: the revision file without a lock; expiry (under
    /// the lock) only when a lease is due; the log only when the revision moved.
    private func poll(after: Int64) throws -> [LeaseEvent] {
        var state = try FileIO.read(statePath).map { try StoreState(parsing: $0, path: statePath) }
        let due = state?.nextExpiry.map { $0 <= clock() } ?? false
        if due || FileIO.exists(pendingPath) || (state == nil && FileIO.exists(eventsPath)) {
            state = try exclusive { tx in
                try tx.expireIfDue()
                return tx.state
            }
        }
        let current = state ?? StoreState()
        if after > current.revision {
            // The store is behind the watcher: it was reset, or the revision
            // came from elsewhere. Only a fresh list can resynchronise.
            throw LeaseStoreError.compacted(requested: after, oldest: current.oldest)
        }
        guard current.revision > after else { return [] }
        let log: [UInt8]? = try {
            let lock = try FileLock(path: lockPath, exclusive: false)
            defer { lock.unlock() }
            return try FileIO.read(eventsPath)
        }()
        let changes = log.map { StoreChange.parseLog($0, path: eventsPath) } ?? []
        var expected = after + 1
        var events: [LeaseEvent] = []
        for change in changes where change.revision > after && change.revision <= current.revision {
            // Revisions are consecutive; a hole means events were trimmed or lost.
            guard change.revision == expected else {
                throw LeaseStoreError.compacted(requested: after, oldest: change.revision)
            }
            events.append(change.event)
            expected += 1
        }
        if expected <= current.revision {
            throw LeaseStoreError.compacted(requested: after, oldest: current.revision + 1)
        }
        return events
    }

    func reportOnce(_ problem: LeaseStoreError, path: String) {
        let isNew = reported.withLock { $0.insert(path + "\u{0}" + problem.description).inserted }
        if isNew { logger.warning("skipping unreadable lease entry: \(problem)") }
    }
}

/// Where a watch stands: the last revision handed out and events fetched
/// but not yet delivered.
private final class WatchCursor: Sendable {
    private let state: Mutex<(after: Int64, buffered: [LeaseEvent])>

    init(after: Int64) { state = Mutex((after, [])) }

    var after: Int64 { state.withLock { $0.after } }

    func next() -> LeaseEvent? {
        state.withLock { s in
            guard !s.buffered.isEmpty else { return nil }
            let event = s.buffered.removeFirst()
            s.after = event.revision
            return event
        }
    }

    func add(_ events: [LeaseEvent]) {
        state.withLock { $0.buffered += events }
    }
}

extension FileError {
    /// The store's error for a failed file operation, naming the file.
    var asStoreError: LeaseStoreError { .io(path: path, reason: reason) }
}
