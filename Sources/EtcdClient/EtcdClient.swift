import CoreMetrics
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import GRPCProtobuf
import Logging
import Synchronization

/// A client for the parts of etcd's v3 API that tunneld uses, over gRPC.
///
/// One HTTP/2 channel spans all endpoints with round-robin balancing, so a
/// dead endpoint is skipped (gRPC's pick-first would stick to the first one).
/// With credentials, the client authenticates on first use and again when
/// the server rejects its token (etcd's simple tokens expire).
///
/// The connections run in a task started by `init`; call `close()` when done.
/// Every operation throws `EtcdError`.
public final class EtcdClient: Sendable {
    typealias Transport = HTTP2ClientTransport.Posix

    /// The endpoints as given, for messages.
    public let endpoints: [String]
    /// Timeout of each unary request (and of one keep-alive round trip).
    public let requestTimeout: Duration
    /// The largest response message accepted, in bytes.
    public let maxReceiveMessageBytes: Int
    /// How often a connection with calls open is checked (a gRPC keepalive
    /// ping; a watch also asks for a progress report), and how long the
    /// answer may take before the member counts as gone.
    public let keepaliveTime: Duration
    public let keepaliveTimeout: Duration

    /// A member that vanishes without a FIN (power lost, link cut) is left
    /// within `time + timeout`: ~5 s. etcd's default --grpc-keepalive-min-time
    /// is 5 s, but grpc-go counts a ping as abuse only when the server sent
    /// nothing since the previous one, and the watch's progress reports
    /// (every `time`) are data; connections without a watch ping only while
    /// a call is open.
    public static let defaultKeepaliveTime = Duration.seconds(2)
    public static let defaultKeepaliveTimeout = Duration.seconds(3)

    /// gRPC's usual 4 MiB is too little for a large etcd answer (etcd's own
    /// Go client accepts up to 2 GiB); range reads are paged anyway, so
    /// this only bounds what one page or one watch message may hold.
    public static let defaultMaxReceiveMessageBytes = 64 << 20
    /// Keys per page of a range read: flannel lease keys and values are a
    /// few hundred bytes, so a page is a few hundred KiB.
    public static let defaultPageSize = 1000

    private let grpc: GRPCClient<Transport>
    /// A transport like `grpc`'s, for the connections of one watch attempt.
    private let makeTransport: @Sendable () throws -> Transport
    private let kv: Etcdserverpb_KV.Client<Transport>
    private let leaseService: Etcdserverpb_Lease.Client<Transport>
    private let auth: Etcdserverpb_Auth.Client<Transport>
    private let credentials: EtcdCredentials?
    private let state: Mutex<State>
    private let connections: Task<Void, Never>
    /// Watch streams re-established after a broken connection, and requests
    /// repeated while no endpoint answered (swift-metrics; the daemon exports them).
    private let watchReconnects: CoreMetrics.Counter
    private let requestRetries: CoreMetrics.Counter
    private let logger: Logger
    /// The endpoints and TLS files, for `TLSDiagnosis`.
    private let parsedEndpoints: [EtcdEndpoint]
    private let tls: EtcdTLS?
    /// The last diagnosis and when it was made: a client retrying every
    /// second connects to look at most every 10 s.
    private let diagnosis = Mutex<(at: ContinuousClock.Instant, text: String?)?>(nil)

    private struct State {
        var token: String?
        var closed = false
        var watches: [Int: Task<Void, Never>] = [:]
        var nextWatch = 0
    }

