import Foundation
import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS
import NetBase

/// Why a TLS connection to an etcd endpoint fails, in an operator's words.
///
/// gRPC reports a failed handshake as "the server accepted the TCP connection
/// but closed the connection before completing the HTTP/2 connection
/// preface", with BoringSSL's error stack as the cause; that names neither
/// the certificate nor the file to fix. When a request fails so, the client
/// connects to each endpoint once more with the same settings, outside gRPC,
/// and looks at what happened: the server's certificate (expired, not signed
/// by the CA file, not naming the address), the server's alert (our client
/// certificate refused or missing), or no TLS at all (https against a plain
/// http endpoint, and the reverse).
enum TLSDiagnosis {
    /// What went wrong with one endpoint; nil: nothing found there.
    static func diagnose(_ endpoint: EtcdEndpoint, tls: EtcdTLS?, timeout: Duration = .seconds(3)) async -> String? {
        if !endpoint.secure {
            // Plain http failed in the preface: does the endpoint speak TLS?
            guard let config = try? context(verification: .none, tls: nil) else { return nil }
            if case .handshakeCompleted = await handshake(endpoint, context: config, timeout: timeout) {
                return
                    "\(endpoint) speaks TLS (https), not plain http: write it as https://\(endpoint.host):\(endpoint.port) and give --etcd-cafile (and --etcd-certfile/--etcd-keyfile if it asks for a client certificate)"
            }
            return nil
        }
        let tls = tls ?? EtcdTLS()
        let caFile = tls.caFile.map { "the CA file \($0)" } ?? "the system's CA certificates (no --etcd-cafile given)"
        let real: NIOSSLContext
        do {
            real = try context(verification: .fullVerification, tls: tls)
        } catch {
            return "the TLS files cannot be used: \(error)"
        }
        let outcome = await handshake(endpoint, context: real, timeout: timeout)
        switch outcome {
        case .handshakeCompleted:
            return nil
        case .alert(let text)
        where text.contains("CERTIFICATE_REQUIRED") || (tls.certFile == nil && text.contains("HANDSHAKE_FAILURE")):
            return
                "\(endpoint) asks for a client certificate and none was given: give --etcd-certfile and --etcd-keyfile of a certificate signed by the CA etcd trusts (its --trusted-ca-file)"
        case .alert(let text)
        where text.contains("BAD_CERTIFICATE") || text.contains("UNKNOWN_CA")
            || text.contains("CERTIFICATE_UNKNOWN") || text.contains("HANDSHAKE_FAILURE")
            || text.contains("UNSUPPORTED_CERTIFICATE"):
            return
                "\(endpoint) refused the client certificate \(tls.certFile ?? "")\(Self.alertName(text)): it is not signed by the CA etcd trusts (its --trusted-ca-file), has expired, or is not for client authentication; give --etcd-certfile/--etcd-keyfile of one it accepts"
        case .alert(let text), .failed(let text):
            if text.contains("WRONG_VERSION_NUMBER") || text.contains("HTTP") || text.contains("PACKET_LENGTH") {
                return
                    "\(endpoint) does not speak TLS (it answers plain http): write it as http://\(endpoint.host):\(endpoint.port), or turn on TLS in etcd (--cert-file, --key-file)"
            }
            if text.contains("EOF during handshake") { return hungUp(endpoint) }
            if text.contains("failedToValidateHostname") || text.contains("Couldn't find") {
                return
                    "the certificate of \(endpoint) does not name \(endpoint.host) (its subjectAltName lists other names or addresses): connect by a name or address it lists, or reissue it with \(endpoint.host) in its subjectAltName"
            }
            if text.contains("CERTIFICATE_VERIFY_FAILED") {
                return await untrusted(endpoint, caFile: caFile, timeout: timeout)
            }
            return "the TLS handshake with \(endpoint) failed: \(text)"
        case .hungUp:
            return hungUp(endpoint)
        case .unreachable:
            return nil
        }
    }

    /// etcd's plain listener hangs up on a TLS greeting, with a FIN or a reset.
    private static func hungUp(_ endpoint: EtcdEndpoint) -> String {
        "\(endpoint) does not speak TLS (it hung up on the TLS greeting, as a plain http endpoint does): write it as http://\(endpoint.host):\(endpoint.port), or turn on TLS in etcd (--cert-file, --key-file)"
    }

    /// The certificate failed verification: expired, not yet valid, or not
    /// signed by the CA file. Reads it without verifying to tell which.
    private static func untrusted(_ endpoint: EtcdEndpoint, caFile: String, timeout: Duration) async -> String {
        let generic =
            "the certificate of \(endpoint) is not trusted by \(caFile): give --etcd-cafile the CA that signed etcd's certificate (its --cert-file)"
        guard let capture = try? context(verification: .noHostnameVerification, tls: nil) else { return generic }
        let chain = PeerChain([])
        _ = await handshake(endpoint, context: capture, timeout: timeout, capturing: chain)
        guard let leaf = chain.get().first else { return generic }
        let now = time(nil)
        if leaf.notValidAfter < now {
            return
                "the certificate of \(endpoint) expired on \(Self.date(leaf.notValidAfter)): renew etcd's certificate (its --cert-file)"
        }
        if leaf.notValidBefore > now {
            return
                "the certificate of \(endpoint) is not valid before \(Self.date(leaf.notValidBefore)) (check this host's clock, or etcd's certificate)"
        }
        return generic
    }

