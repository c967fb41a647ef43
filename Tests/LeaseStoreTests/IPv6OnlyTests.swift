import EtcdClient
import EtcdTestSupport
import FlannelFiles
import Foundation
import NetBase
import Testing

@testable import LeaseStore

let ipv6OnlyJSON =
    #"{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00:10:244::/48", "Backend": {"Type": "host-gw"}}"#

/// IPv6-only networks (`"EnableIPv4": false`), as flanneld has them
/// (pkg/subnet/config.go, pkg/subnet/subnet.go, read for behaviour): no
/// Network needed, lease keys `0.0.0.0-0&<IPv6 subnet>` (MakeSubnetKey with
/// an empty IPv4 subnet), subnet.env without the IPv4 lines.
@Suite struct IPv6OnlyConfigTests {
    @Test func anIPv6OnlyConfigNeedsNoNetwork() throws {
        let c = try config(ipv6OnlyJSON)
        #expect(c.isIPv6Only && !c.enableIPv4 && c.enableIPv6)
        #expect(c.ipv4Network == nil && c.network == .noIPv4 && c.subnetLen == 0)
        #expect(c.ipv6?.network == net6("fd00:10:244::/48") && c.ipv6?.subnetLen == 64)
        #expect(c.ipv6?.subnetMin == net6("fd00:10:244:1::/64"))
        #expect(c.networksDescription == "fd00:10:244::/48")
        #expect(c.backend.type == "host-gw")
        // Only the IPv4 subnet 0.0.0.0/0 fits: every lease key's IPv4 part.
        #expect(c.fits(.noIPv4) && !c.fits(net("10.2.1.0/24")))
    }

    @Test func aNetworkGivenBesideIsNotUsed() throws {
        let c = try config(
            #"{"Network": "10.2.0.0/16", "SubnetLen": 99, "EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00::/56"}"#
        )
        #expect(c.ipv4Network == nil && c.ipv6?.subnetLen == 64)
    }

    @Test func dualStackStaysAsItWas() throws {
        let c = try config(dualStackJSON)
        #expect(!c.isIPv6Only && c.ipv4Network == net("10.2.0.0/16"))
        #expect(c.networksDescription == "10.2.0.0/16 and fd00:10:244::/48")
    }
}

@Suite struct IPv6OnlyLeaseTests {
    static let key = "0.0.0.0-0&fd00:10:244:5::-64"

    @Test func flanneldsKeyNamesOnlyAnIPv6Subnet() {
        #expect(LeaseKey.subnet(fromKey: "/coreos.com/network/subnets/" + Self.key) == .noIPv4)
        #expect(LeaseKey.ipv6Subnet(fromKey: Self.key) == net6("fd00:10:244:5::/64"))
        let lease = Lease(
            subnet: .noIPv4,
            ipv6Subnet: net6("fd00:10:244:5::/64"),
            attributes: LeaseAttributes(publicIP: ip("198.18.0.2")),
            expiration: nil,
            revision: 1
        )
        #expect(lease.key == Self.key)
        #expect(lease.ipv4Subnet == nil)
        #expect(lease.primarySubnet == .ipv6(net6("fd00:10:244:5::/64")))
        #expect(lease.description == "fd00:10:244:5::/64 → 198.18.0.2 (reserved)")
        #expect(
            LeaseEvent.delete(subnet: .noIPv4, revision: 2, key: Self.key).primarySubnet
                == .ipv6(net6("fd00:10:244:5::/64"))
        )
        // A dual-stack or IPv4 lease is still named by its IPv4 subnet.
        let dual = Lease(
            subnet: net("10.2.5.0/24"),
            ipv6Subnet: net6("fd00:10:244:5::/64"),
            attributes: LeaseAttributes(publicIP: ip("198.18.0.2")),
            expiration: nil,
            revision: 1
        )
        #expect(dual.primarySubnet == .ipv4(net("10.2.5.0/24")) && dual.ipv4Subnet == net("10.2.5.0/24"))
    }

    /// What a flanneld host-gw host of an IPv6-only network writes: it has
    /// no IPv4 address to give, so PublicIP is Go's zero IP4.
    @Test func flanneldsIPv6OnlyValueRoundTripsByteForByte() throws {
        let value = #"{"PublicIP":"0.0.0.0","PublicIPv6":"fd18::9","BackendType":"host-gw"}"#
        let attrs = try LeaseAttributes(flannelJSON: value, key: Self.key)
        #expect(attrs.publicIP == ip("0.0.0.0") && attrs.publicIPv6 == ip6("fd18::9"))
        #expect(attrs.flannelJSON == value)
    }
}