    /// Connects (lazily) to etcd.
    ///
    /// - Parameters:
    ///   - endpoints: `http://host:port` or `https://host:port` URLs, or `host:port`
    ///     (then https when `tls` is given, else http). All must use the same scheme.
    ///   - tls: CA, client certificate and key files. Used for https endpoints.
    ///   - credentials: user name and password when etcd has auth enabled.
    ///   - requestTimeout: limit for each request.
    ///   - maxReceiveMessageBytes: the largest response message accepted.
    ///   - keepaliveTime, keepaliveTimeout: how often a connection in use is
    ///     checked and how long its answer may take (see `defaultKeepaliveTime`).
    public init(endpoints: [String], tls: EtcdTLS? = nil, credentials: EtcdCredentials? = nil,
                requestTimeout: Duration = .seconds(10),
                maxReceiveMessageBytes: Int = EtcdClient.defaultMaxReceiveMessageBytes,
                keepaliveTime: Duration = EtcdClient.defaultKeepaliveTime,
                keepaliveTimeout: Duration = EtcdClient.defaultKeepaliveTimeout,
                logger: Logger = Logger(label: "tunneld.etcd")) throws(EtcdError) {
        guard keepaliveTime >= .milliseconds(100), keepaliveTimeout >= .milliseconds(100) else {
            throw EtcdError(.configuration, operation: "connect", endpoints: endpoints,
                            reason: "keepalive time \(keepaliveTime) and timeout \(keepaliveTimeout) must be at least 0.1 s",
                            hint: "give --etcd-keepalive-time and --etcd-keepalive-timeout in seconds, e.g. 2 and 3")
        }
        let nonEmpty = endpoints.filter { !$0.trimmingCharacters(in: .whitespaces).isEmpty }
        guard !nonEmpty.isEmpty else {
            throw EtcdError(.configuration, operation: "connect", endpoints: [], reason: "no endpoints given",
                            hint: "give at least one, e.g. http://127.0.0.1:2379")
        }
        var parsed: [EtcdEndpoint] = []
        for text in nonEmpty { parsed.append(try EtcdEndpoint.parse(text, defaultSecure: tls != nil)) }
        self.endpoints = nonEmpty
        guard Set(parsed.map(\.secure)).count == 1 else {
            throw EtcdError(.configuration, operation: "connect", endpoints: nonEmpty,
                            reason: "endpoints mix http:// and https://",
                            hint: "use https:// for every endpoint of a TLS cluster, http:// otherwise")
        }
        let security: Transport.TransportSecurity =
            parsed[0].secure ? .tls(try Self.tlsConfig(tls ?? EtcdTLS(), endpoints: nonEmpty)) : .plaintext

        var config = Transport.Config.defaults
        // A member gone without a FIN is noticed by the ping's missing
        // answer, and its connection closed: the round robin then sends
        // nothing more its way. No pings without an open stream: etcd
        // refuses those (GOAWAY too_many_pings). grpc-swift-nio-transport
        // (2.9) stops a connection's pings for good once all its streams
        // have closed, which is why each watch gets connections of its own
        // (`makeWatchClient`).
        config.connection.keepalive = .init(time: keepaliveTime, timeout: keepaliveTimeout,
                                            allowWithoutCalls: false)
        config.backoff = .init(initial: .milliseconds(200), max: .seconds(5), multiplier: 1.6, jitter: 0.2)
        let target = EtcdEndpointsTarget(endpoints: parsed)
        let makeTransport: @Sendable () throws -> Transport = { [config] in
            var registry = NameResolverRegistry()
            registry.registerFactory(EtcdEndpointsResolverFactory())
            return try Transport(
                target: target,
                transportSecurity: security,
                config: config,
                resolverRegistry: registry,
                serviceConfig: ServiceConfig(loadBalancingConfig: [.roundRobin]))
        }
        let transport: Transport
        do {
            transport = try makeTransport()
        } catch {
            throw EtcdError(.configuration, operation: "connect", endpoints: nonEmpty,
                            reason: "cannot set up the gRPC transport: \(Self.describe(error))",
                            hint: tls != nil ? "check the TLS certificate and key files" : nil)
        }
        let grpc = GRPCClient(transport: transport)
        self.grpc = grpc
        self.makeTransport = makeTransport
        self.kv = Etcdserverpb_KV.Client(wrapping: grpc)
        self.leaseService = Etcdserverpb_Lease.Client(wrapping: grpc)
        self.auth = Etcdserverpb_Auth.Client(wrapping: grpc)
        self.credentials = credentials
        self.requestTimeout = requestTimeout
        self.maxReceiveMessageBytes = max(1024, maxReceiveMessageBytes)
        self.keepaliveTime = keepaliveTime
        self.logger = logger
        self.parsedEndpoints = parsed
        self.tls = tls
        self.keepaliveTimeout = keepaliveTimeout
        self.state = Mutex(State())
        self.watchReconnects = CoreMetrics.Counter(label: "tunneld_store_watch_reconnects_total")
        self.requestRetries = CoreMetrics.Counter(label: "tunneld_store_request_retries_total")
        // runConnections returns after beginGracefulShutdown once in-flight
        // RPCs are done; errors here resurface on the RPCs themselves.
        self.connections = Task { try? await grpc.runConnections() }
    }

    deinit {
        grpc.beginGracefulShutdown()
        connections.cancel()
    }

    /// Ends every watch, lets in-flight requests finish (at most a few
    /// seconds), and closes the connections. Later calls fail with `.closed`.
    public func close() async {
        let watches = state.withLock { state -> [Task<Void, Never>] in
            state.closed = true
            defer { state.watches = [:] }
            return Array(state.watches.values)
        }
        for watch in watches { watch.cancel() }
        grpc.beginGracefulShutdown()
        let connections = self.connections
        // Bounded wait: after 5 s, cut whatever is still running.
        let deadline = Task {
            try? await Task.sleep(for: .seconds(5))
            connections.cancel()
        }
        await connections.value
        deadline.cancel()
    }

    private static func tlsConfig(_ tls: EtcdTLS, endpoints: [String]) throws(EtcdError)
        -> Transport.TransportSecurity.TLS
    {
        func check(_ path: String?, _ what: String) throws(EtcdError) {
            guard let path else { return }
            guard FileManager.default.isReadableFile(atPath: path) else {
                throw EtcdError(.configuration, operation: "connect", endpoints: endpoints,
                                reason: "cannot read the \(what) file \(path)",
                                hint: "check the path and its permissions")
            }
        }
        try check(tls.caFile, "CA")
        try check(tls.certFile, "client certificate")
        try check(tls.keyFile, "client key")
        guard (tls.certFile == nil) == (tls.keyFile == nil) else {
            throw EtcdError(.configuration, operation: "connect", endpoints: endpoints,
                            reason: "a client certificate needs its key and a key needs its certificate",
                            hint: "give both --etcd-certfile and --etcd-keyfile, or neither")
        }
        return .init(
            certificateChain: tls.certFile.map { [.file(path: $0, format: .pem)] } ?? [],
            privateKey: tls.keyFile.map { .file(path: $0, format: .pem) },
            serverCertificateVerification: .fullVerification,
            trustRoots: tls.caFile.map { .certificates([.file(path: $0, format: .pem)]) } ?? .systemDefault)
    }

    // MARK: - KV

    /// Reads one key; nil if it does not exist.
    public func get(_ key: String) async throws(EtcdError) -> EtcdKeyValue? {
        try await range(key: key).kvs.first
    }

    /// Reads one key, with the revision the read saw.
    public func range(key: String, revision: Int64 = 0) async throws(EtcdError) -> EtcdRangeResult {
        var request = Etcdserverpb_RangeRequest()
        request.key = Data(key.utf8)
        request.revision = revision
        return try await range(request, operation: "Range \(key)")
    }

