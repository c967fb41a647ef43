import Foundation

/// TLS settings for talking to etcd, as flanneld's `-etcd-cafile`,
/// `-etcd-certfile` and `-etcd-keyfile` give them (PEM files).
public struct EtcdTLS: Sendable, Equatable {
    /// CA bundle that signs the servers' certificates; nil uses the system's roots.
    public var caFile: String?
    /// Client certificate (mutual TLS); must come with `keyFile`.
    public var certFile: String?
    /// Private key of `certFile`.
    public var keyFile: String?

    public init(caFile: String? = nil, certFile: String? = nil, keyFile: String? = nil) {
        self.caFile = caFile
        self.certFile = certFile
        self.keyFile = keyFile
    }
}

/// An etcd user name and password (flanneld's `-etcd-username`, `-etcd-password`).
public struct EtcdCredentials: Sendable, Equatable {
    public var username: String
    public var password: String

    public init(username: String, password: String) {
        self.username = username
        self.password = password
    }
}

/// One key as stored in etcd.
public struct EtcdKeyValue: Sendable, Equatable, CustomStringConvertible {
    public var key: String
    public var value: [UInt8]
    /// Revision at which the key was (last) created.
    public var createRevision: Int64
    /// Revision of the last change to the key.
    public var modRevision: Int64
    /// Changes since creation (1 after the first put).
    public var version: Int64
    /// etcd lease the key is attached to; 0 for none (the key never expires).
    public var lease: Int64

    public init(
        key: String,
        value: [UInt8],
        createRevision: Int64,
        modRevision: Int64,
        version: Int64,
        lease: Int64
    ) {
        self.key = key
        self.value = value
        self.createRevision = createRevision
        self.modRevision = modRevision
        self.version = version
        self.lease = lease
    }

    /// The value as UTF-8 text (invalid sequences replaced).
    public var valueString: String { String(decoding: value, as: UTF8.self) }

    public var description: String {
        "\(key)=\(valueString) (rev \(modRevision)" + (lease != 0 ? ", lease \(String(lease, radix: 16)))" : ")")
    }
}

/// The keys a range read found, and the store revision it was read at.
public struct EtcdRangeResult: Sendable, Equatable {
    public var kvs: [EtcdKeyValue]
    /// The store revision the read saw (the response header's revision).
    public var revision: Int64

    public init(kvs: [EtcdKeyValue], revision: Int64) {
        self.kvs = kvs
        self.revision = revision
    }
}

/// What a create-if-absent transaction did.
public enum EtcdCreateResult: Sendable, Equatable {
    /// The key did not exist and now holds the value; `revision` is the put's revision.
    case created(revision: Int64)
    /// The key already existed; this is what it holds (nothing was written).
    case exists(EtcdKeyValue)
}

/// What a compare-and-put transaction did.
public enum EtcdSwapResult: Sendable, Equatable {
    /// The key was unchanged and now holds the new value.
    case written(revision: Int64)
    /// The key had changed (or been deleted: `current` is nil); nothing was written.
    case changed(current: EtcdKeyValue?)
}

/// A granted etcd lease.
public struct EtcdLease: Sendable, Equatable {
    public var id: Int64
    /// Time to live the server granted, in seconds.
    public var ttl: Int64

    public init(id: Int64, ttl: Int64) {
        self.id = id
        self.ttl = ttl
    }
}

/// What the server knows about a lease that still exists.
public struct EtcdLeaseInfo: Sendable, Equatable {
    public var id: Int64
    /// Seconds left before the lease expires.
    public var remainingTTL: Int64
    /// The TTL the lease was granted (or last kept alive) with.
    public var grantedTTL: Int64
    /// Keys attached to the lease.
    public var keys: [String]

    public init(id: Int64, remainingTTL: Int64, grantedTTL: Int64, keys: [String]) {
        self.id = id
        self.remainingTTL = remainingTTL
        self.grantedTTL = grantedTTL
        self.keys = keys
    }
}

/// One change seen by a watch.
public struct EtcdWatchEvent: Sendable, Equatable {
    public enum Kind: Sendable, Equatable {
        case put
        /// A delete, including a key removed because its lease expired or was revoked.
        case delete
    }

    public var kind: Kind
    /// For a put, the key after the change. For a delete, only `key` and
    /// `modRevision` (the delete's revision) are meaningful.
    public var kv: EtcdKeyValue
    /// The key before the change, when the watch asked for it.
    public var previous: EtcdKeyValue?

