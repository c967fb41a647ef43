import CoreMetrics
import Foundation
import LeaseStore
import MetricsTestKit
import NetBase
import NetTestSupport
import PeerControl
import Testing

let configJSON = #"{"Network":"10.2.0.0/16","SubnetLen":24,"Backend":{"Type":"udp"}}"#

/// A PeerSync over a memory store, with our host at 198.18.0.1 holding a
/// lease, and the running watch/renew/re-acquire tasks cancelled at the end.
struct Fixture {
    let store: MemoryLeaseStore
    let backend: RecordingBackend
    let sync: PeerSync
    let logs: LogCapture
    let own: Lease
    let movedTo: Locked<[IPv4Network]>

    init(
        type: BackendType = .udp,
        configJSON: String = configJSON,
        unusable: @escaping @Sendable (Lease) -> String? = { _ in nil },
        metrics: any MetricsFactory = MetricsSystem.factory
    ) async throws {
        let config = try NetworkConfig(json: configJSON)
        store = MemoryLeaseStore(config: configJSON)
        backend = RecordingBackend(type: type, publicIP: ip("198.18.0.1"), unusable: unusable)
        logs = LogCapture()
        let attributes = try backend.leaseAttributes()
        own = try await store.acquireLease(config: config, attributes: attributes, preferred: net("10.2.5.0/24"))
        let movedTo = Locked<[IPv4Network]>([])
        self.movedTo = movedTo
        sync = PeerSync(
            store: store,
            backend: backend,
            holder: LeaseHolder(own),
            config: config,
            attributes: attributes,
            logger: logs.logger,
            onSubnetChange: { lease in movedTo.withLock { $0.append(lease.subnet) } },
            metricsFactory: metrics
        )
    }

    /// Runs `body` while the sync's tasks run (from a fresh list).
    func running(_ body: () async throws -> Void) async throws {
        let revision = try await sync.loadInitialPeers()
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { await self.sync.run(from: revision, renewMargin: .seconds(60)) }
            defer { group.cancelAll() }
            try await body()
        }
    }
}

func udpLease(_ publicIP: String) -> LeaseAttributes { LeaseAttributes(publicIP: ip(publicIP)) }

@Suite struct PeerSyncTests {
    @Test func theFirstListGivesTheBackendEveryPeerButUs() async throws {
        let f = try await Fixture()
        f.store.put(net("10.2.7.0/24"), udpLease("198.18.0.7"))
        f.store.put(net("10.2.8.0/24"), udpLease("198.18.0.8"))
        _ = try await f.sync.loadInitialPeers()
        #expect(f.backend.peers == [net("10.2.7.0/24"): ip("198.18.0.7"), net("10.2.8.0/24"): ip("198.18.0.8")])
        #expect(f.own.subnet == net("10.2.5.0/24"))
        #expect(f.backend.peers[f.own.subnet] == nil)
    }

    @Test func theWatchAddsUpdatesAndRemovesPeersAndARenewalIsNoChange() async throws {
        let f = try await Fixture()
        try await f.running {
            f.store.put(net("10.2.7.0/24"), udpLease("198.18.0.7"))
            #expect(await eventually { f.backend.peers[net("10.2.7.0/24")] == ip("198.18.0.7") })
            // The same attributes again (a renewal): nothing for the backend.
            let before = f.backend.changes.count
            f.store.put(net("10.2.7.0/24"), udpLease("198.18.0.7"))
            f.store.put(net("10.2.7.0/24"), udpLease("198.18.0.17"))
            #expect(await eventually { f.backend.peers[net("10.2.7.0/24")] == ip("198.18.0.17") })
            #expect(f.backend.changes.count == before + 1)
            guard case .updated(let old, let new) = f.backend.changes.last else {
                Issue.record("expected an update, got \(f.backend.changes)")
                return
            }
            #expect(old.attributes.publicIP == ip("198.18.0.7") && new.attributes.publicIP == ip("198.18.0.17"))
            f.store.delete(net("10.2.7.0/24"))
            #expect(await eventually { f.backend.peers.isEmpty })
            #expect(f.logs.count(containing: "peer 10.2.7.0/24 is gone") == 1)
        }
    }