    /// Reads every key starting with `prefix`, in key order, at one
    /// revision: `revision`, or (0) the newest when the read began.
    ///
    /// The keys are read in pages of at most `pageSize` keys, every page at
    /// the first page's revision (as etcd's own clients page: `limit`, the
    /// next page starting after the last key returned), so no answer has to
    /// hold the whole range and the result is one consistent snapshot even
    /// while keys change; watch from `revision + 1` to follow it. A page too
    /// large for `maxReceiveMessageBytes` is asked for again with half as
    /// many keys. If the snapshot's revision is compacted before the last
    /// page (the listing took longer than etcd keeps history), a read of the
    /// newest revision starts again (at most 3 times); with an explicit
    /// `revision` that fails with `.compacted`.
    public func range(prefix: String, revision: Int64 = 0, pageSize: Int = EtcdClient.defaultPageSize)
        async throws(EtcdError) -> EtcdRangeResult
    {
        var restarts = 0
        while true {
            do {
                return try await pagedRange(prefix: prefix, revision: revision, pageSize: pageSize)
            } catch {
                guard case .compacted = error.code, revision == 0, restarts < 3 else { throw error }
                restarts += 1
            }
        }
    }

    private func pagedRange(prefix: String, revision: Int64, pageSize: Int) async throws(EtcdError)
        -> EtcdRangeResult
    {
        let end = Self.prefixEnd(prefix)
        var kvs: [EtcdKeyValue] = []
        var snapshot = revision
        var start = Data(prefix.utf8)
        var limit = max(1, pageSize)
        var pages = 0
        while true {
            var request = Etcdserverpb_RangeRequest()
            request.key = start
            request.rangeEnd = end
            request.revision = snapshot
            request.limit = Int64(limit)
            // No sort order: etcd returns keys in ascending order anyway, and
            // any sort makes it read the whole range for every page.
            let response: Etcdserverpb_RangeResponse
            do {
                response = try await perform("Range \(prefix)* page \(pages + 1)") { [request] metadata, options in
                    try await self.kv.range(request, metadata: metadata, options: options)
                }
            } catch {
                if error.code == .responseTooLarge && limit > 1 {
                    limit = max(1, limit / 2)
                    continue
                }
                throw error
            }
            pages += 1
            if snapshot == 0 { snapshot = response.header.revision }
            // `count` is the number of keys in the whole range.
            if pages == 1 { kvs.reserveCapacity(Int(clamping: min(response.count, 1 << 20))) }
            for kv in response.kvs { kvs.append(EtcdKeyValue(kv)) }
            guard response.more, let last = response.kvs.last else { break }
            // The smallest key after the last one returned.
            start = last.key + Data([0])
        }
        return EtcdRangeResult(kvs: kvs, revision: snapshot)
    }

    /// The keys of `[key, rangeEnd)` in one request: at most `limit` (0: all)
    /// of them, at `revision` (0: the newest). `more` says whether keys were
    /// left out. For tests and tools that show what one answer holds.
    public func rangePage(key: String, rangeEnd: Data, revision: Int64 = 0, limit: Int64 = 0)
        async throws(EtcdError) -> (result: EtcdRangeResult, more: Bool)
    {
        var request = Etcdserverpb_RangeRequest()
        request.key = Data(key.utf8)
        request.rangeEnd = rangeEnd
        request.revision = revision
        request.limit = limit
        let response = try await perform("Range \(key) limit \(limit)") { [request] metadata, options in
            try await self.kv.range(request, metadata: metadata, options: options)
        }
        return (EtcdRangeResult(kvs: response.kvs.map(EtcdKeyValue.init), revision: response.header.revision),
                response.more)
    }

    /// The end of the range of every key starting with `prefix`.
    public static func rangeEnd(ofPrefix prefix: String) -> Data { prefixEnd(prefix) }

    private func range(_ request: Etcdserverpb_RangeRequest, operation: String) async throws(EtcdError)
        -> EtcdRangeResult
    {
        let response = try await perform(operation) { [request] metadata, options in
            try await self.kv.range(request, metadata: metadata, options: options)
        }
        return EtcdRangeResult(kvs: response.kvs.map(EtcdKeyValue.init), revision: response.header.revision)
    }

    /// Writes a key, attached to `lease` (0: no lease, the key stays until
    /// deleted). Returns the revision of the write.
    @discardableResult
    public func put(_ key: String, value: [UInt8], lease: Int64 = 0) async throws(EtcdError) -> Int64 {
        var request = Etcdserverpb_PutRequest()
        request.key = Data(key.utf8)
        request.value = Data(value)
        request.lease = lease
        let response = try await perform("Put \(key)") { [request] metadata, options in
            try await self.kv.put(request, metadata: metadata, options: options)
        }
        return response.header.revision
    }

    @discardableResult
    public func put(_ key: String, value: String, lease: Int64 = 0) async throws(EtcdError) -> Int64 {
        try await put(key, value: Array(value.utf8), lease: lease)
    }

    /// Writes several keys in one transaction (one revision), each attached
    /// to `lease` (0: none). etcd refuses more operations per transaction
    /// than its `--max-txn-ops` (default 128). Returns the revision.
    @discardableResult
    public func putAll(_ pairs: [(key: String, value: [UInt8])], lease: Int64 = 0) async throws(EtcdError) -> Int64 {
        var request = Etcdserverpb_TxnRequest()
        request.success = pairs.map { pair in
            var put = Etcdserverpb_PutRequest()
            put.key = Data(pair.key.utf8)
            put.value = Data(pair.value)
            put.lease = lease
            return .with { $0.requestPut = put }
        }
        let response = try await perform("Txn put \(pairs.count) keys") { [request] metadata, options in
            try await self.kv.txn(request, metadata: metadata, options: options)
        }
        return response.header.revision
    }

