import EtcdClient
import Foundation
import Logging
import NetBase
import Synchronization

/// flannel's subnet store in etcd v3, compatible with flanneld on the same
/// cluster:
///
/// - the network config at `<prefix>/config` (prefix default `/coreos.com/network`);
/// - one key per lease at `<prefix>/subnets/10.2.72.0-24`, holding flannel's
///   lease JSON and attached to an etcd lease of `leaseTTL` (24 h);
/// - reservations: lease keys with no etcd lease, which never expire and
///   are never given one;
/// - a lease is created by a create-if-absent transaction; a lost race
///   moves on to another free subnet (flanneld exits there).
public final class EtcdLeaseStore: LeaseStore {
    public let client: EtcdClient
    /// The key prefix without a trailing slash ("/coreos.com/network").
    public let prefix: String
    /// Lifetime of a lease between renewals.
    public let leaseTTL: Duration
    public let location: String
    /// Keys per page when listing (`EtcdClient.range(prefix:pageSize:)`).
    public let pageSize: Int
    private let logger: Logger
    /// How many times the lease keys were listed (a start should list once).
    let listings = Atomic<Int>(0)
    /// Keys no lease key that a watch met, each logged once.
    private let reportedMalformed = Mutex<Set<String>>([])

    /// How many create races in a row `acquireLease` may lose before giving up.
    static let maxCreateAttempts = 24

    public static let defaultPrefix = "/coreos.com/network"

    /// - Parameters:
    ///   - prefix: flanneld's `-etcd-prefix`; a trailing slash is ignored.
    ///   - leaseTTL: how long a lease lives unless renewed (flannel: 24 h).
    public init(
        client: EtcdClient,
        prefix: String = EtcdLeaseStore.defaultPrefix,
        leaseTTL: Duration = .seconds(24 * 3600),
        pageSize: Int = EtcdClient.defaultPageSize,
        logger: Logger = Logger(label: "tunneld.leasestore.etcd")
    ) {
        var trimmed = Substring(prefix)
        while trimmed.hasSuffix("/") { trimmed = trimmed.dropLast() }
        self.client = client
        self.prefix = String(trimmed)
        self.subnetsPrefix = self.prefix + "/subnets/"
        self.leaseTTL = leaseTTL
        self.pageSize = max(1, pageSize)
        self.location = "etcd \(client.endpoints.joined(separator: ",")) \(trimmed.isEmpty ? "/" : trimmed)"
        self.logger = logger
    }

    var configKey: String { prefix + "/config" }
    /// `<prefix>/subnets/`, made once: a list of 60,000 leases looks at it
    /// for every key.
    let subnetsPrefix: String
    func key(for subnet: IPv4Network) -> String { subnetsPrefix + LeaseKey.key(for: subnet) }
    private var ttlSeconds: Int64 { max(1, leaseTTL.components.seconds) }

    // MARK: - Config

    public func rawNetworkConfig() async throws -> String? {
        try await client.get(configKey)?.valueString
    }

    @discardableResult
    public func setNetworkConfig(json: String) async throws -> NetworkConfig {
        let config = try NetworkConfig(json: json)
        try await client.put(configKey, value: json)
        return config
    }

    // MARK: - Listing and watching

    /// One lease key as read: the subnet it names, and its lease, or why its
    /// value could not be read (such a key still occupies the subnet).
    private struct Entry {
        var subnet: IPv4Network
        /// The key's name under `subnets/`.
        var name: String
        /// The etcd lease the key is attached to (0: a reservation).
        var etcdLease: Int64
        var lease: Result<Lease, LeaseStoreError>
    }

    /// The lease keys under `<prefix>/subnets/` as read at one revision.
    private struct Listing {
        var entries: [Entry]
        var revision: Int64
        /// Names under `subnets/` that are no lease keys.
        var malformed: [String]

        var leases: [Lease] { entries.compactMap { try? $0.lease.get() } }

