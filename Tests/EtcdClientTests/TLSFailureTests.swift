import EtcdClient
import EtcdTestSupport
import Foundation
import NetBase
import Testing

/// TLS failures in words: each made with certificates the test issues with
/// openssl, against `openssl s_server` (any certificate, any client-certificate
/// policy) or a real etcd, through the client's ordinary request path.
@Suite(
    .serialized,
    .enabled(
        if: FileManager.default.isExecutableFile(atPath: "/usr/bin/openssl"),
        "needs /usr/bin/openssl to issue the test's certificates"
    )
)
struct TLSFailureTests {
    /// A CA, and certificates it signs, in a temporary directory removed
    /// with it.
    final class Issuer {
        let certificates: CertificateIssuer
        init() throws {
            certificates = try CertificateIssuer(
                directory: FileManager.default.temporaryDirectory.appendingPathComponent(
                    "tunneld-tls-\(UUID().uuidString)"
                )
            )
        }
        deinit { try? FileManager.default.removeItem(at: certificates.directory) }

        func path(_ name: String) -> String { certificates.path(name) }

        /// A self-signed CA named `name` (files NAME.crt, NAME.key).
        func ca(_ name: String) throws -> String { try certificates.ca(name) }

        /// A certificate signed by CA `by`, valid for `days` (negative: expired).
        func issue(
            _ name: String,
            by ca: String,
            days: Int = 2,
            san: String = "IP:127.0.0.1",
            usage: String = "serverAuth,clientAuth"
        ) throws -> (cert: String, key: String) {
            try certificates.issue(name, by: ca, usage: usage, san: san, days: days)
        }
    }

    struct TestFailure: Error, CustomStringConvertible {
        var description: String
        init(_ description: String) { self.description = description }
    }

    /// `openssl s_server` on 127.0.0.1 with `cert`; with `clientCA`, it
    /// demands a client certificate signed by that CA.
    final class TLSServer {
        let process: ChildProcess
        let port: Int

        init(cert: (cert: String, key: String), clientCA: String? = nil) throws {
            port = try freePorts(1)[0]
            var arguments = [
                "s_server", "-quiet", "-accept", "127.0.0.1:\(port)", "-cert", cert.cert, "-key", cert.key,
                "-alpn", "h2",
            ]
            if let clientCA { arguments += ["-Verify", "1", "-verify_return_error", "-CAfile", clientCA] }
            process = try ChildProcess.start(
                "/usr/bin/openssl",
                arguments: arguments,
                standardOutput: .null,
                standardError: .null,
                parentDeathSignal: SIGKILL
            )
            // Ready when it accepts a connection (bounded: 10 s).
            for _ in 0..<200 {
                if Self.accepts(port) { return }
                usleep(50_000)
            }
            stop()
            throw TestFailure("openssl s_server did not listen on \(port)")
        }

        deinit { stop() }

        /// s_server does not stop on SIGTERM.
        func stop() {
            process.terminate(signal: SIGKILL)
        }

