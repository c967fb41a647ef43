import EtcdClient
import EtcdTestSupport
import Foundation
import NetBase
import Testing

@testable import LeaseStore

private let etcdMissing = "etcd is not installed (apt-get install etcd-server etcd-client)"

/// flannel's vxlan lease value with an extra BackendData field that makes
/// it ~330 bytes, so that 20,000 leases are more than 4 MiB.
private func paddedValue(host: Int) -> [UInt8] {
    let publicIP = "198.18.\(1 + host / 250).\(1 + host % 250)"
    let pad = String(repeating: "p", count: 200)
    return Array(
        #"{"PublicIP":"\#(publicIP)","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:00:00:01","Pad":"\#(pad)"}}"#
            .utf8
    )
}

/// Subnet `i` of 10.0.0.0/8 in /24s, skipping 10.0.0.0/24.
private func subnet(_ i: Int) -> IPv4Network {
    IPv4Network(address: IPv4Address(UInt32(10) << 24 | UInt32(i + 1) << 8), prefixLength: 24)
}

/// Puts leases for subnets 0..<count, 128 per transaction, on one etcd lease.
private func putLeases(_ client: EtcdClient, prefix: String, count: Int, lease: Int64) async throws {
    var index = 0
    while index < count {
        let batch = (index..<min(count, index + 128)).map { i in
            (key: prefix + LeaseKey.key(for: subnet(i)), value: paddedValue(host: i))
        }
        try await client.putAll(batch, lease: lease)
        index += batch.count
    }
}

