import FlannelFiles
import Foundation
import NetBase
import Testing

@testable import LeaseStore

func net6(_ text: String) -> IPv6Network {
    guard let n = IPv6Network(text, strict: true) else { fatalError("bad IPv6 network literal \(text)") }
    return n
}

func ip6(_ text: String) -> IPv6Address {
    guard let a = IPv6Address(text) else { fatalError("bad IPv6 address literal \(text)") }
    return a
}

let dualStackJSON =
    #"{"Network": "10.2.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:10:244::/48", "Backend": {"Type": "vxlan"}}"#

/// Dual-stack leases as flanneld writes and reads them: the IPv6 subnet in
/// the key (`10.2.5.0-24&fd00:10:244:5::-64`, pkg/subnet MakeSubnetKey),
/// the value with `PublicIPv6` and `BackendV6Data` (pkg/lease LeaseAttrs).
@Suite struct DualStackLeaseTests {
    /// A dual-stack vxlan lease value, byte for byte as flanneld's
    /// json.Marshal of LeaseAttrs writes it.
    static let flanneldValue =
        #"{"PublicIP":"198.18.0.2","PublicIPv6":"2001:db8::2","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:01"},"BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:02"}}"#

    @Test func flanneldsDualStackValueRoundTripsByteForByte() throws {
        let attrs = try LeaseAttributes(flannelJSON: Self.flanneldValue, key: "10.2.5.0-24&fd00:10:244:5::-64")
        #expect(attrs.publicIP == ip("198.18.0.2"))
        #expect(attrs.publicIPv6 == ip6("2001:db8::2"))
        #expect(attrs.backendType == "vxlan")
        #expect(attrs.backendData?.field("VtepMAC") == .string("aa:bb:cc:dd:ee:01"))
        #expect(attrs.backendV6Data?.field("VtepMAC") == .string("aa:bb:cc:dd:ee:02"))
        #expect(attrs.flannelJSON == Self.flanneldValue)
    }

    @Test func publicIPv6IsWrittenInGosSpelling() {
        let attrs = LeaseAttributes(publicIP: ip("198.18.0.3"), publicIPv6: ip6("2001:0DB8:0:0:0:0:0:0003"))
        #expect(attrs.flannelJSON == #"{"PublicIP":"198.18.0.3","PublicIPv6":"2001:db8::3"}"#)
    }