    /// Deletes a key. Returns how many keys were deleted (0 or 1) and the revision.
    @discardableResult
    public func delete(_ key: String) async throws(EtcdError) -> (deleted: Int64, revision: Int64) {
        var request = Etcdserverpb_DeleteRangeRequest()
        request.key = Data(key.utf8)
        let response = try await perform("DeleteRange \(key)") { [request] metadata, options in
            try await self.kv.deleteRange(request, metadata: metadata, options: options)
        }
        return (response.deleted, response.header.revision)
    }

    /// Writes `key` only if it does not exist, in one transaction:
    /// `If(create_revision(key) == 0) Then(Put) Else(Range)`. Of several
    /// clients racing for the same key exactly one gets `.created`; the others
    /// get `.exists` with what the winner wrote.
    public func createIfAbsent(_ key: String, value: [UInt8], lease: Int64 = 0) async throws(EtcdError)
        -> EtcdCreateResult
    {
        var compare = Etcdserverpb_Compare()
        compare.target = .create
        compare.createRevision = 0
        let operation = "Txn create-if-absent \(key)"
        let response = try await putIf(compare, key: key, value: value, lease: lease, operation: operation)
        if response.succeeded { return .created(revision: response.header.revision) }
        guard case .responseRange(let found)? = response.responses.first?.response,
              let existing = found.kvs.first else {
            // The transaction is atomic: a failed compare means the key existed
            // when the Range ran.
            throw EtcdError(.protocolViolation, operation: operation, endpoints: endpoints,
                            reason: "the compare failed but the key was not returned")
        }
        return .exists(EtcdKeyValue(existing))
    }

    /// One transaction: `If(compare == on key) Then(Put key) Else(Range key)`,
    /// so a loser learns at once what the key holds.
    private func putIf(_ compare: Etcdserverpb_Compare, key: String, value: [UInt8], lease: Int64,
                       operation: String) async throws(EtcdError) -> Etcdserverpb_TxnResponse {
        var compare = compare
        compare.key = Data(key.utf8)
        compare.result = .equal
        var put = Etcdserverpb_PutRequest()
        put.key = Data(key.utf8)
        put.value = Data(value)
        put.lease = lease
        var get = Etcdserverpb_RangeRequest()
        get.key = Data(key.utf8)
        var request = Etcdserverpb_TxnRequest()
        request.compare = [compare]
        request.success = [.with { $0.requestPut = put }]
        request.failure = [.with { $0.requestRange = get }]
        return try await perform(operation) { [request] metadata, options in
            try await self.kv.txn(request, metadata: metadata, options: options)
        }
    }

    public func createIfAbsent(_ key: String, value: String, lease: Int64 = 0) async throws(EtcdError)
        -> EtcdCreateResult
    {
        try await createIfAbsent(key, value: Array(value.utf8), lease: lease)
    }

    /// Writes `key` only if it was not changed since `modRevision` (0: only
    /// if it does not exist), in one transaction:
    /// `If(mod_revision(key) == modRevision) Then(Put) Else(Range)`.
    /// Returns `.written` with the put's revision, or `.changed` with the
    /// current value (nil if the key is gone) when someone else got there first.
    public func compareAndPut(_ key: String, value: [UInt8], lease: Int64 = 0, modRevision: Int64)
        async throws(EtcdError) -> EtcdSwapResult
    {
        var compare = Etcdserverpb_Compare()
        compare.target = .mod
        compare.modRevision = modRevision
        let response = try await putIf(compare, key: key, value: value, lease: lease,
                                       operation: "Txn compare-and-put \(key)@\(modRevision)")
        if response.succeeded { return .written(revision: response.header.revision) }
        guard case .responseRange(let found)? = response.responses.first?.response else {
            return .changed(current: nil)
        }
        return .changed(current: found.kvs.first.map(EtcdKeyValue.init))
    }

    /// Deletes `key` only if it was not changed since `modRevision`, in one
    /// transaction: `If(mod_revision(key) == modRevision) Then(DeleteRange) Else(Range)`.
    /// Returns `.written` with the delete's revision, or `.changed` with the
    /// current value (nil if the key is gone) when someone else wrote it meanwhile.
    public func compareAndDelete(_ key: String, modRevision: Int64) async throws(EtcdError) -> EtcdSwapResult {
        var compare = Etcdserverpb_Compare()
        compare.target = .mod
        compare.modRevision = modRevision
        compare.key = Data(key.utf8)
        compare.result = .equal
        var delete = Etcdserverpb_DeleteRangeRequest()
        delete.key = Data(key.utf8)
        var get = Etcdserverpb_RangeRequest()
        get.key = Data(key.utf8)
        var request = Etcdserverpb_TxnRequest()
        request.compare = [compare]
        request.success = [.with { $0.requestDeleteRange = delete }]
        request.failure = [.with { $0.requestRange = get }]
        let response = try await perform("Txn compare-and-delete \(key)@\(modRevision)") { [request] metadata, options in
            try await self.kv.txn(request, metadata: metadata, options: options)
        }
        if response.succeeded { return .written(revision: response.header.revision) }
        guard case .responseRange(let found)? = response.responses.first?.response else {
            return .changed(current: nil)
        }
        return .changed(current: found.kvs.first.map(EtcdKeyValue.init))
    }