        var unreadable: [(subnet: IPv4Network, problem: LeaseStoreError)] {
            entries.compactMap { entry in
                guard case .failure(let problem) = entry.lease else { return nil }
                return (entry.subnet, problem)
            }
        }

        var snapshot: LeaseSnapshot {
            LeaseSnapshot(
                leases: leases,
                revision: revision,
                skipped: unreadable.map(\.problem),
                unreadableKeys: entries.compactMap { entry in
                    guard case .failure = entry.lease else { return nil }
                    return entry.name
                },
                malformedKeys: malformed
            )
        }

        /// The listing with `lease` as it is now (acquired or refreshed
        /// after the read): a watch from `revision` replays that write.
        func with(_ lease: Lease, etcdLease: Int64) -> Listing {
            var copy = self
            copy.entries.removeAll { $0.name == lease.key }
            copy.entries.append(
                Entry(subnet: lease.subnet, name: lease.key, etcdLease: etcdLease, lease: .success(lease))
            )
            return copy
        }
    }

    /// Unexpired leases and reservations; keys whose value cannot be read
    /// are left out and listed in `skipped` (their subnets stay taken).
    /// Keys that are not lease keys are ignored, as flannel ignores them.
    /// Read in pages at one revision (`EtcdClient.range(prefix:)`).
    public func leases() async throws -> LeaseSnapshot {
        try await list(expiriesOf: nil).snapshot
    }

    /// `leases()` without one TimeToLive request per lease: only `holder`'s
    /// leases get their expiry looked up, the others carry
    /// `Lease.expirationNotLookedUp`. (flanneld asks for every lease's TTL
    /// on every list.) A key whose etcd lease has just expired but not yet
    /// been deleted is then listed until its DELETE arrives, moments later.
    public func peerLeases(holder: IPv4Address) async throws -> LeaseSnapshot {
        try await list(expiriesOf: { $0.publicIP == holder }).snapshot
    }

    /// Reads the lease keys a page at a time, decoding each page into
    /// leases as it arrives (no page is kept).
    ///
    /// - Parameter holder: which leases get their expiry looked up (a
    ///   host's own, by PublicIP or `LeaseAttributes.belongs(to:)`); nil:
    ///   every lease.
    private func list(expiriesOf holder: ((LeaseAttributes) -> Bool)?) async throws -> Listing {
        listings.add(1, ordering: .relaxed)
        var entries: [Entry] = []
        var malformed: [String] = []
        var previous: LeaseAttributes?
        let revision = try await client.range(prefix: subnetsPrefix, pageSize: pageSize) { page, restart in
            if restart {
                entries.removeAll()
                malformed.removeAll()
            }
            if entries.isEmpty { entries.reserveCapacity(page.count) }
            for kv in page {
                let name = name(ofKey: kv.key)
                guard let subnet = subnet(fromKey: kv.key) else {
                    malformed.append(name)
                    continue
                }
                let lease: Result<Lease, LeaseStoreError>
                do throws(LeaseStoreError) {
                    var attributes = try LeaseAttributes(flannelJSON: kv.value, key: kv.key)
                    if let previous { attributes.share(with: previous) }
                    previous = attributes
                    // Expiries are looked up below, for the leases that need one.
                    lease = .success(
                        Lease(
                            subnet: subnet,
                            attributes: attributes,
                            expiration: kv.lease == 0 ? nil : Lease.expirationNotLookedUp,
                            revision: kv.modRevision,
                            key: name
                        )
                    )
                } catch {
                    let problem = LeaseStoreError.corrupt(
                        key: kv.key,
                        reason: Self.reason(error)
                            + "; the subnet stays taken until you fix the value or `etcdctl del \(kv.key)`"
                    )
                    logger.warning("skipping unreadable lease: \(problem)")
                    lease = .failure(problem)
                }
                entries.append(Entry(subnet: subnet, name: name, etcdLease: kv.lease, lease: lease))
            }
        }
        func wantsExpiry(_ entry: Entry) -> Bool {
            guard entry.etcdLease != 0 else { return false }
            guard let holder else { return true }
            return (try? entry.lease.get()).map { holder($0.attributes) } ?? false
        }
        let wanted = Set(entries.filter(wantsExpiry).map(\.etcdLease))
        if !wanted.isEmpty {
            let expirations = try await expirations(ofLeases: wanted)
            entries = entries.compactMap { entry in
                guard wantsExpiry(entry) else { return entry }
                // An expired etcd lease whose key the server has not deleted
                // yet: the DELETE is on its way; treat the subnet as free.
                guard let expires = expirations[entry.etcdLease] else { return nil }
                guard case .success(var lease) = entry.lease else { return entry }
                lease.expiration = expires
                var updated = entry
                updated.lease = .success(lease)
                return updated
            }
        }
        return Listing(entries: entries, revision: revision, malformed: malformed)
    }