    @Test(arguments: [
        (#"{"PublicIP":"198.18.0.1","PublicIPv6":"fd00::1::2"}"#, "is not an IPv6 address"),
        (#"{"PublicIP":"198.18.0.1","PublicIPv6":7}"#, "is not an IPv6 address"),
    ])
    func unreadablePublicIPv6IsCorrupt(_ text: String, _ reason: String) {
        let e = #expect(throws: LeaseStoreError.self) { try LeaseAttributes(flannelJSON: text, key: "k") }
        guard case .corrupt(_, let why)? = e else {
            Issue.record("expected .corrupt, got \(String(describing: e))")
            return
        }
        #expect(why.contains(reason), "\(why)")
    }

    @Test func dualStackKeysCarryTheIPv6Subnet() {
        let key = "/coreos.com/network/subnets/10.2.5.0-24&fd00:10:244:5::-64"
        #expect(LeaseKey.subnet(fromKey: key) == net("10.2.5.0/24"))
        #expect(LeaseKey.ipv6Subnet(fromKey: key) == net6("fd00:10:244:5::/64"))
        #expect(LeaseKey.ipv6Subnet(fromKey: "10.2.5.0-24") == nil)
        #expect(
            LeaseKey.key(for: net("10.2.5.0/24"), ipv6: net6("fd00:10:244:5::/64")) == "10.2.5.0-24&fd00:10:244:5::-64"
        )
        #expect(LeaseKey.key(for: net("10.2.5.0/24"), ipv6: nil) == "10.2.5.0-24")
        // flannel's pattern: lower-case hex and colons; host bits zero here.
        #expect(LeaseKey.subnet(fromKey: "10.2.5.0-24&FD00:10:244:5::-64") == nil)
        #expect(LeaseKey.subnet(fromKey: "10.2.5.0-24&fd00:10:244:5::1-64") == nil)
        #expect(LeaseKey.subnet(fromKey: "10.2.5.0-24&fd00:10:244:5::-129") == nil)
        #expect(LeaseKey.subnet(fromKey: "10.2.5.0-24&::ffff:1.2.3.4-128") == nil)
        #expect(LeaseKey.subnet(fromKey: "10.2.5.0-24&fd00::-64&fd01::-64") == nil)
        // Another spelling of the IPv6 subnet still names it, as for flanneld.
        #expect(LeaseKey.ipv6Subnet(fromKey: "10.2.5.0-24&fd00:10:244:5:0:0:0:0-64") == net6("fd00:10:244:5::/64"))
    }

    /// Random subnets of both families: the key names them back, and a key
    /// names an IPv6 subnet only if flannel's pattern allows it.
    @Test func dualStackKeysRoundTripForRandomSubnets() {
        var g = SeededGenerator(seed: 0x6_0002)
        for _ in 0..<5000 {
            let v4 = IPv4Network(
                address: IPv4Address(UInt32.random(in: 0...UInt32.max, using: &g)),
                prefixLength: Int.random(in: 0...32, using: &g)
            )
            var raw: UInt128 = 0
            for _ in 0..<8 {
                raw = raw << 16 | UInt128(Bool.random(using: &g) ? 0 : UInt16.random(in: 0...0xffff, using: &g))
            }
            let v6 = IPv6Network(address: IPv6Address(raw), prefixLength: Int.random(in: 0...128, using: &g))
            let key = "/coreos.com/network/subnets/" + LeaseKey.key(for: v4, ipv6: v6)
            let mapped = v6.address.value >> 32 == 0xffff  // printed with dots, outside flannel's pattern
            #expect(LeaseKey.subnet(fromKey: key) == (mapped ? nil : v4), "\(key)")
            #expect(LeaseKey.ipv6Subnet(fromKey: key) == (mapped ? nil : v6), "\(key)")
        }
    }

    @Test func aLeaseMadeWithAnIPv6SubnetHasFlanneldsKey() {
        let lease = Lease(
            subnet: net("10.2.5.0/24"),
            ipv6Subnet: net6("fd00:10:244:5::/64"),
            attributes: LeaseAttributes(publicIP: ip("198.18.0.5")),
            expiration: nil,
            revision: 1
        )
        #expect(lease.key == "10.2.5.0-24&fd00:10:244:5::-64")
        #expect(lease.ipv6Subnet == net6("fd00:10:244:5::/64"))
        #expect(lease.description.contains("fd00:10:244:5::/64"))
    }
}

@Suite struct DualStackRuleTests {
    func lease(_ key: String, _ publicIP: String) -> Lease {
        Lease(
            subnet: LeaseKey.subnet(fromKey: key)!,
            attributes: LeaseAttributes(publicIP: ip(publicIP)),
            expiration: Date.distantFuture,
            revision: 1,
            key: key
        )
    }

    @Test func ipv6PartsOutsideTheIPv6NetworkAreIgnoredInADualStackNetwork() throws {
        let rule = LeaseRule(try config(dualStackJSON))
        let set = rule.sort(leases: [
            lease("10.2.1.0-24&fd00:10:244:1::-64", "198.18.0.1"),
            lease("10.2.2.0-24&fd00:99::-64", "198.18.0.2"),  // outside
            lease("10.2.3.0-24&fd00:10:244:3::-80", "198.18.0.3"),  // wrong length
            lease("10.2.4.0-24", "198.18.0.4"),  // no IPv6 yet: an IPv4 peer
        ])
        #expect(set.leases.map(\.key) == ["10.2.1.0-24&fd00:10:244:1::-64", "10.2.4.0-24"])
        #expect(set.ignored.map(\.key).sorted() == ["10.2.2.0-24&fd00:99::-64", "10.2.3.0-24&fd00:10:244:3::-80"])
        let text = set.ignored.first { $0.key.hasPrefix("10.2.2.0") }!.description
        #expect(
            text.contains("has the IPv6 subnet fd00:99::/64, which is no /64 of the IPv6Network fd00:10:244::/48"),
            "\(text)"
        )
    }

    @Test func twoLeasesOfOneIPv6SubnetConflict() throws {
        let rule = LeaseRule(try config(dualStackJSON))
        let set = rule.sort(leases: [
            lease("10.2.2.0-24&fd00:10:244:7::-64", "198.18.0.2"),
            lease("10.2.1.0-24&fd00:10:244:7::-64", "198.18.0.1"),
        ])
        #expect(set.leases.map(\.key) == ["10.2.1.0-24&fd00:10:244:7::-64"])
        #expect(set.conflicting.map(\.key) == ["10.2.2.0-24&fd00:10:244:7::-64"])
        #expect(set.ignored.map(\.reason) == [.conflicts(with: "10.2.1.0-24&fd00:10:244:7::-64")])
    }

