import CoreMetrics
import Foundation
import LeaseStore
import Logging
import NetBase
import ServiceLifecycle
import Synchronization

/// Keeps a backend's peers equal to the store's leases, and this node's own
/// lease alive. It does not know which backend it feeds.
///
/// The peer record starts from a list at revision R and follows a watch from
/// R; when the store has forgotten the changes we need (compaction), the
/// list is read again and the record diffed against it. A broken watch is
/// resumed from the last revision seen, with backoff. Our own lease deleted
/// behind our back is acquired again (the same subnet while it is free) by a
/// task of its own, so peer changes keep flowing while it retries.
///
/// The record holds only leases the backend can use: leases by `LeaseRule`
/// (a hand-written key such as 10.2.0.0-16 would otherwise cover other
/// hosts' subnets and our own), not our own, of our backend type. Keys left
/// out are reported once each, with what to do.
public final class PeerSync: Sendable {
    public let store: any LeaseStore
    public let backend: any Backend
    public let holder: LeaseHolder
    public let config: NetworkConfig
    public let attributes: LeaseAttributes
    /// What a lease is; the subnet chooser applies the same rule.
    public let rule: LeaseRule
    let logger: Logger
    /// Called after we moved to another subnet (subnet.env, masquerade rules).
    let onSubnetChange: @Sendable (Lease) -> Void

    /// The lease of every subnet by `rule` — ours and those the backend
    /// cannot use included: which key a conflicting one is measured against
    /// — and whether it is applied to the backend as a peer. One record per
    /// subnet (a host among 60,000 keeps 60,000 of them).
    private let table = Mutex<[LeaseSubnet: Slot]>([:])
    private let metrics: Metrics
    /// Keys already reported as ignored or unusable, with the reason, so
    /// that each is reported once (again only if the reason changes).
    private let reported = Mutex<[String: String]>([:])
    /// Leases that lost a conflict to another key of their subnet, by key:
    /// one of them becomes the peer when the winner is deleted.
    private let shadowed = Mutex<[String: Lease]>([:])
    /// Changes are applied one batch at a time, in order.
    private let applying = Mutex<Void>(())
    /// Requests to acquire our lease again; consumed by `keepLeaseAcquired`.
    private let reacquireRequests: AsyncStream<IPv4Network>
    private let reacquireContinuation: AsyncStream<IPv4Network>.Continuation
    /// True while a re-acquisition is pending or running.
    private let reacquiring = Mutex<Bool>(false)

    public init(
        store: any LeaseStore,
        backend: any Backend,
        holder: LeaseHolder,
        config: NetworkConfig,
        attributes: LeaseAttributes,
        logger: Logger,
        onSubnetChange: @escaping @Sendable (Lease) -> Void = { _ in },
        metricsFactory: any MetricsFactory = MetricsSystem.factory
    ) {
        self.metrics = Metrics(factory: metricsFactory)
        self.store = store
        self.backend = backend
        self.holder = holder
        self.config = config
        self.attributes = attributes
        self.rule = LeaseRule(config)
        self.logger = logger
        self.onSubnetChange = onSubnetChange
        (reacquireRequests, reacquireContinuation) = AsyncStream<IPv4Network>.makeStream(
            bufferingPolicy: .bufferingNewest(1)
        )
    }

    /// A subnet's lease, and whether the backend has it as a peer. While
    /// applied, the backend has this lease's attributes (a renewal replaces
    /// the lease and changes nothing else).
    struct Slot {
        var lease: Lease
        var applied: Bool
        /// When it was last added or changed as a peer (seconds since 2001).
        var changedAt: Double

        mutating func markApplied(at time: Double) {
            applied = true
            changedAt = time
        }
    }

    /// The peers applied to the backend.
    public var currentPeers: [LeaseSubnet: Lease] {
        table.withLock { $0.compactMapValues { $0.applied ? $0.lease : nil } }
    }

    /// How many peers are applied to the backend.
    public var peerCount: Int { table.withLock { $0.values.count(where: \.applied) } }

    /// When each current peer was last added or changed (for `tunneld status`).
    public var peerChangeTimes: [LeaseSubnet: Date] {
        table.withLock {
            $0.compactMapValues { $0.applied ? Date(timeIntervalSinceReferenceDate: $0.changedAt) : nil }
        }
    }

    /// Applies the list a start read (`LeaseStore.join`); returns the
    /// revision to watch from.
    public func load(_ snapshot: LeaseSnapshot) -> Int64 {
        sync(with: snapshot)
        return snapshot.revision
    }

