import EtcdTestSupport
import Foundation
import Testing

@testable import EtcdClient

private let etcdMissing = "etcd is not installed (apt-get install etcd-server etcd-client)"

/// Every test starts its own etcd on 127.0.0.1 (EtcdServer) and stops it by PID.
@Suite(.enabled(if: EtcdServer.isInstalled, Comment(rawValue: etcdMissing)), .timeLimit(.minutes(2)))
struct EtcdClientTests {
    @Test func putThenRangeReadsKeysAndPrefixes() async throws {
        try await EtcdServer.with { server in
            let client = try EtcdClient(endpoints: [server.clientURL])
            let first = try await client.put("/net/subnets/a", value: "1")
            try await client.put("/net/subnets/b", value: "2")
            try await client.put("/net/subnetsX", value: "outside")
            try await client.put("/other", value: "3")

            let one = try #require(try await client.get("/net/subnets/a"))
            #expect(one.valueString == "1")
            #expect(one.modRevision == first)
            #expect(one.lease == 0)
            #expect(try await client.get("/net/missing") == nil)

            let listed = try await client.range(prefix: "/net/subnets/")
            #expect(listed.kvs.map(\.key) == ["/net/subnets/a", "/net/subnets/b"])
            #expect(listed.revision == first + 3)

            // Reading as of an older revision sees the older store.
            let old = try await client.range(prefix: "/net/subnets/", revision: first)
            #expect(old.kvs.map(\.key) == ["/net/subnets/a"])

            let deleted = try await client.delete("/net/subnets/a")
            #expect(deleted.deleted == 1)
            #expect(try await client.get("/net/subnets/a") == nil)
            #expect(try await client.delete("/net/subnets/a").deleted == 0)
            // etcdctl sees what we wrote (same wire protocol).
            #expect(try server.etcdctl(["get", "/net/subnets/b", "--print-value-only"]) == "2\n")
            await client.close()
        }
    }

    @Test func createIfAbsentHasExactlyOneWinnerAmongRacers() async throws {
        try await EtcdServer.with { server in
            let client = try EtcdClient(endpoints: [server.clientURL])
            let results = try await withThrowingTaskGroup(of: (Int, EtcdCreateResult).self) { group in
                for i in 0..<8 {
                    group.addTask { (i, try await client.createIfAbsent("/race", value: "racer-\(i)")) }
                }
                return try await group.reduce(into: []) { $0.append($1) }
            }
            let winners = results.compactMap { i, result -> Int? in
                if case .created = result { return i } else { return nil }
            }
            #expect(winners.count == 1)
            let winner = try #require(winners.first)
            for (i, result) in results where i != winner {
                guard case .exists(let kv) = result else {
                    Issue.record("racer \(i) should have lost")
                    continue
                }
                #expect(kv.valueString == "racer-\(winner)")
            }
            #expect(try await client.get("/race")?.valueString == "racer-\(winner)")
            await client.close()
        }
    }

    @Test func leaseExpiryArrivesAsDeleteInWatch() async throws {
        try await EtcdServer.with { server in
            let client = try EtcdClient(endpoints: [server.clientURL])
            let lease = try await client.leaseGrant(ttl: 2)
            #expect(lease.ttl == 2)
            let written = try await client.put("/leased/k", value: "v", lease: lease.id)
            let info = try #require(try await client.leaseTimeToLive(lease.id, keys: true))
            #expect(info.keys == ["/leased/k"])
            #expect(info.grantedTTL == 2)
            #expect(try await client.leaseKeepAliveOnce(lease.id) == 2)
            #expect(try await client.get("/leased/k")?.lease == lease.id)

            let events = try await collectEvents(
                client.watch(prefix: "/leased/", fromRevision: written + 1),
                count: 1,
                within: .seconds(15)
            )
            #expect(events.map(\.kind) == [.delete])
            #expect(events.first?.kv.key == "/leased/k")
            #expect(try await client.leaseTimeToLive(lease.id) == nil)
            let keepAliveError = try await etcdError { _ = try await client.leaseKeepAliveOnce(lease.id) }
            #expect(keepAliveError.code == .leaseNotFound)
            await client.close()
        }
    }

