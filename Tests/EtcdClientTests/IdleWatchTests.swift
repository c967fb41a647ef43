import EtcdTestSupport
import Foundation
import Logging
import Synchronization
import Testing

@testable import EtcdClient

/// A watch with nothing to report stays open: the member answers every
/// progress request, so silence detection must not take an idle cluster for
/// a silent member. (It did: the progress requests stopped after the first,
/// and every idle watch was torn down and re-made every `time + timeout`.)
@Suite(
    .enabled(if: EtcdServer.isInstalled, "etcd is not installed (apt-get install etcd-server etcd-client)"),
    .timeLimit(.minutes(1))
)
struct IdleWatchTests {
    @Test func anIdleWatchIsNotTakenForASilentMember() async throws {
        try await EtcdServer.with { server in
            let warnings = Warnings()
            let logger = Logger(label: "test") { _ in WarningCapture(warnings: warnings) }
            // Probes every 0.3 s, patience 0.6 s: 4 s idle is several patiences.
            let client = try EtcdClient(
                endpoints: [server.clientURL],
                keepaliveTime: .milliseconds(300),
                keepaliveTimeout: .milliseconds(300),
                logger: logger
            )
            let start = try await client.put("/idle/a", value: "1")
            let stream = client.watch(prefix: "/idle/", fromRevision: start + 1)
            try await Task.sleep(for: .seconds(4))
            try await client.put("/idle/b", value: "2")
            let events = try await collectEvents(stream, count: 1, within: .seconds(5))
            #expect(events.map(\.kv.key) == ["/idle/b"])
            let interrupted = warnings.lines.withLock { $0 }.filter { $0.contains("interrupted") }
            #expect(interrupted.isEmpty, "an idle watch was interrupted: \(interrupted)")
            await client.close()
        }
    }
}

private final class Warnings: Sendable {
    let lines = Mutex<[String]>([])
}

/// Keeps the warnings (and worse) a logger is given.
private struct WarningCapture: LogHandler {
    let warnings: Warnings
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .trace
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }
    func log(event: LogEvent) {
        guard event.level >= .warning else { return }
        warnings.lines.withLock { $0.append("\(event.message)") }
    }
}