    /// The keys ignored or unusable as peers, with why (for `tunneld status`).
    public var ignoredKeys: [String: String] { reported.withLock { $0 } }

    /// Whether a re-acquisition of our lease is pending or running.
    public var isReacquiring: Bool { reacquiring.withLock { $0 } }

    /// Applies a fresh list; returns the revision to watch from.
    public func loadInitialPeers() async throws -> Int64 {
        let snapshot = try await store.peerLeases(holder: attributes.publicIP)
        sync(with: snapshot)
        return snapshot.revision
    }

    /// Runs the watch, renewal and re-acquisition until cancelled.
    public func run(from revision: Int64, renewMargin: Duration) async {
        await withTaskGroup(of: Void.self) { group in
            group.addTask { await self.watch(from: revision) }
            group.addTask { await self.renew(margin: renewMargin) }
            group.addTask { await self.keepLeaseAcquired() }
            await group.next()
            group.cancelAll()
        }
    }

    // MARK: - Which leases are peers

    /// Logs `reason` for `key` unless it was the last thing said about it.
    private func report(_ key: String, _ reason: String) {
        let isNew = reported.withLock { seen -> Bool in
            guard seen[key] != reason else { return false }
            seen[key] = reason
            return true
        }
        if isNew { logger.warning("\(reason)") }
    }

    private func report(_ ignored: IgnoredLeaseKey, own: LeaseSubnet) {
        var text = ignored.description
        if case .wider = ignored.reason, let own = own.ipv4, let subnet = LeaseKey.subnet(fromKey: ignored.key),
            subnet.contains(own)
        {
            text = text.replacingOccurrences(
                of: "other hosts' subnets",
                with: "other hosts' subnets, including ours (\(own))"
            )
        }
        report(ignored.key, text)
    }

    /// The lease as a peer, or nil (reported once) when this backend cannot
    /// use it. Only leases by `rule` get here.
    ///
    /// - Parameter forgetting: whether an earlier report about the lease's
    ///   key may exist, to be forgotten now that it is usable.
    private func usablePeer(_ lease: Lease, own: LeaseSubnet, forgetting: Bool = true) -> Lease? {
        if lease.primarySubnet == own { return nil }
        var reason: String?
        if lease.attributes.effectiveBackendType != backend.type.rawValue {
            let theirs = lease.attributes.effectiveBackendType
            reason =
                "peer \(lease.primarySubnet) (\(lease.attributes.publicIP)) runs the \(theirs) backend and this host runs \(backend.type); it cannot be reached until both use the same Backend.Type: restart that host with the current config (or this one, if the config says \(theirs))"
        } else if let why = backend.unusableReason(lease) {
            reason = "peer \(lease.primarySubnet) (\(lease.attributes.publicIP)) cannot be used: \(why)"
        }
        guard let reason else {
            if forgetting { reported.withLock { $0[lease.key] = nil } }
            return lease
        }
        report(lease.key, reason)
        return nil
    }

    // MARK: - Applying changes

    /// Makes the backend's peers exactly the usable leases of `snapshot`.
    public func sync(with snapshot: LeaseSnapshot) {
        let own = holder.lease.primarySubnet
        let sorted = rule.sort(snapshot)
        if reported.withLock({ !$0.isEmpty }) {
            let present = Set(snapshot.leases.map(\.key) + snapshot.unreadableKeys + snapshot.malformedKeys)
            reported.withLock { seen in seen = seen.filter { present.contains($0.key) } }
        }
        for ignored in sorted.ignored { report(ignored, own: own) }
        // Whether any lease key has a report to forget when it is usable
        // (none, at a first start: no lookup per lease then).
        let forgetting = reported.withLock { !$0.isEmpty }
        shadowed.withLock { $0 = Dictionary(sorted.conflicting.map { ($0.key, $0) }, uniquingKeysWith: { a, _ in a }) }
        applying.withLock { _ in
            // The new table is built beside the old one, then swapped in.
            var current = table.withLock { $0 }
            var next: [LeaseSubnet: Slot] = [:]
            next.reserveCapacity(sorted.leases.count)
            var removed: [PeerChange] = []
            var changed: [PeerChange] = []
            for lease in sorted.leases {
                let name = lease.primarySubnet
                guard next[name] == nil else { continue }
                let previous = current[name]
                let applied = previous.flatMap { $0.applied ? $0.lease : nil }
                next[name] = Slot(lease: lease, applied: applied != nil, changedAt: previous?.changedAt ?? 0)
                switch (applied, usablePeer(lease, own: own, forgetting: forgetting)) {
                case (nil, let new?): changed.append(.added(new))
                case (let old?, let new?): if Self.differs(old, new) { changed.append(.updated(old: old, new: new)) }
                case (let old?, nil): removed.append(.removed(old))
                case (nil, nil): break
                }
            }
            for (subnet, slot) in current where slot.applied && next[subnet] == nil {
                removed.append(.removed(slot.lease))
            }
            // Only the table holds the new storage from here on (no copy
            // when `commit` marks the peers applied), and the old one goes.
            table.withLock { $0 = next }
            next = [:]
            current = [:]
            commit(Self.inAddressOrder(removed) + Self.inAddressOrder(changed))
        }
        if !sorted.leases.contains(where: { $0.primarySubnet == own }) {
            logger.warning(
                "our lease \(own) is missing from \(store.location); acquiring a lease again, forwarding continues"
            )
            requestReacquire(holder.lease.subnet)
        }
    }

