import Foundation
import NetBase
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A throwaway etcd for tests: listens on 127.0.0.1 only, on free ports, with
/// its data in a fresh temporary directory; stopped by PID and the directory
/// removed by `stop()` (also called on deinit).
///
/// Prefer `EtcdServer.with { server in … }`, which stops it on every path.
/// Tests skip when `EtcdServer.isInstalled` is false (etcd comes from
/// Debian's etcd-server package; etcdctl from etcd-client).
public final class EtcdServer: @unchecked Sendable {
    /// Client URL, e.g. "http://127.0.0.1:40123" (https with TLS).
    public let clientURL: String
    public let clientPort: Int
    /// The temporary directory holding data, log and certificates.
    public let directory: URL
    /// The running etcd's process ID (changes with `restart()`).
    public var pid: pid_t { state.withLock { $0.process.pid } }
    /// Certificates when started with TLS.
    public let certificates: TestCertificates?
    /// Used by `etcdctl` once auth has been enabled with `enableAuth`.
    private let rootCredentials = Mutex<String?>(nil)
    private let arguments: [String]
    private let metricsPort: Int
    private struct State {
        var process: ChildProcess
        var stopped = false
    }
    private let state: Mutex<State>
    private var process: ChildProcess { state.withLock { $0.process } }

    public static let etcdPath = "/usr/bin/etcd"
    public static let etcdctlPath = "/usr/bin/etcdctl"

    /// Whether etcd and etcdctl are installed.
    public static var isInstalled: Bool {
        FileManager.default.isExecutableFile(atPath: etcdPath)
            && FileManager.default.isExecutableFile(atPath: etcdctlPath)
    }

    /// Starts etcd, runs `body`, and stops etcd whatever happens.
    public static func with<T>(
        tls: Bool = false,
        arguments: [String] = [],
        _ body: (EtcdServer) async throws -> T
    ) async throws -> T {
        let server = try await start(tls: tls, arguments: arguments)
        do {
            let result = try await body(server)
            server.stop()
            return result
        } catch {
            server.stop()
            throw error
        }
    }

    /// Starts etcd and waits (at most 15 s) until it reports healthy.
    /// With `tls`, clients must present a certificate signed by the test CA
    /// (`certificates.client*`).
    public static func start(tls: Bool = false, arguments: [String] = []) async throws -> EtcdServer {
        guard isInstalled else {
            throw TestSupportError("etcd is not installed (apt-get install etcd-server etcd-client)")
        }
        // A port picked as free may be taken before etcd binds it: try again.
        var lastError: (any Error)?
        for _ in 0..<3 {
            do {
                return try await startOnce(tls: tls, arguments: arguments)
            } catch let error as TestSupportError where error.retryable {
                lastError = error
            }
        }
        throw lastError ?? TestSupportError("etcd did not start")
    }

    private static func startOnce(tls: Bool, arguments: [String]) async throws -> EtcdServer {
        let directory = FileManager.default.temporaryDirectory
            .appendingPathComponent("tunneld-etcd-\(getpid())-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        do {
            let certificates = tls ? try TestCertificates.make(in: directory.appendingPathComponent("certs")) : nil
            let ports = try freePorts(3)
            let scheme = tls ? "https" : "http"
            let clientURL = "\(scheme)://127.0.0.1:\(ports[0])"
            let peerURL = "http://127.0.0.1:\(ports[1])"
            let metricsURL = "http://127.0.0.1:\(ports[2])"
            var args = [
                "--name", "t",
                "--data-dir", directory.appendingPathComponent("data").path,
                "--listen-client-urls", clientURL,
                "--advertise-client-urls", clientURL,
                "--listen-peer-urls", peerURL,
                "--initial-advertise-peer-urls", peerURL,
                "--initial-cluster", "t=\(peerURL)",
                // Plain http even with client TLS: the health check uses it.
                "--listen-metrics-urls", metricsURL,
                "--logger=zap", "--log-outputs=stderr",
            ]
            if let certificates {
                args += [
                    "--client-cert-auth",
                    "--trusted-ca-file", certificates.caFile,
                    "--cert-file", certificates.serverCertFile,
                    "--key-file", certificates.serverKeyFile,
                ]
            }
            args += arguments
            let process = try launch(args, in: directory)
            let server = EtcdServer(
                clientURL: clientURL,
                clientPort: ports[0],
                metricsPort: ports[2],
                directory: directory,
                arguments: args,
                process: process,
                certificates: certificates
            )
            do {
                try await server.waitHealthy(metricsPort: ports[2], timeout: .seconds(15))
            } catch {
                server.stop()
                throw error
            }
            return server
        } catch {
            try? FileManager.default.removeItem(at: directory)
            throw error
        }
    }

