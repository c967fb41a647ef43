import CoreMetrics
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import GRPCProtobuf
import Logging
import Synchronization

extension EtcdClient {
    /// Runs one RPC with the auth token, the request timeout, one
    /// re-authentication when the token is rejected, and retries while no
    /// endpoint is reachable, for up to half the request timeout (every
    /// operation here is safe to repeat: a repeated create-if-absent reports
    /// `.exists` with our own value).
    /// Call options with the receive limit. grpc-swift-nio-transport 2.x
    /// bounds inbound messages by `maxRequestMessageBytes`; both are set.
    var callOptions: CallOptions {
        var options = CallOptions.defaults
        options.maxRequestMessageBytes = maxReceiveMessageBytes
        options.maxResponseMessageBytes = maxReceiveMessageBytes
        return options
    }

    func perform<Result: Sendable>(
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
    func tlsProblem(_ error: RPCError) async -> String? {
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
    func retryDelay(after retries: Int, since started: ContinuousClock.Instant) -> Duration? {
        let delay = Duration.milliseconds(min(250 << min(retries, 3), 1000))
        guard ContinuousClock.now + delay - started < requestTimeout / 2 else { return nil }
        return delay
    }

    /// etcd rejects an expired simple token with Unauthenticated "invalid auth
    /// token", and one issued before a change to users or roles with "revision
    /// of auth store is old".
    static func isStaleToken(_ error: RPCError) -> Bool {
        error.code == .unauthenticated || error.message.contains("auth store is old")
    }

    func invalidateToken() {
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
    func requestMetadata(operation: String) async throws(EtcdError) -> Metadata {
        var metadata = try await authMetadata(operation: operation)
        metadata.addString("true", forKey: "hasleader")
        return metadata
    }

    func authMetadata(operation: String) async throws(EtcdError) -> Metadata {
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
                throw EtcdError(
                    .other,
                    operation: "Authenticate \(credentials.username)",
                    endpoints: endpoints,
                    reason: Self.describe(error)
                )
            }
        }
    }

    func map(_ error: RPCError, operation: String) -> EtcdError {
        let message = Self.serverMessage(error)
        let code: EtcdError.Code
        var reason: String
        // grpc-swift reports an answer over the receive limit as an internal
        // error ("Failed to decode message") caused by resourceExhausted.
        if message.contains("exceeded the configured maximum payload size") {
            return EtcdError(
                .responseTooLarge,
                operation: operation,
                endpoints: endpoints,
                reason: "the answer is larger than the receive limit of \(maxReceiveMessageBytes) bytes"
            )
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
    static func serverMessage(_ error: RPCError) -> String {
        var message = error.message
        if message.hasPrefix("etcdserver: ") { message.removeFirst("etcdserver: ".count) }
        // grpc-swift's wording for "no endpoint is up"; the cause says why.
        message = message.replacingOccurrences(
            of: "Channel is in a transient failure state and 'wait for ready' isn't enabled. ",
            with: ""
        )
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