    @Test func aLeaseKeyWiderThanSubnetLenOverwritesNeitherOtherPeersNorOurOwnEntry() async throws {
        let f = try await Fixture()
        f.store.put(net("10.2.7.0/24"), udpLease("198.18.0.7"))
        try await f.running {
            #expect(await eventually { f.backend.peers.count == 1 })
            // Put by hand: 10.2.0.0-16 covers every subnet, ours included.
            f.store.put(net("10.2.0.0/16"), udpLease("198.18.0.66"))
            f.store.put(net("10.2.9.0/24"), udpLease("198.18.0.9"))
            #expect(await eventually { f.backend.peers[net("10.2.9.0/24")] != nil })
            #expect(f.backend.peers == [net("10.2.7.0/24"): ip("198.18.0.7"), net("10.2.9.0/24"): ip("198.18.0.9")])
            #expect(!f.backend.changes.contains { $0.subnet == net("10.2.0.0/16") })
            let warning = f.logs.all.filter { $0.contains("10.2.0.0-16") }
            #expect(warning.count == 1, "\(f.logs.all)")
            #expect(warning.first?.contains("including ours (10.2.5.0/24)") == true)
            #expect(warning.first?.contains("etcdctl del") == true)
        }
    }

    @Test func aSecondKeyForAPeersSubnetIsIgnoredOnceAndTakesOverOnlyWhenTheLeaseIsDeleted() async throws {
        let f = try await Fixture()
        let subnet = net("10.2.7.0/24")
        f.store.put(subnet, udpLease("198.18.0.7"))
        _ = try await f.sync.loadInitialPeers()
        // A dual-stack key naming the same subnet, written by someone else.
        let dual = Lease(
            subnet: subnet,
            attributes: udpLease("198.18.0.77"),
            expiration: nil,
            revision: 50,
            key: "10.2.7.0-24&fd00:10:244:1::-64"
        )
        f.sync.apply(.put(dual))
        f.sync.apply(.put(dual))
        #expect(f.backend.peers == [subnet: ip("198.18.0.7")])
        let lines = f.logs.all.filter { $0.contains(dual.key) }
        #expect(lines.count == 1, "\(f.logs.all)")
        #expect(lines.first?.contains("names the same subnet as the lease 10.2.7.0-24") == true)
        // The lease deleted: the other key is the lease of the subnet now.
        f.sync.apply(.delete(subnet: subnet, revision: 51))
        #expect(f.backend.peers == [subnet: ip("198.18.0.77")])
        f.sync.apply(.delete(subnet: subnet, revision: 52, key: dual.key))
        #expect(f.backend.peers.isEmpty)
    }

