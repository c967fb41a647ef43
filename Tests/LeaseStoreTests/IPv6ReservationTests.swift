import EtcdClient
import EtcdTestSupport
import Foundation
import NetBase
import Testing

@testable import LeaseStore

/// Reservations (lease keys without a TTL) of IPv6 subnets, as flannel has
/// them: a dual-stack key `<IPv4>&<IPv6>` for the host with its PublicIP,
/// and an IPv6-only key `0.0.0.0-0&<IPv6>` for the host with its PublicIPv6
/// (flanneld writes PublicIP 0.0.0.0 there). The host gets its reserved
/// subnets, the key never expires, and release leaves it in place.
@Suite struct IPv6ReservationTests {
    static let dualStackJSON =
        #"{"Network": "10.2.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:10:244::/48", "Backend": {"Type": "host-gw"}}"#

    func host(_ n: Int) -> LeaseAttributes {
        LeaseAttributes(
            publicIP: IPv4Address(198, 18, 0, UInt8(n)),
            publicIPv6: ip6("fd18::\(n)"),
            backendType: "host-gw"
        )
    }

    /// What an operator reserves for an IPv6-only host, as flanneld writes it.
    static let ipv6OnlyValue = #"{"PublicIP":"0.0.0.0","PublicIPv6":"fd18::9","BackendType":"host-gw"}"#

    @Test func aKeyBelongsToItsPublicIPOrWithout0000ToItsPublicIPv6() {
        let me = host(9)
        #expect(LeaseAttributes(publicIP: ip("198.18.0.9")).belongs(to: me))
        #expect(!LeaseAttributes(publicIP: ip("198.18.0.8"), publicIPv6: ip6("fd18::9")).belongs(to: me))
        #expect(LeaseAttributes(publicIP: ip("0.0.0.0"), publicIPv6: ip6("fd18::9")).belongs(to: me))
        #expect(!LeaseAttributes(publicIP: ip("0.0.0.0"), publicIPv6: ip6("fd18::8")).belongs(to: me))
        // 0.0.0.0 without a PublicIPv6 names no host, not even one without an IPv6 address.
        #expect(!LeaseAttributes(publicIP: ip("0.0.0.0")).belongs(to: LeaseAttributes(publicIP: ip("0.0.0.0"))))
    }

    @Test func theChooserHandsAnIPv6OnlyReservationToTheHostWithItsPublicIPv6() throws {
        let c = try config(ipv6OnlyJSON)
        let reserved = Lease(
            subnet: .noIPv4,
            ipv6Subnet: net6("fd00:10:244:c8::/64"),
            attributes: try LeaseAttributes(flannelJSON: Self.ipv6OnlyValue, key: "k"),
            expiration: nil,
            revision: 1
        )
        var g = SeededGenerator(seed: 5)
        let mine = try SubnetChooser.choose(config: c, leases: [reserved], host: host(9), preferred: nil, using: &g)
        #expect(mine.source == .existingLease(reserved))
        let other = try SubnetChooser.choose(config: c, leases: [reserved], host: host(8), preferred: nil, using: &g)
        #expect(other.source == .free && !other.ipv6Candidates.contains(net6("fd00:10:244:c8::/64")))
    }

