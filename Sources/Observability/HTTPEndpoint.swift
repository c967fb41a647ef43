import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization

/// The daemon's HTTP/1.1 endpoint on swift-nio: flanneld's `GET /healthz`
/// and `GET /readyz`, Prometheus' `GET /metrics`, and (on the control socket only) `GET
/// /status`. Every connection is served on its own, without blocking the
/// others: a scrape never waits for a slow or silent client, which is closed
/// after `idleTimeout` without a complete request.
public final class HTTPEndpoint: Sendable {
    /// Where to listen.
    public enum Listener: Sendable, CustomStringConvertible {
        /// TCP on an IPv4 address (health and metrics); `label` and `hint`
        /// name it and say what to do in an error ("healthz", "choose another --healthz-port").
        case tcp(host: String, port: Int, label: String = "http", hint: String = "choose another port")
        /// A unix socket (the control socket: also status).
        case unix(path: String)

        public var description: String {
            switch self {
            case .tcp(let host, let port, _, _): "http://\(host):\(port)"
            case .unix(let path): "unix:\(path)"
            }
        }
    }

    /// What the routes answer; called on the endpoint's thread for each request.
    public struct Routes: Sendable {
        public var metrics: @Sendable () -> [UInt8]
        public var status: @Sendable () -> [UInt8]
        /// What the daemon still waits for before it is ready, in words;
        /// nil once it is (GET /readyz: 503 with this, then 200).
        public var waitingFor: @Sendable () -> String?

        public init(
            metrics: @escaping @Sendable () -> [UInt8],
            status: @escaping @Sendable () -> [UInt8],
            waitingFor: @escaping @Sendable () -> String? = { nil }
        ) {
            self.metrics = metrics
            self.status = status
            self.waitingFor = waitingFor
        }
    }

    private let group: MultiThreadedEventLoopGroup
    private let channels: Mutex<[any Channel]>
    private let socketPaths: [String]
    /// The listeners as bound (a TCP port 0 becomes the port the kernel chose).
    public let bound: [Listener]