    /// The reason inside a `.corrupt` error (the key is named separately).
    private static func reason(_ error: LeaseStoreError) -> String {
        if case .corrupt(_, let reason) = error { return reason }
        return error.description
    }

    /// When each etcd lease expires; leases that no longer exist are absent.
    private func expirations(ofLeases ids: Set<Int64>) async throws -> [Int64: Date] {
        let client = self.client
        let now = Date()
        return try await withThrowingTaskGroup(of: (Int64, Int64?).self) { group in
            var result: [Int64: Date] = [:]
            var pending = ids.makeIterator()
            // At most 16 lookups in flight: large clusters have hundreds of leases.
            for _ in 0..<16 {
                guard let id = pending.next() else { break }
                group.addTask { (id, try await client.leaseTimeToLive(id)?.remainingTTL) }
            }
            while let (id, remaining) = try await group.next() {
                if let remaining { result[id] = now.addingTimeInterval(TimeInterval(remaining)) }
                if let next = pending.next() {
                    group.addTask { (next, try await client.leaseTimeToLive(next)?.remainingTTL) }
                }
            }
            return result
        }
    }

    public func watchLeases(after revision: Int64) -> AsyncThrowingStream<LeaseEvent, any Error> {
        watch(after: revision, expiriesOf: nil)
    }

    /// `watchLeases(after:)` with a TimeToLive request only for puts of
    /// `holder`'s leases (a burst of 1,000 peer changes costs no requests).
    public func watchPeerLeases(
        after revision: Int64,
        holder: IPv4Address
    )
        -> AsyncThrowingStream<LeaseEvent, any Error>
    {
        watch(after: revision, expiriesOf: holder)
    }

    private func watch(
        after revision: Int64,
        expiriesOf holder: IPv4Address?
    )
        -> AsyncThrowingStream<LeaseEvent, any Error>
    {
        let (stream, continuation) = AsyncThrowingStream<LeaseEvent, any Error>.makeStream()
        let changes = client.watch(prefix: subnetsPrefix, fromRevision: revision + 1)
        let task = Task {
            do {
                for try await batch in changes {
                    for event in batch.events {
                        if let leaseEvent = await self.leaseEvent(event, expiriesOf: holder) {
                            continuation.yield(leaseEvent)
                        }
                    }
                }
                continuation.finish()
            } catch let error as EtcdError {
                if case .compacted(let oldest) = error.code {
                    continuation.finish(throwing: LeaseStoreError.compacted(requested: revision, oldest: oldest))
                } else {
                    continuation.finish(throwing: error)
                }
            } catch {
                continuation.finish(throwing: error)
            }
        }
        continuation.onTermination = { _ in task.cancel() }
        return stream
    }

