import EtcdTestSupport
import Foundation
import NetBase
import Testing

@testable import EtcdClient

private let etcdMissing = "etcd is not installed (apt-get install etcd-server etcd-client)"

/// Writes `count` keys `<prefix>NNNNNN` with values of `valueBytes` bytes,
/// 128 per transaction (etcd's default --max-txn-ops).
private func fill(_ client: EtcdClient, prefix: String, count: Int, valueBytes: Int) async throws {
    let value = Array(repeating: UInt8(ascii: "v"), count: valueBytes)
    var index = 0
    while index < count {
        let batch = (index..<min(count, index + 128)).map { i in
            (key: prefix + String(format: "%06d", i), value: value)
        }
        try await client.putAll(batch)
        index += batch.count
    }
}

/// Range reads and watches that do not depend on one answer holding
/// everything: gRPC's usual receive limit is 4 MiB and a /8 network of /24
/// subnets has 65,535 leases.
@Suite(.enabled(if: EtcdServer.isInstalled, Comment(rawValue: etcdMissing)), .timeLimit(.minutes(2)))
struct EtcdPagingTests {
    @Test func rangeLargerThanTheReceiveLimitIsReadInPagesThatShrinkUntilTheyFit() async throws {
        try await EtcdServer.with { server in
            // 3,000 keys of ~330 bytes: ~1 MB, four times the client's limit;
            // a 1,000-key page (~330 KB) is too large too and must be halved.
            let client = try EtcdClient(endpoints: [server.clientURL], maxReceiveMessageBytes: 256 << 10)
            try await fill(client, prefix: "/big/", count: 3000, valueBytes: 300)
            try await client.put("/big0", value: "outside the prefix")

            // One answer for everything does not fit: the limit is real.
            await #expect {
                _ = try await client.rangePage(key: "/big/", rangeEnd: EtcdClient.rangeEnd(ofPrefix: "/big/"))
            } throws: { error in
                (error as? EtcdError)?.code == .responseTooLarge
            }

            let listed = try await client.range(prefix: "/big/")
            #expect(listed.kvs.count == 3000)
            #expect(listed.kvs.map(\.key) == (0..<3000).map { "/big/" + String(format: "%06d", $0) })
            #expect(listed.kvs.allSatisfy { $0.value.count == 300 })
            #expect(listed.revision == (try server.currentRevision()))
            await client.close()
        }
    }

    @Test func pagedRangeIsOneSnapshotWhileKeysChangeBetweenPages() async throws {
        try await EtcdServer.with { server in
            let client = try EtcdClient(endpoints: [server.clientURL])
            try await fill(client, prefix: "/s/", count: 2000, valueBytes: 20)

            // A writer changes keys all over the range (new values, deletes,
            // new keys) while the list reads 20 keys per page: 100 pages.
            let writes = Locked<[Int64]>([])
            let listingDone = Locked(false)
            let writer = Task {
                var generator = SystemRandomNumberGenerator()
                for step in 0..<3000 where !listingDone.get() {
                    let key = "/s/" + String(format: "%06d", Int.random(in: 0..<2100, using: &generator))
                    let revision: Int64
                    if step % 3 == 0 {
                        revision = try await client.delete(key).revision
                    } else {
                        revision = try await client.put(key, value: "changed-\(step)")
                    }
                    writes.set(writes.get() + [revision])
                }
            }
            // Let the writer get going before the first page.
            while writes.get().count < 5 { try await Task.sleep(for: .milliseconds(5)) }
            let listed = try await client.range(prefix: "/s/", pageSize: 20)
            let writtenDuringListing = writes.get().filter { $0 > listed.revision }
            listingDone.set(true)
            try await writer.value

            // Keys changed after the first page was read, yet the result is
            // exactly the store as of the first page's revision.
            #expect(!writtenDuringListing.isEmpty, "the writer made no change while the list was read")
            let atRevision = try await client.rangePage(
                key: "/s/",
                rangeEnd: EtcdClient.rangeEnd(ofPrefix: "/s/"),
                revision: listed.revision
            )
            #expect(atRevision.more == false)
            #expect(listed.kvs == atRevision.result.kvs)
            let now = try await client.range(prefix: "/s/")
            #expect(now.kvs != listed.kvs)

            // Watching from revision + 1 and applying the changes to the
            // snapshot gives today's store: nothing between is lost.
            var state = Dictionary(uniqueKeysWithValues: listed.kvs.map { ($0.key, $0.value) })
            var revision = listed.revision
            for try await batch in client.watch(prefix: "/s/", fromRevision: listed.revision + 1) {
                for event in batch.events {
                    switch event.kind {
                    case .put: state[event.kv.key] = event.kv.value
                    case .delete: state[event.kv.key] = nil
                    }
                    revision = event.revision
                }
                if revision >= now.revision { break }
            }
            #expect(state == Dictionary(uniqueKeysWithValues: now.kvs.map { ($0.key, $0.value) }))
            await client.close()
        }
    }

    @Test func watchCatchingUpOnMoreThanTheReceiveLimitGetsEveryEvent() async throws {
        try await EtcdServer.with { server in
            let client = try EtcdClient(endpoints: [server.clientURL], maxReceiveMessageBytes: 4 << 20)
            let start = try server.currentRevision()
            // 48 transactions of 128 puts of ~1 KiB: ~6.3 MB of events a
            // watch from `start` gets at once unless etcd splits the answer.
            try await fill(client, prefix: "/w/", count: 48 * 128, valueBytes: 1000)
            var seen = Set<String>()
            var events = 0
            for try await batch in client.watch(prefix: "/w/", fromRevision: start + 1) {
                for event in batch.events where event.kind == .put {
                    events += 1
                    seen.insert(event.kv.key)
                }
                if seen.count == 48 * 128 { break }
            }
            #expect(seen.count == 48 * 128)
            // A fragment resumed after a reconnect may repeat a revision's
            // events; without a reconnect each arrives once.
            #expect(events == 48 * 128)
            await client.close()
        }
    }
}