    @Test func revokingALeaseDeletesItsKeys() async throws {
        try await EtcdServer.with { server in
            let client = try EtcdClient(endpoints: [server.clientURL])
            let lease = try await client.leaseGrant(ttl: 600)
            try await client.put("/r/1", value: "x", lease: lease.id)
            try await client.put("/r/2", value: "y")
            try await client.leaseRevoke(lease.id)
            #expect(try await client.range(prefix: "/r/").kvs.map(\.key) == ["/r/2"])
            let twice = try await etcdError { try await client.leaseRevoke(lease.id) }
            #expect(twice.code == .leaseNotFound)
            await client.close()
        }
    }

    @Test func watchFromARevisionReplaysLaterChangesInOrder() async throws {
        try await EtcdServer.with { server in
            let client = try EtcdClient(endpoints: [server.clientURL])
            try await client.put("/w/a", value: "1")
            let second = try await client.put("/w/b", value: "2")
            try await client.delete("/w/a")
            try await client.put("/x/ignored", value: "-")
            let stream = client.watch(prefix: "/w/", fromRevision: second, previousValues: true)
            // Writes after the watch started arrive too, after the replay.
            try await client.put("/w/b", value: "3")
            let events = try await collectEvents(stream, count: 3, within: .seconds(10))
            #expect(events.map(\.kind) == [.put, .delete, .put])
            #expect(events.map(\.kv.key) == ["/w/b", "/w/a", "/w/b"])
            #expect(events.map(\.kv.valueString) == ["2", "", "3"])
            #expect(events[0].revision == second)
            #expect(events[1].previous?.valueString == "1")
            #expect(events[2].previous?.valueString == "2")
            await client.close()
        }
    }

    @Test func watchOfACompactedRevisionEndsWithCompactedError() async throws {
        try await EtcdServer.with { server in
            let client = try EtcdClient(endpoints: [server.clientURL])
            let first = try await client.put("/c/k", value: "1")
            try await client.put("/c/k", value: "2")
            let last = try await client.put("/c/k", value: "3")
            try server.etcdctl(["compact", String(last)])

            let error = try await etcdError {
                _ = try await collectEvents(
                    client.watch(prefix: "/c/", fromRevision: first),
                    count: 1,
                    within: .seconds(10)
                )
            }
            #expect(error.code == .compacted(oldestRevision: last))
            #expect(error.description.contains("compacted"))

            // Reading at a compacted revision fails the same way (oldest unknown there).
            let rangeError = try await etcdError { _ = try await client.range(prefix: "/c/", revision: first) }
            #expect(rangeError.code == .compacted(oldestRevision: 0), "\(rangeError)")
            // Watching from the compaction point on works.
            try await client.put("/c/k", value: "4")
            let events = try await collectEvents(
                client.watch(prefix: "/c/", fromRevision: last + 1),
                count: 1,
                within: .seconds(10)
            )
            #expect(events.map(\.kv.valueString) == ["4"])
            await client.close()
        }
    }

    @Test func watchEndsWithoutErrorWhenTheClientCloses() async throws {
        try await EtcdServer.with { server in
            let client = try EtcdClient(endpoints: [server.clientURL])
            // A watch from a revision already written delivers that write once it is
            // established: its first batch is the sign that the watch is live.
            let ready = try await client.put("/q/ready", value: "1")
            let stream = client.watch(prefix: "/q/", fromRevision: ready)
            let (batches, batchArrived) = AsyncStream<Void>.makeStream()
            let consumer = Task {
                var count = 0
                for try await batch in stream {
                    count += batch.events.count
                    batchArrived.yield()
                }
                return count
            }
            try await waitForBatch(batches, within: .seconds(10))
            await client.close()
            let outcome = try await withTimeout(.seconds(10)) { try await consumer.value }
            #expect(outcome == 1)
            let closed = try await etcdError { try await client.put("/q/a", value: "1") }
            #expect(closed.code == .closed)
        }
    }

