import EtcdClient
import EtcdTestSupport
import Foundation
import NetBase
import Synchronization
import Testing

@testable import LeaseStore

private let etcdMissing = "etcd is not installed (apt-get install etcd-server etcd-client)"

/// Runs `body` with a store on a fresh etcd (stopped afterwards), prefix
/// "/docker/network/" (trailing slash on purpose), and `config` written.
private func withStore<T>(
    config: String = #"{"Network":"10.5.0.0/16","SubnetLen":24,"Backend":{"Type":"udp"}}"#,
    leaseTTL: Duration = .seconds(24 * 3600),
    _ body: (EtcdServer, EtcdLeaseStore, NetworkConfig) async throws -> T
) async throws -> T {
    try await EtcdServer.with { server in
        let client = try EtcdClient(endpoints: [server.clientURL])
        let store = EtcdLeaseStore(client: client, prefix: "/docker/network/", leaseTTL: leaseTTL)
        do {
            let parsed = try await store.setNetworkConfig(json: config)
            let result = try await body(server, store, parsed)
            await client.close()
            return result
        } catch {
            await client.close()
            throw error
        }
    }
}

private func node(_ last: UInt8) -> LeaseAttributes {
    LeaseAttributes(publicIP: IPv4Address(198, 18, 0, last))
}

@Suite(.enabled(if: EtcdServer.isInstalled, Comment(rawValue: etcdMissing)), .timeLimit(.minutes(2)))
struct EtcdLeaseStoreTests {
    @Test func configLivesAtPrefixConfigWithTheTrailingSlashIgnored() async throws {
        try await withStore { server, store, config in
            #expect(store.prefix == "/docker/network")
            let stored = try server.etcdctl(["get", "/docker/network/config", "--print-value-only"])
            #expect(stored == config.json + "\n")
            let raw = try await store.rawNetworkConfig()
            #expect(raw == config.json)
            let parsed = try await store.networkConfig()
            #expect(parsed == config)
        }
    }

