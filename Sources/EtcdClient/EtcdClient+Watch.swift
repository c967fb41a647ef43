import CoreMetrics
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import GRPCProtobuf
import Logging
import NetBase
import Synchronization

extension EtcdClient {
    /// Streams every change to keys under `prefix`, starting with revision
    /// `fromRevision` (inclusive; 0 means "changes from now on").
    ///
    /// A broken connection is resumed transparently (from the revision after
    /// the last delivered event) on any endpoint; after a minute without
    /// a working connection the stream ends with `.unavailable`. If the
    /// requested revisions were compacted, the stream ends with
    /// `EtcdError.Code.compacted`. It ends without error when the consumer
    /// stops iterating or the client is closed.
    public func watch(
        prefix: String,
        fromRevision: Int64,
        previousValues: Bool = false
    )
        -> AsyncThrowingStream<EtcdWatchBatch, any Error>
    {
        let (stream, continuation) = AsyncThrowingStream<EtcdWatchBatch, any Error>.makeStream()
        let id: Int? = state.withLock { state in
            guard !state.closed else { return nil }
            state.nextWatch += 1
            return state.nextWatch
        }
        guard let id else {
            continuation.finish(
                throwing: EtcdError(
                    .closed,
                    operation: "Watch \(prefix)*",
                    endpoints: endpoints,
                    reason: "the client is closed"
                )
            )
            return stream
        }
        let task = Task {
            await self.runWatch(
                prefix: prefix,
                from: fromRevision,
                previousValues: previousValues,
                continuation: continuation
            )
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

    /// Writes `request` every `interval` until `finished` ends (the response
    /// side is done) or the task is cancelled. `finished` is iterated once,
    /// here: an AsyncStream ends for good when a task iterating it is
    /// cancelled, so it must not be awaited afresh for every interval (that
    /// ended the probing after the first report, and an idle watch was then
    /// taken for a silent member every `patience`).
    private static func probe(
        every interval: Duration,
        until finished: AsyncStream<Never>,
        _ write: @escaping @Sendable () async throws -> Void
    ) async throws {
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask {
                for await _ in finished {}
            }
            group.addTask {
                while true {
                    try await Task.sleep(for: interval)
                    try await write()
                }
            }
            // The response side ended (or a write failed): stop probing.
            try await group.next()
            group.cancelAll()
        }
    }

    /// Runs `call` until it ends, or until nothing was heard from the
    /// server for `patience` (`heard` is when the last message arrived):
    /// then the call is cancelled and this throws Unavailable, which the
    /// watch retries — on another member, since the round robin moves on
    /// and the keepalive closes the silent member's connection.
    private static func untilSilent(
        for patience: Duration,
        heard: Locked<ContinuousClock.Instant>,
        _ call: @escaping @Sendable () async throws -> Void
    ) async throws {
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await call() }
            group.addTask {
                while true {
                    let silence = ContinuousClock.now - heard.get()
                    if silence >= patience {
                        throw RPCError(
                            code: .unavailable,
                            message:
                                "no answer from the member for \(seconds(silence)) (a watch progress request went unanswered)"
                        )
                    }
                    try await Task.sleep(for: patience - silence)
                }
            }
            // The first to end decides; the other is cancelled.
            try await group.next()
            group.cancelAll()
        }
    }

    private func runWatch(
        prefix: String,
        from start: Int64,
        previousValues: Bool,
        continuation: AsyncThrowingStream<EtcdWatchBatch, any Error>.Continuation
    ) async {
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
                            try await Self.probe(every: probe, until: finished) {
                                try await writer.write(progressRequest)
                            }
                        },
                        onResponse: { response in
                            defer { finish.finish() }
                            for try await message in response.messages {
                                heard.set(ContinuousClock.now)
                                if message.compactRevision > 0 {
                                    throw EtcdError(
                                        .compacted(oldestRevision: message.compactRevision),
                                        operation: operation,
                                        endpoints: self.endpoints,
                                        reason: "revision \(next.get()) has been compacted "
                                            + "(oldest kept: \(message.compactRevision))"
                                    )
                                }
                                if message.canceled {
                                    throw EtcdError(
                                        .watchCanceled,
                                        operation: operation,
                                        endpoints: self.endpoints,
                                        reason: message.cancelReason.isEmpty
                                            ? "the server canceled the watch" : message.cancelReason
                                    )
                                }
                                if message.created { established.set(true) }
                                guard !message.events.isEmpty else { continue }
                                let events = message.events.map(EtcdWatchEvent.init)
                                // A fragment may end inside a revision: resuming
                                // after it repeats that revision's events (puts
                                // and deletes are idempotent for the consumer).
                                let last = events[events.count - 1].revision
                                next.set(message.fragment ? last : last + 1)
                                continuation.yield(
                                    EtcdWatchBatch(
                                        events: events,
                                        headerRevision: message.header.revision
                                    )
                                )
                            }
                            throw RPCError(code: .unavailable, message: "the server ended the watch stream")
                        }
                    )
                }
            } catch is CancellationError {
                break
            } catch let error as EtcdError {
                if case .watchCanceled = error.code, !reauthenticated, credentials != nil,
                    error.reason.contains("auth")
                {
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
                let retryable: Set<RPCError.Code> = [
                    .unavailable, .deadlineExceeded, .aborted, .internalError,
                    .unknown, .resourceExhausted,
                ]
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
                logger.warning(
                    "etcd watch of \(prefix)* interrupted (\(Self.serverMessage(error))); resuming from revision \(next.get()) in \(delay) s on whichever member answers"
                )
                do { try await Task.sleep(for: .seconds(delay)) } catch { break }
                watchReconnects.increment()
            } catch {
                if Task.isCancelled { break }
                continuation.finish(
                    throwing: EtcdError(
                        .other,
                        operation: operation,
                        endpoints: endpoints,
                        reason: Self.describe(error)
                    )
                )
                return
            }
        }
        continuation.finish()
    }
}