    /// Starts etcd with its output appended to `directory`/etcd.log.
    /// etcd gets SIGKILL when this test process ends, however it ends: a killed test run
    /// leaves no etcd behind.
    private static func launch(_ arguments: [String], in directory: URL) throws -> ChildProcess {
        try ChildProcess.start(
            etcdPath,
            arguments: arguments,
            standardOutput: .file(directory.appendingPathComponent("etcd.log").path),
            standardError: .standardOutput,
            parentDeathSignal: SIGKILL
        )
    }

    private init(
        clientURL: String,
        clientPort: Int,
        metricsPort: Int,
        directory: URL,
        arguments: [String],
        process: ChildProcess,
        certificates: TestCertificates?
    ) {
        self.clientURL = clientURL
        self.clientPort = clientPort
        self.metricsPort = metricsPort
        self.directory = directory
        self.arguments = arguments
        self.state = Mutex(State(process: process))
        self.certificates = certificates
    }

    /// Stops etcd and starts it again on the same ports with the same data,
    /// as after a crash or an upgrade; waits until it is healthy again.
    /// `downtime` is how long it stays down in between.
    public func restart(downtime: Duration = .zero) async throws {
        terminate(process)
        try await Task.sleep(for: downtime)
        let process = try EtcdServer.launch(arguments, in: directory)
        state.withLock { $0.process = process }
        try await waitHealthy(metricsPort: metricsPort, timeout: .seconds(15))
    }

    /// SIGTERM, then SIGKILL after 5 s; waits for the exit.
    private func terminate(_ process: ChildProcess) {
        process.terminate(grace: .seconds(5))
    }

    deinit { stop() }

    /// The last lines etcd logged, for failure messages.
    public func logTail(lines: Int = 20) -> String {
        let text = (try? String(contentsOf: directory.appendingPathComponent("etcd.log"), encoding: .utf8)) ?? ""
        return text.split(separator: "\n").suffix(lines).joined(separator: "\n")
    }

    private func waitHealthy(metricsPort: Int, timeout: Duration) async throws {
        let clock = ContinuousClock()
        let deadline = clock.now + timeout
        while clock.now < deadline {
            guard process.wait(timeout: .zero) == nil else {
                let tail = logTail()
                throw TestSupportError(
                    "etcd exited during start-up: \(tail)",
                    retryable: tail.contains("address already in use")
                )
            }
            if let body = try? httpGet(port: metricsPort, path: "/health"), body.contains("\"true\"") {
                return
            }
            try await Task.sleep(for: .milliseconds(100))
        }
        throw TestSupportError("etcd at \(clientURL) not healthy within \(timeout): \(logTail())")
    }

    /// Stops etcd (SIGTERM, then SIGKILL after 5 s) and removes its directory. Idempotent.
    public func stop() {
        let first = state.withLock { state in
            defer { state.stopped = true }
            return !state.stopped
        }
        guard first else { return }
        terminate(process)
        try? FileManager.default.removeItem(at: directory)
    }

    /// Turns auth on: adds user root with `password` and enables auth.
    /// Later `etcdctl` calls authenticate as root.
    public func enableAuth(rootPassword: String) throws {
        try etcdctl(["user", "add", "root:\(rootPassword)"])
        try etcdctl(["auth", "enable"])
        rootCredentials.withLock { $0 = "root:\(rootPassword)" }
    }