    private func leaseEvent(_ event: EtcdWatchEvent, expiriesOf holder: IPv4Address?) async -> LeaseEvent? {
        guard let subnet = subnet(fromKey: event.kv.key) else {
            let name = name(ofKey: event.kv.key)
            if event.kind == .put, reportedMalformed.withLock({ $0.insert(name).inserted }) {
                logger.warning(
                    "lease key \(name) is not a lease key such as 10.2.72.0-24; every host ignores it — delete it (etcdctl del '\(event.kv.key)')"
                )
            }
            return nil
        }
        let name = name(ofKey: event.kv.key)
        switch event.kind {
        case .delete:
            return .delete(subnet: subnet, revision: event.revision, key: name)
        case .put:
            let attributes: LeaseAttributes
            do {
                attributes = try LeaseAttributes(flannelJSON: event.kv.value, key: event.kv.key)
            } catch {
                logger.warning("ignoring unreadable lease update: \(error)")
                return nil
            }
            var expiration: Date?
            if event.kv.lease != 0, let holder, attributes.publicIP != holder {
                expiration = Lease.expirationNotLookedUp
            } else if event.kv.lease != 0 {
                do {
                    // nil: the lease is already gone; its DELETE follows.
                    let remaining = try await client.leaseTimeToLive(event.kv.lease)?.remainingTTL ?? 0
                    expiration = Date().addingTimeInterval(TimeInterval(remaining))
                } catch {
                    // The key was just written with a fresh lease: assume a full TTL.
                    logger.debug("TimeToLive of the lease of \(event.kv.key) failed (\(error)); assuming \(leaseTTL)")
                    expiration = Date().addingTimeInterval(TimeInterval(ttlSeconds))
                }
            }
            return .put(
                Lease(
                    subnet: subnet,
                    attributes: attributes,
                    expiration: expiration,
                    revision: event.revision,
                    key: name
                )
            )
        }
    }

    /// The subnet a key directly under `<prefix>/subnets/` names; nil for
    /// other keys (flannel skips those), including deeper ones such as
    /// `<prefix>/subnets/x/10.2.72.0-24`, which a prefix range also returns.
    /// The name of a key under `<prefix>/subnets/`.
    private func name(ofKey key: String) -> String {
        guard let start = nameStart(ofKey: key) else { return key }
        return String(key[start...])
    }

    private func subnet(fromKey key: String) -> IPv4Network? {
        guard let start = nameStart(ofKey: key) else { return nil }
        let name = key.utf8[start...]
        guard !name.contains(UInt8(ascii: "/")) else { return nil }
        return LeaseKey.subnet(fromKeyBytes: name)
    }

    /// Where the name under `subnets/` starts in `key`; nil for a key
    /// outside `subnetsPrefix`. Byte-wise: no Characters or copies for
    /// every key of a long list.
    private func nameStart(ofKey key: String) -> String.Index? {
        let bytes = key.utf8, prefixBytes = subnetsPrefix.utf8
        guard bytes.starts(with: prefixBytes) else { return nil }
        return bytes.index(bytes.startIndex, offsetBy: prefixBytes.count)
    }

    // MARK: - Acquire, renew, release

    public func acquireLease(
        config: NetworkConfig,
        attributes: LeaseAttributes,
        preferred: IPv4Network?,
        preferredIPv6: IPv6Network?
    ) async throws -> Lease {
        try await acquireListing(
            config: config,
            attributes: attributes,
            preferred: preferred,
            preferredIPv6: preferredIPv6
        ).lease
    }

    /// One read of the leases both chooses the subnet and is the list of
    /// peers, at one revision: a host joining 60,000 others reads them once.
    public func join(
        config: NetworkConfig,
        attributes: LeaseAttributes,
        preferred: IPv4Network?,
        preferredIPv6: IPv6Network?
    ) async throws -> LeaseJoin {
        let (lease, listing) = try await acquireListing(
            config: config,
            attributes: attributes,
            preferred: preferred,
            preferredIPv6: preferredIPv6
        )
        return LeaseJoin(lease: lease, peers: listing.snapshot)
    }