@Suite struct IPv6OnlyRuleAndChooserTests {
    func lease(_ key: String, _ publicIP: String, expiration: Date? = Date.distantFuture) -> Lease {
        Lease(
            subnet: LeaseKey.subnet(fromKey: key)!,
            attributes: LeaseAttributes(publicIP: ip(publicIP)),
            expiration: expiration,
            revision: 1,
            key: key
        )
    }

    @Test func onlyFlanneldsIPv6OnlyKeysAreLeases() throws {
        let rule = LeaseRule(try config(ipv6OnlyJSON))
        #expect(rule.isIPv6Only)
        let set = rule.sort(leases: [
            lease("0.0.0.0-0&fd00:10:244:1::-64", "198.18.0.1"),
            lease("0.0.0.0-0&fd00:10:244:2::-64", "198.18.0.2"),
            lease("0.0.0.0-0&fd00:99::-64", "198.18.0.3"),  // outside the IPv6Network
            lease("10.2.4.0-24&fd00:10:244:4::-64", "198.18.0.4"),  // an IPv4 part
            lease("10.2.5.0-24", "198.18.0.5"),  // IPv4 only
            lease("0.0.0.0-0", "198.18.0.6"),  // no IPv6 part
        ])
        // Two leases, told apart by their IPv6 subnets though both are 0.0.0.0/0.
        #expect(set.leases.map(\.key) == ["0.0.0.0-0&fd00:10:244:1::-64", "0.0.0.0-0&fd00:10:244:2::-64"])
        #expect(
            Set(set.ignored.map(\.key))
                == ["0.0.0.0-0&fd00:99::-64", "10.2.4.0-24&fd00:10:244:4::-64", "10.2.5.0-24", "0.0.0.0-0"]
        )
        let text = set.ignored.first { $0.key == "10.2.5.0-24" }!.description
        #expect(text.contains("is no lease of this IPv6-only network"), "\(text)")
        #expect(rule.problem(with: .noIPv4) == nil && rule.problem(with: net("10.2.5.0/24")) == .notIPv6Only)
    }

    @Test func aDualStackNetworkDoesNotTakeIPv6OnlyKeys() throws {
        let rule = LeaseRule(try config(dualStackJSON))
        let set = rule.sort(leases: [lease("0.0.0.0-0&fd00:10:244:1::-64", "198.18.0.1")])
        #expect(set.leases.isEmpty && set.ignored.count == 1)
    }

    func choose(
        _ leases: [Lease],
        me: String = "198.18.0.1",
        preferredIPv6: String? = nil
    ) throws -> SubnetChoice {
        var g = SeededGenerator(seed: 3)
        return try SubnetChooser.choose(
            config: try config(ipv6OnlyJSON),
            leases: leases,
            host: LeaseAttributes(publicIP: ip(me)),
            preferred: nil,
            preferredIPv6: preferredIPv6.map(net6),
            using: &g
        )
    }

    /// Hosts with only an IPv6 underlay all have PublicIP 0.0.0.0 (as
    /// flanneld writes it): their own lease is the one with their PublicIPv6.
    @Test func withoutAPublicIPTheLeaseOfOurPublicIPv6IsOurs() throws {
        func v6Lease(_ key: String, _ publicIPv6: String) -> Lease {
            var l = lease(key, "0.0.0.0")
            l.attributes.publicIPv6 = IPv6Address(publicIPv6)!
            return l
        }
        let theirs = v6Lease("0.0.0.0-0&fd00:10:244:6::-64", "fd18::2")
        let mine = v6Lease("0.0.0.0-0&fd00:10:244:7::-64", "fd18::1")
        var g = SeededGenerator(seed: 3)
        let choice = try SubnetChooser.choose(
            config: try config(ipv6OnlyJSON),
            leases: [theirs, mine],
            host: LeaseAttributes(publicIP: IPv4Address(0), publicIPv6: IPv6Address("fd18::1")!),
            preferred: nil,
            using: &g
        )
        #expect(choice.source == .existingLease(mine))
        #expect(!theirs.attributes.belongs(to: mine.attributes))
        #expect(mine.attributes.belongs(to: mine.attributes))
        // With a PublicIP, that alone names the host, as in flannel.
        #expect(
            LeaseAttributes(publicIP: ip("198.18.0.1"), publicIPv6: IPv6Address("fd18::1")!)
                .belongs(to: LeaseAttributes(publicIP: ip("198.18.0.1")))
        )
    }

    @Test func theChooserPicksOnlyAnIPv6Subnet() throws {
        let choice = try choose([lease("0.0.0.0-0&fd00:10:244:1::-64", "198.18.0.9")])
        #expect(choice.source == .free)
        #expect(choice.candidates.count == choice.ipv6Candidates.count && choice.candidates.count == 100)
        #expect(choice.candidates.allSatisfy { $0.isNoIPv4 })
        #expect(!choice.ipv6Candidates.contains(net6("fd00:10:244:1::/64")))
        // Each try gets its own IPv6 subnet.
        #expect(Set((0..<5).map { choice.ipv6Candidate($0)! }).count == 5)
        #expect(
            LeaseKey.key(for: choice.candidates[0], ipv6: choice.ipv6Candidate(0))
                == "0.0.0.0-0&" + choice.ipv6Candidate(0)!.leaseKey
        )
    }

    @Test func thePreviousIPv6SubnetComesFirstAndOurLeaseIsReused() throws {
        let preferred = try choose([], preferredIPv6: "fd00:10:244:9::/64")
        #expect(preferred.source == .preferred && preferred.ipv6Subnet == net6("fd00:10:244:9::/64"))
        let mine = lease("0.0.0.0-0&fd00:10:244:7::-64", "198.18.0.1")
        let reused = try choose([lease("0.0.0.0-0&fd00:10:244:6::-64", "198.18.0.2"), mine])
        #expect(reused.source == .existingLease(mine))
        // Our dual-stack lease of an earlier config is obsolete here.
        let old = lease("10.2.7.0-24&fd00:10:244:7::-64", "198.18.0.1")
        let replaced = try choose([old])
        #expect(replaced.obsolete == [old] && replaced.ipv6Subnet != nil)
    }
}