    @Test func watchSurvivesAServerRestartWithoutLosingEvents() async throws {
        try await EtcdServer.with { server in
            let client = try EtcdClient(endpoints: [server.clientURL])
            let first = try await client.put("/s/a", value: "1")
            let stream = client.watch(prefix: "/s/", fromRevision: first)
            let (batches, batchArrived) = AsyncStream<Void>.makeStream()
            let collector = Task {
                try await collectEvents(stream, count: 3, within: .seconds(60), onBatch: { batchArrived.yield() })
            }
            // The watch has delivered "1": it is established before the server goes away.
            try await waitForBatch(batches, within: .seconds(10))
            let pid = server.pid
            try await server.restart(downtime: .seconds(1))
            #expect(server.pid != pid)
            // Written right away, before the watch has reconnected: the watch
            // resumes after the last event it delivered, so none is lost.
            try await client.put("/s/b", value: "2")
            try await client.put("/s/c", value: "3")
            let events = try await collector.value
            #expect(events.map(\.kv.valueString) == ["1", "2", "3"])
            await client.close()
        }
    }

    @Test func deadFirstEndpointFailsOverToTheLiveOne() async throws {
        try await EtcdServer.with { server in
            let deadPort = try freePorts(1)[0]
            let client = try EtcdClient(endpoints: ["http://127.0.0.1:\(deadPort)", server.clientURL])
            for i in 0..<5 {
                try await client.put("/f/\(i)", value: "\(i)")
            }
            #expect(try await client.range(prefix: "/f/").kvs.count == 5)
            let events = try await collectEvents(
                client.watch(prefix: "/f/", fromRevision: 1),
                count: 5,
                within: .seconds(10)
            )
            #expect(events.count == 5)
            await client.close()
        }
    }

    @Test func unreachableEndpointsGiveAnErrorNamingThem() async throws {
        let ports = try freePorts(2)
        let endpoints = ports.map { "http://127.0.0.1:\($0)" }
        let client = try EtcdClient(endpoints: endpoints, requestTimeout: .seconds(3))
        let started = ContinuousClock.now
        let error = try await etcdError { _ = try await client.get("/docker/network/config") }
        #expect(error.code == .unavailable || error.code == .timedOut)
        let text = error.description
        #expect(text.hasPrefix("etcd Range /docker/network/config at \(endpoints[0]), \(endpoints[1]) failed: "))
        #expect(text.contains("(is etcd running and reachable?)") || error.code == .timedOut)
        #expect(ContinuousClock.now - started < .seconds(15))
        await client.close()
    }

    @Test func usernameAndPasswordAuthenticateAndTokensAreRenewed() async throws {
        // Tokens live 1 s here, so the second request needs a new one.
        try await EtcdServer.with(arguments: ["--auth-token-ttl=1"]) { server in
            try server.enableAuth(rootPassword: "s3cret")
            let client = try EtcdClient(
                endpoints: [server.clientURL],
                credentials: EtcdCredentials(username: "root", password: "s3cret")
            )
            try await client.put("/auth/k", value: "1")
            try await Task.sleep(for: .milliseconds(2500))
            #expect(try await client.get("/auth/k")?.valueString == "1")
            let events = try await collectEvents(
                client.watch(prefix: "/auth/", fromRevision: 1),
                count: 1,
                within: .seconds(10)
            )
            #expect(events.map(\.kv.key) == ["/auth/k"])

            let wrong = try EtcdClient(
                endpoints: [server.clientURL],
                credentials: EtcdCredentials(username: "root", password: "wrong")
            )
            let refused = try await etcdError { _ = try await wrong.get("/auth/k") }
            #expect(refused.code == .authenticationFailed)
            #expect(refused.description.contains("Authenticate root"))

            let anonymous = try EtcdClient(endpoints: [server.clientURL])
            await #expect(throws: EtcdError.self) { _ = try await anonymous.get("/auth/k") }
            await anonymous.close()
            await wrong.close()
            await client.close()
        }
    }

