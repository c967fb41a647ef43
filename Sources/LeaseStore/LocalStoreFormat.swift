import FlannelFiles
import NetBase

// The on-disk formats of LocalLeaseStore (documented in LocalLeaseStore.swift).

/// One lease as the local store keeps it.
struct StoredLease: Equatable, Sendable {
    /// The file name under subnets/ (flannel's key, "10.2.72.0-24").
    var key: String
    var subnet: IPv4Network
    var attributes: LeaseAttributes
    /// nil: a reservation.
    var expiration: Timestamp?
    var revision: Int64

    var lease: Lease {
        Lease(subnet: subnet, attributes: attributes, expiration: expiration?.date, revision: revision, key: key)
    }

    /// `{"Revision":7,"Expiration":"…","Value":<flannel's lease value>}`;
    /// no Expiration for a reservation. The lease value is flannel's bytes.
    var recordJSON: String {
        var out = "{\"Revision\":\(revision)"
        if let expiration { out += ",\"Expiration\":\"\(expiration)\"" }
        out += ",\"Value\":" + attributes.flannelJSON + "}"
        return out
    }

    /// Reads a record file. Besides the record form, a bare flannel lease
    /// value (`{"PublicIP":…}`) is accepted as a reservation at revision 0,
    /// so that an operator can reserve a subnet by writing the same value
    /// they would `etcdctl put`.
    init(record bytes: [UInt8], key: String, subnet: IPv4Network, path: String) throws(LeaseStoreError) {
        let root: JSONValue
        do {
            root = try JSONValue(parsing: bytes)
        } catch {
            throw .corrupt(key: path, reason: "not JSON (\(error))")
        }
        guard case .object(let fields) = root else {
            throw .corrupt(key: path, reason: "contains \(root.kindName), not a lease record object")
        }
        self.key = key
        self.subnet = subnet
        if fields["Value"] == nil {
            attributes = try LeaseAttributes(flannelValue: root, key: path)
            expiration = nil
            revision = 0
            return
        }
        attributes = try LeaseAttributes(flannelValue: fields["Value"]!, key: path)
        revision = try Self.revision(fields["Revision"], path: path) ?? 0
        expiration = try Self.expiration(fields["Expiration"], path: path)
    }

    init(key: String, subnet: IPv4Network, attributes: LeaseAttributes, expiration: Timestamp?, revision: Int64) {
        self.key = key
        self.subnet = subnet
        self.attributes = attributes
        self.expiration = expiration
        self.revision = revision
    }

    static func revision(_ value: JSONValue?, path: String) throws(LeaseStoreError) -> Int64? {
        guard let value = NetworkConfig.present(value) else { return nil }
        guard case .number(let n) = value, n >= 0, n == n.rounded(), n < 9e15 else {
            throw .corrupt(key: path, reason: "Revision \(value.compactText) is not a whole number ≥ 0")
        }
        return Int64(n)
    }

    static func expiration(_ value: JSONValue?, path: String) throws(LeaseStoreError) -> Timestamp? {
        guard let value = NetworkConfig.present(value) else { return nil }
        guard case .string(let text) = value, let t = Timestamp(rfc3339: text) else {
            throw .corrupt(
                key: path,
                reason: "Expiration \(value.compactText) is not a UTC time "
                    + "such as \"2026-03-01T12:00:00.000Z\""
            )
        }
        return t
    }
}

/// One change, as logged in events.log and in the pending journal.
enum StoreChange: Equatable, Sendable {
    case put(StoredLease)
    case delete(key: String, subnet: IPv4Network, revision: Int64)

    var key: String {
        switch self {
        case .put(let stored): stored.key
        case .delete(let key, _, _): key
        }
    }

    var revision: Int64 {
        switch self {
        case .put(let stored): stored.revision
        case .delete(_, _, let revision): revision
        }
    }

    var event: LeaseEvent {
        switch self {
        case .put(let stored): .put(stored.lease)
        case .delete(let key, let subnet, let revision): .delete(subnet: subnet, revision: revision, key: key)
        }
    }