    private func acquireListing(
        config: NetworkConfig,
        attributes: LeaseAttributes,
        preferred: IPv4Network?,
        preferredIPv6: IPv6Network?
    ) async throws -> (lease: Lease, listing: Listing) {
        // An etcd lease granted for a create that lost its race is reused for
        // the next try, and revoked if it ends up attached to no key.
        var spare: EtcdLease?
        do {
            let acquired = try await acquire(
                config: config,
                attributes: attributes,
                preferred: preferred,
                preferredIPv6: preferredIPv6,
                spare: &spare
            )
            if let spare { try? await client.leaseRevoke(spare.id) }
            return acquired
        } catch {
            if let spare { try? await client.leaseRevoke(spare.id) }
            throw error
        }
    }

    /// The lease, and the listing the choice was made from with the lease
    /// as it is after this call.
    private func acquire(
        config: NetworkConfig,
        attributes: LeaseAttributes,
        preferred: IPv4Network?,
        preferredIPv6: IPv6Network?,
        spare: inout EtcdLease?
    ) async throws -> (Lease, Listing) {
        let value = Array(attributes.flannelJSON.utf8)
        var generator = SystemRandomNumberGenerator()
        var attempts = 0
        var rounds = 0
        // Bounded: each round reads the leases once and tries its candidates;
        // every lost create counts towards maxCreateAttempts.
        while attempts < Self.maxCreateAttempts && rounds < Self.maxCreateAttempts {
            rounds += 1
            // Only our own leases' expiries matter to the choice (which of
            // ours to reuse); the others only occupy their subnets.
            let listing = try await list(expiriesOf: { $0.belongs(to: attributes) })
            let choice = try SubnetChooser.choose(
                config: config,
                leases: listing.leases,
                host: attributes,
                preferred: preferred,
                preferredIPv6: preferredIPv6,
                occupied: listing.unreadable.map(\.subnet),
                using: &generator
            )
            for obsolete in choice.obsolete {
                await deleteObsolete(obsolete, key: subnetsPrefix + obsolete.key)
            }
            if case .existingLease(let existing) = choice.source {
                let key = subnetsPrefix + existing.key
                if let renewed = try await refreshIfStillOurs(existing, key: key, attributes: attributes) {
                    logger.info("reusing lease \(renewed)")
                    return (renewed, listing.with(renewed.withKey(existing.key), etcdLease: 0))
                }
                continue  // it changed or expired under us: look again
            }
            for (index, subnet) in choice.candidates.enumerated() where attempts < Self.maxCreateAttempts {
                attempts += 1
                let ipv6Subnet = choice.ipv6Candidate(index)
                let leaseName = LeaseKey.key(for: subnet, ipv6: ipv6Subnet)
                let etcdLease: EtcdLease
                if let spare { etcdLease = spare } else { etcdLease = try await client.leaseGrant(ttl: ttlSeconds) }
                spare = etcdLease
                // Guarded by the IPv4 part: no other key (plain or dual-stack)
                // of this IPv4 subnet may exist, whatever its IPv6 part.
                switch try await client.createIfAbsent(
                    subnetsPrefix + leaseName,
                    value: value,
                    lease: etcdLease.id,
                    // IPv6-only: every key starts 0.0.0.0-0, so the key itself.
                    guardPrefix: subnetsPrefix + (subnet.isNoIPv4 ? leaseName : subnet.leaseKey)
                ) {
                case .created(let revision):
                    spare = nil
                    let lease = Lease(
                        subnet: subnet,
                        ipv6Subnet: ipv6Subnet,
                        attributes: attributes,
                        expiration: Date().addingTimeInterval(TimeInterval(etcdLease.ttl)),
                        revision: revision
                    )
                    if ipv6Subnet != nil, let after = try await ipv6RaceLost(lease, etcdLease: etcdLease.id) {
                        // Another host created the same IPv6 subnet (under
                        // another IPv4 subnet) at the same moment, and its key
                        // is the lease by the rule: ours is gone, try again.
                        logger.info(
                            "IPv6 subnet \(ipv6Subnet!) was taken by \(after) at the same moment; trying another"
                        )
                        continue
                    }
                    logger.info("acquired lease \(leaseName) for \(attributes.publicIP)")
                    return (lease, listing.with(lease, etcdLease: etcdLease.id))
                case .exists(let holder):
                    if let held = try? LeaseAttributes(flannelJSON: holder.value, key: holder.key),
                        held.belongs(to: attributes)
                    {
                        // Ours after all (a retried request, or another instance
                        // with our PublicIP): take it over rather than a second subnet.
                        let lease = Lease(
                            subnet: subnet,
                            attributes: held,
                            expiration: nil,
                            revision: holder.modRevision,
                            key: leaseName
                        )
                        if let renewed = try await refreshIfStillOurs(
                            lease,
                            key: holder.key,
                            attributes: attributes
                        ) {
                            return (renewed, listing.with(renewed.withKey(name(ofKey: holder.key)), etcdLease: 0))
                        }
                    }
                    logger.info("subnet \(leaseName) was taken by another node first; trying another")
                }
            }
        }
        throw LeaseStoreError.io(
            path: location,
            reason: "lost the race for a free subnet \(attempts) times in a row; try again"
        )
    }

