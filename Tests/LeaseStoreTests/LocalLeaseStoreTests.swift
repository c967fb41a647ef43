import EtcdTestSupport
import Foundation
import Logging
import NetBase
import Synchronization
import Testing

@testable import LeaseStore

@Suite struct LocalLeaseStoreTests {
    static let smallNetwork = #"{"Network": "10.2.0.0/24", "SubnetLen": 28}"#  // 15 subnets
    static let tinyNetwork = #"{"Network": "10.2.0.0/28"}"#  // 3 subnets: .4 .8 .12

    func node(_ n: Int) -> LeaseAttributes { LeaseAttributes(publicIP: IPv4Address(198, 18, 0, UInt8(n))) }

    /// Collects `count` events from a watch, failing after `timeout` (a
    /// guard against hanging, generous for a loaded machine).
    func collect(
        _ stream: AsyncThrowingStream<LeaseEvent, any Error>,
        count: Int,
        timeout: Duration = .seconds(30),
        onEvent: @escaping @Sendable () -> Void = {}
    ) async throws -> [LeaseEvent] {
        try await withThrowingTaskGroup(of: [LeaseEvent]?.self) { group in
            group.addTask {
                var events: [LeaseEvent] = []
                for try await event in stream {
                    events.append(event)
                    onEvent()
                    if events.count == count { break }
                }
                return events
            }
            group.addTask {
                try await Task.sleep(for: timeout)
                return nil
            }
            let first = try await group.next()!
            group.cancelAll()
            guard let events = first else {
                Issue.record("timed out waiting for \(count) events")
                return []
            }
            return events
        }
    }

    @Test func concurrentAcquisitionsFromSeparateInstancesGetDistinctSubnets() async throws {
        try await withTemporaryDirectory { dir in
            let setup = try LocalLeaseStore(directory: dir)
            let c = try await setup.setNetworkConfig(json: Self.smallNetwork)
            let leases = try await withThrowingTaskGroup(of: Lease.self) { group in
                for i in 1...8 {
                    group.addTask {
                        // A store instance per task: separate lock descriptors, as separate processes have.
                        let store = try LocalLeaseStore(directory: dir)
                        return try await store.acquireLease(config: c, attributes: self.node(i), preferred: nil)
                    }
                }
                return try await group.reduce(into: []) { $0.append($1) }
            }
            #expect(Set(leases.map(\.subnet)).count == 8)
            #expect(Set(leases.map(\.revision)) == Set(1...8))
            #expect(leases.allSatisfy { c.fits($0.subnet) })
            let snapshot = try await setup.leases()
            #expect(snapshot.revision == 8)
            #expect(Set(snapshot.leases.map(\.subnet)) == Set(leases.map(\.subnet)))
            #expect(snapshot.skipped.isEmpty)
        }
    }

    @Test func leaseIsReusedAfterRestart() async throws {
        try await withTemporaryDirectory { dir in
            let first = try LocalLeaseStore(directory: dir)
            let c = try await first.setNetworkConfig(json: Self.smallNetwork)
            let lease = try await first.acquireLease(config: c, attributes: node(1), preferred: nil)
            _ = try await first.acquireLease(config: c, attributes: node(2), preferred: nil)

            let restarted = try LocalLeaseStore(directory: dir)
            let again = try await restarted.acquireLease(config: c, attributes: node(1), preferred: nil)
            #expect(again.subnet == lease.subnet)
            #expect(again.revision == 3)
            #expect(again.expiration! >= lease.expiration!)
            #expect(try await restarted.leases().leases.count == 2)
        }
    }

