import EtcdClient
import Foundation
import Logging
import NetBase

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
    private let logger: Logger

    /// How many create races in a row `acquireLease` may lose before giving up.
    static let maxCreateAttempts = 24

    public static let defaultPrefix = "/coreos.com/network"

    /// - Parameters:
    ///   - prefix: flanneld's `-etcd-prefix`; a trailing slash is ignored.
    ///   - leaseTTL: how long a lease lives unless renewed (flannel: 24 h).
    public init(client: EtcdClient, prefix: String = EtcdLeaseStore.defaultPrefix,
                leaseTTL: Duration = .seconds(24 * 3600),
                logger: Logger = Logger(label: "tunneld.leasestore.etcd")) {
        var trimmed = Substring(prefix)
        while trimmed.hasSuffix("/") { trimmed = trimmed.dropLast() }
        self.client = client
        self.prefix = String(trimmed)
        self.leaseTTL = leaseTTL
        self.location = "etcd \(client.endpoints.joined(separator: ",")) \(trimmed.isEmpty ? "/" : trimmed)"
        self.logger = logger
    }

    var configKey: String { prefix + "/config" }
    var subnetsPrefix: String { prefix + "/subnets/" }
    func key(for subnet: IPv4Network) -> String { subnetsPrefix + subnet.leaseKey }
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

    /// One lease key as read: the subnet it names, and its lease if the value
    /// could be read (an unreadable one still occupies the subnet).
    private struct Entry {
        var subnet: IPv4Network
        var kv: EtcdKeyValue
        var lease: Lease?
    }

    public func leases() async throws -> LeaseSnapshot {
        let (entries, revision) = try await readEntries()
        return LeaseSnapshot(leases: entries.compactMap(\.lease), revision: revision)
    }

    private func readEntries() async throws -> ([Entry], Int64) {
        let listed = try await client.range(prefix: subnetsPrefix)
        let parsed = listed.kvs.compactMap { kv -> (IPv4Network, EtcdKeyValue)? in
            guard let subnet = subnet(fromKey: kv.key) else { return nil }
            return (subnet, kv)
        }
        let expirations = try await expirations(ofLeases: Set(parsed.map(\.1.lease).filter { $0 != 0 }))
        var entries: [Entry] = []
        for (subnet, kv) in parsed {
            var lease: Lease?
            var expiration: Date?
            if kv.lease != 0 {
                // An expired etcd lease whose key the server has not deleted yet:
                // the DELETE is on its way; treat the subnet as free.
                guard let expires = expirations[kv.lease] else { continue }
                expiration = expires
            }
            do {
                let attributes = try decodeLeaseValue(kv.valueString, key: kv.key)
                lease = Lease(subnet: subnet, attributes: attributes, expiration: expiration,
                              revision: kv.modRevision)
            } catch {
                logger.warning("skipping unreadable lease: \(error)")
            }
            entries.append(Entry(subnet: subnet, kv: kv, lease: lease))
        }
        return (entries, listed.revision)
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
        let (stream, continuation) = AsyncThrowingStream<LeaseEvent, any Error>.makeStream()
        let changes = client.watch(prefix: subnetsPrefix, fromRevision: revision + 1)
        let task = Task {
            do {
                for try await batch in changes {
                    for event in batch.events {
                        if let leaseEvent = await self.leaseEvent(event) { continuation.yield(leaseEvent) }
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

    private func leaseEvent(_ event: EtcdWatchEvent) async -> LeaseEvent? {
        guard let subnet = subnet(fromKey: event.kv.key) else { return nil }
        switch event.kind {
        case .delete:
            return .delete(subnet: subnet, revision: event.revision)
        case .put:
            let attributes: LeaseAttributes
            do {
                attributes = try decodeLeaseValue(event.kv.valueString, key: event.kv.key)
            } catch {
                logger.warning("ignoring unreadable lease update: \(error)")
                return nil
            }
            var expiration: Date?
            if event.kv.lease != 0 {
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
            return .put(Lease(subnet: subnet, attributes: attributes, expiration: expiration,
                              revision: event.revision))
        }
    }

    /// The subnet a key under `<prefix>/subnets/` names; nil for other keys
    /// (flannel skips those). Of a dual-stack key ("…-24&fd00::-64") the
    /// IPv4 part counts.
    private func subnet(fromKey key: String) -> IPv4Network? {
        guard key.hasPrefix(subnetsPrefix) else { return nil }
        let name = key.dropFirst(subnetsPrefix.count)
        guard !name.contains("/") else { return nil }
        let v4 = name.split(separator: "&", maxSplits: 1, omittingEmptySubsequences: false)[0]
        return IPv4Network(leaseKey: v4)
    }

    // MARK: - Acquire, renew, release

    public func acquireLease(config: NetworkConfig, attributes: LeaseAttributes,
                             preferred: IPv4Network?) async throws -> Lease {
        // An etcd lease granted for a create that lost its race is reused for
        // the next try, and revoked if it ends up attached to no key.
        var spare: EtcdLease?
        do {
            let lease = try await acquire(config: config, attributes: attributes, preferred: preferred,
                                          spare: &spare)
            if let spare { try? await client.leaseRevoke(spare.id) }
            return lease
        } catch {
            if let spare { try? await client.leaseRevoke(spare.id) }
            throw error
        }
    }

    private func acquire(config: NetworkConfig, attributes: LeaseAttributes, preferred: IPv4Network?,
                         spare: inout EtcdLease?) async throws -> Lease {
        let value = encodeLeaseValue(attributes)
        var attempts = 0
        var rounds = 0
        // Bounded: each round reads the leases once and tries its candidates;
        // every lost create counts towards maxCreateAttempts.
        while attempts < Self.maxCreateAttempts && rounds < Self.maxCreateAttempts {
            rounds += 1
            let (entries, _) = try await readEntries()
            let choice = try chooseSubnet(config: config, entries: entries, publicIP: attributes.publicIP,
                                          preferred: preferred)
            for obsolete in choice.obsolete {
                logger.info("deleting our lease \(obsolete.subnet): it no longer fits the network config")
                _ = try? await client.delete(key(for: obsolete.subnet))
            }
            if let existing = choice.existing {
                if let renewed = try await refreshIfStillOurs(existing, attributes: attributes) {
                    logger.info("reusing lease \(renewed)")
                    return renewed
                }
                continue  // it changed or expired under us: look again
            }
            for subnet in choice.candidates where attempts < Self.maxCreateAttempts {
                attempts += 1
                let etcdLease: EtcdLease
                if let spare { etcdLease = spare } else { etcdLease = try await client.leaseGrant(ttl: ttlSeconds) }
                spare = etcdLease
                switch try await client.createIfAbsent(key(for: subnet), value: value, lease: etcdLease.id) {
                case .created(let revision):
                    spare = nil
                    logger.info("acquired lease \(subnet) for \(attributes.publicIP)")
                    return Lease(subnet: subnet, attributes: attributes,
                                 expiration: Date().addingTimeInterval(TimeInterval(etcdLease.ttl)),
                                 revision: revision)
                case .exists(let holder):
                    if let held = try? decodeLeaseValue(holder.valueString, key: holder.key),
                       held.publicIP == attributes.publicIP {
                        // Ours after all (a retried request, or another instance
                        // with our PublicIP): take it over rather than a second subnet.
                        let lease = Lease(subnet: subnet, attributes: held, expiration: nil,
                                          revision: holder.modRevision)
                        if let renewed = try await refreshIfStillOurs(lease, attributes: attributes) {
                            return renewed
                        }
                    }
                    logger.info("subnet \(subnet) was taken by another node first; trying another")
                }
            }
        }
        throw LeaseStoreError.io(path: location,
                                 reason: "lost the race for a free subnet \(attempts) times in a row; try again")
    }

    public func renewLease(_ lease: Lease) async throws -> Lease {
        // Bounded: a key that keeps changing under us is someone else's.
        for _ in 0..<3 {
            guard let renewed = try await refresh(lease, attributes: lease.attributes) else { continue }
            return renewed
        }
        throw LeaseStoreError.leaseNotFound(subnet: lease.subnet)
    }

    /// `refresh`, with "no longer ours" (expired, deleted, taken) as nil.
    private func refreshIfStillOurs(_ lease: Lease, attributes: LeaseAttributes) async throws -> Lease? {
        do {
            return try await refresh(lease, attributes: attributes)
        } catch LeaseStoreError.leaseNotFound {
            return nil
        }
    }

    /// Rewrites our lease key with `attributes` and a fresh etcd lease (new
    /// Grant + Put, as flannel renews), only if the key is still ours and
    /// unchanged since read. A reservation keeps having no etcd lease; its
    /// value is rewritten only if the attributes changed. nil: the key
    /// changed between read and write (read again).
    private func refresh(_ lease: Lease, attributes: LeaseAttributes) async throws -> Lease? {
        let key = key(for: lease.subnet)
        guard let kv = try await client.get(key),
              let held = try? decodeLeaseValue(kv.valueString, key: key),
              held.publicIP == attributes.publicIP else {
            throw LeaseStoreError.leaseNotFound(subnet: lease.subnet)
        }
        let value = encodeLeaseValue(attributes)
        if kv.lease == 0 {
            guard kv.valueString != String(decoding: value, as: UTF8.self) else {
                return Lease(subnet: lease.subnet, attributes: held, expiration: nil, revision: kv.modRevision)
            }
            switch try await client.compareAndPut(key, value: value, lease: 0, modRevision: kv.modRevision) {
            case .written(let revision):
                return Lease(subnet: lease.subnet, attributes: attributes, expiration: nil, revision: revision)
            case .changed:
                return nil
            }
        }
        let granted = try await client.leaseGrant(ttl: ttlSeconds)
        switch try await client.compareAndPut(key, value: value, lease: granted.id, modRevision: kv.modRevision) {
        case .written(let revision):
            // The old etcd lease now holds no key; let it go rather than wait 24 h.
            try? await client.leaseRevoke(kv.lease)
            return Lease(subnet: lease.subnet, attributes: attributes,
                         expiration: Date().addingTimeInterval(TimeInterval(granted.ttl)), revision: revision)
        case .changed:
            try? await client.leaseRevoke(granted.id)
            return nil
        }
    }

    public func releaseLease(_ lease: Lease) async throws {
        let key = key(for: lease.subnet)
        guard let kv = try await client.get(key) else { return }
        guard let held = try? decodeLeaseValue(kv.valueString, key: key),
              held.publicIP == lease.attributes.publicIP else {
            logger.info("not releasing \(lease.subnet): it is held by another node now")
            return
        }
        // Reservations are the operator's: releasing one leaves it in place.
        guard kv.lease != 0 else { return }
        try await client.delete(key)
        do {
            try await client.leaseRevoke(kv.lease)
        } catch {
            // Expired meanwhile: nothing left to revoke.
            if error.code != .leaseNotFound { throw error }
        }
    }

    // MARK: - Subnet choice (flannel's order)

    private struct Choice {
        /// A lease or reservation of ours that fits the config: reuse it.
        var existing: Lease?
        /// Otherwise the subnets to try creating, in order.
        var candidates: [IPv4Network]
        /// Our expiring leases that no longer fit the config.
        var obsolete: [Lease]
    }

    /// flannel's acquisition order, as one call so that a shared chooser can
    /// replace it: 1) our lease (a reservation first) that fits the config;
    /// 2) `preferred`, if it fits and is free; 3) the free subnets among the
    /// first ≤ 100 from SubnetMin, in random order.
    private func chooseSubnet(config: NetworkConfig, entries: [Entry], publicIP: IPv4Address,
                              preferred: IPv4Network?) throws -> Choice {
        let own = entries.compactMap(\.lease).filter { $0.attributes.publicIP == publicIP }
        let obsolete = own.filter { !$0.isReservation && !fits($0.subnet, config) }
        let reusable = own.filter { fits($0.subnet, config) }.sorted { a, b in
            if a.isReservation != b.isReservation { return a.isReservation }
            return (a.expiration ?? .distantFuture) > (b.expiration ?? .distantFuture)
        }
        if let lease = reusable.first {
            return Choice(existing: lease, candidates: [], obsolete: obsolete)
        }
        let obsoleteSubnets = Set(obsolete.map(\.subnet))
        let taken = entries.map(\.subnet).filter { !obsoleteSubnets.contains($0) }
        func isFree(_ subnet: IPv4Network) -> Bool { !taken.contains { $0.overlaps(subnet) } }

        var free: [IPv4Network] = []
        let step = UInt64(1) << UInt64(32 - config.subnetLen)
        var address = UInt64(config.subnetMin.address.value)
        let last = UInt64(config.subnetMax.address.value)
        while address <= last && free.count < 100 {
            let subnet = IPv4Network(address: IPv4Address(UInt32(address)), prefixLength: config.subnetLen)
            if isFree(subnet) { free.append(subnet) }
            address += step
        }
        var candidates = free.shuffled()
        if let preferred, fits(preferred, config), isFree(preferred) {
            candidates.removeAll { $0 == preferred }
            candidates.insert(preferred, at: 0)
        }
        guard !candidates.isEmpty else { throw LeaseStoreError.outOfSubnets(network: config.network) }
        return Choice(existing: nil, candidates: candidates, obsolete: obsolete)
    }

    /// flannel's test for a lease still matching the config.
    private func fits(_ subnet: IPv4Network, _ config: NetworkConfig) -> Bool {
        subnet.prefixLength == config.subnetLen && config.network.contains(subnet)
            && subnet.address >= config.subnetMin.address && subnet.address <= config.subnetMax.address
    }
}

// MARK: - flannel's lease value

/// flannel's lease JSON, byte for byte as flanneld writes it: `PublicIP`,
/// `PublicIPv6` (null when absent), then `BackendType` and `BackendData`
/// only when present. Written by hand: an encoder would not promise the order.
private func encodeLeaseValue(_ attributes: LeaseAttributes) -> [UInt8] {
    var out = "{\"PublicIP\":" + jsonString(attributes.publicIP.description)
    out += ",\"PublicIPv6\":" + (attributes.publicIPv6.map(jsonString) ?? "null")
    if let type = attributes.backendType, !type.isEmpty { out += ",\"BackendType\":" + jsonString(type) }
    if let data = attributes.backendData { out += ",\"BackendData\":" + jsonText(data) }
    return Array((out + "}").utf8)
}

private func jsonString(_ text: String) -> String {
    var out = "\""
    for scalar in text.unicodeScalars {
        switch scalar {
        case "\"": out += "\\\""
        case "\\": out += "\\\\"
        case "\n": out += "\\n"
        case "\r": out += "\\r"
        case "\t": out += "\\t"
        case _ where scalar.value < 0x20: out += String(format: "\\u%04x", scalar.value)
        default: out.unicodeScalars.append(scalar)
        }
    }
    return out + "\""
}

/// Compact JSON with object keys sorted (Go sorts map keys; struct fields
/// such as vxlan's VNI, VtepMAC happen to be in sorted order too).
private func jsonText(_ value: JSONValue) -> String {
    switch value {
    case .null: return "null"
    case .bool(let b): return b ? "true" : "false"
    case .number(let n):
        if n.rounded() == n, abs(n) < 1e15 { return String(Int64(n)) }
        return "\(n)"
    case .string(let s): return jsonString(s)
    case .array(let items): return "[" + items.map(jsonText).joined(separator: ",") + "]"
    case .object(let fields):
        return "{" + fields.keys.sorted().map { jsonString($0) + ":" + jsonText(fields[$0]!) }
            .joined(separator: ",") + "}"
    }
}

/// Reads a lease value written by any flannel version (extra fields ignored).
private func decodeLeaseValue(_ text: String, key: String) throws -> LeaseAttributes {
    let raw: LeaseValueJSON
    do {
        raw = try JSONDecoder().decode(LeaseValueJSON.self, from: Data(text.utf8))
    } catch {
        throw LeaseStoreError.corrupt(key: key, reason: "lease value is not flannel's lease JSON: \(text)")
    }
    guard let publicIP = IPv4Address(raw.PublicIP) else {
        throw LeaseStoreError.corrupt(key: key, reason: "PublicIP \"\(raw.PublicIP)\" is not an IPv4 address")
    }
    let type = raw.BackendType.flatMap { $0.isEmpty ? nil : $0 }
    let data: JSONValue?
    switch raw.BackendData?.value {
    case nil, .null?: data = nil
    case let value?: data = value
    }
    return LeaseAttributes(publicIP: publicIP, publicIPv6: raw.PublicIPv6, backendType: type, backendData: data)
}

// swiftlint:disable identifier_name
private struct LeaseValueJSON: Decodable {
    var PublicIP: String
    var PublicIPv6: String?
    var BackendType: String?
    var BackendData: AnyJSON?
}

/// Any JSON value, decoded without relying on JSONValue's own Codable form.
private struct AnyJSON: Decodable {
    var value: JSONValue

    private struct Key: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }

    init(from decoder: any Decoder) throws {
        if let object = try? decoder.container(keyedBy: Key.self) {
            var fields: [String: JSONValue] = [:]
            for key in object.allKeys { fields[key.stringValue] = try object.decode(AnyJSON.self, forKey: key).value }
            value = .object(fields)
        } else if var array = try? decoder.unkeyedContainer() {
            var items: [JSONValue] = []
            while !array.isAtEnd { items.append(try array.decode(AnyJSON.self).value) }
            value = .array(items)
        } else {
            let single = try decoder.singleValueContainer()
            if single.decodeNil() {
                value = .null
            } else if let b = try? single.decode(Bool.self) {
                value = .bool(b)
            } else if let n = try? single.decode(Double.self) {
                value = .number(n)
            } else {
                value = .string(try single.decode(String.self))
            }
        }
    }
}