    @Test func mutualTLSWithClientCertificates() async throws {
        try await EtcdServer.with(tls: true) { server in
            let certs = try #require(server.certificates)
            #expect(server.clientURL.hasPrefix("https://127.0.0.1:"))
            let client = try EtcdClient(
                endpoints: [server.clientURL],
                tls: EtcdTLS(caFile: certs.caFile, certFile: certs.clientCertFile, keyFile: certs.clientKeyFile)
            )
            try await client.put("/tls/k", value: "secure")
            #expect(try await client.get("/tls/k")?.valueString == "secure")

            // Without a client certificate the server refuses the handshake.
            let noCert = try EtcdClient(
                endpoints: [server.clientURL],
                tls: EtcdTLS(caFile: certs.caFile),
                requestTimeout: .seconds(3)
            )
            await #expect(throws: EtcdError.self) { _ = try await noCert.get("/tls/k") }
            // Plain http to a TLS port fails too.
            let plain = try EtcdClient(
                endpoints: ["http://127.0.0.1:\(server.clientPort)"],
                requestTimeout: .seconds(3)
            )
            await #expect(throws: EtcdError.self) { _ = try await plain.get("/tls/k") }
            await plain.close()
            await noCert.close()
            await client.close()
        }
    }

    @Test func badEndpointsAndTLSFilesAreRejectedWithAReason() throws {
        func configurationError(_ make: () throws -> EtcdClient) -> EtcdError? {
            do {
                _ = try make()
                return nil
            } catch {
                return error as? EtcdError
            }
        }
        let scheme = configurationError { try EtcdClient(endpoints: ["ftp://127.0.0.1:2379"]) }
        #expect(scheme?.code == .configuration)
        #expect(scheme?.description.contains("unsupported scheme") == true)
        let mixed = configurationError {
            try EtcdClient(endpoints: ["http://127.0.0.1:2379", "https://127.0.0.1:2380"])
        }
        #expect(mixed?.description.contains("mix http:// and https://") == true)
        #expect(configurationError { try EtcdClient(endpoints: []) }?.code == .configuration)
        #expect(configurationError { try EtcdClient(endpoints: ["http://127.0.0.1:99999"]) }?.code == .configuration)
        let missing = configurationError {
            try EtcdClient(endpoints: ["https://127.0.0.1:2379"], tls: EtcdTLS(caFile: "/nonexistent/ca.pem"))
        }
        #expect(missing?.description.contains("cannot read the CA file /nonexistent/ca.pem") == true)
    }

    @Test func endpointsParseWithAndWithoutScheme() throws {
        let plain = try EtcdEndpoint.parse("10.0.0.1:4001", defaultSecure: false)
        #expect(plain.secure == false && plain.host == "10.0.0.1" && plain.port == 4001)
        let secure = try EtcdEndpoint.parse("https://etcd.example/", defaultSecure: false)
        #expect(secure.secure && secure.host == "etcd.example" && secure.port == 2379)
        #expect(secure.hostKind == .name)
        let v6 = try EtcdEndpoint.parse("http://[::1]:2379", defaultSecure: true)
        #expect(v6.secure == false && v6.host == "::1" && v6.hostKind == .ipv6)
    }

    @Test func prefixRangeEndIncrementsTheLastByte() {
        #expect(EtcdClient.prefixEnd("/a/") == Data("/a0".utf8))
        #expect(EtcdClient.prefixEnd("é") == Data([0xC3, 0xAA]))
        #expect(EtcdClient.prefixEnd("") == Data([0]))
    }
}

/// Reads batches until `count` events have arrived; fails after `within`.
func collectEvents(
    _ stream: AsyncThrowingStream<EtcdWatchBatch, any Error>,
    count: Int,
    within limit: Duration,
    onBatch: @escaping @Sendable () -> Void = {}
) async throws -> [EtcdWatchEvent] {
    try await withTimeout(limit) {
        var events: [EtcdWatchEvent] = []
        for try await batch in stream {
            events += batch.events
            onBatch()
            if events.count >= count { break }
        }
        return events
    }
}

/// Waits until `batches` has a signal (a watch delivered a batch); fails after `limit`.
func waitForBatch(_ batches: AsyncStream<Void>, within limit: Duration) async throws {
    try await withTimeout(limit) {
        for await _ in batches { return }
        throw TestSupportError("the watch delivered nothing")
    }
}

/// The EtcdError `body` throws; fails the test if it returns or throws something else.
func etcdError(_ body: () async throws -> Void) async throws -> EtcdError {
    var thrown: (any Error)?
    do {
        try await body()
    } catch {
        thrown = error
    }
    return try #require(thrown as? EtcdError, "expected an EtcdError, got \(String(describing: thrown))")
}