    @Test func ownLeaseThatNoLongerFitsIsReplacedAndDeleted() async throws {
        try await withTemporaryDirectory { dir in
            let store = try LocalLeaseStore(directory: dir)
            let before = try await store.setNetworkConfig(json: Self.smallNetwork)
            let old = try await store.acquireLease(config: before, attributes: node(1), preferred: nil)
            let after = try await store.setNetworkConfig(json: #"{"Network": "10.2.0.0/24", "SubnetLen": 27}"#)
            let new = try await store.acquireLease(config: after, attributes: node(1), preferred: old.subnet)
            #expect(new.subnet.prefixLength == 27 && after.fits(new.subnet))
            #expect(try await store.leases().leases == [new])
            let events = try await collect(store.watchLeases(after: old.revision), count: 2)
            #expect(events == [.delete(subnet: old.subnet, revision: old.revision + 1), .put(new)])
        }
    }

    @Test func preferredSubnetIsTakenWhenFree() async throws {
        try await withTemporaryDirectory { dir in
            let store = try LocalLeaseStore(directory: dir)
            let c = try await store.setNetworkConfig(json: Self.smallNetwork)
            let lease = try await store.acquireLease(config: c, attributes: node(1), preferred: net("10.2.0.208/28"))
            #expect(lease.subnet == net("10.2.0.208/28"))
            // Someone else preferring the same subnet gets another one.
            let other = try await store.acquireLease(config: c, attributes: node(2), preferred: net("10.2.0.208/28"))
            #expect(other.subnet != lease.subnet)
        }
    }

    @Test func storeFilesHaveTheDocumentedLayout() async throws {
        try await withTemporaryDirectory { base in
            let dir = base + "/store/nested"
            let store = try LocalLeaseStore(directory: dir)
            var info = stat()
            #expect(stat(dir, &info) == 0 && info.st_mode & 0o777 == 0o700)
            let c = try await store.setNetworkConfig(json: Self.smallNetwork)
            #expect(readText(dir + "/config.json") == Self.smallNetwork)
            let lease = try await store.acquireLease(config: c, attributes: node(1), preferred: net("10.2.0.16/28"))
            let record = try #require(readText(dir + "/subnets/10.2.0.16-28"))
            #expect(record.hasPrefix(#"{"Revision":1,"Expiration":""#))
            #expect(record.hasSuffix(#"","Value":{"PublicIP":"198.18.0.1","PublicIPv6":null}}"#))
            #expect(record.contains(Timestamp(lease.expiration!).description))
            #expect(readText(dir + "/revision")?.hasPrefix("revision 1\noldest 1\nnext-expiry ") == true)
            #expect(
                readText(dir + "/events.log")?.hasPrefix(#"{"Revision":1,"Type":"PUT","Key":"10.2.0.16-28","#) == true
            )
            #expect(!FileManager.default.fileExists(atPath: dir + "/pending"))
            let names = try FileManager.default.contentsOfDirectory(atPath: dir + "/subnets")
            #expect(names == ["10.2.0.16-28"])  // no temporary files left behind
        }
    }

    @Test func renewExtendsTheLeaseAndReleaseDeletesIt() async throws {
        try await withTemporaryDirectory { dir in
            let store = try LocalLeaseStore(directory: dir, leaseTTL: .seconds(60))
            let c = try await store.setNetworkConfig(json: Self.smallNetwork)
            let lease = try await store.acquireLease(config: c, attributes: node(1), preferred: nil)
            try await Task.sleep(for: .milliseconds(20))
            let renewed = try await store.renewLease(lease)
            #expect(renewed.subnet == lease.subnet)
            #expect(renewed.revision == lease.revision + 1)
            #expect(renewed.expiration! > lease.expiration!)
            try await store.releaseLease(renewed)
            #expect(try await store.leases().leases.isEmpty)
            // Releasing again, or renewing what is gone, is reported plainly.
            try await store.releaseLease(renewed)
            await #expect(throws: LeaseStoreError.leaseNotFound(subnet: lease.subnet)) {
                try await store.renewLease(renewed)
            }
        }
    }