    /// Runs etcdctl against this server (with its TLS files and root
    /// credentials when set) and returns its standard output.
    @discardableResult
    public func etcdctl(_ arguments: [String]) throws -> String {
        var args = ["--endpoints", clientURL, "--command-timeout=10s"]
        if let certificates {
            args += [
                "--cacert", certificates.caFile, "--cert", certificates.clientCertFile,
                "--key", certificates.clientKeyFile,
            ]
        }
        if let user = rootCredentials.withLock({ $0 }) { args += ["--user", user] }
        let result = try run(EtcdServer.etcdctlPath, args + arguments, environment: ["ETCDCTL_API": "3"])
        guard result.status == 0 else {
            throw TestSupportError(
                "etcdctl \(arguments.joined(separator: " ")) failed (\(result.status)): \(result.output)"
            )
        }
        return result.output
    }

    /// The store's current revision (from `etcdctl endpoint status`).
    public func currentRevision() throws -> Int64 {
        let json = try etcdctl(["endpoint", "status", "-w", "json"])
        guard let range = json.range(of: "\"revision\":") else {
            throw TestSupportError("no revision in etcdctl endpoint status: \(json)")
        }
        let digits = json[range.upperBound...].prefix { $0.isNumber }
        guard let revision = Int64(digits) else { throw TestSupportError("bad revision in \(json)") }
        return revision
    }
}

/// Test certificates made with openssl in one directory: CAs (NAME.crt,
/// NAME.key) and the certificates they sign. The one place tests issue
/// certificates (etcd's TLS, the lab's etcd, the TLS failure tests).
public struct CertificateIssuer: Sendable {
    public let directory: URL

    public init(directory: URL) throws {
        self.directory = directory
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    }

    public func path(_ name: String) -> String { directory.appendingPathComponent(name).path }

    /// A self-signed CA (NAME.crt, NAME.key) with CN `name`; returns NAME.crt.
    @discardableResult
    public func ca(_ name: String) throws -> String {
        try openssl([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", path("\(name).key"), "-out", path("\(name).crt"), "-subj", "/CN=\(name)",
        ])
        return path("\(name).crt")
    }

    /// A certificate NAME.crt (key NAME.key) signed by the CA named `ca`,
    /// valid for `days` (negative: already expired).
    ///
    /// - Parameters:
    ///   - commonName: the subject's CN (default `name`).
    ///   - usage: its extendedKeyUsage.
    ///   - san: its subjectAltName ("IP:127.0.0.1,DNS:localhost"); nil for none.
    @discardableResult
    public func issue(
        _ name: String,
        by ca: String,
        commonName: String? = nil,
        usage: String = "serverAuth,clientAuth",
        san: String? = "IP:127.0.0.1",
        days: Int = 2
    ) throws -> (cert: String, key: String) {
        var extensions = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        extensions += "extendedKeyUsage=\(usage)\n"
        if let san { extensions += "subjectAltName=\(san)\n" }
        try extensions.write(toFile: path("\(name).ext"), atomically: true, encoding: .utf8)
        try openssl([
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", path("\(name).key"),
            "-out", path("\(name).csr"), "-subj", "/CN=\(commonName ?? name)",
        ])
        try openssl([
            "x509", "-req", "-in", path("\(name).csr"), "-CA", path("\(ca).crt"), "-CAkey", path("\(ca).key"),
            "-CAcreateserial", "-days", "\(days)", "-out", path("\(name).crt"), "-extfile", path("\(name).ext"),
        ])
        return (path("\(name).crt"), path("\(name).key"))
    }

    private func openssl(_ arguments: [String]) throws {
        let result = try run("/usr/bin/openssl", arguments)
        guard result.status == 0 else {
            throw TestSupportError("openssl \(arguments.first ?? "") failed: \(result.output)")
        }
    }
}

/// Files for mutual TLS: a CA, a server certificate (for 127.0.0.1 /
/// localhost unless told otherwise), and a client certificate (CN=root).
public struct TestCertificates: Sendable {
    public var caFile: String
    public var serverCertFile: String
    public var serverKeyFile: String
    public var clientCertFile: String
    public var clientKeyFile: String