    /// Applies one watch event.
    public func apply(_ event: LeaseEvent) {
        let own = holder.lease.primarySubnet
        let reason =
            rule.isIPv6Only ? rule.problem(withKey: event.key, subnet: event.subnet) : rule.problem(with: event.subnet)
        if let reason {
            switch event {
            case .put(let lease):
                report(rule.ignored(lease.key, reason, publicIP: lease.attributes.publicIP), own: own)
            case .delete(_, _, let key):
                reported.withLock { $0[key] = nil }
            }
            return
        }
        switch event {
        case .put(let lease):
            let name = lease.primarySubnet
            if let held = table.withLock({ $0[name]?.lease }), held.key != lease.key {
                if LeaseRule.precedes(held.key, lease.key) {
                    // Another key names this subnet first: this one is no lease.
                    shadowed.withLock { $0[lease.key] = lease }
                    report(
                        rule.ignored(lease.key, .conflicts(with: held.key), publicIP: lease.attributes.publicIP),
                        own: own
                    )
                    return
                }
                // This key precedes the one that was the lease of its subnet.
                shadowed.withLock { $0[held.key] = held }
                report(
                    rule.ignored(held.key, .conflicts(with: lease.key), publicIP: held.attributes.publicIP),
                    own: own
                )
            }
            shadowed.withLock { $0[lease.key] = nil }
            if name == own {
                table.withLock { t in
                    t[own] = Slot(lease: lease, applied: t[own]?.applied ?? false, changedAt: t[own]?.changedAt ?? 0)
                }
                if lease.attributes.belongs(to: attributes) {
                    holder.replace(lease)
                } else {
                    logger.error(
                        "our subnet \(own) was written for \(lease.attributes.publicIP) by someone else; two hosts now claim it — remove the wrong lease"
                    )
                }
                return
            }
            update(name, to: lease, own: own)
        case .delete(_, _, let key):
            let subnet = event.primarySubnet
            reported.withLock { $0[key] = nil }
            // A conflicting key that went away: the lease of its subnet stays.
            if shadowed.withLock({ $0.removeValue(forKey: key) }) != nil { return }
            guard table.withLock({ $0[subnet]?.lease.key }) == key else { return }
            // A conflicting key of the same subnet, if any, is the lease now.
            let next = shadowed.withLock { shadowed -> Lease? in
                let candidates = shadowed.values.filter { $0.primarySubnet == subnet }
                guard let best = candidates.min(by: { LeaseRule.precedes($0.key, $1.key) }) else { return nil }
                shadowed[best.key] = nil
                return best
            }
            if let next {
                reported.withLock { $0[next.key] = nil }
                logger.info("lease \(key) was deleted; \(next.key) is the lease of \(subnet) now")
            }
            if subnet == own {
                // Our subnet is never a peer: its slot only records the key.
                table.withLock { $0[own] = next.map { Slot(lease: $0, applied: false, changedAt: 0) } }
                logger.warning(
                    "our lease \(own) was deleted from \(store.location) (expired or removed); acquiring a lease again, forwarding continues"
                )
                requestReacquire(holder.lease.subnet)
                return
            }
            update(subnet, to: next, own: own)
        }
    }