    /// The end of the range holding every key that starts with `prefix`:
    /// the prefix with its last byte incremented (trailing 0xff bytes
    /// dropped); "\0" (every key) when nothing is left.
    static func prefixEnd(_ prefix: String) -> Data {
        var bytes = Array(prefix.utf8)
        while let last = bytes.last {
            if last < 0xff {
                bytes[bytes.count - 1] = last + 1
                return Data(bytes)
            }
            bytes.removeLast()
        }
        return Data([0])
    }

    // MARK: - Leases

    /// Grants a lease of `ttl` seconds.
    public func leaseGrant(ttl: Int64) async throws(EtcdError) -> EtcdLease {
        var request = Etcdserverpb_LeaseGrantRequest()
        request.ttl = ttl
        let operation = "LeaseGrant ttl=\(ttl)s"
        let response = try await perform(operation) { [request] metadata, options in
            try await self.leaseService.leaseGrant(request, metadata: metadata, options: options)
        }
        guard response.error.isEmpty else {
            throw EtcdError(.other, operation: operation, endpoints: endpoints, reason: response.error)
        }
        return EtcdLease(id: response.id, ttl: response.ttl)
    }

    /// Revokes a lease: every key attached to it is deleted.
    public func leaseRevoke(_ id: Int64) async throws(EtcdError) {
        var request = Etcdserverpb_LeaseRevokeRequest()
        request.id = id
        _ = try await perform("LeaseRevoke \(Self.hex(id))") { [request] metadata, options in
            try await self.leaseService.leaseRevoke(request, metadata: metadata, options: options)
        }
    }

    /// Renews a lease once over a LeaseKeepAlive stream; returns the new TTL
    /// in seconds. Fails with `.leaseNotFound` if the lease is gone.
    public func leaseKeepAliveOnce(_ id: Int64) async throws(EtcdError) -> Int64 {
        var request = Etcdserverpb_LeaseKeepAliveRequest()
        request.id = id
        let operation = "LeaseKeepAlive \(Self.hex(id))"
        let ttl = try await perform(operation) { [request] metadata, options in
            // Returning from the producer half-closes the stream and etcd then
            // ends LeaseKeepAlive without answering: keep it suspended until
            // the response has arrived.
            let (answered, answer) = AsyncStream<Never>.makeStream()
            return try await self.leaseService.leaseKeepAlive(
                metadata: metadata, options: options,
                requestProducer: { writer in
                    try await writer.write(request)
                    for await _ in answered {}
                },
                onResponse: { response in
                    defer { answer.finish() }
                    for try await message in response.messages where message.id == id {
                        return message.ttl
                    }
                    throw RPCError(code: .unavailable, message: "the server ended the stream without answering")
                })
        }
        guard ttl > 0 else {
            throw EtcdError(.leaseNotFound, operation: operation, endpoints: endpoints,
                            reason: "lease not found (expired or revoked)")
        }
        return ttl
    }

    /// What the server knows about a lease; nil if it has expired or never existed.
    public func leaseTimeToLive(_ id: Int64, keys: Bool = false) async throws(EtcdError) -> EtcdLeaseInfo? {
        var request = Etcdserverpb_LeaseTimeToLiveRequest()
        request.id = id
        request.keys = keys
        let response = try await perform("LeaseTimeToLive \(Self.hex(id))") { [request] metadata, options in
            try await self.leaseService.leaseTimeToLive(request, metadata: metadata, options: options)
        }
        // etcd answers TTL -1 for a lease it does not have.
        guard response.ttl >= 0 else { return nil }
        return EtcdLeaseInfo(id: response.id, remainingTTL: response.ttl, grantedTTL: response.grantedTtl,
                             keys: response.keys.map { String(decoding: $0, as: UTF8.self) })
    }

    static func seconds(_ duration: Duration) -> String {
        let (whole, atto) = duration.components
        return String(format: "%.1f s", Double(whole) + Double(atto) / 1e18)
    }

    static func hex(_ id: Int64) -> String { String(UInt64(bitPattern: id), radix: 16) }

    // MARK: - Watch

    /// Streams every change to keys under `prefix`, starting with revision
    /// `fromRevision` (inclusive; 0 means "changes from now on").
    ///
    /// A broken connection is resumed transparently (from the revision after
    /// the last delivered event) on any endpoint; after a minute without
    /// a working connection the stream ends with `.unavailable`. If the
    /// requested revisions were compacted, the stream ends with
    /// `EtcdError.Code.compacted`. It ends without error when the consumer
    /// stops iterating or the client is closed.
    public func watch(prefix: String, fromRevision: Int64, previousValues: Bool = false)
        -> AsyncThrowingStream<EtcdWatchBatch, any Error>
    {
        let (stream, continuation) = AsyncThrowingStream<EtcdWatchBatch, any Error>.makeStream()
        let id: Int? = state.withLock { state in
            guard !state.closed else { return nil }
            state.nextWatch += 1
            return state.nextWatch
        }
        guard let id else {
            continuation.finish(throwing: EtcdError(.closed, operation: "Watch \(prefix)*", endpoints: endpoints,
                                                    reason: "the client is closed"))
            return stream
        }
        let task = Task {
            await self.runWatch(prefix: prefix, from: fromRevision, previousValues: previousValues,
                                continuation: continuation)
            _ = self.state.withLock { $0.watches.removeValue(forKey: id) }
        }
        state.withLock { state in
            if !task.isCancelled { state.watches[id] = task }
        }
        continuation.onTermination = { _ in task.cancel() }
        return stream
    }

    /// A gRPC client for one watch attempt, closed when the attempt ends.
    private struct WatchClient: Sendable {
        let grpc: GRPCClient<Transport>
        let connections: Task<Void, Never>