    public func renewLease(_ lease: Lease) async throws -> Lease {
        // Bounded: a key that keeps changing under us is someone else's.
        for _ in 0..<3 {
            guard
                let renewed = try await refresh(
                    lease,
                    key: subnetsPrefix + lease.key,
                    attributes: lease.attributes
                )
            else { continue }
            return renewed
        }
        throw LeaseStoreError.leaseNotFound(subnet: lease.subnet)
    }

    /// `refresh`, with "no longer ours" (expired, deleted, taken) as nil.
    private func refreshIfStillOurs(
        _ lease: Lease,
        key: String,
        attributes: LeaseAttributes
    ) async throws -> Lease? {
        do {
            return try await refresh(lease, key: key, attributes: attributes)
        } catch LeaseStoreError.leaseNotFound {
            return nil
        }
    }

    /// Rewrites our lease `key` with `attributes` and a fresh etcd lease (new
    /// Grant + Put, as flannel renews), only if the key is still ours and
    /// unchanged since read. A reservation keeps having no etcd lease; its
    /// value is rewritten only if the attributes changed. nil: the key
    /// changed between read and write (read again).
    private func refresh(_ lease: Lease, key: String, attributes: LeaseAttributes) async throws -> Lease? {
        guard let kv = try await client.get(key),
            let held = try? LeaseAttributes(flannelJSON: kv.value, key: key),
            held.belongs(to: attributes)
        else {
            throw LeaseStoreError.leaseNotFound(subnet: lease.subnet)
        }
        let json = attributes.flannelJSON
        let value = Array(json.utf8)
        try await betweenReadAndWrite(key)
        if kv.lease == 0 {
            guard kv.valueString != json else {
                return Lease(
                    subnet: lease.subnet,
                    attributes: held,
                    expiration: nil,
                    revision: kv.modRevision,
                    key: lease.key
                )
            }
            switch try await client.compareAndPut(key, value: value, lease: 0, modRevision: kv.modRevision) {
            case .written(let revision):
                return Lease(
                    subnet: lease.subnet,
                    attributes: attributes,
                    expiration: nil,
                    revision: revision,
                    key: lease.key
                )
            case .changed:
                return nil
            }
        }
        let granted = try await client.leaseGrant(ttl: ttlSeconds)
        switch try await client.compareAndPut(key, value: value, lease: granted.id, modRevision: kv.modRevision) {
        case .written(let revision):
            // The old etcd lease now holds no key; let it go rather than wait 24 h.
            try? await client.leaseRevoke(kv.lease)
            return Lease(
                subnet: lease.subnet,
                attributes: attributes,
                expiration: Date().addingTimeInterval(TimeInterval(granted.ttl)),
                revision: revision,
                key: lease.key
            )
        case .changed:
            try? await client.leaseRevoke(granted.id)
            return nil
        }
    }