@Suite struct IPv6OnlySubnetEnvTests {
    let env = SubnetEnv(
        network: nil,
        subnet: nil,
        mtu: 1472,
        ipMasq: true,
        ipv6Network: net6("fd00:10:244::/48"),
        ipv6Subnet: net6("fd00:10:244:48::/64")
    )

    /// flanneld's WriteSubnetFile with EnableIPv4 false: no FLANNEL_NETWORK
    /// or FLANNEL_SUBNET.
    @Test func textHasNoIPv4Lines() throws {
        #expect(
            env.text == """
                FLANNEL_IPV6_NETWORK=fd00:10:244::/48
                FLANNEL_IPV6_SUBNET=fd00:10:244:48::1/64
                FLANNEL_MTU=1472
                FLANNEL_IPMASQ=true

                """
        )
        #expect(try SubnetEnv(parsing: env.text) == env)
    }

    @Test func aFileWithNeitherFamilyIsRefused() {
        let e = #expect(throws: SubnetEnvError.self) {
            try SubnetEnv(parsing: "FLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n")
        }
        #expect(e?.reason.contains("FLANNEL_NETWORK is missing") == true, "\(String(describing: e))")
    }
}

/// Both stores: two hosts get distinct IPv6 subnets under flanneld's keys,
/// and renew, list and release them by those keys.
@Suite struct IPv6OnlyStoreTests {
    func node(_ n: Int) -> LeaseAttributes {
        LeaseAttributes(publicIP: IPv4Address(198, 18, 0, UInt8(n)), backendType: "host-gw")
    }