    @Test func missingConfigSaysWhichStoreHasNone() async throws {
        try await EtcdServer.with { server in
            let client = try EtcdClient(endpoints: [server.clientURL])
            let store = EtcdLeaseStore(client: client)
            #expect(try await store.rawNetworkConfig() == nil)
            await #expect(throws: LeaseStoreError.configNotFound(location: store.location)) {
                _ = try await store.networkConfig()
            }
            #expect(store.location.hasSuffix("/coreos.com/network"))
            await client.close()
        }
    }

    @Test func leaseWrittenByFlannelWithEtcdctlIsListed() async throws {
        try await withStore { server, store, _ in
            let grant = try server.etcdctl(["lease", "grant", "600"])  // "lease 694d… granted with TTL(600s)"
            let leaseID = try #require(grant.split(separator: " ").dropFirst().first)
            try server.etcdctl([
                "put", "--lease=\(leaseID)", "/docker/network/subnets/10.5.72.0-24",
                #"{"PublicIP":"198.18.0.72","PublicIPv6":null}"#,
            ])
            try server.etcdctl([
                "put", "/docker/network/subnets/10.5.73.0-24",
                #"{"PublicIP":"198.18.0.73","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}"#,
            ])
            // Not lease keys: skipped, as flannel does.
            try server.etcdctl(["put", "/docker/network/subnets/garbage", "x"])
            try server.etcdctl(["put", "/docker/network/subnets/10.5.74.0-24/extra", "x"])

            let snapshot = try await store.leases()
            #expect(snapshot.revision == (try server.currentRevision()))
            let leases = snapshot.leases.sorted { $0.subnet.address < $1.subnet.address }
            #expect(leases.map(\.subnet.description) == ["10.5.72.0/24", "10.5.73.0/24"])
            // Named, so that every reader can report them (`LeaseRule`).
            #expect(snapshot.malformedKeys == ["10.5.74.0-24/extra", "garbage"])
            let udp = leases[0]
            #expect(udp.attributes == node(72))
            let expiration = try #require(udp.expiration)
            #expect(expiration.timeIntervalSinceNow > 500 && expiration.timeIntervalSinceNow <= 601)
            let vxlan = leases[1]
            #expect(vxlan.isReservation)
            #expect(vxlan.attributes.backendType == "vxlan")
            #expect(
                vxlan.attributes.backendData == .object(["VNI": .number(1), "VtepMAC": .string("aa:bb:cc:dd:ee:ff")])
            )
        }
    }

    @Test func acquiredLeaseIsFlannelsExactJSONOnA24HourEtcdLease() async throws {
        try await withStore { server, store, config in
            let lease = try await store.acquireLease(config: config, attributes: node(1), preferred: nil)
            #expect(config.network.contains(lease.subnet) && lease.subnet.prefixLength == 24)
            #expect(lease.subnet != IPv4Network("10.5.0.0/24"))  // SubnetMin skips the first subnet
            let key = "/docker/network/subnets/\(lease.subnet.leaseKey)"
            #expect(
                try server.etcdctl(["get", key, "--print-value-only"])
                    == #"{"PublicIP":"198.18.0.1","PublicIPv6":null}"# + "\n"
            )
            let kv = try #require(try await store.client.get(key))
            #expect(kv.lease != 0)
            let ttl = try #require(try await store.client.leaseTimeToLive(kv.lease))
            #expect(ttl.grantedTTL == 24 * 3600)
            let expiration = try #require(lease.expiration)
            #expect(abs(expiration.timeIntervalSinceNow - 24 * 3600) < 60)
        }
    }

    /// A start reads the leases once: the read that chose the subnet is
    /// the list of peers, with our new lease in it, and the watch from its
    /// revision replays our lease's creation.
    @Test func joinListsOnceAndItsPeersIncludeTheNewLease() async throws {
        try await withStore { server, store, config in
            for i in 1...3 {
                _ = try server.etcdctl([
                    "put", "/docker/network/subnets/10.5.\(i).0-24",
                    #"{"PublicIP":"198.18.1.\#(i)","PublicIPv6":null}"#,
                ])
            }
            let before = store.listings.load(ordering: .relaxed)
            let joined = try await store.join(config: config, attributes: node(9), preferred: nil)
            #expect(store.listings.load(ordering: .relaxed) - before == 1)
            #expect(joined.peers.leases.count == 4)
            #expect(joined.peers.leases.filter { $0.subnet == joined.lease.subnet } == [joined.lease])
            #expect(
                Set(joined.peers.leases.map(\.subnet)).isSuperset(of: (1...3).map { IPv4Network("10.5.\($0).0/24")! })
            )
            #expect(joined.peers.revision < joined.lease.revision)
            var events = store.watchPeerLeases(after: joined.peers.revision, holder: node(9).publicIP)
                .makeAsyncIterator()
            let first = try await events.next()
            #expect(first?.key == joined.lease.key)
            #expect(first?.revision == joined.lease.revision)
        }
    }

    /// A restart that reuses its lease: the list holds the lease as
    /// refreshed, not as read before the refresh.
    @Test func joinReusingItsLeaseListsItAsRefreshed() async throws {
        try await withStore { _, store, config in
            let first = try await store.acquireLease(config: config, attributes: node(7), preferred: nil)
            let joined = try await store.join(config: config, attributes: node(7), preferred: nil)
            #expect(joined.lease.subnet == first.subnet)
            #expect(joined.lease.revision > first.revision)
            #expect(joined.peers.leases == [joined.lease])
        }
    }

    @Test func preferredSubnetIsTakenWhenFree() async throws {
        try await withStore { _, store, config in
            let wanted = try #require(IPv4Network("10.5.200.0/24"))
            let lease = try await store.acquireLease(config: config, attributes: node(2), preferred: wanted)
            #expect(lease.subnet == wanted)
            // Taken now: another node asking for it gets another one.
            let other = try await store.acquireLease(config: config, attributes: node(3), preferred: wanted)
            #expect(other.subnet != wanted)
        }
    }

    @Test func eightConcurrentAcquisitionsGetEightDistinctSubnets() async throws {
        // Eight subnets for eight nodes picking at random: lost races are
        // near certain, and every node must end up with one of them.
        let config = #"{"Network":"10.6.0.0/16","SubnetLen":24,"SubnetMin":"10.6.1.0","SubnetMax":"10.6.8.0"}"#
        try await withStore(config: config) { server, store, config in
            let leases = try await withThrowingTaskGroup(of: Lease.self) { group in
                for i in 0..<8 {
                    group.addTask {
                        try await store.acquireLease(config: config, attributes: node(UInt8(10 + i)), preferred: nil)
                    }
                }
                return try await group.reduce(into: [Lease]()) { $0.append($1) }
            }
            #expect(Set(leases.map(\.subnet)) == Set((1...8).map { IPv4Network("10.6.\($0).0/24")! }))
            #expect(Set(leases.map(\.attributes.publicIP)).count == 8)
            let listed = try await store.leases().leases
            #expect(Set(listed.map(\.subnet)) == Set(leases.map(\.subnet)))
            // No etcd lease is left behind by lost races: 8 keys, 8 leases.
            let leaseList = try server.etcdctl(["lease", "list"])
            #expect(leaseList.hasPrefix("found 8 leases"))
        }
    }

    @Test func fullNetworkGivesOutOfSubnets() async throws {
        let config = #"{"Network":"10.7.0.0/16","SubnetLen":24,"SubnetMin":"10.7.1.0","SubnetMax":"10.7.3.0"}"#
        try await withStore(config: config) { _, store, config in
            for i in 0..<3 {
                _ = try await store.acquireLease(config: config, attributes: node(UInt8(20 + i)), preferred: nil)
            }
            let full = await #expect(throws: LeaseStoreError.self) {
                _ = try await store.acquireLease(config: config, attributes: node(30), preferred: nil)
            }
            guard case .outOfSubnets(config.network, let keys)? = full else {
                Issue.record("expected out of subnets, got \(String(describing: full))")
                return
            }
            #expect(keys == ["10.7.1.0-24", "10.7.2.0-24", "10.7.3.0-24"])
        }
    }

    @Test func unreadableLeaseIsNotListedButKeepsItsSubnetTaken() async throws {
        let config = #"{"Network":"10.8.0.0/16","SubnetLen":24,"SubnetMin":"10.8.1.0","SubnetMax":"10.8.2.0"}"#
        try await withStore(config: config) { server, store, config in
            try server.etcdctl(["put", "/docker/network/subnets/10.8.1.0-24", "not json"])
            #expect(try await store.leases().leases.isEmpty)
            let lease = try await store.acquireLease(
                config: config,
                attributes: node(70),
                preferred: IPv4Network("10.8.1.0/24")
            )
            #expect(lease.subnet == IPv4Network("10.8.2.0/24"))
            await #expect(
                throws: LeaseStoreError.outOfSubnets(
                    network: config.network,
                    blockedBy: ["10.8.2.0-24", "10.8.1.0-24"]
                )
            ) {
                _ = try await store.acquireLease(config: config, attributes: node(71), preferred: nil)
            }
        }
    }

    @Test func unreadableLeaseValuesAreListedInSkippedWithTheirKeys() async throws {
        try await withStore { server, store, _ in
            try server.etcdctl(["put", "/docker/network/subnets/10.5.10.0-24", "not json"])
            try server.etcdctl(["put", "/docker/network/subnets/10.5.11.0-24", #"{"PublicIPv6":null}"#])
            try server.etcdctl([
                "put", "/docker/network/subnets/10.5.12.0-24",
                #"{"PublicIP":"198.18.0.12","PublicIPv6":null}"#,
            ])
            // Not a lease key: ignored as flannel ignores it, not reported.
            try server.etcdctl(["put", "/docker/network/subnets/not-a-lease", "x"])

            let snapshot = try await store.leases()
            #expect(snapshot.leases.map(\.subnet) == [IPv4Network("10.5.12.0/24")!])
            #expect(snapshot.skipped.count == 2)
            var reasons: [String: String] = [:]
            for problem in snapshot.skipped {
                guard case .corrupt(let key, let reason) = problem else {
                    Issue.record("skipped entry is not .corrupt: \(problem)")
                    continue
                }
                reasons[key] = reason
                // Says what to do about it, naming the key.
                #expect(problem.description.contains("etcdctl del \(key)"))
            }
            #expect(
                reasons.keys.sorted() == [
                    "/docker/network/subnets/10.5.10.0-24",
                    "/docker/network/subnets/10.5.11.0-24",
                ]
            )
            #expect(reasons["/docker/network/subnets/10.5.10.0-24"]?.contains("not JSON") == true)
            #expect(reasons["/docker/network/subnets/10.5.11.0-24"]?.contains("no PublicIP") == true)
        }
    }

    @Test func vxlanLeaseValueIsWrittenAsFlanneldWritesIt() async throws {
        try await withStore { server, store, config in
            let attributes = LeaseAttributes(
                publicIP: IPv4Address(198, 18, 0, 9),
                backendType: "vxlan",
                backendData: .object(["VtepMAC": .string("aa:bb:cc:dd:ee:ff"), "VNI": .number(1)])
            )
            let lease = try await store.acquireLease(config: config, attributes: attributes, preferred: nil)
            let key = "/docker/network/subnets/\(lease.subnet.leaseKey)"
            #expect(
                try server.etcdctl(["get", key, "--print-value-only"])
                    == #"{"PublicIP":"198.18.0.9","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}"#
                    + "\n"
            )
            let listed = try await store.leases().leases
            #expect(listed.map(\.subnet) == [lease.subnet])
            #expect(listed.first?.attributes == attributes)
        }
    }

    @Test func ownLeaseThatNoLongerFitsIsDeletedButOwnReservationAndOthersLeasesStay() async throws {
        try await withStore { server, store, config in
            let old = try await store.acquireLease(
                config: config,
                attributes: node(80),
                preferred: IPv4Network("10.5.80.0/24")
            )
            #expect(old.subnet == IPv4Network("10.5.80.0/24"))
            let oldKey = "/docker/network/subnets/10.5.80.0-24"
            let oldKV = try #require(try await store.client.get(oldKey))
            let others = try await store.acquireLease(
                config: config,
                attributes: node(82),
                preferred: IPv4Network("10.5.82.0/24")
            )
            let reservationKey = "/docker/network/subnets/10.5.81.0-24"
            try server.etcdctl(["put", reservationKey, #"{"PublicIP":"198.18.0.80","PublicIPv6":null}"#])

            // /25 subnets now, and only four of them. Our old /24 is deleted;
            // the /24 reservation is no lease by the one rule (wider than
            // SubnetLen): it blocks none of the /25s inside it.
            let narrower = try await store.setNetworkConfig(
                json: #"""
                    {"Network":"10.5.0.0/16","SubnetLen":25,"SubnetMin":"10.5.80.0","SubnetMax":"10.5.81.128"}
                    """#
            )
            let new = try await store.acquireLease(config: narrower, attributes: node(80), preferred: nil)
            #expect(new.subnet.prefixLength == 25)
            #expect(narrower.fits(new.subnet))
            #expect(!new.isReservation)

            #expect(try await store.client.get(oldKey) == nil)
            #expect(try await store.client.leaseTimeToLive(oldKV.lease) == nil)  // revoked, not left for 24 h
            // The reservation is the operator's: untouched, still without a TTL.
            let reservation = try #require(try await store.client.get(reservationKey))
            #expect(reservation.lease == 0 && reservation.version == 1)
            // Another node's lease that no longer fits is that node's to replace.
            let listed = try await store.leases().leases
            #expect(listed.first { $0.subnet == others.subnet }?.revision == others.revision)
            #expect(Set(listed.map(\.subnet)) == [new.subnet, IPv4Network("10.5.81.0/24")!, others.subnet])
        }
    }

    @Test func restartedNodeReusesItsLeaseForTheSamePublicIP() async throws {
        try await withStore { server, store, config in
            let first = try await store.acquireLease(config: config, attributes: node(40), preferred: nil)
            // A new store object and client, as after a restart, even with another preference.
            let client = try EtcdClient(endpoints: [server.clientURL])
            let restarted = EtcdLeaseStore(client: client, prefix: "/docker/network")
            let again = try await restarted.acquireLease(
                config: config,
                attributes: node(40),
                preferred: IPv4Network("10.5.99.0/24")
            )
            #expect(again.subnet == first.subnet)
            #expect(again.revision > first.revision)  // rewritten with a fresh etcd lease
            #expect(try await restarted.leases().leases.count == 1)
            await client.close()
        }
    }

    @Test func renewKeepsTheSubnetWithAFreshEtcdLease() async throws {
        try await withStore(leaseTTL: .seconds(30)) { _, store, config in
            let lease = try await store.acquireLease(config: config, attributes: node(41), preferred: nil)
            let key = "/docker/network/subnets/\(lease.subnet.leaseKey)"
            let before = try #require(try await store.client.get(key))
            let renewed = try await store.renewLease(lease)
            #expect(renewed.subnet == lease.subnet)
            #expect(renewed.revision > lease.revision)
            let after = try #require(try await store.client.get(key))
            #expect(after.lease != before.lease)
            #expect(try await store.client.leaseTimeToLive(before.lease) == nil)  // old one revoked
            #expect(try await store.client.leaseTimeToLive(after.lease)?.grantedTTL == 30)

            try await store.releaseLease(renewed)
            #expect(try await store.client.get(key) == nil)
            await #expect(throws: LeaseStoreError.leaseNotFound(subnet: lease.subnet)) {
                _ = try await store.renewLease(renewed)
            }
        }
    }

    /// The etcd leases the server holds now (`etcdctl lease list`: a count line, then
    /// one hexadecimal ID a line).
    private func etcdLeases(_ server: EtcdServer) throws -> [Int64] {
        try server.etcdctl(["lease", "list"]).split(separator: "\n").dropFirst().map { line in
            let text = line.trimmingCharacters(in: .whitespaces)
            return Int64(bitPattern: try #require(UInt64(text, radix: 16), "lease list line \(text)"))
        }
    }

    /// Counts the hook's calls and runs `change` on the first only.
    private final class OneChange: Sendable {
        let calls = Mutex(0)
        let change: @Sendable (String) async throws -> Void
        init(_ change: @escaping @Sendable (String) async throws -> Void) { self.change = change }
        func callAsFunction(_ key: String) async throws {
            if calls.withLock({
                $0 += 1; return $0
            }) == 1 {
                try await change(key)
            }
        }
        var count: Int { calls.withLock { $0 } }
    }

    @Test func renewRetriesWhenTheKeyChangesBetweenItsReadAndItsWrite() async throws {
        try await withStore(leaseTTL: .seconds(30)) { server, store, config in
            let lease = try await store.acquireLease(config: config, attributes: node(70), preferred: nil)
            let client = store.client
            // Rewritten by us elsewhere (same host, same etcd lease) after the read: the
            // compare-and-put fails, the renewal reads again and succeeds.
            let change = OneChange { key in
                let kv = try #require(try await client.get(key))
                try await client.put(key, value: kv.valueString, lease: kv.lease)
            }
            store.testHook.withLock { $0 = { try await change($0) } }
            let renewed = try await store.renewLease(lease)
            #expect(change.count == 2)
            #expect(renewed.subnet == lease.subnet && renewed.attributes == node(70))
            let kv = try #require(try await client.get("/docker/network/subnets/\(lease.subnet.leaseKey)"))
            #expect(kv.modRevision == renewed.revision)
            // The etcd lease granted for the failed attempt was revoked, as was the old
            // one: only the renewed key's lease is left.
            #expect(try etcdLeases(server) == [kv.lease])
        }
    }

    @Test func renewOfAKeyAnotherHostTookBetweenReadAndWriteFailsAndLeavesItsKey() async throws {
        try await withStore(leaseTTL: .seconds(30)) { _, store, config in
            let lease = try await store.acquireLease(config: config, attributes: node(71), preferred: nil)
            let client = store.client
            let theirs = node(72).flannelJSON
            let change = OneChange { key in
                let granted = try await client.leaseGrant(ttl: 30)
                try await client.put(key, value: theirs, lease: granted.id)
            }
            store.testHook.withLock { $0 = { try await change($0) } }
            await #expect(throws: LeaseStoreError.leaseNotFound(subnet: lease.subnet)) {
                _ = try await store.renewLease(lease)
            }
            let key = "/docker/network/subnets/\(lease.subnet.leaseKey)"
            #expect(try await client.get(key)?.valueString == theirs)
            // Without the hook: a key another host holds already is not renewed either.
            store.testHook.withLock { $0 = nil }
            await #expect(throws: LeaseStoreError.leaseNotFound(subnet: lease.subnet)) {
                _ = try await store.renewLease(lease)
            }
            #expect(try await client.get(key)?.valueString == theirs)
        }
    }

    @Test func releaseLeavesAKeyAnotherHostTookBetweenReadAndDelete() async throws {
        try await withStore(leaseTTL: .seconds(30)) { _, store, config in
            let lease = try await store.acquireLease(config: config, attributes: node(73), preferred: nil)
            let client = store.client
            let key = "/docker/network/subnets/\(lease.subnet.leaseKey)"
            let theirs = node(74).flannelJSON
            // Our lease ran out and another host took the subnet after release read it.
            let change = OneChange { key in
                let granted = try await client.leaseGrant(ttl: 30)
                try await client.put(key, value: theirs, lease: granted.id)
            }
            store.testHook.withLock { $0 = { try await change($0) } }
            try await store.releaseLease(lease)
            #expect(change.count == 1)
            let kv = try #require(try await client.get(key), "release deleted the key another host holds")
            #expect(kv.valueString == theirs)
            #expect(try await client.leaseTimeToLive(kv.lease) != nil)  // their etcd lease lives on

            // And when nothing changes in between, release deletes our key and revokes its lease.
            store.testHook.withLock { $0 = nil }
            let other = try await store.acquireLease(config: config, attributes: node(73), preferred: nil)
            let ours = try #require(try await client.get("/docker/network/subnets/\(other.subnet.leaseKey)"))
            try await store.releaseLease(other)
            #expect(try await client.get("/docker/network/subnets/\(other.subnet.leaseKey)") == nil)
            #expect(try await client.leaseTimeToLive(ours.lease) == nil)
        }
    }

    @Test func expiredLeaseArrivesAsDeleteInTheWatch() async throws {
        try await withStore(leaseTTL: .seconds(2)) { _, store, config in
            let start = try await store.leases()
            let events = store.watchLeases(after: start.revision)
            // Not a lease key: the watch skips it.
            try await store.client.put("/docker/network/subnets/not-a-lease", value: "x")
            let lease = try await store.acquireLease(config: config, attributes: node(50), preferred: nil)
            let seen = try await withTimeout(.seconds(20)) {
                var seen: [LeaseEvent] = []
                for try await event in events {
                    seen.append(event)
                    if case .delete = event { break }
                }
                return seen
            }
            // The put, then its expiry: the watch stops at the first delete, so a
            // delete first (or a lost put) leaves fewer than two events.
            try #require(seen.count == 2, "events: \(seen)")
            guard case .put(let put) = seen[0], case .delete(let subnet, let revision, _) = seen[1] else {
                Issue.record("expected the lease's put and then its delete, got \(seen)")
                return
            }
            #expect(put.subnet == lease.subnet && put.attributes == node(50))
            #expect(put.revision == lease.revision)
            #expect(subnet == lease.subnet)
            #expect(revision > lease.revision)
            #expect(try await store.leases().leases.isEmpty)
        }
    }

    @Test func watchAfterACompactedRevisionEndsWithCompacted() async throws {
        try await withStore { server, store, config in
            let start = try await store.leases()
            _ = try await store.acquireLease(config: config, attributes: node(60), preferred: nil)
            _ = try await store.acquireLease(config: config, attributes: node(61), preferred: nil)
            let now = try server.currentRevision()
            try server.etcdctl(["compact", String(now)])
            var thrown: (any Error)?
            do {
                _ = try await withTimeout(.seconds(10)) {
                    for try await _ in store.watchLeases(after: start.revision) {}
                }
            } catch {
                thrown = error
            }
            #expect(thrown as? LeaseStoreError == .compacted(requested: start.revision, oldest: now))
        }
    }

    @Test func reservationIsHonouredAndNeverGivenATTL() async throws {
        try await withStore(leaseTTL: .seconds(30)) { server, store, config in
            let key = "/docker/network/subnets/10.5.7.0-24"
            try server.etcdctl(["put", key, #"{"PublicIP":"198.18.0.7","PublicIPv6":null}"#])
            // Nobody else gets the reserved subnet, even when asking for it.
            let other = try await store.acquireLease(
                config: config,
                attributes: node(8),
                preferred: IPv4Network("10.5.7.0/24")
            )
            #expect(other.subnet != IPv4Network("10.5.7.0/24"))

            let lease = try await store.acquireLease(config: config, attributes: node(7), preferred: nil)
            #expect(lease.subnet == IPv4Network("10.5.7.0/24"))
            #expect(lease.isReservation)
            let renewed = try await store.renewLease(lease)
            #expect(renewed.isReservation && renewed.subnet == lease.subnet)
            try await store.releaseLease(renewed)  // the operator's: left in place
            let kv = try #require(try await store.client.get(key))
            #expect(kv.lease == 0)
            #expect(kv.version == 1)  // never rewritten
            #expect(try await store.leases().leases.first { $0.subnet == lease.subnet }?.isReservation == true)
        }
    }
}

/// Dual-stack leases in a real etcd, written as flanneld writes them.
@Suite(.enabled(if: EtcdServer.isInstalled, Comment(rawValue: etcdMissing)), .timeLimit(.minutes(2)))
struct EtcdDualStackLeaseTests {
    static let config =
        #"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:5::/48","Backend":{"Type":"vxlan"}}"#

    @Test func flanneldsDualStackLeaseIsReadAndOursIsWrittenInItsForm() async throws {
        try await withStore(config: Self.config) { server, store, config in
            // A flanneld vxlan host's lease: both subnets in the key, the
            // IPv6 address and v6 VTEP in the value (put as flanneld writes it).
            let flanneld =
                #"{"PublicIP":"198.18.0.72","PublicIPv6":"2001:db8::72","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:01"},"BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:02"}}"#
            try server.etcdctl(["put", "/docker/network/subnets/10.5.72.0-24&fd00:10:5:72::-64", flanneld])

            let listed = try await store.leases().leases
            let theirs = try #require(listed.first)
            #expect(listed.count == 1)
            #expect(theirs.subnet == net("10.5.72.0/24"))
            #expect(theirs.ipv6Subnet == IPv6Network("fd00:10:5:72::/64"))
            #expect(theirs.attributes.publicIPv6 == IPv6Address("2001:db8::72"))
            #expect(theirs.attributes.backendV6Data?.field("VtepMAC") == .string("aa:bb:cc:dd:ee:02"))
            #expect(theirs.attributes.flannelJSON == flanneld)

            var attributes = LeaseAttributes(
                publicIP: IPv4Address(198, 18, 0, 5),
                publicIPv6: IPv6Address("2001:db8::5"),
                backendType: "vxlan",
                backendData: .object(["VNI": .number(1), "VtepMAC": .string("0e:00:00:00:00:05")])
            )
            attributes.backendV6Data = .object(["VNI": .number(1), "VtepMAC": .string("0e:00:00:00:00:06")])
            let ours = try await store.acquireLease(
                config: config,
                attributes: attributes,
                preferred: net("10.5.9.0/24")
            )
            let v6 = try #require(ours.ipv6Subnet)
            #expect(ours.subnet == net("10.5.9.0/24"))
            #expect(config.ipv6?.fits(v6) == true && v6 != IPv6Network("fd00:10:5:72::/64"))
            // The key and value flanneld reads (pkg/subnet ParseSubnetKey, LeaseAttrs).
            let key = "/docker/network/subnets/10.5.9.0-24&\(v6.leaseKey)"
            #expect(ours.key == "10.5.9.0-24&\(v6.leaseKey)")
            #expect(
                try server.etcdctl(["get", key, "--print-value-only"]) == """
                    {"PublicIP":"198.18.0.5","PublicIPv6":"2001:db8::5","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:05"},"BackendV6Data":{"VNI":1,"VtepMAC":"0e:00:00:00:00:06"}}

                    """
            )
            #expect(try await store.client.get(key)?.lease != 0)

            // Renewal and release address the dual-stack key, not the plain one.
            let renewed = try await store.renewLease(ours)
            #expect(renewed.key == ours.key && renewed.ipv6Subnet == v6)
            let again = try await store.acquireLease(config: config, attributes: attributes, preferred: nil)
            #expect(again.key == ours.key)  // reused, not a second lease
            try await store.releaseLease(again)
            #expect(try await store.client.get(key) == nil)
        }
    }

    /// etcd guards the IPv4 part of a key: a dual-stack key cannot be
    /// created while a plain or dual-stack key of its IPv4 subnet exists.
    @Test func aKeyOfTheSameIPv4SubnetBlocksTheCreateWhateverItsIPv6Part() async throws {
        try await withStore(config: Self.config) { server, store, _ in
            let prefix = "/docker/network/subnets/"
            try server.etcdctl(["put", prefix + "10.5.9.0-24", #"{"PublicIP":"198.18.0.9","PublicIPv6":null}"#])
            let blocked = try await store.client.createIfAbsent(
                prefix + "10.5.9.0-24&fd00:10:5:9::-64",
                value: Array("{}".utf8),
                guardPrefix: prefix + "10.5.9.0-24"
            )
            guard case .exists(let holder) = blocked else {
                Issue.record("created beside the plain key: \(blocked)")
                return
            }
            #expect(holder.key == prefix + "10.5.9.0-24")
            try server.etcdctl(["put", prefix + "10.5.8.0-24&fd00:10:5:8::-64", "{}"])
            let alsoBlocked = try await store.client.createIfAbsent(
                prefix + "10.5.8.0-24&fd00:10:5:99::-64",
                value: Array("{}".utf8),
                guardPrefix: prefix + "10.5.8.0-24"
            )
            guard case .exists = alsoBlocked else {
                Issue.record("created beside another dual-stack key: \(alsoBlocked)")
                return
            }
            let free = try await store.client.createIfAbsent(
                prefix + "10.5.7.0-24&fd00:10:5:7::-64",
                value: Array("{}".utf8),
                guardPrefix: prefix + "10.5.7.0-24"
            )
            guard case .created = free else {
                Issue.record("not created with no key of its IPv4 subnet: \(free)")
                return
            }
        }
    }

    /// Rounds 1–3 in a large IPv6 network; 4–6 in one of three IPv6 subnets
    /// for three hosts, where they all but surely pick the same one at once.
    @Test(arguments: 1...6)
    func concurrentDualStackAcquisitionsGetDistinctSubnetsOfBothFamilies(_ round: Int) async throws {
        let tiny =
            #"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:5::/124","Backend":{"Type":"vxlan"}}"#
        let hosts = round <= 3 ? 6 : 3
        try await withStore(config: round <= 3 ? Self.config : tiny) { _, store, config in
            let leases = try await withThrowingTaskGroup(of: Lease.self) { group in
                for n in 1...hosts {
                    group.addTask {
                        try await store.acquireLease(
                            config: config,
                            attributes: LeaseAttributes(publicIP: IPv4Address(198, 18, 1, UInt8(n))),
                            preferred: nil
                        )
                    }
                }
                return try await group.reduce(into: [Lease]()) { $0.append($1) }
            }
            #expect(Set(leases.map(\.subnet)).count == hosts)
            let v6 = leases.compactMap(\.ipv6Subnet)
            #expect(v6.count == hosts && Set(v6).count == hosts)
            #expect(v6.allSatisfy { config.ipv6?.fits($0) == true })
            let listed = try await store.leases().leases
            #expect(listed.count == hosts)
            #expect(LeaseRule(config).sort(leases: listed).leases.count == hosts)
        }
    }
}