    /// Makes `lease` the lease of `subnet` (nil: none) and the backend's
    /// peer there what it allows.
    private func update(_ subnet: LeaseSubnet, to lease: Lease?, own: LeaseSubnet) {
        let peer = lease.flatMap { usablePeer($0, own: own) }
        applying.withLock { _ in
            let old = table.withLock { t -> Lease? in
                let previous = t[subnet]
                if let lease {
                    t[subnet] = Slot(
                        lease: lease,
                        applied: previous?.applied ?? false,
                        changedAt: previous?.changedAt ?? 0
                    )
                } else {
                    t[subnet] = nil
                }
                return previous.flatMap { $0.applied ? $0.lease : nil }
            }
            switch (old, peer) {
            case (nil, let new?): commit([.added(new)])
            case (let old?, let new?) where Self.differs(old, new): commit([.updated(old: old, new: new)])
            case (let old?, nil): commit([.removed(old)])
            default: break
            }
        }
    }

    /// Only the public IP and backend data matter to a backend; a renewal
    /// (new expiry, new revision) is no change.
    private static func differs(_ a: Lease, _ b: Lease) -> Bool {
        a.attributes != b.attributes
    }

    /// `changes` sorted by subnet address, the comparisons made on the
    /// addresses alone (a first list sorts 60,000 changes).
    private static func inAddressOrder(_ changes: [PeerChange]) -> [PeerChange] {
        var order = changes.indices.map { (address: changes[$0].subnet.address.value, index: $0) }
        order.sort { $0.address < $1.address }
        return order.map { changes[$0.index] }
    }

    /// Records and hands `changes` to the backend. Called under `applying`.
    private func commit(_ changes: [PeerChange]) {
        guard !changes.isEmpty else { return }
        let now = Date().timeIntervalSinceReferenceDate
        var added = 0, updated = 0, removed = 0
        table.withLock { t in
            for change in changes {
                switch change {
                case .added(let lease), .updated(_, let lease):
                    if case .added = change { added += 1 } else { updated += 1 }
                    // The slot holds the lease (set before the change was made).
                    t[lease.primarySubnet]?.markApplied(at: now)
                case .removed(let lease):
                    removed += 1
                    t[lease.primarySubnet]?.applied = false
                }
            }
        }
        for (counter, count) in [(metrics.added, added), (metrics.updated, updated), (metrics.removed, removed)]
        where count > 0 {
            counter.increment(by: count)
        }
        backend.apply(changes)
        for case .removed(let lease) in changes {
            logger.info("peer \(lease.primarySubnet) is gone")
        }
    }

    // MARK: - Our own lease

    private func requestReacquire(_ subnet: IPv4Network) {
        let first = reacquiring.withLock { busy -> Bool in
            defer { busy = true }
            return !busy
        }
        if first { reacquireContinuation.yield(subnet) }
    }

    /// Acquires our lease again whenever asked, until cancelled.
    func keepLeaseAcquired() async {
        for await subnet in reacquireRequests {
            if Task.isCancelled { return }
            await reacquire(preferred: subnet)
            reacquiring.withLock { $0 = false }
        }
    }

    /// Gets a lease again after ours vanished, retrying (with backoff) until
    /// it works or we are shut down.
    func reacquire(preferred: IPv4Network) async {
        var delay = Duration.seconds(1)
        while !Task.isCancelled && !Task.isShuttingDownGracefully {
            do {
                let old = holder.lease
                let lease = try await store.acquireLease(
                    config: config,
                    attributes: attributes,
                    preferred: preferred,
                    preferredIPv6: old.ipv6Subnet
                )
                holder.replace(lease)
                metrics.reacquisitions.increment()
                if lease.primarySubnet == old.primarySubnet {
                    logger.info("lease \(lease.primarySubnet) acquired again")
                } else {
                    logger.error(
                        "subnet \(old.primarySubnet) was taken by another host; moved to \(lease.primarySubnet): containers on this host must be restarted with the new subnet.env"
                    )
                    // The new subnet may have been a peer's a moment ago.
                    applying.withLock { _ in
                        if let stale = table.withLock({
                            $0[lease.primarySubnet].flatMap { $0.applied ? $0.lease : nil }
                        }) {
                            commit([.removed(stale)])
                        }
                    }
                    do {
                        try backend.move(from: old, to: lease)
                    } catch {
                        logger.error("could not move the \(backend.type) backend to \(lease.primarySubnet): \(error)")
                    }
                    onSubnetChange(lease)
                }
                return
            } catch {
                logger.error("could not acquire a lease again: \(error); retrying in \(delay)")
                try? await Task.sleep(for: delay)
                delay = min(delay * 2, .seconds(60))
            }
        }
    }