    func exercise(_ store: any LeaseStore, _ c: NetworkConfig) async throws {
        let a = try await store.acquireLease(config: c, attributes: node(1), preferred: nil)
        let b = try await store.acquireLease(
            config: c,
            attributes: node(2),
            preferred: nil,
            preferredIPv6: net6("fd00:10:244:9::/64")
        )
        #expect(a.subnet.isNoIPv4 && b.subnet.isNoIPv4)
        #expect(b.key == "0.0.0.0-0&fd00:10:244:9::-64")
        #expect(a.ipv6Subnet != nil && a.ipv6Subnet != b.ipv6Subnet && c.ipv6!.fits(a.ipv6Subnet!))
        #expect(a.key == "0.0.0.0-0&" + a.ipv6Subnet!.leaseKey)
        let listed = try await store.leases().leases
        #expect(Set(listed.map(\.key)) == [a.key, b.key])
        #expect(LeaseRule(c).sort(leases: listed).leases.count == 2)
        // Renewal and a restart with the same PublicIP keep each host's own key.
        let renewed = try await store.renewLease(b)
        #expect(renewed.key == b.key && renewed.attributes.publicIP == b.attributes.publicIP)
        let again = try await store.acquireLease(config: c, attributes: node(1), preferred: nil)
        #expect(again.key == a.key)
        try await store.releaseLease(b)
        #expect(try await store.leases().leases.map(\.key) == [a.key])
    }

    @Test func theLocalStoreKeepsIPv6OnlyLeases() async throws {
        try await withTemporaryDirectory { dir in
            let store = try LocalLeaseStore(directory: dir)
            let c = try await store.setNetworkConfig(json: ipv6OnlyJSON)
            try await exercise(store, c)
            let files = try FileManager.default.contentsOfDirectory(atPath: dir + "/subnets")
            #expect(files.count == 1 && files[0].hasPrefix("0.0.0.0-0&fd00:10:244:"), "\(files)")
        }
    }

    @Test(.enabled(if: EtcdServer.isInstalled), .timeLimit(.minutes(2)))
    func etcdKeepsIPv6OnlyLeasesUnderFlanneldsKeys() async throws {
        try await EtcdServer.with { server in
            let client = try EtcdClient(endpoints: [server.clientURL])
            do {
                let store = EtcdLeaseStore(client: client, prefix: "/coreos.com/network")
                let c = try await store.setNetworkConfig(json: ipv6OnlyJSON)
                try await exercise(store, c)
                let keys = try server.etcdctl(["get", "/coreos.com/network/subnets/", "--prefix", "--keys-only"])
                #expect(keys.hasPrefix("/coreos.com/network/subnets/0.0.0.0-0&fd00:10:244:"), "\(keys)")
                // A lease put as flanneld writes it is read back as one.
                _ = try server.etcdctl([
                    "put", "/coreos.com/network/subnets/0.0.0.0-0&fd00:10:244:c8::-64",
                    #"{"PublicIP":"0.0.0.0","PublicIPv6":"fd18::9","BackendType":"host-gw"}"#,
                ])
                let listed = try await store.leases().leases
                let flanneld = try #require(listed.first { $0.key == "0.0.0.0-0&fd00:10:244:c8::-64" })
                #expect(flanneld.primarySubnet == .ipv6(net6("fd00:10:244:c8::/64")))
                #expect(flanneld.attributes.publicIPv6 == ip6("fd18::9"))
                #expect(LeaseRule(c).sort(leases: listed).leases.count == 2)
                await client.close()
            } catch {
                await client.close()
                throw error
            }
        }
    }
}