    @Test func renewOfALeaseDeletedBehindOurBackIsLeaseNotFound() async throws {
        try await withTemporaryDirectory { dir in
            let store = try LocalLeaseStore(directory: dir)
            let c = try await store.setNetworkConfig(json: Self.smallNetwork)
            let lease = try await store.acquireLease(config: c, attributes: node(1), preferred: nil)
            let admin = try LocalLeaseStore(directory: dir)
            #expect(try await admin.deleteLease(subnet: lease.subnet))
            await #expect(throws: LeaseStoreError.leaseNotFound(subnet: lease.subnet)) {
                try await store.renewLease(lease)
            }
            // Taken over by another node meanwhile: still not ours to renew.
            let other = try await admin.acquireLease(config: c, attributes: node(2), preferred: lease.subnet)
            #expect(other.subnet == lease.subnet)
            await #expect(throws: LeaseStoreError.leaseNotFound(subnet: lease.subnet)) {
                try await store.renewLease(lease)
            }
            try await store.releaseLease(lease)  // must not delete node 2's lease
            #expect(try await store.leases().leases.map(\.attributes.publicIP) == [node(2).publicIP])
        }
    }

    @Test func reservationIsHonouredAndNeverExpires() async throws {
        try await withTemporaryDirectory { dir in
            let store = try LocalLeaseStore(directory: dir, leaseTTL: .milliseconds(200))
            let c = try await store.setNetworkConfig(json: Self.smallNetwork)
            let reserved = try await store.reserve(net("10.2.0.240/28"), attributes: node(5))
            #expect(reserved.isReservation)

            let lease = try await store.acquireLease(config: c, attributes: node(5), preferred: net("10.2.0.16/28"))
            #expect(lease == reserved)  // unchanged attributes: not rewritten
            #expect(try await store.renewLease(lease) == reserved)

            // New attributes (a new VtepMAC, say) update it but keep it a reservation.
            var attrs = node(5)
            attrs.backendType = "vxlan"
            attrs.backendData = .object(["VNI": .number(1), "VtepMAC": .string("aa:bb:cc:dd:ee:ff")])
            let updated = try await store.acquireLease(config: c, attributes: attrs, preferred: nil)
            #expect(updated.subnet == reserved.subnet && updated.isReservation && updated.attributes == attrs)

            try await store.releaseLease(updated)
            try await Task.sleep(for: .milliseconds(250))
            #expect(try await store.leases().leases == [updated])
        }
    }

    @Test func handWrittenFlannelValueIsAReservation() async throws {
        try await withTemporaryDirectory { dir in
            let store = try LocalLeaseStore(directory: dir)
            let c = try await store.setNetworkConfig(json: Self.smallNetwork)
            try writeText(dir + "/subnets/10.2.0.32-28", #"{"PublicIP":"198.18.0.7","PublicIPv6":null}"#)
            let lease = try await store.acquireLease(config: c, attributes: node(7), preferred: nil)
            #expect(lease.subnet == net("10.2.0.32/28"))
            #expect(lease.isReservation)
        }
    }

    @Test func expiredLeaseIsRemovedWithADeleteEvent() async throws {
        try await withTemporaryDirectory { dir in
            let clock = TestClock()
            let store = try LocalLeaseStore(
                directory: dir,
                leaseTTL: .seconds(1),
                compactionKeep: 1000,
                logger: Logger(label: "test"),
                clock: { clock.now }
            )
            let c = try await store.setNetworkConfig(json: Self.smallNetwork)
            let lease = try await store.acquireLease(config: c, attributes: node(1), preferred: nil)
            clock.advance(milliseconds: 1100)

            // Only a watcher is running: its poll must notice the expiry.
            let events = try await collect(store.watchLeases(after: lease.revision), count: 1)
            #expect(events == [.delete(subnet: lease.subnet, revision: lease.revision + 1)])
            let after = try await store.leases()
            #expect(after.leases.isEmpty)
            #expect(after.revision == lease.revision + 1)
            #expect(!FileManager.default.fileExists(atPath: dir + "/subnets/" + lease.subnet.leaseKey))
        }
    }

    @Test func expiredLeaseIsFreeForTheNextAcquirer() async throws {
        try await withTemporaryDirectory { dir in
            // A clock of the test's own: a loaded machine must not let the
            // leases run out before the network is full.
            let clock = TestClock()
            let store = try LocalLeaseStore(
                directory: dir,
                leaseTTL: .seconds(1),
                compactionKeep: 1000,
                logger: Logger(label: "test"),
                clock: { clock.now }
            )
            let c = try await store.setNetworkConfig(json: Self.tinyNetwork)
            for i in 1...3 { _ = try await store.acquireLease(config: c, attributes: node(i), preferred: nil) }
            let full = await #expect(throws: LeaseStoreError.self) {
                try await store.acquireLease(config: c, attributes: self.node(4), preferred: nil)
            }
            guard case .outOfSubnets(c.network, let keys)? = full else {
                Issue.record("expected out of subnets, got \(String(describing: full))")
                return
            }
            #expect(keys.count == 3, "\(keys)")
            clock.advance(milliseconds: 1100)
            let lease = try await store.acquireLease(config: c, attributes: node(4), preferred: nil)
            #expect(lease.revision == 3 + 3 + 1)  // three PUTs, three expiry DELETEs, our PUT
        }
    }

    @Test func watchSeesPutsAndDeletesInOrderAndResumes() async throws {
        try await withTemporaryDirectory { dir in
            let store = try LocalLeaseStore(directory: dir)
            let c = try await store.setNetworkConfig(json: Self.smallNetwork)
            let a = try await store.acquireLease(config: c, attributes: node(1), preferred: net("10.2.0.16/28"))
            let b = try await store.acquireLease(config: c, attributes: node(2), preferred: net("10.2.0.32/28"))
            try await store.releaseLease(a)

            let all = try await collect(store.watchLeases(after: 0), count: 3)
            #expect(all == [.put(a), .put(b), .delete(subnet: a.subnet, revision: 3)])
            let resumed = try await collect(store.watchLeases(after: 2), count: 1)
            #expect(resumed == [.delete(subnet: a.subnet, revision: 3)])

            // Live: changes made by another instance while the watch waits.
            let writer = try LocalLeaseStore(directory: dir)
            let (arrivals, arrived) = AsyncStream<Void>.makeStream()
            async let live = collect(store.watchLeases(after: 2), count: 3, onEvent: { arrived.yield() })
            // The delete at revision 3 arrives first: the watch has read what there was
            // and is open when the other instance writes.
            try await withTimeout(.seconds(30)) {
                for await _ in arrivals { return }
                throw TestSupportError("the watch delivered nothing")
            }
            let d = try await writer.acquireLease(config: c, attributes: node(4), preferred: nil)
            try await writer.releaseLease(b)
            #expect(
                try await live == [
                    .delete(subnet: a.subnet, revision: 3), .put(d), .delete(subnet: b.subnet, revision: 5),
                ]
            )
        }
    }

    @Test func watchFromACompactedRevisionEndsWithCompacted() async throws {
        try await withTemporaryDirectory { dir in
            let store = try LocalLeaseStore(directory: dir, compactionKeep: 3)
            let c = try await store.setNetworkConfig(json: Self.smallNetwork)
            for i in 1...3 {
                let lease = try await store.acquireLease(config: c, attributes: node(i), preferred: nil)
                _ = try await store.renewLease(lease)
            }
            let lines = readText(dir + "/events.log")?.split(separator: "\n") ?? []
            #expect(lines.count == 3)
            await #expect(throws: LeaseStoreError.compacted(requested: 2, oldest: 4)) {
                for try await _ in store.watchLeases(after: 2) {}
            }
            let kept = try await collect(store.watchLeases(after: 3), count: 3)
            #expect(kept.map(\.revision) == [4, 5, 6])
            // A watcher ahead of the store (the store was reset) must re-list too.
            await #expect(throws: LeaseStoreError.self) {
                for try await _ in store.watchLeases(after: 99) {}
            }
        }
    }

    @Test func watchStopsWhenItsConsumerIsCancelled() async throws {
        try await withTemporaryDirectory { dir in
            let store = try LocalLeaseStore(directory: dir)
            let consumer = Task {
                var n = 0
                for try await _ in store.watchLeases(after: 0) { n += 1 }
                return n
            }
            try await Task.sleep(for: .milliseconds(200))
            consumer.cancel()
            let clock = ContinuousClock()
            let start = clock.now
            #expect(try await consumer.value == 0)
            // Only a guard against hanging: file work may be slow on a busy machine.
            #expect(clock.now - start < .seconds(30))
        }
    }

    @Test func corruptLeaseFileIsSkippedReportedAndStaysTaken() async throws {
        try await withTemporaryDirectory { dir in
            let store = try LocalLeaseStore(directory: dir)
            let c = try await store.setNetworkConfig(json: Self.tinyNetwork)
            let good = try await store.acquireLease(config: c, attributes: node(1), preferred: net("10.2.0.8/30"))
            try writeText(dir + "/subnets/10.2.0.4-30", "{\"Revision\": 3, \"Value\": {\"PublicIP\": \"nope\"}}")
            try writeText(dir + "/subnets/README", "not a lease")

            let snapshot = try await store.leases()
            #expect(snapshot.leases == [good])
            #expect(snapshot.skipped.count == 1)
            #expect(snapshot.unreadableKeys == ["10.2.0.4-30"])
            // Not a lease: the readers report it by `LeaseRule`.
            #expect(snapshot.malformedKeys == ["README"])
            let descriptions = snapshot.skipped.map(\.description).joined(separator: "\n")
            #expect(descriptions.contains(dir + "/subnets/10.2.0.4-30"))
            #expect(descriptions.contains("PublicIP \"nope\" is not an IPv4 address"))
            #expect(descriptions.contains("fix or delete the file"))

            // The corrupt entry's subnet is not handed out.
            let other = try await store.acquireLease(config: c, attributes: node(2), preferred: net("10.2.0.4/30"))
            #expect(other.subnet == net("10.2.0.12/30"))
            let full = await #expect(throws: LeaseStoreError.self) {
                try await store.acquireLease(config: c, attributes: self.node(3), preferred: nil)
            }
            // The error names the keys in the way, the unreadable one among them.
            #expect(full?.description.contains("10.2.0.4-30") == true, "\(String(describing: full))")
            // The operator's way out.
            #expect(try await store.deleteLease(subnet: net("10.2.0.4/30")))
            #expect(
                try await store.acquireLease(config: c, attributes: node(3), preferred: nil).subnet
                    == net("10.2.0.4/30")
            )
        }
    }

    @Test func networkConfigRoundTripsAndIsValidated() async throws {
        try await withTemporaryDirectory { dir in
            let store = try LocalLeaseStore(directory: dir)
            #expect(try await store.rawNetworkConfig() == nil)
            await #expect(throws: LeaseStoreError.configNotFound(location: "local \(dir)")) {
                try await store.networkConfig()
            }
            let json = "{\"Network\": \"10.5.0.0/16\", \"Backend\": {\"Type\": \"vxlan\"}}\n"
            let set = try await store.setNetworkConfig(json: json)
            #expect(try await store.rawNetworkConfig() == json)
            #expect(try await store.networkConfig() == set)
            #expect(set.backend.type == "vxlan")

            await #expect(throws: NetworkConfigError.networkTooSmall(network: net("10.5.0.0/30"))) {
                try await store.setNetworkConfig(json: #"{"Network": "10.5.0.0/30"}"#)
            }
            #expect(try await store.rawNetworkConfig() == json)  // the bad one was not stored
        }
    }

    @Test func interruptedUpdateIsFinishedByTheNextProcess() async throws {
        try await withTemporaryDirectory { dir in
            let store = try LocalLeaseStore(directory: dir)
            let c = try await store.setNetworkConfig(json: Self.smallNetwork)
            let a = try await store.acquireLease(config: c, attributes: node(1), preferred: net("10.2.0.16/28"))
            // A process died after journaling revision 2 (and applying nothing).
            let orphan = StoredLease(
                key: "10.2.0.48-28",
                subnet: net("10.2.0.48/28"),
                attributes: node(2),
                expiration: Timestamp(a.expiration!),
                revision: 2
            )
            try writeText(
                dir + "/pending",
                StoreChange.put(orphan).line
                    + StoreChange.delete(key: "10.2.0.16-28", subnet: a.subnet, revision: 3).line
            )

            let snapshot = try await store.leases()
            #expect(snapshot.revision == 3)
            #expect(snapshot.leases == [orphan.lease])
            #expect(!FileManager.default.fileExists(atPath: dir + "/pending"))
            let events = try await collect(store.watchLeases(after: 1), count: 2)
            #expect(events == [.put(orphan.lease), .delete(subnet: a.subnet, revision: 3)])

            // A stale journal (already committed) is not applied again.
            try writeText(dir + "/pending", StoreChange.put(orphan).line)
            _ = try await store.deleteLease(subnet: orphan.subnet)
            #expect(try await store.leases().leases.isEmpty)
        }
    }

    @Test func lostRevisionFileIsRecoveredNotRestarted() async throws {
        try await withTemporaryDirectory { dir in
            let store = try LocalLeaseStore(directory: dir)
            let c = try await store.setNetworkConfig(json: Self.smallNetwork)
            for i in 1...3 { _ = try await store.acquireLease(config: c, attributes: node(i), preferred: nil) }
            try FileManager.default.removeItem(atPath: dir + "/revision")
            // A watcher alone finds its way back, and restores the file.
            let events = try await collect(store.watchLeases(after: 2), count: 1)
            #expect(events.map(\.revision) == [3])
            #expect(readText(dir + "/revision")?.hasPrefix("revision 3\n") == true)

            try FileManager.default.removeItem(atPath: dir + "/revision")
            let lease = try await store.acquireLease(config: c, attributes: node(4), preferred: nil)
            #expect(lease.revision == 4)

            try writeText(dir + "/revision", "garbage\n")
            let e = await #expect(throws: LeaseStoreError.self) { try await store.leases() }
            #expect(e?.description.contains(dir + "/revision") == true)
            #expect(e?.description.contains("delete the file") == true)
        }
    }

    @Test func unwritableDirectoryGivesAClearError() throws {
        #expect(throws: LeaseStoreError.self) {
            try LocalLeaseStore(directory: "/proc/version/store")
        }
        do {
            _ = try LocalLeaseStore(directory: "/proc/version/store")
        } catch {
            #expect("\(error)".contains("/proc/version"))
        }
    }
}

/// A clock that moves only when told to.
final class TestClock: Sendable {
    private let milliseconds = Mutex<Int64>(Timestamp.now.milliseconds)
    var now: Timestamp { Timestamp(milliseconds: milliseconds.withLock { $0 }) }
    func advance(milliseconds delta: Int64) { milliseconds.withLock { $0 += delta } }
}