    /// One line: `{"Revision":8,"Type":"PUT","Key":"10.2.72.0-24","Expiration":"…","Value":{…}}`
    /// or `{"Revision":9,"Type":"DELETE","Key":"10.2.72.0-24"}`.
    var line: String {
        switch self {
        case .put(let stored):
            var out = "{\"Revision\":\(stored.revision),\"Type\":\"PUT\",\"Key\":"
            JSONValue.writeString(stored.key, to: &out)
            if let expiration = stored.expiration { out += ",\"Expiration\":\"\(expiration)\"" }
            out += ",\"Value\":" + stored.attributes.flannelJSON + "}\n"
            return out
        case .delete(let key, _, let revision):
            var out = "{\"Revision\":\(revision),\"Type\":\"DELETE\",\"Key\":"
            JSONValue.writeString(key, to: &out)
            return out + "}\n"
        }
    }

    init(line: some Collection<UInt8>, path: String) throws(LeaseStoreError) {
        let root: JSONValue
        do {
            root = try JSONValue(parsing: Array(line))
        } catch {
            throw .corrupt(key: path, reason: "event line is not JSON (\(error))")
        }
        guard case .object(let fields) = root,
            case .string(let type)? = fields["Type"],
            case .string(let key)? = fields["Key"],
            let subnet = LeaseKey.subnet(fromKey: key),
            let revision = try StoredLease.revision(fields["Revision"], path: path)
        else {
            throw .corrupt(key: path, reason: "event line lacks Revision, Type or a lease Key")
        }
        switch type {
        case "PUT":
            guard let value = fields["Value"] else {
                throw .corrupt(key: path, reason: "PUT event \(revision) has no Value")
            }
            self = .put(
                StoredLease(
                    key: key,
                    subnet: subnet,
                    attributes: try LeaseAttributes(flannelValue: value, key: path),
                    expiration: try StoredLease.expiration(fields["Expiration"], path: path),
                    revision: revision
                )
            )
        case "DELETE":
            self = .delete(key: key, subnet: subnet, revision: revision)
        default:
            throw .corrupt(key: path, reason: "event \(revision) has unknown Type \"\(type)\"")
        }
    }

    /// The readable changes of a log (or journal), in file order. Unreadable
    /// lines (a torn append, an edit) are left out; readers notice the hole
    /// because revisions are consecutive.
    static func parseLog(_ bytes: [UInt8], path: String) -> [StoreChange] {
        var changes: [StoreChange] = []
        for line in bytes.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: true) {
            if let change = try? StoreChange(line: line, path: path) { changes.append(change) }
        }
        return changes
    }
}

/// The small file `<dir>/revision` that readers poll:
/// ```
/// revision 42
/// oldest 1
/// next-expiry 2026-03-01T12:00:00.250Z
/// ```
/// `oldest` is the first revision still in events.log; `next-expiry` is no
/// later than the earliest lease expiration (absent: no lease expires).
struct StoreState: Equatable, Sendable {
    var revision: Int64 = 0
    var oldest: Int64 = 1
    var nextExpiry: Timestamp?

    var text: String {
        var out = "revision \(revision)\noldest \(oldest)\n"
        if let nextExpiry { out += "next-expiry \(nextExpiry)\n" }
        return out
    }

    init(revision: Int64 = 0, oldest: Int64 = 1, nextExpiry: Timestamp? = nil) {
        self.revision = revision
        self.oldest = oldest
        self.nextExpiry = nextExpiry
    }

    init(parsing bytes: [UInt8], path: String) throws(LeaseStoreError) {
        var sawRevision = false
        for line in String(decoding: bytes, as: UTF8.self).split(whereSeparator: \.isNewline) {
            let parts = line.split(separator: " ", maxSplits: 1)
            guard parts.count == 2 else { continue }
            switch parts[0] {
            case "revision":
                guard let v = Int64(parts[1]), v >= 0 else { break }
                revision = v
                sawRevision = true
            case "oldest":
                if let v = Int64(parts[1]), v >= 1 { oldest = v }
            case "next-expiry":
                // Unreadable: scan at once, which also rewrites it.
                nextExpiry = Timestamp(rfc3339: String(parts[1])) ?? Timestamp(milliseconds: 0)
            default:
                continue
            }
        }
        guard sawRevision else {
            throw .io(
                path: path,
                reason: "has no line \"revision N\": delete the file and "
                    + "tunneld recovers the revision from events.log and the lease files"
            )
        }
    }
}
