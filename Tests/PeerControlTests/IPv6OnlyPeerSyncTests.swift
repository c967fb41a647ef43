import Foundation
import LeaseStore
import NetBase
import NetTestSupport
import PeerControl
import Testing

/// In an IPv6-only network every lease's IPv4 part is 0.0.0.0/0: the peer
/// table tells leases apart by their IPv6 subnets (`LeaseSubnet`).
@Suite struct IPv6OnlyPeerSyncTests {
    static let json =
        #"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/48","Backend":{"Type":"udp"}}"#

    func lease(_ v6: String, _ publicIP: String, revision: Int64) -> Lease {
        Lease(
            subnet: .noIPv4,
            ipv6Subnet: IPv6Network(v6, strict: true)!,
            attributes: udpLease(publicIP),
            expiration: Date().addingTimeInterval(3600),
            revision: revision
        )
    }

    @Test func ipv6OnlyPeersAreToldApartByTheirIPv6Subnets() throws {
        let config = try NetworkConfig(json: Self.json)
        let backend = RecordingBackend(type: .udp, publicIP: ip("198.18.0.1"))
        let logs = LogCapture()
        let own = lease("fd00:10:244:1::/64", "198.18.0.1", revision: 1)
        let sync = PeerSync(
            store: MemoryLeaseStore(config: Self.json),
            backend: backend,
            holder: LeaseHolder(own),
            config: config,
            attributes: own.attributes,
            logger: logs.logger
        )
        let a = lease("fd00:10:244:2::/64", "198.18.0.2", revision: 2)
        let b = lease("fd00:10:244:3::/64", "198.18.0.3", revision: 3)
        sync.sync(with: LeaseSnapshot(leases: [own, a, b], revision: 3))
        #expect(Set(sync.currentPeers.keys) == [.ipv6(a.ipv6Subnet!), .ipv6(b.ipv6Subnet!)])
        #expect(backend.changes.count == 2)

        // flanneld's deletion of one key: that peer goes, the other stays.
        sync.apply(.delete(subnet: .noIPv4, revision: 4, key: a.key))
        #expect(Set(sync.currentPeers.keys) == [.ipv6(b.ipv6Subnet!)])
        // An update of the other is applied to it alone.
        sync.apply(.put(lease("fd00:10:244:3::/64", "198.18.0.33", revision: 5)))
        #expect(sync.currentPeers[.ipv6(b.ipv6Subnet!)]?.attributes.publicIP == ip("198.18.0.33"))

        // A plain IPv4 key is no lease here: reported, no peer.
        sync.apply(
            .put(Lease(subnet: net("10.2.5.0/24"), attributes: udpLease("198.18.0.5"), expiration: nil, revision: 6))
        )
        #expect(sync.peerCount == 1)
        #expect(logs.count(containing: "is no lease of this IPv6-only network") == 1, "\(logs.all)")
        // Our own key is never a peer.
        sync.apply(.put(lease("fd00:10:244:1::/64", "198.18.0.1", revision: 7)))
        #expect(sync.peerCount == 1)
    }
}
