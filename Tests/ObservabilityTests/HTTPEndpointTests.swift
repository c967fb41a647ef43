import Foundation
import Observability
import Prometheus
import Synchronization
import Testing

/// The endpoint on loopback and on unix sockets in a scratch directory; no
/// root needed.
@Suite struct HTTPEndpointTests {
    func makeEndpoint(socket: String? = nil) throws -> HTTPEndpoint {
        let exporter = MetricsExporter(registry: PrometheusCollectorRegistry(), source: { sampleReport() })
        var listeners: [HTTPEndpoint.Listener] = [.tcp(host: "127.0.0.1", port: 0)]
        if let socket { listeners.append(.unix(path: socket)) }
        return try HTTPEndpoint(
            listeners: listeners,
            routes: .init(
                metrics: exporter.exposition,
                status: { sampleReport().json() }
            ),
            idleTimeout: .seconds(2)
        )
    }

    func port(_ endpoint: HTTPEndpoint) throws -> Int {
        for case .tcp(_, let port, _, _) in endpoint.bound { return port }
        throw TestFailure("no TCP listener")
    }

    func scratch() throws -> String {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent(
            "td-http-\(UUID().uuidString.prefix(8))"
        ).path
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        return path
    }

    @Test func healthAndMetricsAnswerAndUnknownPathsAreNotFound() throws {
        let endpoint = try makeEndpoint()
        defer { endpoint.stop() }
        let health = try httpGet(port: port(endpoint), path: "/healthz")
        #expect(health.status == 200 && health.body == "tunneld is running\n")
        let metrics = try httpGet(port: port(endpoint), path: "/metrics")
        #expect(metrics.status == 200)
        #expect(metrics.headers.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8"))
        #expect(series(metrics.body)["tunneld_packets_total{direction=\"tx\"}"] == 10)
        #expect(try httpGet(port: port(endpoint), path: "/status").status == 404, "status only on the control socket")
        #expect(try httpGet(port: port(endpoint), path: "/elsewhere").status == 404)
        #expect(try httpGet(port: port(endpoint), path: "/healthz", method: "POST").status == 405)
    }

    @Test func readyzSays503NamingTheStepUnderWayUntilTheDaemonIsReadyThen200() throws {
        let readiness = Readiness(waitingFor: "installing the iptables rules")
        let endpoint = try HTTPEndpoint(
            listeners: [.tcp(host: "127.0.0.1", port: 0)],
            routes: .init(
                metrics: { [] },
                status: { [] },
                waitingFor: { readiness.waitingFor }
            ),
            idleTimeout: .seconds(2)
        )
        defer { endpoint.stop() }
        let port = try port(endpoint)
        let rules = try httpGet(port: port, path: "/readyz")
        #expect(
            rules.status == 503 && rules.body == "tunneld is not ready: installing the iptables rules\n",
            "\(rules)"
        )
        #expect(try httpGet(port: port, path: "/healthz").status == 200, "alive while not ready")

        readiness.waiting(for: "writing /run/flannel/subnet.env")
        let file = try httpGet(port: port, path: "/readyz")
        #expect(file.status == 503 && file.body == "tunneld is not ready: writing /run/flannel/subnet.env\n", "\(file)")