    private static func date(_ seconds: time_t) -> String {
        ISO8601DateFormatter().string(from: Date(timeIntervalSince1970: TimeInterval(seconds)))
    }

    /// " (alert: certificate unknown)" from BoringSSL's "SSLV3_ALERT_CERTIFICATE_UNKNOWN".
    private static func alertName(_ text: String) -> String {
        guard let range = text.range(of: #"ALERT_[A-Z_]+"#, options: .regularExpression) else { return "" }
        return " (alert: " + text[range].dropFirst("ALERT_".count).lowercased().replacingOccurrences(of: "_", with: " ")
            + ")"
    }

    private static func context(verification: CertificateVerification, tls: EtcdTLS?) throws -> NIOSSLContext {
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.certificateVerification = verification
        configuration.applicationProtocols = ["h2"]
        if let tls {
            if let caFile = tls.caFile {
                configuration.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(caFile))
            }
            if let certFile = tls.certFile, let keyFile = tls.keyFile {
                configuration.certificateChain = try NIOSSLCertificate.fromPEMFile(certFile).map { .certificate($0) }
                configuration.privateKey = .privateKey(try NIOSSLPrivateKey(file: keyFile, format: .pem))
            }
        }
        return try NIOSSLContext(configuration: configuration)
    }

    enum Outcome: Sendable {
        case handshakeCompleted
        /// The server sent a TLS alert (its name in BoringSSL's words).
        case alert(String)
        case failed(String)
        /// The server closed or reset the connection before the handshake
        /// was done, without an alert (what a plain listener does with a
        /// TLS greeting).
        case hungUp
        case unreachable
    }

    /// The certificates a server presented, caught by a verification callback that accepts them.
    typealias PeerChain = Locked<[NIOSSLCertificate]>

    /// One TLS handshake, then a moment to hear the alert a server sends
    /// after it (TLS 1.3 servers check the client certificate after the
    /// client has finished).
    private static func handshake(
        _ endpoint: EtcdEndpoint,
        context: NIOSSLContext,
        timeout: Duration,
        capturing chain: PeerChain? = nil
    ) async -> Outcome {
        let group = MultiThreadedEventLoopGroup.singleton
        let promise = group.next().makePromise(of: Outcome.self)
        let serverName = endpoint.hostKind == .name ? endpoint.host : nil
        let bootstrap = ClientBootstrap(group: group)
            .connectTimeout(.milliseconds(Int64(timeout.components.seconds * 1000)))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let handler: NIOSSLClientHandler
                    if let chain {
                        handler = try NIOSSLClientHandler(
                            context: context,
                            serverHostname: serverName,
                            customVerificationCallback: { certificates, verdict in
                                chain.set(certificates)
                                verdict.succeed(.certificateVerified)
                            }
                        )
                    } else {
                        handler = try NIOSSLClientHandler(context: context, serverHostname: serverName)
                    }
                    try channel.pipeline.syncOperations.addHandler(handler)
                    try channel.pipeline.syncOperations.addHandler(OutcomeHandler(promise: promise))
                }
            }
        let channel: Channel
        do {
            channel = try await bootstrap.connect(host: endpoint.host, port: endpoint.port).get()
        } catch {
            promise.succeed(.unreachable)
            return .unreachable
        }
        let deadline = channel.eventLoop.scheduleTask(in: .milliseconds(Int64(timeout.components.seconds * 1000))) {
            promise.succeed(.failed("no answer within \(timeout)"))
        }
        let outcome = (try? await promise.futureResult.get()) ?? .unreachable
        deadline.cancel()
        try? await channel.close()
        return outcome
    }

    private final class OutcomeHandler: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = ByteBuffer
        let promise: EventLoopPromise<Outcome>
        private var completed = false

        init(promise: EventLoopPromise<Outcome>) { self.promise = promise }

        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if case .handshakeCompleted? = event as? TLSUserEvent {
                completed = true
                // A server that refuses our certificate says so right after.
                let promise = self.promise
                context.eventLoop.scheduleTask(in: .milliseconds(300)) { promise.succeed(.handshakeCompleted) }
            }
            context.fireUserInboundEventTriggered(event)
        }

        func errorCaught(context: ChannelHandlerContext, error: any Error) {
            let text = String(describing: error)
            if !completed, let io = error as? IOError, io.errnoCode == ECONNRESET {
                promise.succeed(.hungUp)
            } else {
                promise.succeed(text.contains("ALERT") ? .alert(text) : .failed(text))
            }
            context.close(promise: nil)
        }

        func channelInactive(context: ChannelHandlerContext) {
            if !completed { promise.succeed(.hungUp) }
            context.fireChannelInactive()
        }
    }
}