    /// Binds every listener (all or none) and starts serving.
    public init(
        listeners: [Listener],
        routes: Routes,
        idleTimeout: TimeAmount = .seconds(15),
        maxConnections: Int = 256
    ) throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let shared = SharedState()
        var channels: [any Channel] = []
        var bound: [Listener] = []
        var paths: [String] = []
        do {
            for listener in listeners {
                let serveStatus: Bool
                if case .unix = listener { serveStatus = true } else { serveStatus = false }
                let bootstrap = ServerBootstrap(group: group)
                    .serverChannelOption(.backlog, value: 128)
                    .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                    .childChannelInitializer { channel in
                        channel.eventLoop.makeCompletedFuture {
                            let sync = channel.pipeline.syncOperations
                            try sync.configureHTTPServerPipeline(withErrorHandling: true)
                            try sync.addHandler(IdleStateHandler(readTimeout: idleTimeout))
                            try sync.addHandler(
                                RequestHandler(
                                    routes: routes,
                                    serveStatus: serveStatus,
                                    shared: shared,
                                    maxConnections: maxConnections
                                )
                            )
                        }
                    }
                    .childChannelOption(.socketOption(.so_reuseaddr), value: 1)
                switch listener {
                case .tcp(let host, let port, let label, let hint):
                    let channel: any Channel
                    do {
                        channel = try bootstrap.bind(host: host, port: port).wait()
                    } catch {
                        throw EndpointError(
                            "listening on \(label) \(host):\(port) failed: \(Self.reason(error)) (\(hint))"
                        )
                    }
                    channels.append(channel)
                    bound.append(.tcp(host: host, port: channel.localAddress?.port ?? port, label: label, hint: hint))
                case .unix(let path):
                    try Self.prepareSocketPath(path)
                    let channel: any Channel
                    do {
                        channel = try bootstrap.bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true).wait()
                    } catch {
                        throw EndpointError(
                            "listening on the control socket \(path) failed: \(Self.reason(error)) (give another --control-socket, or an empty one for none)"
                        )
                    }
                    // The status names peers' addresses: root and its group only.
                    chmod(path, 0o660)
                    channels.append(channel)
                    paths.append(path)
                    bound.append(listener)
                }
            }
        } catch {
            for channel in channels { try? channel.close().wait() }
            for path in paths { unlink(path) }
            try? group.syncShutdownGracefully()
            throw error
        }
        self.group = group
        self.channels = Mutex(channels)
        self.socketPaths = paths
        self.bound = bound
    }

    /// Stops listening, closes the connections, removes the socket files.
    public func stop() {
        let channels = self.channels.withLock { current -> [any Channel] in
            defer { current = [] }
            return current
        }
        for channel in channels { try? channel.close().wait() }
        for path in socketPaths { unlink(path) }
        try? group.syncShutdownGracefully()
    }

    /// An errno in words, as the rest of tunneld says it.
    static func reason(_ error: any Error) -> String {
        guard let io = error as? IOError else { return "\(error)" }
        return String(cString: strerror(io.errnoCode))
    }

    /// Makes the socket's directory; a socket file left by a daemon that
    /// died is removed, but one that still answers belongs to a running
    /// tunneld and is an error.
    static func prepareSocketPath(_ path: String) throws {
        let directory = (path as NSString).deletingLastPathComponent
        if !directory.isEmpty {
            do {
                try FileManager.default.createDirectory(
                    atPath: directory,
                    withIntermediateDirectories: true,
                    attributes: [.posixPermissions: 0o755]
                )
            } catch {
                throw EndpointError("cannot create the control socket's directory \(directory): \(error)")
            }
        }
        guard FileManager.default.fileExists(atPath: path) else { return }
        if ControlClient.isAnswering(path) {
            throw EndpointError(
                "another tunneld answers on the control socket \(path): stop it, or give this one another --control-socket"
            )
        }
    }

    /// Open connections, over all listeners.
    final class SharedState: Sendable {
        let open = Atomic<Int>(0)
    }

    /// One connection: requests in order (keep-alive), each answered at once.
    final class RequestHandler: ChannelInboundHandler, RemovableChannelHandler {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart

        let routes: Routes
        let serveStatus: Bool
        let shared: SharedState
        let maxConnections: Int
        private var head: HTTPRequestHead?
        private var counted = false

        init(routes: Routes, serveStatus: Bool, shared: SharedState, maxConnections: Int) {
            self.routes = routes
            self.serveStatus = serveStatus
            self.shared = shared
            self.maxConnections = maxConnections
        }

        func channelActive(context: ChannelHandlerContext) {
            let now = shared.open.wrappingAdd(1, ordering: .relaxed).newValue
            counted = true
            // Bounded memory whatever clients do: past the limit, refuse.
            if now > maxConnections {
                context.close(promise: nil)
                return
            }
            context.fireChannelActive()
        }

        func channelInactive(context: ChannelHandlerContext) {
            if counted {
                shared.open.wrappingSubtract(1, ordering: .relaxed)
                counted = false
            }
            context.fireChannelInactive()
        }

        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if event is IdleStateHandler.IdleStateEvent {
                context.close(promise: nil)
            } else {
                context.fireUserInboundEventTriggered(event)
            }
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch unwrapInboundIn(data) {
            case .head(let head):
                self.head = head
            case .body:
                break  // GET has none; anything sent is ignored
            case .end:
                guard let head else { return }
                self.head = nil
                respond(context: context, to: head)
            }
        }

        private func respond(context: ChannelHandlerContext, to head: HTTPRequestHead) {
            let path = head.uri.split(separator: "?", maxSplits: 1).first.map(String.init) ?? head.uri
            var status = HTTPResponseStatus.ok
            var type = "text/plain; charset=utf-8"
            var body: [UInt8]
            var keepAlive = head.isKeepAlive
            if head.method != .GET && head.method != .HEAD {
                (status, body, keepAlive) = (.methodNotAllowed, Array("only GET is served here\n".utf8), false)
            } else {
                switch path {
                case "/healthz":
                    body = Array("tunneld is running\n".utf8)
                case "/readyz":
                    if let waiting = routes.waitingFor() {
                        (status, body) = (.serviceUnavailable, Array("tunneld is not ready: \(waiting)\n".utf8))
                    } else {
                        body = Array("tunneld is ready\n".utf8)
                    }
                case "/metrics":
                    type = MetricsExporter.contentType
                    body = routes.metrics()
                case "/status" where serveStatus:
                    type = "application/json"
                    body = routes.status()
                default:
                    status = .notFound
                    body = Array(
                        "not found: try GET /healthz, /readyz or /metrics\(serveStatus ? " or /status" : "")\n".utf8
                    )
                }
            }
            var headers = HTTPHeaders()
            headers.add(name: "Content-Type", value: type)
            headers.add(name: "Content-Length", value: "\(body.count)")
            headers.add(name: "Connection", value: keepAlive ? "keep-alive" : "close")
            context.write(
                wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: status, headers: headers))),
                promise: nil
            )
            if head.method != .HEAD {
                var buffer = context.channel.allocator.buffer(capacity: body.count)
                buffer.writeBytes(body)
                context.write(wrapOutboundOut(.body(.byteBuffer(buffer))), promise: nil)
            }
            if keepAlive {
                context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
            } else {
                let channel = context.channel
                context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in channel.close(promise: nil) }
            }
        }
    }
}

public struct EndpointError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}