        readiness.ready()
        let ready = try httpGet(port: port, path: "/readyz")
        #expect(ready.status == 200 && ready.body == "tunneld is ready\n", "\(ready)")
        #expect(try httpGet(port: port, path: "/readyz", method: "HEAD").status == 200)
        #expect(try httpGet(port: port, path: "/healthz").body == "tunneld is running\n")
    }

    @Test func aTakenPortIsAnErrorNamingTheListenerAndWhatToDo() throws {
        let first = try makeEndpoint()
        defer { first.stop() }
        let taken = try port(first)
        #expect {
            try HTTPEndpoint(
                listeners: [
                    .tcp(host: "127.0.0.1", port: taken, label: "healthz", hint: "choose another --healthz-port")
                ],
                routes: .init(metrics: { [] }, status: { [] })
            )
        } throws: { error in
            "\(error)"
                == "listening on healthz 127.0.0.1:\(taken) failed: Address already in use (choose another --healthz-port)"
        }
    }

    @Test func twentyConcurrentScrapesAreAnsweredWhileSilentClientsHoldConnections() throws {
        let endpoint = try makeEndpoint()
        defer { endpoint.stop() }
        let port = try port(endpoint)
        // Two clients that connect and never finish a request.
        let silent = try connectTCP(port: port)
        defer { close(silent) }
        let half = try connectTCP(port: port)
        defer { close(half) }
        _ = "GET /metrics HTTP/1.1\r\nHost: x\r\n".withCString { send(half, $0, strlen($0), Int32(MSG_NOSIGNAL)) }

        let answered = Mutex(0)
        DispatchQueue.concurrentPerform(iterations: 20) { i in
            if let response = try? httpGet(port: port, path: i % 2 == 0 ? "/metrics" : "/healthz"),
                response.status == 200
            {
                answered.withLock { $0 += 1 }
            }
        }
        #expect(answered.withLock { $0 } == 20)
    }

    @Test func aSilentClientIsClosedAfterTheIdleTimeout() throws {
        let endpoint = try makeEndpoint()
        defer { endpoint.stop() }
        let silent = try connectTCP(port: port(endpoint))
        defer { close(silent) }
        var limit = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(silent, SOL_SOCKET, SO_RCVTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
        var byte: UInt8 = 0
        let started = ContinuousClock.now
        let n = recv(silent, &byte, 1, 0)
        #expect(n == 0, "the endpoint should close an idle connection (got \(n), errno \(errno))")
        #expect(ContinuousClock.now - started < .seconds(9))
    }

    @Test func keepAliveServesSeveralRequestsOnOneConnection() throws {
        let endpoint = try makeEndpoint()
        defer { endpoint.stop() }
        let fd = try connectTCP(port: port(endpoint))
        defer { close(fd) }
        let two =
            "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        _ = two.withCString { send(fd, $0, strlen($0), Int32(MSG_NOSIGNAL)) }
        let text = readAll(fd)
        #expect(text.components(separatedBy: "HTTP/1.1 200 OK").count == 3, "\(text)")
    }

    @Test func theControlSocketServesStatusToTheClient() throws {
        let directory = try scratch()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let socket = directory + "/run/tunneld.sock"
        let endpoint = try makeEndpoint(socket: socket)
        let body = try ControlClient.get("/status", socket: socket)
        #expect(try StatusReport.decode(json: body) == sampleReport())
        #expect(throws: ControlClient.Failure.self) { try ControlClient.get("/nothing", socket: socket) }

        // A second endpoint may not take a socket that answers.
        #expect(throws: EndpointError.self) { try makeEndpoint(socket: socket) }
        endpoint.stop()
        #expect(!FileManager.default.fileExists(atPath: socket), "stop removes the socket file")
        do {
            _ = try ControlClient.get("/status", socket: socket)
            Issue.record("a stopped endpoint answered")
        } catch {
            guard case .notRunning = error else { Issue.record("expected notRunning, got \(error)"); return }
        }
    }

    @Test func aSocketFileLeftByADeadDaemonIsReplaced() throws {
        let directory = try scratch()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let socket = directory + "/tunneld.sock"
        // A bound socket whose owner is gone: the file stays, nobody listens.
        let fd = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: Array(socket.utf8)) }
        _ = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        close(fd)
        #expect(FileManager.default.fileExists(atPath: socket))
        let endpoint = try makeEndpoint(socket: socket)
        defer { endpoint.stop() }
        #expect(try StatusReport.decode(json: ControlClient.get("/status", socket: socket)).version == "0.1.0")
    }
}

struct TestFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

func connectTCP(port: Int) throws -> Int32 {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = in_port_t(UInt16(port).bigEndian)
    address.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
    let result = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
            connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
        }
    }
    guard result == 0 else {
        close(fd)
        throw TestFailure("connect to 127.0.0.1:\(port): \(String(cString: strerror(errno)))")
    }
    var limit = timeval(tv_sec: 5, tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
    return fd
}

func readAll(_ fd: Int32) -> String {
    var data: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
        if n <= 0 { break }
        data += chunk[..<n]
    }
    return String(decoding: data, as: UTF8.self)
}

/// One request on its own connection (Connection: close), bounded by 5 s.
func httpGet(port: Int, path: String, method: String = "GET") throws -> (status: Int, headers: String, body: String) {
    let fd = try connectTCP(port: port)
    defer { close(fd) }
    let request = "\(method) \(path) HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    _ = request.withCString { send(fd, $0, strlen($0), Int32(MSG_NOSIGNAL)) }
    let text = readAll(fd)
    guard let split = text.range(of: "\r\n\r\n") else { throw TestFailure("no complete response: \(text)") }
    let headers = String(text[..<split.lowerBound])
    let status = Int(headers.split(separator: " ").dropFirst().first ?? "") ?? -1
    return (status, headers, String(text[split.upperBound...]))
}