@Suite(.enabled(if: EtcdServer.isInstalled, Comment(rawValue: etcdMissing)), .timeLimit(.minutes(3)))
struct EtcdLeaseStoreScaleTests {
    @Test func twentyThousandLeasesLargerThanFourMiBAreListedWatchedAndAcquiredAmong() async throws {
        try await EtcdServer.with { server in
            // gRPC's usual receive limit: one answer holding every lease fails.
            let client = try EtcdClient(endpoints: [server.clientURL], maxReceiveMessageBytes: 4 << 20)
            let store = EtcdLeaseStore(client: client, prefix: "/scale/network")
            let config = try await store.setNetworkConfig(
                json: #"{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#
            )
            let etcdLease = try await client.leaseGrant(ttl: 3600)
            try await putLeases(client, prefix: store.subnetsPrefix, count: 20_000, lease: etcdLease.id)

            await #expect {
                _ = try await client.rangePage(
                    key: store.subnetsPrefix,
                    rangeEnd: EtcdClient.rangeEnd(ofPrefix: store.subnetsPrefix)
                )
            } throws: { error in
                (error as? EtcdError)?.code == .responseTooLarge
            }

            let snapshot = try await store.leases()
            #expect(snapshot.skipped.isEmpty)
            #expect(snapshot.leases.count == 20_000)
            #expect(Set(snapshot.leases.map(\.subnet)) == Set((0..<20_000).map(subnet)))
            #expect(snapshot.revision == (try server.currentRevision()))
            let sample = try #require(snapshot.leases.first { $0.subnet == subnet(12_345) })
            #expect(sample.attributes.publicIP == IPv4Address(198, 18, 50, 96))
            let expiry = try #require(sample.expiration)
            #expect(expiry > Date() && expiry < Date().addingTimeInterval(3601))

            // As a peer list: the same leases, no expiry looked up for others.
            let peers = try await store.peerLeases(holder: IPv4Address(198, 18, 0, 250))
            #expect(peers.leases.map(\.subnet) == snapshot.leases.map(\.subnet))
            #expect(peers.leases.map(\.attributes) == snapshot.leases.map(\.attributes))
            #expect(peers.leases.allSatisfy { $0.expiration == Lease.expirationNotLookedUp })

            // A new host joins among them: it gets a free subnet, the first
            // free ones being right after the 20,000 taken.
            let joined = try await store.acquireLease(
                config: config,
                attributes: LeaseAttributes(publicIP: IPv4Address(198, 19, 0, 1)),
                preferred: nil
            )
            #expect(!Set((0..<20_000).map(subnet)).contains(joined.subnet))
            #expect(joined.subnet.address.value >= subnet(20_000).address.value)
            #expect(joined.subnet.address.value <= subnet(20_099).address.value)
            let expires = try #require(joined.expiration)
            #expect(expires > Date().addingTimeInterval(23 * 3600))
            await client.close()
        }
    }

    @Test func peerWatchLooksUpOnlyTheHoldersExpiry() async throws {
        try await EtcdServer.with { server in
            let client = try EtcdClient(endpoints: [server.clientURL])
            let store = EtcdLeaseStore(client: client, prefix: "/w/network", leaseTTL: .seconds(600))
            let config = try await store.setNetworkConfig(json: #"{"Network":"10.0.0.0/8","SubnetLen":24}"#)
            let me = LeaseAttributes(publicIP: IPv4Address(198, 18, 0, 1))
            let start = try server.currentRevision()
            // Away from the 200 subnets put below.
            let mine = try await store.acquireLease(config: config, attributes: me, preferred: net("10.200.0.0/24"))
            #expect(mine.subnet == net("10.200.0.0/24"))
            let other = try await client.leaseGrant(ttl: 300)
            try await putLeases(client, prefix: store.subnetsPrefix, count: 200, lease: other.id)

            var events: [LeaseEvent] = []
            for try await event in store.watchPeerLeases(after: start, holder: me.publicIP) {
                events.append(event)
                if events.count == 201 { break }
            }
            let own = events.compactMap { event -> Lease? in
                guard case .put(let lease) = event, lease.subnet == mine.subnet else { return nil }
                return lease
            }
            let ownExpiry = try #require(own.first?.expiration)
            #expect(ownExpiry > Date().addingTimeInterval(500) && ownExpiry < Date().addingTimeInterval(601))
            let others = events.compactMap { event -> Lease? in
                guard case .put(let lease) = event, lease.subnet != mine.subnet else { return nil }
                return lease
            }
            #expect(others.count == 200)
            #expect(others.allSatisfy { $0.expiration == Lease.expirationNotLookedUp })

            // The full watch still looks every expiry up.
            var full: [LeaseEvent] = []
            for try await event in store.watchLeases(after: start) {
                full.append(event)
                if full.count == 201 { break }
            }
            for case .put(let lease) in full where lease.subnet != mine.subnet {
                let expiry = try #require(lease.expiration)
                #expect(expiry > Date() && expiry < Date().addingTimeInterval(301))
            }
            await client.close()
        }
    }
}

@Suite struct SubnetChooserScaleTests {
    @Test func choosingAmongSixtyThousandTakenSubnetsOfASlashEightFindsTheFreeOnes() throws {
        let c = try config(#"{"Network": "10.0.0.0/8"}"#)
        let later = Date(timeIntervalSince1970: 2_000_000_000)
        // Every subnet but every 600th of the first 60,600 is taken, in a
        // shuffled order.
        var generator = SeededGenerator(seed: 7)
        let taken = (0..<60_600).filter { $0 % 600 != 599 }.shuffled(using: &generator)
        let leases = taken.map { i in
            Lease(
                subnet: c.subnets[i],
                attributes: LeaseAttributes(publicIP: ip("198.18.1.1")),
                expiration: later,
                revision: 1
            )
        }
        #expect(leases.count == 60_499)
        var choose = SeededGenerator(seed: 1)
        let choice = try SubnetChooser.choose(
            config: c,
            leases: leases,
            host: LeaseAttributes(publicIP: ip("198.19.0.1")),
            preferred: nil,
            using: &choose
        )
        #expect(choice.source == .free)
        // The first 100 free: 100 of the 101 gaps (the 101st is further).
        let expected = (0..<60_600).filter { $0 % 600 == 599 }.prefix(100).map { c.subnets[$0] }
        #expect(Set(choice.candidates) == Set(expected))
        #expect(choice.candidates.count == SubnetChooser.freeCandidateLimit)
    }
}