    /// The same story in either store; `reserve` puts a key without a TTL.
    func exercise(
        _ store: any LeaseStore,
        dualStack: NetworkConfig,
        ipv6Only: NetworkConfig,
        setConfig: (String) async throws -> Void,
        reserve: (_ key: String, _ value: String) async throws -> Void
    ) async throws {
        // Dual stack: reserved for 198.18.0.5 under the key with both subnets.
        let dualKey = "10.2.50.0-24&fd00:10:244:32::-64"
        try await reserve(dualKey, #"{"PublicIP":"198.18.0.5","PublicIPv6":"fd18::5","BackendType":"host-gw"}"#)
        let dual = try await store.acquireLease(config: dualStack, attributes: host(5), preferred: nil)
        #expect(dual.key == dualKey && dual.isReservation, "\(dual)")
        #expect(dual.subnet == net("10.2.50.0/24") && dual.ipv6Subnet == net6("fd00:10:244:32::/64"))
        #expect(try await store.renewLease(dual).isReservation)
        let stranger = try await store.acquireLease(config: dualStack, attributes: host(6), preferred: nil)
        #expect(stranger.key != dualKey && !stranger.isReservation)
        try await store.releaseLease(dual)
        #expect(try await store.leases().leases.contains { $0.key == dualKey && $0.isReservation })

        // IPv6-only: reserved for fd18::9, the way flanneld writes such a key.
        try await setConfig(ipv6OnlyJSON)
        let onlyKey = "0.0.0.0-0&fd00:10:244:c8::-64"
        try await reserve(onlyKey, Self.ipv6OnlyValue)
        let other = try await store.acquireLease(config: ipv6Only, attributes: host(8), preferred: nil)
        #expect(other.key != onlyKey && !other.isReservation)
        let only = try await store.acquireLease(config: ipv6Only, attributes: host(9), preferred: nil)
        #expect(only.key == onlyKey && only.isReservation, "\(only)")
        #expect(only.attributes == host(9), "the host's attributes are written to it")
        // Rewritten with the host's PublicIP, it is still the host's on a restart, and still a reservation.
        let again = try await store.acquireLease(config: ipv6Only, attributes: host(9), preferred: nil)
        #expect(again.key == onlyKey && again.isReservation)
        #expect(try await store.renewLease(again).isReservation)
        try await store.releaseLease(again)
        let listed = try await store.leases().leases
        #expect(listed.first { $0.key == onlyKey }?.isReservation == true, "\(listed)")
    }

    @Test func theLocalStoreHandsOutReservedIPv6Subnets() async throws {
        try await withTemporaryDirectory { dir in
            let store = try LocalLeaseStore(directory: dir)
            let dual = try await store.setNetworkConfig(json: Self.dualStackJSON)
            let only = try config(ipv6OnlyJSON)
            try await exercise(
                store,
                dualStack: dual,
                ipv6Only: only,
                setConfig: { _ = try await store.setNetworkConfig(json: $0) },
                reserve: { key, value in
                    let subnet = try #require(LeaseKey.subnet(fromKey: key))
                    _ = try await store.reserve(
                        subnet,
                        ipv6Subnet: LeaseKey.ipv6Subnet(fromKey: key),
                        attributes: try LeaseAttributes(flannelJSON: value, key: key)
                    )
                }
            )
            // deleteLease tells IPv6-only keys apart by their IPv6 subnet.
            #expect(try await store.deleteLease(subnet: .noIPv4, ipv6Subnet: net6("fd00:10:244:c8::/64")))
            #expect(try await !store.deleteLease(subnet: .noIPv4, ipv6Subnet: net6("fd00:10:244:c8::/64")))
            #expect(try await !store.leases().leases.contains { $0.key == "0.0.0.0-0&fd00:10:244:c8::-64" })
            #expect(try await store.leases().leases.contains { $0.key == "10.2.50.0-24&fd00:10:244:32::-64" })
        }
    }

    @Test(.enabled(if: EtcdServer.isInstalled), .timeLimit(.minutes(2)))
    func etcdHandsOutIPv6SubnetsReservedWithEtcdctl() async throws {
        try await EtcdServer.with { server in
            let client = try EtcdClient(endpoints: [server.clientURL])
            do {
                let store = EtcdLeaseStore(client: client, prefix: "/coreos.com/network")
                let dual = try await store.setNetworkConfig(json: Self.dualStackJSON)
                try await exercise(
                    store,
                    dualStack: dual,
                    ipv6Only: try config(ipv6OnlyJSON),
                    setConfig: { _ = try await store.setNetworkConfig(json: $0) },
                    reserve: { key, value in
                        _ = try server.etcdctl(["put", "/coreos.com/network/subnets/" + key, value])
                    }
                )
                // Still keys without an etcd lease.
                for key in ["10.2.50.0-24&fd00:10:244:32::-64", "0.0.0.0-0&fd00:10:244:c8::-64"] {
                    let json = try server.etcdctl(["get", "/coreos.com/network/subnets/" + key, "-w", "json"])
                    #expect(json.contains("\"kvs\"") && !json.contains("\"lease\""), "\(key): \(json)")
                }
                await client.close()
            } catch {
                await client.close()
                throw error
            }
        }
    }

    /// Not a reservation: the expiring lease a flanneld host of an IPv6-only
    /// network wrote (PublicIP 0.0.0.0) is taken over by tunneld started on
    /// the same machine (its PublicIPv6), as flanneld restarted there would
    /// take its own lease, and stays an expiring lease.
    @Test(.enabled(if: EtcdServer.isInstalled), .timeLimit(.minutes(2)))
    func tunneldTakesOverTheLeaseOfTheFlanneldHostItReplaces() async throws {
        try await EtcdServer.with { server in
            let client = try EtcdClient(endpoints: [server.clientURL])
            do {
                let store = EtcdLeaseStore(client: client, prefix: "/coreos.com/network")
                let c = try await store.setNetworkConfig(json: ipv6OnlyJSON)
                let granted = try server.etcdctl(["lease", "grant", "3600"])
                let id = try #require(granted.split(separator: " ").dropFirst().first, "\(granted)")
                let key = "/coreos.com/network/subnets/0.0.0.0-0&fd00:10:244:d0::-64"
                _ = try server.etcdctl([
                    "put", "--lease=\(id)", key,
                    #"{"PublicIP":"0.0.0.0","PublicIPv6":"fd18::7","BackendType":"host-gw"}"#,
                ])
                let stranger = try await store.acquireLease(config: c, attributes: host(8), preferred: nil)
                #expect(stranger.ipv6Subnet != net6("fd00:10:244:d0::/64"))
                let lease = try await store.acquireLease(config: c, attributes: host(7), preferred: nil)
                #expect(lease.ipv6Subnet == net6("fd00:10:244:d0::/64") && !lease.isReservation, "\(lease)")
                #expect(
                    try server.etcdctl(["get", key, "--print-value-only"]).hasPrefix(
                        #"{"PublicIP":"198.18.0.7","PublicIPv6":"fd18::7""#
                    )
                )
                await client.close()
            } catch {
                await client.close()
                throw error
            }
        }
    }
}
