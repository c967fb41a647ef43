import CoreMetrics
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import GRPCProtobuf
import Logging
import NetBase
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
    /// few hundred bytes, so a page is one or two MiB. etcd 3.4 walks the
    /// rest of the range for every page (to count it), so a list of 60,000
    /// leases costs it 12 walks at this size rather than 60 at 1,000
    /// (docs/RELIABILITY.md, "Scale").
    public static let defaultPageSize = 5000

    let grpc: GRPCClient<Transport>
    /// A transport like `grpc`'s, for the connections of one watch attempt.
    let makeTransport: @Sendable () throws -> Transport
    let kv: Etcdserverpb_KV.Client<Transport>
    let leaseService: Etcdserverpb_Lease.Client<Transport>
    let auth: Etcdserverpb_Auth.Client<Transport>
    let credentials: EtcdCredentials?
    let state: Mutex<State>
    let connections: Task<Void, Never>
    /// Watch streams re-established after a broken connection, and requests
    /// repeated while no endpoint answered (swift-metrics; the daemon exports them).
    let watchReconnects: Counter
    let requestRetries: Counter
    let logger: Logger
    /// The endpoints and TLS files, for `TLSDiagnosis`.
    let parsedEndpoints: [EtcdEndpoint]
    let tls: EtcdTLS?
    /// The last diagnosis and when it was made: a client retrying every
    /// second connects to look at most every 10 s.
    let diagnosis = Mutex<(at: ContinuousClock.Instant, text: String?)?>(nil)

    struct State {
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
    public init(
        endpoints: [String],
        tls: EtcdTLS? = nil,
        credentials: EtcdCredentials? = nil,
        requestTimeout: Duration = .seconds(10),
        maxReceiveMessageBytes: Int = EtcdClient.defaultMaxReceiveMessageBytes,
        keepaliveTime: Duration = EtcdClient.defaultKeepaliveTime,
        keepaliveTimeout: Duration = EtcdClient.defaultKeepaliveTimeout,
        logger: Logger = Logger(label: "tunneld.etcd")
    ) throws(EtcdError) {
        guard keepaliveTime >= .milliseconds(100), keepaliveTimeout >= .milliseconds(100) else {
            throw EtcdError(
                .configuration,
                operation: "connect",
                endpoints: endpoints,
                reason: "keepalive time \(keepaliveTime) and timeout \(keepaliveTimeout) must be at least 0.1 s",
                hint: "give --etcd-keepalive-time and --etcd-keepalive-timeout in seconds, e.g. 2 and 3"
            )
        }
        let nonEmpty = endpoints.filter { !$0.trimmingCharacters(in: .whitespaces).isEmpty }
        guard !nonEmpty.isEmpty else {
            throw EtcdError(
                .configuration,
                operation: "connect",
                endpoints: [],
                reason: "no endpoints given",
                hint: "give at least one, e.g. http://127.0.0.1:2379"
            )
        }
        var parsed: [EtcdEndpoint] = []
        for text in nonEmpty { parsed.append(try EtcdEndpoint.parse(text, defaultSecure: tls != nil)) }
        self.endpoints = nonEmpty
        guard Set(parsed.map(\.secure)).count == 1 else {
            throw EtcdError(
                .configuration,
                operation: "connect",
                endpoints: nonEmpty,
                reason: "endpoints mix http:// and https://",
                hint: "use https:// for every endpoint of a TLS cluster, http:// otherwise"
            )
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
        config.connection.keepalive = .init(
            time: keepaliveTime,
            timeout: keepaliveTimeout,
            allowWithoutCalls: false
        )
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
                serviceConfig: ServiceConfig(loadBalancingConfig: [.roundRobin])
            )
        }
        let transport: Transport
        do {
            transport = try makeTransport()
        } catch {
            throw EtcdError(
                .configuration,
                operation: "connect",
                endpoints: nonEmpty,
                reason: "cannot set up the gRPC transport: \(Self.describe(error))",
                hint: tls != nil ? "check the TLS certificate and key files" : nil
            )
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
        self.watchReconnects = Counter(label: "tunneld_store_watch_reconnects_total")
        self.requestRetries = Counter(label: "tunneld_store_request_retries_total")
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

    private static func tlsConfig(
        _ tls: EtcdTLS,
        endpoints: [String]
    ) throws(EtcdError)
        -> Transport.TransportSecurity.TLS
    {
        func check(_ path: String?, _ what: String) throws(EtcdError) {
            guard let path else { return }
            guard FileManager.default.isReadableFile(atPath: path) else {
                throw EtcdError(
                    .configuration,
                    operation: "connect",
                    endpoints: endpoints,
                    reason: "cannot read the \(what) file \(path)",
                    hint: "check the path and its permissions"
                )
            }
        }
        try check(tls.caFile, "CA")
        try check(tls.certFile, "client certificate")
        try check(tls.keyFile, "client key")
        guard (tls.certFile == nil) == (tls.keyFile == nil) else {
            throw EtcdError(
                .configuration,
                operation: "connect",
                endpoints: endpoints,
                reason: "a client certificate needs its key and a key needs its certificate",
                hint: "give both --etcd-certfile and --etcd-keyfile, or neither"
            )
        }
        return .init(
            certificateChain: tls.certFile.map { [.file(path: $0, format: .pem)] } ?? [],
            privateKey: tls.keyFile.map { .file(path: $0, format: .pem) },
            serverCertificateVerification: .fullVerification,
            trustRoots: tls.caFile.map { .certificates([.file(path: $0, format: .pem)]) } ?? .systemDefault
        )
    }
}

extension EtcdKeyValue {
    init(_ kv: Mvccpb_KeyValue) {
        self.init(
            key: String(decoding: kv.key, as: UTF8.self),
            value: Array(kv.value),
            createRevision: kv.createRevision,
            modRevision: kv.modRevision,
            version: kv.version,
            lease: kv.lease
        )
    }
}

extension EtcdWatchEvent {
    init(_ event: Mvccpb_Event) {
        self.init(
            kind: event.type == .delete ? .delete : .put,
            kv: EtcdKeyValue(event.kv),
            previous: event.hasPrevKv ? EtcdKeyValue(event.prevKv) : nil
        )
    }
}