    public func releaseLease(_ lease: Lease) async throws {
        let key = subnetsPrefix + lease.key
        // Bounded, as renewal: a key that keeps changing under us is someone else's.
        for _ in 0..<3 {
            guard let kv = try await client.get(key) else { return }
            guard let held = try? LeaseAttributes(flannelJSON: kv.value, key: key),
                held.belongs(to: lease.attributes)
            else {
                logger.info("not releasing \(lease.primarySubnet): it is held by another node now")
                return
            }
            // Reservations are the operator's: releasing one leaves it in place.
            guard kv.lease != 0 else { return }
            try await betweenReadAndWrite(key)
            // Only what was read is deleted: if our lease ran out and another host took
            // the subnet after the read, its key stays.
            if try await deleteKey(key, etcdLease: kv.lease, ifUnchangedSince: kv.modRevision) { return }
        }
        logger.info("not releasing \(lease.primarySubnet): its key kept changing while we tried")
    }

    /// Runs between reading a lease key and the conditional write or delete that
    /// depends on what was read (renewal, release); the tests change the key there
    /// to take the paths where someone else wrote it meanwhile.
    let testHook = Mutex<(@Sendable (String) async throws -> Void)?>(nil)

    private func betweenReadAndWrite(_ key: String) async throws {
        if let hook = testHook.withLock({ $0 }) { try await hook(key) }
    }

    /// Deletes a lease key, only if it is unchanged since `modRevision` (read
    /// and delete are not one step, and another host may take an expired
    /// subnet in between), and revokes its etcd lease, which then holds no key
    /// (rather than leaving it to run out in 24 h). False: the key changed
    /// meanwhile and nothing was deleted.
    private func deleteKey(_ key: String, etcdLease: Int64, ifUnchangedSince modRevision: Int64) async throws -> Bool {
        guard case .written = try await client.compareAndDelete(key, modRevision: modRevision) else { return false }
        guard etcdLease != 0 else { return true }
        do {
            try await client.leaseRevoke(etcdLease)
        } catch {
            // Expired meanwhile: nothing left to revoke.
            if error.code != .leaseNotFound { throw error }
        }
        return true
    }

    /// After creating a dual-stack lease: the key of another lease naming
    /// the same IPv6 subnet that was created before ours, if there is one
    /// (two hosts chose it in the same moment; etcd cannot guard a key's
    /// IPv6 part), in which case ours has been deleted. nil: ours stands.
    /// The earlier creation wins, so of two racers exactly the later one
    /// yields, whichever looks first (creation revisions are totally ordered).
    private func ipv6RaceLost(_ lease: Lease, etcdLease: Int64) async throws -> String? {
        guard let mine = lease.ipv6Subnet else { return nil }
        let earlier = try await client.range(prefix: subnetsPrefix).kvs.filter { kv in
            let name = name(ofKey: kv.key)
            return name != lease.key && kv.createRevision < lease.revision && LeaseKey.ipv6Subnet(fromKey: name) == mine
        }
        guard let winner = earlier.min(by: { $0.createRevision < $1.createRevision }) else { return nil }
        _ = try await deleteKey(subnetsPrefix + lease.key, etcdLease: etcdLease, ifUnchangedSince: lease.revision)
        return name(ofKey: winner.key)
    }

    /// Deletes our expiring lease that no longer fits the network config, as
    /// flannel does, so that peers stop routing that subnet to us. Only
    /// expiring leases get here (`SubnetChoice.obsolete` never lists a
    /// reservation); a failure is logged and acquisition goes on, since the
    /// stale lease then simply runs out.
    private func deleteObsolete(_ lease: Lease, key: String) async {
        logger.info("deleting our lease \(lease.primarySubnet): it no longer fits the network config")
        do {
            guard let kv = try await client.get(key), kv.lease != 0,
                kv.modRevision == lease.revision
            else { return }  // changed or gone meanwhile
            _ = try await deleteKey(key, etcdLease: kv.lease, ifUnchangedSince: kv.modRevision)
        } catch {
            logger.warning("could not delete our obsolete lease \(lease.primarySubnet) (\(error)); it will expire")
        }
    }
}