    public init(kind: Kind, kv: EtcdKeyValue, previous: EtcdKeyValue?) {
        self.kind = kind
        self.kv = kv
        self.previous = previous
    }

    /// The revision of this change.
    public var revision: Int64 { kv.modRevision }
}

/// The events of one watch response, in revision order.
public struct EtcdWatchBatch: Sendable, Equatable {
    public var events: [EtcdWatchEvent]
    /// The store revision when the server sent the batch (≥ every event's revision).
    public var headerRevision: Int64

    public init(events: [EtcdWatchEvent], headerRevision: Int64) {
        self.events = events
        self.headerRevision = headerRevision
    }
}

/// A failed etcd operation: what was attempted, against which endpoints, why
/// it failed and — where there is one — what to do about it.
public struct EtcdError: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Code: Sendable, Equatable {
        /// No endpoint could be reached (or the cluster has no leader).
        case unavailable
        /// The operation did not finish within the request timeout.
        case timedOut
        /// Wrong user name or password, or the server refused the token.
        case authenticationFailed
        /// The user may not do this (etcd role permissions).
        case permissionDenied
        /// The etcd lease does not exist (expired or revoked).
        case leaseNotFound
        /// The requested revision was compacted away; `oldestRevision` is the
        /// oldest the server still keeps. A watch ends with this error: list
        /// again, then watch from the listed revision + 1.
        case compacted(oldestRevision: Int64)
        /// The server ended a watch for a reason other than compaction.
        case watchCanceled
        /// The request is not valid (bad key, TTL, revision in the future…).
        case invalidRequest
        /// The client was closed.
        case closed
        /// Bad endpoint URL or TLS files: a configuration mistake.
        case configuration
        /// The server answered something this client cannot interpret.
        case protocolViolation
        /// An answer was larger than the client's receive limit.
        case responseTooLarge
        /// Anything else gRPC reported.
        case other
    }

    public var code: Code
    /// What was attempted, e.g. "Range /docker/network/config".
    public var operation: String
    /// The endpoints the client was using.
    public var endpoints: [String]
    /// Why it failed, in the server's or the transport's words.
    public var reason: String
    public var hint: String?

    public init(_ code: Code, operation: String, endpoints: [String], reason: String, hint: String? = nil) {
        self.code = code
        self.operation = operation
        self.endpoints = endpoints
        self.reason = reason
        self.hint = hint ?? EtcdError.notEtcdHint(code, reason) ?? EtcdError.defaultHint(for: code)
    }

    /// Something accepted the connection but did not speak gRPC over HTTP/2:
    /// another service, etcd's peer port, or https spoken to an http port.
    static func notEtcdHint(_ code: Code, _ reason: String) -> String? {
        guard code == .unavailable || code == .protocolViolation || code == .other else { return nil }
        let signs = [
            "connection preface", "UnableToParseFrame", "BadClientMagic", "not an HTTP/2", "WRONG_VERSION_NUMBER",
        ]
        guard signs.contains(where: { reason.contains($0) }) else { return nil }
        return
            "something answers at that address, but not etcd's client API (gRPC over HTTP/2): check that -etcd-endpoints names etcd's client URL (usually port 2379, not the peer port 2380) with the right scheme, http or https"
    }

    public var description: String {
        var text = "etcd \(operation)"
        if !endpoints.isEmpty { text += " at \(endpoints.joined(separator: ", "))" }
        text += " failed: \(reason)"
        if let hint { text += " (\(hint))" }
        return text
    }

    static func defaultHint(for code: Code) -> String? {
        switch code {
        case .unavailable: "is etcd running and reachable?"
        case .timedOut: "is etcd overloaded or partitioned? check its health with `etcdctl endpoint health`"
        case .authenticationFailed: "check --etcd-username and --etcd-password"
        case .permissionDenied: "grant the etcd user read/write on the prefix (etcdctl role grant-permission)"
        case .compacted: "list again and watch from the listed revision + 1"
        case .responseTooLarge:
            "a single key's value is larger than the receive limit; is that key really etcd data of this network?"
        case .configuration, .closed, .leaseNotFound, .watchCanceled, .invalidRequest,
            .protocolViolation, .other:
            nil
        }
    }
}