        func close() {
            grpc.beginGracefulShutdown()
            // The attempt is over: nothing in flight is worth waiting for.
            connections.cancel()
        }
    }

    private func makeWatchClient() throws -> WatchClient {
        let grpc = GRPCClient(transport: try makeTransport())
        return WatchClient(grpc: grpc, connections: Task { try? await grpc.runConnections() })
    }

    /// How a watch RPC ended without delivering a compaction or a cancel.
    private struct WatchInterrupted: Error {
        var error: RPCError
    }

    /// Sleeps for `duration`; false if `finished` ended first (or the task
    /// was cancelled).
    private static func wait(_ duration: Duration, orUntilFinished finished: AsyncStream<Never>) async -> Bool {
        await withTaskGroup(of: Bool.self) { group in
            group.addTask {
                do { try await Task.sleep(for: duration) } catch { return false }
                return true
            }
            group.addTask {
                for await _ in finished {}
                return false
            }
            let result = await group.next() ?? false
            group.cancelAll()
            return result
        }
    }

    /// Runs `call` until it ends, or until nothing was heard from the
    /// server for `patience` (`heard` is when the last message arrived):
    /// then the call is cancelled and this throws Unavailable, which the
    /// watch retries — on another member, since the round robin moves on
    /// and the keepalive closes the silent member's connection.
    private static func untilSilent(for patience: Duration, heard: Locked<ContinuousClock.Instant>,
                                    _ call: @escaping @Sendable () async throws -> Void) async throws {
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await call() }
            group.addTask {
                while true {
                    let silence = ContinuousClock.now - heard.get()
                    if silence >= patience {
                        throw RPCError(code: .unavailable,
                                       message: "no answer from the member for \(seconds(silence)) (a watch progress request went unanswered)")
                    }
                    try await Task.sleep(for: patience - silence)
                }
            }
            // The first to end decides; the other is cancelled.
            try await group.next()
            group.cancelAll()
        }
    }

    private func runWatch(prefix: String, from start: Int64, previousValues: Bool,
                          continuation: AsyncThrowingStream<EtcdWatchBatch, any Error>.Continuation) async
    {
        let operation = "Watch \(prefix)* from revision \(start)"
        let next = Locked(start)
        let established = Locked(false)
        var failures = 0
        var reauthenticated = false
        // Bounded: a minute of consecutive failed attempts, then give up and
        // let the caller decide (it lists again and re-watches).
        var failingSince: ContinuousClock.Instant?
        while !Task.isCancelled {
            established.set(false)
            do {
                let metadata = try await requestMetadata(operation: operation)
                var create = Etcdserverpb_WatchCreateRequest()
                create.key = Data(prefix.utf8)
                create.rangeEnd = Self.prefixEnd(prefix)
                create.startRevision = next.get()
                create.prevKv = previousValues
                // Let etcd split a response bigger than its request limit
                // (a watch catching up on a burst of batched writes).
                create.fragment = true
                let request = Etcdserverpb_WatchRequest.with { $0.createRequest = create }
                let progressRequest = Etcdserverpb_WatchRequest.with {
                    $0.progressRequest = Etcdserverpb_WatchProgressRequest()
                }
                let (finished, finish) = AsyncStream<Never>.makeStream()
                let heard = Locked(ContinuousClock.now)
                let (probe, patience) = (keepaliveTime, keepaliveTime + keepaliveTimeout)
                // Connections of its own, whose first and only stream is this
                // watch: their keepalive pings run as long as it does.
                let watchClient = try makeWatchClient()
                defer { watchClient.close() }
                let watchService = Etcdserverpb_Watch.Client(wrapping: watchClient.grpc)
                try await Self.untilSilent(for: patience, heard: heard) {
                    try await watchService.watch(
                    metadata: metadata,
                    options: self.callOptions,
                    requestProducer: { writer in
                        try await writer.write(request)
                        // Stay open (returning would half-close the stream),
                        // asking for a progress report every `probe`: etcd
                        // answers at once with its revision, so a member that
                        // stopped answering is noticed by `untilSilent`, also
                        // when its connection still answers gRPC pings.
                        while await Self.wait(probe, orUntilFinished: finished) {
                            try await writer.write(progressRequest)
                        }
                    },
                    onResponse: { response in
                        defer { finish.finish() }
                        for try await message in response.messages {
                            heard.set(ContinuousClock.now)
                            if message.compactRevision > 0 {
                                throw EtcdError(.compacted(oldestRevision: message.compactRevision),
                                                operation: operation, endpoints: self.endpoints,
                                                reason: "revision \(next.get()) has been compacted "
                                                    + "(oldest kept: \(message.compactRevision))")
                            }
                            if message.canceled {
                                throw EtcdError(.watchCanceled, operation: operation, endpoints: self.endpoints,
                                                reason: message.cancelReason.isEmpty
                                                    ? "the server canceled the watch" : message.cancelReason)
                            }
                            if message.created { established.set(true) }
                            guard !message.events.isEmpty else { continue }
                            let events = message.events.map(EtcdWatchEvent.init)
                            // A fragment may end inside a revision: resuming
                            // after it repeats that revision's events (puts
                            // and deletes are idempotent for the consumer).
                            let last = events[events.count - 1].revision
                            next.set(message.fragment ? last : last + 1)
                            continuation.yield(EtcdWatchBatch(events: events,
                                                              headerRevision: message.header.revision))
                        }
                        throw RPCError(code: .unavailable, message: "the server ended the watch stream")
                    })
                }
            } catch is CancellationError {
                break
            } catch let error as EtcdError {
                if case .watchCanceled = error.code, !reauthenticated, credentials != nil,
                   error.reason.contains("auth") {
                    reauthenticated = true
                    invalidateToken()
                    continue
                }
                continuation.finish(throwing: error)
                return
            } catch let error as RPCError {
                if Task.isCancelled || error.code == .cancelled { break }
                if error.code == .unauthenticated, credentials != nil, !reauthenticated {
                    reauthenticated = true
                    invalidateToken()
                    continue
                }
                let retryable: Set<RPCError.Code> = [.unavailable, .deadlineExceeded, .aborted, .internalError,
                                                     .unknown, .resourceExhausted]
                if established.get() {
                    failures = 0
                    failingSince = nil
                    reauthenticated = false
                }
                failures += 1
                let since = failingSince ?? ContinuousClock.now
                failingSince = since
                guard retryable.contains(error.code), ContinuousClock.now - since < .seconds(60) else {
                    continuation.finish(throwing: map(error, operation: operation))
                    return
                }
                // At most 2 s apart: once etcd is back, the watch resumes
                // within about that (the connection's own backoff permitting).
                let delay = min(Double(failures) * 0.5, 2.0)
                logger.warning("etcd watch of \(prefix)* interrupted (\(Self.serverMessage(error))); resuming from revision \(next.get()) in \(delay) s on whichever member answers")
                do { try await Task.sleep(for: .seconds(delay)) } catch { break }
                watchReconnects.increment()
            } catch {
                if Task.isCancelled { break }
                continuation.finish(throwing: EtcdError(.other, operation: operation, endpoints: endpoints,
                                                        reason: Self.describe(error)))
                return
            }
        }
        continuation.finish()
    }

    // MARK: - Calls, auth and errors

    /// Runs one RPC with the auth token, the request timeout, one
    /// re-authentication when the token is rejected, and retries while no
    /// endpoint is reachable, for up to half the request timeout (every
    /// operation here is safe to repeat: a repeated create-if-absent reports
    /// `.exists` with our own value).
    /// Call options with the receive limit. grpc-swift-nio-transport 2.x
    /// bounds inbound messages by `maxRequestMessageBytes`; both are set.
    private var callOptions: CallOptions {
        var options = CallOptions.defaults
        options.maxRequestMessageBytes = maxReceiveMessageBytes
        options.maxResponseMessageBytes = maxReceiveMessageBytes
        return options
    }

    private func perform<Result: Sendable>(
        _ operation: String,
        _ body: @Sendable (Metadata, CallOptions) async throws -> Result
    ) async throws(EtcdError) -> Result {
        var options = callOptions
        options.timeout = requestTimeout
        var reauthenticated = false
        var retries = 0
        let started = ContinuousClock.now
        while true {
            if state.withLock({ $0.closed }) {
                throw EtcdError(.closed, operation: operation, endpoints: endpoints, reason: "the client is closed")
            }
            let metadata = try await requestMetadata(operation: operation)
            do {
                return try await body(metadata, options)
            } catch let error as RPCError {
                if credentials != nil, !reauthenticated, Self.isStaleToken(error) {
                    reauthenticated = true
                    invalidateToken()
                    continue
                }
                if error.code == .unavailable, let delay = retryDelay(after: retries, since: started) {
                    retries += 1
                    requestRetries.increment()
                    try? await Task.sleep(for: delay)
                    continue
                }
                var mapped = map(error, operation: operation)
                if let why = await tlsProblem(error) {
                    // The diagnosis says what to do; the transport's words follow for the record.
                    mapped.reason = "\(why) (gRPC: \(mapped.reason))"
                    mapped.hint = nil
                }
                throw mapped
            } catch let error as EtcdError {
                throw error
            } catch is CancellationError {
                throw EtcdError(.other, operation: operation, endpoints: endpoints, reason: "cancelled")
            } catch {
                throw EtcdError(.other, operation: operation, endpoints: endpoints, reason: Self.describe(error))
            }
        }
    }

    /// Why no connection could be made, in words, when `error` is a failed
    /// TLS handshake or HTTP/2 preface (`TLSDiagnosis`); nil otherwise.
    private func tlsProblem(_ error: RPCError) async -> String? {
        let text = Self.serverMessage(error)
        guard text.contains("HTTP/2 connection preface") || text.contains("NIOSSL") || text.contains("handshake")
        else { return nil }
        if let last = diagnosis.withLock({ $0 }), ContinuousClock.now - last.at < .seconds(10) { return last.text }
        var found: [String] = []
        for endpoint in parsedEndpoints {
            if let why = await TLSDiagnosis.diagnose(endpoint, tls: tls) { found.append(why) }
        }
        let result = found.isEmpty ? nil : found.joined(separator: "; ")
        diagnosis.withLock { $0 = (ContinuousClock.now, result) }
        return result
    }

    /// How long to wait before retrying an RPC that found no endpoint up:
    /// gRPC fails such calls at once while its connections back off, so a
    /// request right after an etcd restart would fail without retries.
    /// nil once half the request timeout is spent.
    private func retryDelay(after retries: Int, since started: ContinuousClock.Instant) -> Duration? {
        let delay = Duration.milliseconds(min(250 << min(retries, 3), 1000))
        guard ContinuousClock.now + delay - started < requestTimeout / 2 else { return nil }
        return delay
    }

    /// etcd rejects an expired simple token with Unauthenticated "invalid auth
    /// token", and one issued before a change to users or roles with "revision
    /// of auth store is old".
    private static func isStaleToken(_ error: RPCError) -> Bool {
        error.code == .unauthenticated || error.message.contains("auth store is old")
    }

    private func invalidateToken() {
        state.withLock { $0.token = nil }
    }

    /// What every request and watch carries: the auth token, and etcd's
    /// "hasleader" key, as etcd's own client sends with WithRequireLeader.
    /// With it, a member that has no leader (cut off from the others, or
    /// the cluster has lost quorum) refuses a request at once with
    /// Unavailable "no leader" — retried on another member — instead of
    /// holding it until the request timeout, and ends a watch stream it
    /// serves about three election timeouts after losing its leader, so the
    /// watch resumes on a member that still gets the changes.
    private func requestMetadata(operation: String) async throws(EtcdError) -> Metadata {
        var metadata = try await authMetadata(operation: operation)
        metadata.addString("true", forKey: "hasleader")
        return metadata
    }

    private func authMetadata(operation: String) async throws(EtcdError) -> Metadata {
        guard let credentials else { return [:] }
        if let token = state.withLock({ $0.token }) { return ["token": .string(token)] }
        var request = Etcdserverpb_AuthenticateRequest()
        request.name = credentials.username
        request.password = credentials.password
        var options = CallOptions.defaults
        options.timeout = requestTimeout
        var retries = 0
        let started = ContinuousClock.now
        while true {
            do {
                let response = try await auth.authenticate(request, options: options)
                state.withLock { $0.token = response.token }
                return ["token": .string(response.token)]
            } catch let error as RPCError {
                // Credentials given but auth not enabled: etcd accepts
                // requests without a token, so go on without one.
                if error.code == .failedPrecondition, error.message.contains("authentication is not enabled") {
                    return [:]
                }
                if error.code == .unavailable, let delay = retryDelay(after: retries, since: started) {
                    retries += 1
                    try? await Task.sleep(for: delay)
                    continue
                }
                var mapped = map(error, operation: "Authenticate \(credentials.username) (for \(operation))")
                if error.code == .invalidArgument { mapped.code = .authenticationFailed }
                mapped.hint = mapped.hint ?? EtcdError.defaultHint(for: mapped.code)
                throw mapped
            } catch {
                throw EtcdError(.other, operation: "Authenticate \(credentials.username)", endpoints: endpoints,
                                reason: Self.describe(error))
            }
        }
    }

    private func map(_ error: RPCError, operation: String) -> EtcdError {
        let message = Self.serverMessage(error)
        let code: EtcdError.Code
        var reason: String
        // grpc-swift reports an answer over the receive limit as an internal
        // error ("Failed to decode message") caused by resourceExhausted.
        if message.contains("exceeded the configured maximum payload size") {
            return EtcdError(.responseTooLarge, operation: operation, endpoints: endpoints,
                             reason: "the answer is larger than the receive limit of \(maxReceiveMessageBytes) bytes")
        }
        switch error.code {
        case .unavailable:
            code = .unavailable
            reason = "unavailable"
            if !message.isEmpty { reason += ": \(message)" }
        case .deadlineExceeded:
            code = .timedOut
            reason = "no answer within \(requestTimeout)"
        case .unauthenticated:
            code = .authenticationFailed
            reason = message
        case .permissionDenied:
            code = .permissionDenied
            reason = message
        case .notFound where message.contains("lease not found"):
            code = .leaseNotFound
            reason = message
        case .outOfRange where message.contains("compacted"):
            code = .compacted(oldestRevision: 0)
            reason = message
        case .invalidArgument, .outOfRange, .failedPrecondition:
            code = .invalidRequest
            reason = message
        case .cancelled:
            code = .other
            reason = "cancelled"
        default:
            code = .other
            reason = "\(error.code): \(message)"
        }
        return EtcdError(code, operation: operation, endpoints: endpoints, reason: reason)
    }

    /// etcd's messages start with "etcdserver: "; the reader knows it is etcd.
    private static func serverMessage(_ error: RPCError) -> String {
        var message = error.message
        if message.hasPrefix("etcdserver: ") { message.removeFirst("etcdserver: ".count) }
        // grpc-swift's wording for "no endpoint is up"; the cause says why.
        message = message.replacingOccurrences(
            of: "Channel is in a transient failure state and 'wait for ready' isn't enabled. ", with: "")
        message = message.replacingOccurrences(of: "[ipv4]", with: "").replacingOccurrences(of: "[ipv6]", with: "")
        if let cause = error.cause, !(cause is CancellationError) {
            let text = describe(cause)
            if !text.isEmpty, !message.contains(text) { message += message.isEmpty ? text : " (\(text))" }
        }
        return message
    }

    static func describe(_ error: any Error) -> String {
        if let error = error as? RPCError { return "\(error.code): \(error.message)" }
        if let error = error as? RuntimeError {
            var text = error.message
            if let cause = error.cause { text += " (\(describe(cause)))" }
            return text
        }
        return String(describing: error)
    }
}

/// A value shared between the closures of one RPC.
final class Locked<Value: Sendable>: Sendable {
    private let mutex: Mutex<Value>
    init(_ value: Value) { mutex = Mutex(value) }
    func get() -> Value { mutex.withLock { $0 } }
    func set(_ value: Value) { mutex.withLock { $0 = value } }
}

extension EtcdKeyValue {
    init(_ kv: Mvccpb_KeyValue) {
        self.init(key: String(decoding: kv.key, as: UTF8.self), value: Array(kv.value),
                  createRevision: kv.createRevision, modRevision: kv.modRevision,
                  version: kv.version, lease: kv.lease)
    }
}

extension EtcdWatchEvent {
    init(_ event: Mvccpb_Event) {
        self.init(kind: event.type == .delete ? .delete : .put,
                  kv: EtcdKeyValue(event.kv),
                  previous: event.hasPrevKv ? EtcdKeyValue(event.prevKv) : nil)
    }
}
