import Dispatch
import FlannelFiles
import Foundation
import Logging
import NetBase
import Synchronization

/// The changes one locked operation makes, with the revisions they take.
final class Transaction {
    unowned let store: LocalLeaseStore
    let original: StoreState
    var state: StoreState
    let now: Timestamp
    private(set) var changes: [StoreChange] = []
    private(set) var expired: Set<IPv4Network> = []
    private var scanned = false

    init(store: LocalLeaseStore, state: StoreState, now: Timestamp) {
        self.store = store
        self.original = state
        self.state = state
        self.now = now
    }

    struct Scan {
        var leases: [StoredLease] = []
        var skipped: [LeaseStoreError] = []
        /// Subnets named by entries that could not be read.
        var occupied: [IPv4Network] = []
        /// The file names of those entries.
        var unreadableKeys: [String] = []
        /// Files in subnets/ whose names are no lease keys.
        var malformedKeys: [String] = []
    }

    /// Reads every lease file, deleting expired leases and stale temporary
    /// files (no writer is active while we hold the lock), and recomputes
    /// the earliest expiration.
    func scan() throws -> Scan {
        var result = Scan()
        let directory = store.subnetsPath
        for name in try FileIO.list(directory).sorted() {
            let path = directory + "/" + name
            if name.hasPrefix(".") {
                if name.contains(".tmp-") { _ = try? FileIO.remove(path) }
                continue
            }
            guard let subnet = LeaseKey.subnet(fromKey: name) else {
                // Not a lease: the readers ignore and report it (`LeaseRule`).
                result.malformedKeys.append(name)
                continue
            }
            let stored: StoredLease
            do {
                guard let bytes = try FileIO.read(path) else { continue }
                stored = try StoredLease(record: bytes, key: name, subnet: subnet, path: path)
            } catch {
                let problem: LeaseStoreError
                switch error {
                case let e as LeaseStoreError:
                    if case .corrupt(let key, let reason) = e {
                        problem = .corrupt(
                            key: key,
                            reason: reason
                                + "; the subnet stays taken until you fix or delete the file"
                        )
                    } else {
                        problem = e
                    }
                case let e as FileError: problem = e.asStoreError
                default: problem = .io(path: path, reason: "\(error)")
                }
                result.skipped.append(problem)
                result.occupied.append(subnet)
                result.unreadableKeys.append(name)
                store.reportOnce(problem, path: path)
                continue
            }
            if let expiration = stored.expiration, expiration <= now {
                expired.insert(subnet)
                delete(key: name, subnet: subnet)
                continue
            }
            result.leases.append(stored)
        }
        result.leases.sort { $0.subnet.address < $1.subnet.address }
        state.nextExpiry = result.leases.compactMap(\.expiration).min()
        scanned = true
        return result
    }

    /// Scans (and so expires) if the earliest expiration has passed.
    func expireIfDue() throws {
        if !scanned, let due = state.nextExpiry, due <= now { _ = try scan() }
    }

    /// The key holding `subnet`: its plain key, or a dual-stack key with that
    /// IPv4 part; changes made earlier in this transaction count. nil if none.
    func findKey(_ subnet: IPv4Network) throws -> String? {
        let plain = subnet.leaseKey
        if let change = changes.last(where: { $0.key == plain }) {
            if case .put = change { return plain }
        } else if FileIO.exists(store.subnetsPath + "/" + plain) {
            return plain
        }
        let deleted = Set(
            changes.compactMap { c -> String? in
                if case .delete(let key, _, _) = c { return key } else { return nil }
            }
        )
        return try FileIO.list(store.subnetsPath)
            .filter { $0.hasPrefix(plain + "&") && !deleted.contains($0) }.sorted().first
    }

    /// Whether `key` is taken, counting this transaction's changes.
    func isTaken(_ key: String) -> Bool {
        if let change = changes.last(where: { $0.key == key }) {
            if case .put = change { return true } else { return false }
        }
        return FileIO.exists(store.subnetsPath + "/" + key)
    }

    /// The entry of `lease` as this transaction sees it: by its IPv4 subnet
    /// (`read(_:)`), or in an IPv6-only network, where every key's IPv4
    /// part is 0.0.0.0-0, by its key. nil if none.
    func read(_ lease: Lease) throws -> StoredLease? {
        guard lease.subnet.isNoIPv4 else { return try read(lease.subnet) }
        guard isTaken(lease.key) else { return nil }
        return try read(key: lease.key, subnet: lease.subnet)
    }

    /// The lease for `subnet` as this transaction sees it; nil if none.
    func read(_ subnet: IPv4Network) throws -> StoredLease? {
        guard let key = try findKey(subnet) else { return nil }
        return try read(key: key, subnet: subnet)
    }

    private func read(key: String, subnet: IPv4Network) throws -> StoredLease? {
        if case .put(let stored)? = changes.last(where: { $0.key == key }) { return stored }
        let path = store.subnetsPath + "/" + key
        guard let bytes = try FileIO.read(path) else { return nil }
        return try StoredLease(record: bytes, key: key, subnet: subnet, path: path)
    }

    @discardableResult
    func put(key: String, subnet: IPv4Network, attributes: LeaseAttributes, expiration: Timestamp?) -> StoredLease {
        state.revision += 1
        let stored = StoredLease(
            key: key,
            subnet: subnet,
            attributes: attributes,
            expiration: expiration,
            revision: state.revision
        )
        changes.append(.put(stored))
        if let expiration {
            // Never later than the truth: an early value only costs a scan.
            state.nextExpiry = min(state.nextExpiry ?? expiration, expiration)
        }
        return stored
    }

    func delete(key: String, subnet: IPv4Network) {
        state.revision += 1
        changes.append(.delete(key: key, subnet: subnet, revision: state.revision))
    }
}