    @Test func anIPv4OnlyNetworkLooksOnlyAtTheIPv4Part() throws {
        let rule = LeaseRule(try config(#"{"Network": "10.2.0.0/16"}"#))
        let set = rule.sort(leases: [lease("10.2.2.0-24&fd00:99::-64", "198.18.0.2")])
        #expect(set.leases.count == 1 && set.ignored.isEmpty)
    }
}

@Suite struct DualStackChooserTests {
    let later = Date(timeIntervalSince1970: 2_000_000_000)

    func lease(_ subnet: String, _ v6: String?, _ publicIP: String) -> Lease {
        Lease(
            subnet: net(subnet),
            ipv6Subnet: v6.map(net6),
            attributes: LeaseAttributes(publicIP: ip(publicIP)),
            expiration: later,
            revision: 1
        )
    }

    func choose(
        _ config: NetworkConfig,
        _ leases: [Lease],
        me: String = "198.18.0.1",
        preferred: String? = nil,
        preferredIPv6: String? = nil
    ) throws(LeaseStoreError) -> SubnetChoice {
        var g = SeededGenerator(seed: 7)
        return try SubnetChooser.choose(
            config: config,
            leases: leases,
            host: LeaseAttributes(publicIP: ip(me)),
            preferred: preferred.map(net),
            preferredIPv6: preferredIPv6.map(net6),
            using: &g
        )
    }

    @Test func bothFamiliesAreChosenFromOneListing() throws {
        let c = try config(dualStackJSON)
        let choice = try choose(
            c,
            [
                lease("10.2.1.0/24", "fd00:10:244:1::/64", "198.18.0.9"),
                lease("10.2.2.0/24", "fd00:10:244:2::/64", "198.18.0.8"),
            ]
        )
        #expect(choice.source == .free)
        #expect(choice.candidates.count == 100 && choice.ipv6Candidates.count == 100)
        #expect(!choice.ipv6Candidates.contains(net6("fd00:10:244:1::/64")))
        #expect(!choice.ipv6Candidates.contains(net6("fd00:10:244:2::/64")))
        #expect(Set(choice.ipv6Candidates) == Set((3...102).map { net6("fd00:10:244:\(String($0, radix: 16))::/64") }))
        // Each IPv4 candidate gets its own IPv6 one.
        #expect(choice.ipv6Candidate(0) != choice.ipv6Candidate(1))
        #expect(choice.ipv6Subnet == choice.ipv6Candidates.first)
    }

    @Test func anIPv4OnlyNetworkChoosesNoIPv6() throws {
        let choice = try choose(try config(#"{"Network": "10.2.0.0/16"}"#), [])
        #expect(choice.ipv6Candidates.isEmpty && choice.ipv6Candidate(0) == nil && choice.ipv6Subnet == nil)
    }

    @Test func ownDualStackLeaseIsReused() throws {
        let c = try config(dualStackJSON)
        let mine = lease("10.2.7.0/24", "fd00:10:244:9::/64", "198.18.0.1")
        let choice = try choose(c, [mine])
        #expect(choice.source == .existingLease(mine))
        #expect(choice.ipv6Subnet == net6("fd00:10:244:9::/64"))
    }

    /// flannel's isIPv6SubnetConfigCompat: in a dual-stack network our lease
    /// needs an IPv6 subnet that fits; in an IPv4-only one it must have none.
    @Test func ownLeaseOfTheOtherStackIsReplacedKeepingTheIPv4SubnetThroughTheSubnetFile() throws {
        let dual = try config(dualStackJSON)
        let v4Only = lease("10.2.7.0/24", nil, "198.18.0.1")
        let choice = try choose(dual, [v4Only], preferred: "10.2.7.0/24")
        #expect(choice.obsolete == [v4Only])
        #expect(choice.source == .preferred && choice.subnet == net("10.2.7.0/24"))
        #expect(choice.ipv6Subnet != nil)

        let plain = try config(#"{"Network": "10.2.0.0/16"}"#)
        let dualLease = lease("10.2.7.0/24", "fd00:10:244:9::/64", "198.18.0.1")
        let back = try choose(plain, [dualLease], preferred: "10.2.7.0/24")
        #expect(back.obsolete == [dualLease])
        #expect(back.source == .preferred && back.subnet == net("10.2.7.0/24") && back.ipv6Subnet == nil)
    }

    @Test func thePreferredIPv6SubnetComesFirstWhenFree() throws {
        let c = try config(dualStackJSON)
        let choice = try choose(
            c,
            [lease("10.2.1.0/24", "fd00:10:244:1::/64", "198.18.0.9")],
            preferredIPv6: "fd00:10:244:abc::/64"
        )
        #expect(choice.ipv6Candidates.first == net6("fd00:10:244:abc::/64"))
        let taken = try choose(
            c,
            [lease("10.2.1.0/24", "fd00:10:244:1::/64", "198.18.0.9")],
            preferredIPv6: "fd00:10:244:1::/64"
        )
        #expect(!taken.ipv6Candidates.contains(net6("fd00:10:244:1::/64")))
    }

    @Test func ipv6SpaceRunsOutWithAClearError() throws {
        // /124 with /126 subnets: three usable (the first is skipped).
        let c = try config(#"{"Network": "10.2.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00::/124"}"#)
        let full = [
            lease("10.2.1.0/24", "fd00::4/126", "198.18.0.2"), lease("10.2.2.0/24", "fd00::8/126", "198.18.0.3"),
            lease("10.2.3.0/24", "fd00::c/126", "198.18.0.4"),
        ]
        #expect(throws: LeaseStoreError.self) { try choose(c, full) }
        let one = try choose(c, Array(full.dropLast()))
        #expect(one.ipv6Candidates == [net6("fd00::c/126")])
    }

    /// The skipping search against a plain walk over every subnet.
    @Test func freeIPv6SearchAgreesWithAPlainWalk() throws {
        var g = SeededGenerator(seed: 0x6_0001)
        for _ in 0..<200 {
            let length = Int.random(in: 118...126, using: &g)
            let v6 = try #require(
                try config(
                    #"{"Network": "10.2.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00::/116", "IPv6SubnetLen": \#(length)}"#
                ).ipv6
            )
            let count = Int(v6.network.subnetCount(prefixLength: length))
            // Taken: random subnets of random lengths inside the network.
            var taken: [IPv6Network] = []
            for _ in 0..<Int.random(in: 0...12, using: &g) {
                let l = Int.random(in: 116...128, using: &g)
                let offset = UInt128(UInt64.random(in: 0..<4096, using: &g))
                taken.append(IPv6Network(address: v6.network.address(at: offset), prefixLength: l))
            }
            let limit = Int.random(in: 1...40, using: &g)
            let fast = SubnetChooser.firstFreeIPv6(v6, taken: taken, limit: limit)
            var slow: [IPv6Network] = []
            for i in 1..<count where slow.count < limit {
                let s = v6.network.subnet(prefixLength: length, index: UInt64(i))
                if !taken.contains(where: { $0.overlaps(s) }) { slow.append(s) }
            }
            #expect(fast == slow, "length \(length) taken \(taken)")
        }
    }
}

@Suite struct DualStackSubnetEnvTests {
    let env = SubnetEnv(
        network: net("10.2.0.0/16"),
        subnet: net("10.2.72.0/24"),
        mtu: 1450,
        ipMasq: true,
        ipv6Network: net6("fd00:10:244::/48"),
        ipv6Subnet: net6("fd00:10:244:48::/64")
    )

    /// flanneld's WriteSubnetFile: the IPv6 pair after FLANNEL_SUBNET, each
    /// subnet as its first host address with the prefix.
    @Test func textIsFlanneldsInFlanneldsOrder() {
        #expect(
            env.text == """
                FLANNEL_NETWORK=10.2.0.0/16
                FLANNEL_SUBNET=10.2.72.1/24
                FLANNEL_IPV6_NETWORK=fd00:10:244::/48
                FLANNEL_IPV6_SUBNET=fd00:10:244:48::1/64
                FLANNEL_MTU=1450
                FLANNEL_IPMASQ=true

                """
        )
    }

    @Test func writtenFileReadsBack() async throws {
        try await withTemporaryDirectory { dir in
            let path = dir + "/subnet.env"
            try env.write(to: path)
            #expect(try SubnetEnv.read(from: path).get() == env)
            #expect(try SubnetEnv.previousIPv6Subnet(at: path).get() == net6("fd00:10:244:48::/64"))
            #expect(try SubnetEnv.previousSubnet(at: path).get() == net("10.2.72.0/24"))
            try SubnetEnv(network: env.network, subnet: env.subnet, mtu: 1450, ipMasq: true).write(to: path)
            #expect(try SubnetEnv.previousIPv6Subnet(at: path).get() == nil)
        }
    }

    @Test(arguments: [
        ("FLANNEL_IPV6_NETWORK=fd00::/48\n", "FLANNEL_IPV6_SUBNET is missing"),
        ("FLANNEL_IPV6_SUBNET=fd00::1/64\n", "FLANNEL_IPV6_NETWORK is missing"),
        ("FLANNEL_IPV6_NETWORK=fd00::/48\nFLANNEL_IPV6_SUBNET=fd00::1/127\n", "FLANNEL_IPV6_SUBNET \"fd00::1/127\""),
        ("FLANNEL_IPV6_NETWORK=10.0.0.0/8\nFLANNEL_IPV6_SUBNET=fd00::1/64\n", "FLANNEL_IPV6_NETWORK \"10.0.0.0/8\""),
    ])
    func halfOrMalformedIPv6PairsAreRefused(_ extra: String, _ reason: String) {
        let text =
            "FLANNEL_NETWORK=10.2.0.0/16\nFLANNEL_SUBNET=10.2.72.1/24\n" + extra
            + "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
        let e = #expect(throws: SubnetEnvError.self) { try SubnetEnv(parsing: text) }
        #expect(e?.reason.contains(reason) == true, "\(String(describing: e))")
    }
}

/// The embedded local store: both families in one locked step, the key in
/// flanneld's form, renewal and release by that key.
@Suite struct DualStackLocalStoreTests {
    static let json =
        #"{"Network": "10.2.0.0/24", "SubnetLen": 28, "EnableIPv6": true, "IPv6Network": "fd00:10:2::/60"}"#

    func node(_ n: Int) -> LeaseAttributes {
        LeaseAttributes(publicIP: IPv4Address(198, 18, 0, UInt8(n)), publicIPv6: IPv6Address("2001:db8::\(n)"))
    }

    @Test func concurrentDualStackAcquisitionsGetDistinctSubnetsOfBothFamilies() async throws {
        try await withTemporaryDirectory { dir in
            let setup = try LocalLeaseStore(directory: dir)
            let c = try await setup.setNetworkConfig(json: Self.json)
            let leases = try await withThrowingTaskGroup(of: Lease.self) { group in
                for i in 1...8 {
                    group.addTask {
                        let store = try LocalLeaseStore(directory: dir)
                        return try await store.acquireLease(config: c, attributes: self.node(i), preferred: nil)
                    }
                }
                return try await group.reduce(into: []) { $0.append($1) }
            }
            #expect(Set(leases.map(\.subnet)).count == 8)
            let v6 = leases.compactMap(\.ipv6Subnet)
            #expect(v6.count == 8 && Set(v6).count == 8 && v6.allSatisfy { c.ipv6!.fits($0) })
            #expect(leases.allSatisfy { $0.key == LeaseKey.key(for: $0.subnet, ipv6: $0.ipv6Subnet) })
            let files = try FileManager.default.contentsOfDirectory(atPath: dir + "/subnets")
            #expect(Set(files) == Set(leases.map(\.key)))
            let listed = try await setup.leases().leases
            #expect(listed.allSatisfy { $0.attributes.publicIPv6 != nil })
            #expect(LeaseRule(c).sort(leases: listed).leases.count == 8)
        }
    }

    @Test func preferredIPv6SubnetIsTakenAndTheLeaseRenewsAndReleasesByItsKey() async throws {
        try await withTemporaryDirectory { dir in
            let store = try LocalLeaseStore(directory: dir)
            let c = try await store.setNetworkConfig(json: Self.json)
            let lease = try await store.acquireLease(
                config: c,
                attributes: node(1),
                preferred: net("10.2.0.48/28"),
                preferredIPv6: net6("fd00:10:2:9::/64")
            )
            #expect(lease.key == "10.2.0.48-28&fd00:10:2:9::-64")
            let renewed = try await store.renewLease(lease)
            #expect(renewed.key == lease.key)
            // A restart with the same PublicIP reuses it.
            let again = try await LocalLeaseStore(directory: dir).acquireLease(
                config: c,
                attributes: node(1),
                preferred: nil
            )
            #expect(again.key == lease.key)
            try await store.releaseLease(again)
            #expect(try await store.leases().leases.isEmpty)
        }
    }
}