    /// Follows lease changes until cancelled.
    func watch(from start: Int64) async {
        var revision = start
        var delay = Duration.milliseconds(500)
        var relists = 0
        while !Task.isCancelled {
            do {
                for try await event in store.watchPeerLeases(after: revision, holder: attributes.publicIP) {
                    apply(event)
                    revision = max(revision, event.revision)
                    delay = .milliseconds(500)
                }
                if Task.isCancelled { return }
                metrics.watchRestarts.increment()
                logger.info("lease watch ended; resuming from revision \(revision)")
            } catch LeaseStoreError.compacted(let requested, let oldest) {
                relists += 1
                metrics.compactions.increment()
                // `requested` is where the store's stream began; we may have
                // seen events past it before the stream broke.
                logger.warning(
                    "lease watch: changes after \(max(requested, revision)) were compacted (oldest kept \(oldest)); listing again (re-list #\(relists))"
                )
                do {
                    let snapshot = try await store.peerLeases(holder: attributes.publicIP)
                    sync(with: snapshot)
                    revision = snapshot.revision
                    continue
                } catch {
                    logger.error("lease list failed: \(error); retrying in \(delay)")
                }
            } catch {
                if Task.isCancelled { return }
                metrics.watchRestarts.increment()
                logger.warning("lease watch failed: \(error); resuming from revision \(revision) in \(delay)")
            }
            try? await Task.sleep(for: delay)
            delay = min(delay * 2, .seconds(30))
        }
    }

    /// Renews our lease before it expires until cancelled.
    func renew(margin: Duration) async {
        while !Task.isCancelled {
            let lease = holder.lease
            if isReacquiring {
                // Re-acquisition gives a fresh lease; wait for it.
                try? await Task.sleep(for: .milliseconds(500))
                continue
            }
            guard let expiration = lease.expiration else {
                // A reservation never expires; look again later in case it
                // was turned into a lease.
                try? await Task.sleep(for: .seconds(3600))
                continue
            }
            let remaining = expiration.timeIntervalSinceNow
            let marginSeconds = Double(margin.components.seconds)
            // With a TTL shorter than the margin, renew at half-life.
            let wait = remaining > 2 * marginSeconds ? remaining - marginSeconds : max(remaining / 2, 0)
            if wait > 86_400 {
                // Far off (a long --subnet-lease-ttl): look again in a day
                // rather than sleeping for a duration that could overflow.
                try? await Task.sleep(for: .seconds(86_400))
                continue
            }
            if wait > 0 {
                try? await Task.sleep(for: .milliseconds(Int(wait * 1000)))
                if Task.isCancelled { return }
            }
            guard holder.lease.primarySubnet == lease.primarySubnet, !isReacquiring else { continue }
            do {
                let renewed = try await store.renewLease(holder.lease)
                holder.replace(renewed)
                metrics.renewals.increment()
                let until = renewed.expiration.map { " until \($0)" } ?? ""
                logger.info("renewed lease \(renewed.primarySubnet)\(until)")
            } catch LeaseStoreError.leaseNotFound {
                metrics.renewalFailures.increment()
                logger.warning("lease \(lease.primarySubnet) vanished before renewal; acquiring again")
                requestReacquire(lease.subnet)
            } catch {
                // Keep forwarding; try again in a minute (or sooner when the
                // lease is about to run out).
                metrics.renewalFailures.increment()
                let retry = min(60, max(1, holder.lease.expiration.map { $0.timeIntervalSinceNow / 4 } ?? 60))
                logger.error("renewing lease \(lease.primarySubnet) failed: \(error); retrying in \(Int(retry)) s")
                try? await Task.sleep(for: .seconds(retry))
            }
        }
    }
}

extension PeerSync {
    /// What the control side counts, through swift-metrics (the daemon
    /// bootstraps it with the Prometheus registry; elsewhere these are no-ops).
    struct Metrics: Sendable {
        let added, updated, removed: Counter
        let renewals, renewalFailures, reacquisitions: Counter
        let watchRestarts, compactions: Counter

        init(factory: any MetricsFactory) {
            func counter(_ label: String, _ dimensions: [(String, String)] = []) -> Counter {
                Counter(label: label, dimensions: dimensions, factory: factory)
            }
            added = counter("tunneld_peer_changes_total", [("change", "added")])
            updated = counter("tunneld_peer_changes_total", [("change", "updated")])
            removed = counter("tunneld_peer_changes_total", [("change", "removed")])
            renewals = counter("tunneld_lease_renewals_total")
            renewalFailures = counter("tunneld_lease_renewal_failures_total")
            reacquisitions = counter("tunneld_lease_reacquisitions_total")
            watchRestarts = counter("tunneld_store_watch_restarts_total")
            compactions = counter("tunneld_store_compactions_total")
        }
    }
}