    /// - Parameters:
    ///   - serverName: the server certificate's CN.
    ///   - serverAltNames: its subjectAltName.
    ///   - clientName: the client certificate's CN (with etcd auth on, etcd
    ///     takes it as the user when no password login is given).
    public static func make(
        in directory: URL,
        serverName: String = "localhost",
        serverAltNames: String = "IP:127.0.0.1,DNS:localhost",
        clientName: String = "root"
    ) throws -> TestCertificates {
        let issuer = try CertificateIssuer(directory: directory)
        let ca = try issuer.ca("ca")
        let server = try issuer.issue("server", by: "ca", commonName: serverName, san: serverAltNames)
        let client = try issuer.issue("client", by: "ca", commonName: clientName, usage: "clientAuth", san: nil)
        return TestCertificates(
            caFile: ca,
            serverCertFile: server.cert,
            serverKeyFile: server.key,
            clientCertFile: client.cert,
            clientKeyFile: client.key
        )
    }
}

public struct TestSupportError: Error, CustomStringConvertible {
    public var description: String
    var retryable: Bool
    public init(_ description: String, retryable: Bool = false) {
        self.description = description
        self.retryable = retryable
    }
}

/// Ports on 127.0.0.1 that were free a moment ago (bound to port 0, then closed).
/// Also a way to get an address where nothing listens.
public func freePorts(_ count: Int) throws -> [Int] {
    var sockets: [Int32] = []
    defer { for fd in sockets { close(fd) } }
    var ports: [Int] = []
    for _ in 0..<count {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw TestSupportError("socket failed: \(String(cString: strerror(errno)))") }
        sockets.append(fd)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { generic in
                bind(fd, generic, length) == 0 && getsockname(fd, generic, &length) == 0
            }
        }
        guard bound else { throw TestSupportError("bind to 127.0.0.1:0 failed: \(String(cString: strerror(errno)))") }
        ports.append(Int(UInt16(bigEndian: address.sin_port)))
    }
    return ports
}

/// A minimal HTTP/1.0 GET to 127.0.0.1:port; returns the whole response.
func httpGet(port: Int, path: String) throws -> String {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { throw TestSupportError("socket failed") }
    defer { close(fd) }
    var timeout = timeval(tv_sec: 2, tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    address.sin_port = UInt16(port).bigEndian
    let connected = withUnsafePointer(to: &address) { pointer in
        pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
            connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0
        }
    }
    guard connected else { throw TestSupportError("connect to 127.0.0.1:\(port) failed") }
    let request = Array("GET \(path) HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".utf8)
    guard write(fd, request, request.count) == request.count else { throw TestSupportError("write failed") }
    var response: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 4096)
    for _ in 0..<256 {
        let n = read(fd, &buffer, buffer.count)
        if n <= 0 { break }
        response += buffer[0..<n]
    }
    return String(decoding: response, as: UTF8.self)
}

/// Runs a program to completion; returns its exit status and combined output.
func run(
    _ executable: String,
    _ arguments: [String],
    environment: [String: String] = [:]
)
    throws -> (status: Int32, output: String)
{
    let output = try ChildProcess.run(
        executable,
        arguments: arguments,
        environment: environment.isEmpty ? nil : ProcessInfo.processInfo.environment.merging(environment) { $1 },
        timeout: .seconds(120),
        parentDeathSignal: SIGKILL
    )
    return (output.status, String(decoding: output.stdout + output.stderr, as: UTF8.self))
}

/// Runs `body`, failing with an error if it takes longer than `limit`.
public func withTimeout<T: Sendable>(
    _ limit: Duration,
    _ body: @escaping @Sendable () async throws -> T
) async throws -> T {
    try await withThrowingTaskGroup(of: T.self) { group in
        group.addTask { try await body() }
        group.addTask {
            try await Task.sleep(for: limit)
            throw TestSupportError("timed out after \(limit)")
        }
        defer { group.cancelAll() }
        guard let result = try await group.next() else { throw TestSupportError("no result") }
        return result
    }
}