    @Test func aConflictingKeyGoingAwayLeavesThePeerAndOurOwnLease() async throws {
        let f = try await Fixture()
        let subnet = net("10.2.7.0/24")
        f.store.put(subnet, udpLease("198.18.0.7"))
        _ = try await f.sync.loadInitialPeers()
        let dual = Lease(
            subnet: subnet,
            attributes: udpLease("198.18.0.77"),
            expiration: nil,
            revision: 50,
            key: "10.2.7.0-24&fd00::-64"
        )
        let ours = Lease(
            subnet: f.own.subnet,
            attributes: udpLease("198.18.0.78"),
            expiration: nil,
            revision: 51,
            key: f.own.subnet.leaseKey + "&fd00::-64"
        )
        f.sync.apply(.put(dual))
        f.sync.apply(.put(ours))
        f.sync.apply(.delete(subnet: subnet, revision: 52, key: dual.key))
        f.sync.apply(.delete(subnet: f.own.subnet, revision: 53, key: ours.key))
        #expect(f.backend.peers == [subnet: ip("198.18.0.7")])
        #expect(!f.sync.isReacquiring)
        #expect(
            !f.logs.all.contains { $0.contains("two hosts now claim it") || $0.contains("acquiring a lease again") },
            "\(f.logs.all)"
        )
    }

    @Test func strayKeysInTheFirstListAndTheWatchAreReportedOnceEach() async throws {
        let f = try await Fixture()
        f.store.put(net("10.2.7.0/24"), udpLease("198.18.0.7"))
        f.store.put(net("10.2.8.0/28"), udpLease("198.18.0.8"))
        f.store.put(net("10.9.1.0/24"), udpLease("198.18.0.9"))
        try await f.running {
            #expect(await eventually { f.backend.peers.count == 1 })
            for _ in 0..<3 { f.store.put(net("10.2.8.0/28"), udpLease("198.18.0.8")) }
            f.store.put(net("10.2.0.0/16"), udpLease("198.18.0.66"))
            f.store.put(net("10.2.10.0/24"), udpLease("198.18.0.10"))
            #expect(await eventually { f.backend.peers.count == 2 })
            #expect(f.logs.all.filter { $0.contains("10.2.8.0-28") }.count == 1, "\(f.logs.all)")
            #expect(f.logs.all.filter { $0.contains("10.9.1.0-24") && $0.contains("outside the network") }.count == 1)
            #expect(f.logs.all.filter { $0.contains("10.2.0.0-16") }.count == 1)
            #expect(Set(f.sync.ignoredKeys.keys) == ["10.2.8.0-28", "10.9.1.0-24", "10.2.0.0-16"])
        }
    }

    @Test func leasesOfAnotherBackendTypeAreReportedOncePerPeerWithWhatToDo() async throws {
        let f = try await Fixture(type: .vxlan)
        let hostGW = LeaseAttributes(publicIP: ip("198.18.0.7"), backendType: "host-gw")
        f.store.put(net("10.2.7.0/24"), hostGW)
        try await f.running {
            // Renewed twice, and a re-list after compaction: still one report.
            f.store.put(net("10.2.7.0/24"), hostGW)
            f.store.put(net("10.2.7.0/24"), hostGW)
            f.store.put(net("10.2.8.0/24"), udpLease("198.18.0.8"))
            f.store.compactAndBreakWatches()
            f.store.put(net("10.2.9.0/24"), LeaseAttributes(publicIP: ip("198.18.0.9"), backendType: "vxlan"))
            #expect(await eventually { f.backend.peers[net("10.2.9.0/24")] != nil })
            #expect(f.backend.peers.count == 1)
            #expect(
                f.logs.count(
                    containing: "peer 10.2.7.0/24 (198.18.0.7) runs the host-gw backend and this host runs vxlan"
                ) == 1,
                "\(f.logs.all)"
            )
            #expect(f.logs.count(containing: "peer 10.2.8.0/24 (198.18.0.8) runs the udp backend") == 1)
            #expect(f.logs.all.contains { $0.contains("10.2.7.0/24") && $0.contains("restart that host") })
        }
    }

    @Test func aLeaseTheBackendCannotUseIsReportedOnceAndLeftOut() async throws {
        let f = try await Fixture(
            type: .vxlan,
            unusable: { lease in
                lease.attributes.backendData == nil ? "no VtepMAC" : nil
            }
        )
        try await f.running {
            let bare = LeaseAttributes(publicIP: ip("198.18.0.7"), backendType: "vxlan")
            f.store.put(net("10.2.7.0/24"), bare)
            f.store.put(net("10.2.7.0/24"), bare)
            #expect(await eventually { f.logs.count(containing: "cannot be used: no VtepMAC") == 1 })
            #expect(f.backend.peers.isEmpty)
            // Fixed by its host: now a peer.
            f.store.put(
                net("10.2.7.0/24"),
                LeaseAttributes(
                    publicIP: ip("198.18.0.7"),
                    backendType: "vxlan",
                    backendData: .object(["VtepMAC": .string("0e:00:00:00:00:07")])
                )
            )
            #expect(await eventually { f.backend.peers[net("10.2.7.0/24")] == ip("198.18.0.7") })
        }
    }

    @Test func reacquiringOurLeaseDoesNotStopPeerUpdatesWhileItRetries() async throws {
        let f = try await Fixture()
        try await f.running {
            f.store.failNextAcquisitions(2)
            f.store.delete(f.own.subnet)
            #expect(await eventually { f.store.acquisitionAttempts >= 2 })
            #expect(f.sync.isReacquiring)
            // The store is still refusing us (retry after 1 s, then 2 s):
            // a new peer must still reach the backend meanwhile.
            f.store.put(net("10.2.7.0/24"), udpLease("198.18.0.7"))
            #expect(await eventually(timeout: .milliseconds(800)) { f.backend.peers[net("10.2.7.0/24")] != nil })
            #expect(f.sync.isReacquiring)
            #expect(
                await eventually(timeout: .seconds(10)) {
                    f.logs.count(containing: "lease 10.2.5.0/24 acquired again") == 1
                }
            )
            #expect(!f.sync.isReacquiring)
            #expect(f.backend.moved.isEmpty)
        }
    }

    @Test func losingOurSubnetToAnotherHostMovesTheBackendToTheNewOne() async throws {
        let f = try await Fixture()
        try await f.running {
            f.store.failNextAcquisitions(1)
            f.store.delete(f.own.subnet)
            #expect(await eventually { f.store.acquisitionAttempts >= 1 })
            // Another host takes our subnet before we retry.
            f.store.put(f.own.subnet, udpLease("198.18.0.99"))
            #expect(await eventually(timeout: .seconds(10)) { !f.backend.moved.isEmpty })
            let (from, to) = try #require(f.backend.moved.first)
            #expect(from == net("10.2.5.0/24"))
            #expect(to != from)
            #expect(f.movedTo.get() == [to])
            #expect(f.sync.holder.lease.subnet == to)
            // The other host's lease on our old subnet is now a peer like any other.
            f.store.put(from, udpLease("198.18.0.99"))
            #expect(await eventually { f.backend.peers[from] == ip("198.18.0.99") })
            #expect(f.logs.count(containing: "moved to \(to)") == 1)
        }
    }

    @Test func aRelistAfterCompactionAppliesOnlyTheDifference() async throws {
        let f = try await Fixture()
        f.store.put(net("10.2.7.0/24"), udpLease("198.18.0.7"))
        f.store.put(net("10.2.8.0/24"), udpLease("198.18.0.8"))
        try await f.running {
            #expect(await eventually { f.backend.peers.count == 2 })
            let before = f.backend.changes.count
            // Changes whose events are lost to compaction.
            f.store.silentlyDelete(net("10.2.7.0/24"))
            f.store.compactAndBreakWatches()
            f.store.put(net("10.2.9.0/24"), udpLease("198.18.0.9"))
            #expect(
                await eventually {
                    f.backend.peers == [net("10.2.8.0/24"): ip("198.18.0.8"), net("10.2.9.0/24"): ip("198.18.0.9")]
                },
                "\(f.backend.changes)"
            )
            // One removal and one addition; 10.2.8.0/24 is not touched.
            #expect(await eventually { f.backend.changes.count == before + 2 })
            #expect(!f.backend.changes[before...].contains { $0.subnet == net("10.2.8.0/24") })
            #expect(f.logs.count(containing: "re-list #1") == 1)
        }
    }

    @Test func peerChangesCompactionsAndWatchRestartsAreCounted() async throws {
        let metrics = TestMetrics()
        let f = try await Fixture(metrics: metrics)
        f.store.put(net("10.2.7.0/24"), udpLease("198.18.0.7"))
        f.store.put(net("10.2.8.0/24"), udpLease("198.18.0.8"))
        try await f.running {
            #expect(await eventually { f.backend.peers.count == 2 })
            f.store.put(net("10.2.8.0/24"), udpLease("198.18.0.80"))
            f.store.silentlyDelete(net("10.2.7.0/24"))
            f.store.compactAndBreakWatches()
            #expect(await eventually { f.backend.peers == [net("10.2.8.0/24"): ip("198.18.0.80")] })
            #expect(
                await eventually { (try? metrics.expectCounter("tunneld_store_compactions_total").totalValue) == 1 }
            )
            // A compaction is counted as one, not as a watch restart.
            #expect((try? metrics.expectCounter("tunneld_store_watch_restarts_total").totalValue) == 0)

            // A watch that ends (the store closed it) and one that fails are restarts,
            // and the watch resumes after each: a new peer still arrives.
            #expect(await eventually { f.store.openWatches == 1 })
            f.store.breakWatches()
            #expect(
                await eventually { (try? metrics.expectCounter("tunneld_store_watch_restarts_total").totalValue) == 1 }
            )
            #expect(await eventually { f.store.openWatches == 1 })
            f.store.breakWatches(with: LeaseStoreError.io(path: "memory", reason: "connection reset (test)"))
            #expect(
                await eventually { (try? metrics.expectCounter("tunneld_store_watch_restarts_total").totalValue) == 2 }
            )
            f.store.put(net("10.2.9.0/24"), udpLease("198.18.0.9"))
            #expect(await eventually { f.backend.peers[net("10.2.9.0/24")] == ip("198.18.0.9") })
        }
        #expect(try metrics.expectCounter("tunneld_store_watch_restarts_total").totalValue == 2)
        #expect(try metrics.expectCounter("tunneld_peer_changes_total", [("change", "added")]).totalValue == 3)
        #expect(try metrics.expectCounter("tunneld_peer_changes_total", [("change", "updated")]).totalValue == 1)
        #expect(try metrics.expectCounter("tunneld_peer_changes_total", [("change", "removed")]).totalValue == 1)
        #expect(try metrics.expectCounter("tunneld_lease_renewal_failures_total").totalValue == 0)
        // The change times are kept for the peers there are.
        #expect(Set(f.sync.peerChangeTimes.keys) == [.ipv4(net("10.2.8.0/24")), .ipv4(net("10.2.9.0/24"))])
        #expect(f.logs.count(containing: "lease watch ended; resuming from revision") == 1)
        #expect(f.logs.count(containing: "lease watch failed: ") == 1)
    }

    @Test func aGenericWatchErrorResumesFromTheLastRevisionWithoutLosingChanges() async throws {
        let f = try await Fixture()
        try await f.running {
            f.store.put(net("10.2.7.0/24"), udpLease("198.18.0.7"))
            #expect(await eventually { f.backend.peers[net("10.2.7.0/24")] == ip("198.18.0.7") })
            #expect(await eventually { f.store.openWatches == 1 })
            f.store.breakWatches(with: LeaseStoreError.io(path: "memory", reason: "connection reset (test)"))
            // Changed while no watch is open: the next watch replays them from the revision
            // the broken one had reached, not from now.
            f.store.put(net("10.2.7.0/24"), udpLease("198.18.0.17"))
            f.store.put(net("10.2.8.0/24"), udpLease("198.18.0.8"))
            f.store.delete(net("10.2.7.0/24"))
            #expect(await eventually { f.backend.peers == [net("10.2.8.0/24"): ip("198.18.0.8")] })
        }
        #expect(f.logs.count(containing: "connection reset (test)") == 1, "\(f.logs.all)")
        // Nothing was re-listed: a generic error is not a compaction.
        #expect(f.logs.count(containing: "listing again") == 0)
    }

    @Test func aFailedRelistAfterACompactionIsRetriedUntilItSucceeds() async throws {
        let f = try await Fixture()
        f.store.put(net("10.2.7.0/24"), udpLease("198.18.0.7"))
        try await f.running {
            #expect(await eventually { f.backend.peers.count == 1 })
            #expect(await eventually { f.store.openWatches == 1 })
            f.store.put(net("10.2.8.0/24"), udpLease("198.18.0.8"))
            f.store.silentlyDelete(net("10.2.7.0/24"))
            f.store.failNextLists(1)
            f.store.compactAndBreakWatches()
            // The first re-list fails; the watch from the old revision is compacted again,
            // and the second re-list gives the store's state.
            #expect(
                await eventually(timeout: .seconds(10)) { f.backend.peers == [net("10.2.8.0/24"): ip("198.18.0.8")] },
                "\(f.backend.peers) \(f.logs.all)"
            )
        }
        #expect(f.logs.count(containing: "lease list failed: ") == 1, "\(f.logs.all)")
        #expect(f.logs.count(containing: "listing again (re-list #2)") == 1, "\(f.logs.all)")
    }

    @Test func renewalsTheirFailuresAndReacquisitionsAreCounted() async throws {
        let renewed = TestMetrics()
        let f = try await Fixture(metrics: renewed)
        // A lease about to run out is renewed at half its remaining life.
        f.sync.holder.replace(f.store.put(f.own.subnet, f.own.attributes, ttl: 0.4))
        try await f.running {
            #expect(await eventually { (try? renewed.expectCounter("tunneld_lease_renewals_total").totalValue) == 1 })
        }
        #expect(try renewed.expectCounter("tunneld_lease_renewal_failures_total").totalValue == 0)

        // Gone from the store before its renewal: a failure, then the lease
        // is acquired again.
        let failed = TestMetrics()
        let g = try await Fixture(metrics: failed)
        g.sync.holder.replace(g.store.put(g.own.subnet, g.own.attributes, ttl: 0.4))
        try await g.running {
            g.store.silentlyDelete(g.own.subnet)
            #expect(
                await eventually { (try? failed.expectCounter("tunneld_lease_renewal_failures_total").totalValue) == 1 }
            )
            #expect(
                await eventually { (try? failed.expectCounter("tunneld_lease_reacquisitions_total").totalValue) == 1 }
            )
        }
        #expect(try failed.expectCounter("tunneld_lease_renewals_total").totalValue == 0)
    }

    @Test func ourOwnLeaseMissingFromARelistIsAcquiredAgain() async throws {
        let f = try await Fixture()
        try await f.running {
            f.store.silentlyDelete(f.own.subnet)
            f.store.compactAndBreakWatches()
            #expect(
                await eventually { f.logs.count(containing: "lease 10.2.5.0/24 acquired again") == 1 },
                "\(f.logs.all)"
            )
            let leases = try await f.store.leases().leases
            #expect(leases.contains { $0.subnet == f.own.subnet })
        }
    }
}
