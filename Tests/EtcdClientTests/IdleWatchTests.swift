import EtcdTestSupport
import Foundation
import Logging
import NetTestSupport
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
            let logs = LogCapture()
            let logger = logs.logger
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
            let interrupted = logs.all.filter { $0.hasPrefix("warning:") && $0.contains("interrupted") }
            #expect(interrupted.isEmpty, "an idle watch was interrupted: \(interrupted)")
            await client.close()
        }
    }
}