        static func accepts(_ port: Int) -> Bool {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            defer { close(fd) }
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_addr.s_addr = inet_addr("127.0.0.1")
            address.sin_port = in_port_t(UInt16(port).bigEndian)
            return withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0
                }
            }
        }
    }

    /// The error a request gets.
    func failure(_ endpoint: String, tls: EtcdTLS? = nil) async throws -> String {
        let client = try EtcdClient(endpoints: [endpoint], tls: tls, requestTimeout: .seconds(4))
        var text: String?
        do {
            _ = try await client.get("/tls/k")
        } catch {
            text = error.description
        }
        await client.close()
        guard let text else { throw TestFailure("a request to \(endpoint) succeeded") }
        return text
    }

    @Test func aServerCertificateNotSignedByTheCAFileIsNamedAsSuch() async throws {
        let issuer = try Issuer()
        _ = try issuer.ca("ca")
        let other = try issuer.ca("other")
        let server = try TLSServer(cert: try issuer.issue("server", by: "ca"))
        let text = try await failure("https://127.0.0.1:\(server.port)", tls: EtcdTLS(caFile: other))
        #expect(text.contains("is not trusted by the CA file \(other)"), "\(text)")
    }

    @Test func anExpiredServerCertificateSaysWhenItExpired() async throws {
        let issuer = try Issuer()
        let ca = try issuer.ca("ca")
        let server = try TLSServer(cert: try issuer.issue("server", by: "ca", days: -1))
        let text = try await failure("https://127.0.0.1:\(server.port)", tls: EtcdTLS(caFile: ca))
        #expect(text.contains("expired on"), "\(text)")
        #expect(text.contains("renew etcd's certificate"), "\(text)")
    }

    @Test func aCertificateThatDoesNotNameTheAddressSaysWhichAddress() async throws {
        let issuer = try Issuer()
        let ca = try issuer.ca("ca")
        let server = try TLSServer(cert: try issuer.issue("server", by: "ca", san: "IP:127.0.0.2,DNS:etcd.example"))
        let text = try await failure("https://127.0.0.1:\(server.port)", tls: EtcdTLS(caFile: ca))
        #expect(text.contains("does not name 127.0.0.1"), "\(text)")
    }

    @Test func aMissingOrRefusedClientCertificateIsNamed() async throws {
        let issuer = try Issuer()
        let ca = try issuer.ca("ca")
        _ = try issuer.ca("clients")
        _ = try issuer.ca("stranger")
        let server = try TLSServer(cert: try issuer.issue("server", by: "ca"), clientCA: issuer.path("clients.crt"))
        let endpoint = "https://127.0.0.1:\(server.port)"
        let none = try await failure(endpoint, tls: EtcdTLS(caFile: ca))
        #expect(none.contains("asks for a client certificate and none was given"), "\(none)")
        let wrong = try issuer.issue("client", by: "stranger", usage: "clientAuth")
        let refused = try await failure(endpoint, tls: EtcdTLS(caFile: ca, certFile: wrong.cert, keyFile: wrong.key))
        #expect(refused.contains("refused the client certificate \(wrong.cert)"), "\(refused)")
    }

    /// A loopback listener that resets every connection it accepts (a close
    /// with SO_LINGER 0), as a plain listener may answer a TLS greeting;
    /// at most 20 connections, at most 30 s.
    final class ResettingListener: @unchecked Sendable {
        let port: Int
        private let descriptor: Int32
        private let thread: Thread

        init() throws {
            let descriptor = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            self.descriptor = descriptor
            guard descriptor >= 0 else { throw TestFailure("socket: errno \(errno)") }
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_addr.s_addr = inet_addr("127.0.0.1")
            let bound = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    bind(descriptor, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
            guard bound == 0, listen(descriptor, 8) == 0 else { throw TestFailure("bind/listen: errno \(errno)") }
            var length = socklen_t(MemoryLayout<sockaddr_in>.size)
            _ = withUnsafeMutablePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(descriptor, $0, &length) }
            }
            port = Int(UInt16(bigEndian: address.sin_port))
            var timeout = timeval(tv_sec: 30, tv_usec: 0)
            setsockopt(descriptor, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            let listening = descriptor
            thread = Thread {
                for _ in 0..<20 {
                    let connection = accept(listening, nil, nil)
                    guard connection >= 0 else { return }
                    var hold = linger(l_onoff: 1, l_linger: 0)
                    setsockopt(connection, SOL_SOCKET, SO_LINGER, &hold, socklen_t(MemoryLayout<linger>.size))
                    usleep(20_000)  // let the ClientHello arrive, then reset
                    close(connection)
                }
            }
            thread.start()
        }

        deinit { shutdown(descriptor, Int32(SHUT_RDWR)); close(descriptor) }
    }

    @Test func httpsToAListenerThatResetsTheGreetingSaysItDoesNotSpeakTLS() async throws {
        let listener = try ResettingListener()
        let text = try await failure("https://127.0.0.1:\(listener.port)", tls: EtcdTLS())
        #expect(
            text.contains("does not speak TLS") && text.contains("write it as http://127.0.0.1:\(listener.port)"),
            "\(text)"
        )
    }

    @Test func httpsAgainstPlainHTTPAndTheReverseSayWhichSchemeToUse() async throws {
        try await EtcdServer.with { server in
            let text = try await failure("https://127.0.0.1:\(server.clientPort)", tls: EtcdTLS())
            #expect(
                text.contains("does not speak TLS")
                    && text.contains("write it as http://127.0.0.1:\(server.clientPort)"),
                "\(text)"
            )
        }
        let issuer = try Issuer()
        _ = try issuer.ca("ca")
        let server = try TLSServer(cert: try issuer.issue("server", by: "ca"))
        let text = try await failure("http://127.0.0.1:\(server.port)")
        #expect(
            text.contains("speaks TLS (https), not plain http: write it as https://127.0.0.1:\(server.port)"),
            "\(text)"
        )
    }
}
