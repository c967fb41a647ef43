import Foundation
import NetBase
import Testing

@testable import LeaseStore

/// The one rule for what a lease is, and the subnet chooser applying it.
@Suite struct LeaseRuleTests {
    let later = Date(timeIntervalSince1970: 2_000_000_000)

    func lease(_ key: String, _ publicIP: String) -> Lease {
        guard let subnet = LeaseKey.subnet(fromKey: key) else { fatalError("bad key literal \(key)") }
        return Lease(
            subnet: subnet,
            attributes: LeaseAttributes(publicIP: ip(publicIP)),
            expiration: later,
            revision: 1,
            key: key
        )
    }

    func reasons(_ set: LeaseSet) -> [String: IgnoredLeaseKey.Reason] {
        Dictionary(set.ignored.map { ($0.key, $0.reason) }, uniquingKeysWith: { a, _ in a })
    }

    @Test func aLeaseIsAKeyOfSubnetLenInsideTheNetwork() throws {
        let rule = LeaseRule(try config(#"{"Network": "10.2.0.0/16"}"#))
        #expect(rule.problem(with: net("10.2.7.0/24")) == nil)
        #expect(rule.problem(with: net("10.2.0.0/24")) == nil)  // below SubnetMin, still a host to route to
        #expect(rule.problem(with: net("10.2.0.0/16")) == .wider(prefixLength: 16))
        #expect(rule.problem(with: net("10.0.0.0/8")) == .wider(prefixLength: 8))
        #expect(rule.problem(with: net("10.2.7.0/25")) == .narrower(prefixLength: 25))
        #expect(rule.problem(with: net("10.2.7.7/32")) == .narrower(prefixLength: 32))
        #expect(rule.problem(with: net("10.9.7.0/24")) == .outsideNetwork)
        #expect(rule.problem(with: net("192.168.0.0/16")) == .outsideNetwork)
    }

    @Test func everyKindOfStrayKeyIsIgnoredWithItsReasonAndWhatToDo() throws {
        let rule = LeaseRule(try config(#"{"Network": "10.2.0.0/16"}"#))
        let snapshot = LeaseSnapshot(
            leases: [
                lease("10.2.7.0-24", "198.18.0.7"), lease("10.2.0.0-16", "198.18.0.66"),
                lease("10.2.8.0-28", "198.18.0.67"), lease("10.3.1.0-24", "198.18.0.68"),
                lease("10.2.7.0-24&fd00:10:244:1::-64", "198.18.0.69"),
            ],
            revision: 9,
            unreadableKeys: ["10.2.9.0-24", "10.2.0.0-20"],
            malformedKeys: ["garbage", "10.2.10.0-24/x"]
        )
        let set = rule.sort(snapshot)
        #expect(set.leases.map(\.key) == ["10.2.7.0-24"])
        #expect(set.occupied == [net("10.2.9.0/24")])
        #expect(set.conflicting.map(\.key) == ["10.2.7.0-24&fd00:10:244:1::-64"])
        #expect(
            reasons(set) == [
                "10.2.0.0-16": .wider(prefixLength: 16), "10.2.8.0-28": .narrower(prefixLength: 28),
                "10.3.1.0-24": .outsideNetwork, "10.2.7.0-24&fd00:10:244:1::-64": .conflicts(with: "10.2.7.0-24"),
                "10.2.0.0-20": .wider(prefixLength: 20), "garbage": .malformed, "10.2.10.0-24/x": .malformed,
            ]
        )
        let wide = try #require(set.ignored.first { $0.key == "10.2.0.0-16" })
        #expect(wide.description.contains("10.2.0.0-16 (PublicIP 198.18.0.66) is a /16, wider than SubnetLen /24"))
        #expect(wide.description.contains("etcdctl del '<prefix>/subnets/10.2.0.0-16'"))
    }

    @Test func ofTwoKeysForOneSubnetThePlainKeyIsTheLeaseWhateverTheOrder() throws {
        let rule = LeaseRule(try config(#"{"Network": "10.2.0.0/16"}"#))
        let plain = lease("10.2.7.0-24", "198.18.0.7")
        let dualA = lease("10.2.7.0-24&fd00:1::-64", "198.18.0.8")
        let dualB = lease("10.2.7.0-24&fd00:2::-64", "198.18.0.9")
        for order in [[plain, dualA, dualB], [dualB, dualA, plain], [dualA, plain, dualB]] {
            let set = rule.sort(leases: order)
            #expect(set.leases == [plain])
            #expect(Set(set.conflicting.map(\.key)) == [dualA.key, dualB.key])
            #expect(set.ignored.allSatisfy { $0.reason == .conflicts(with: plain.key) })
        }
        // Without the plain key, the smaller dual-stack key is the lease.
        #expect(rule.sort(leases: [dualB, dualA]).leases == [dualA])
        #expect(LeaseRule.precedes(plain.key, dualA.key) && !LeaseRule.precedes(dualA.key, plain.key))
    }

    // MARK: - the chooser applies it

    func choose(
        _ config: NetworkConfig,
        _ leases: [Lease],
        occupied: [IPv4Network] = [],
        preferred: String? = nil
    ) throws(LeaseStoreError) -> SubnetChoice {
        var g = SeededGenerator(seed: 7)
        return try SubnetChooser.choose(
            config: config,
            leases: leases,
            host: LeaseAttributes(publicIP: ip("198.18.0.1")),
            preferred: preferred.map(net),
            occupied: occupied,
            using: &g
        )
    }

    @Test func aKeyWiderThanSubnetLenBlocksNoSubnet() throws {
        let c = try config(#"{"Network": "10.2.0.0/16"}"#)
        // The stray key that used to make every new host fail with "out of subnets".
        let choice = try choose(
            c,
            [lease("10.2.0.0-16", "198.18.0.66"), lease("10.2.1.0-24", "198.18.0.2")],
            preferred: "10.2.1.0/24"
        )
        #expect(choice.source == .free)
        #expect(choice.candidates.count == SubnetChooser.freeCandidateLimit)
        #expect(!choice.candidates.contains(net("10.2.1.0/24")))
        #expect(choice.candidates.contains(net("10.2.2.0/24")))
    }

    @Test func narrowOutsideAndWideKeysAreNeitherTakenNorReused() throws {
        let c = try config(#"{"Network": "10.2.0.0/16", "SubnetMin": "10.2.1.0", "SubnetMax": "10.2.2.0"}"#)
        // Ours, but of another length or outside: not a lease to reuse,
        // nothing in the way, and ours to delete (as flannel does).
        let choice = try choose(
            c,
            [
                lease("10.2.1.0-25", "198.18.0.1"), lease("10.2.2.0-28", "198.18.0.5"),
                lease("10.0.0.0-8", "198.18.0.6"), lease("10.7.1.0-24", "198.18.0.1"),
            ]
        )
        #expect(choice.source == .free)
        #expect(Set(choice.candidates) == [net("10.2.1.0/24"), net("10.2.2.0/24")])
        #expect(choice.obsolete.map(\.key) == ["10.2.1.0-25", "10.7.1.0-24"])
        // An unreadable key is in the way only when it names a lease of the network.
        let occupiedChoice = try choose(c, [], occupied: [net("10.2.1.0/24"), net("10.2.0.0/16")])
        #expect(occupiedChoice.candidates == [net("10.2.2.0/24")])
    }

    @Test func outOfSubnetsNamesTheKeysThatTakeTheRangeAndNotTheIgnoredOnes() throws {
        let c = try config(#"{"Network": "10.2.0.0/16", "SubnetMin": "10.2.1.0", "SubnetMax": "10.2.2.0"}"#)
        let error = #expect(throws: LeaseStoreError.self) {
            try choose(
                c,
                [
                    lease("10.2.2.0-24", "198.18.0.2"), lease("10.2.0.0-16", "198.18.0.66"),
                    lease("10.2.9.0-24", "198.18.0.9"), lease("10.2.1.0-24&fd00::-64", "198.18.0.3"),
                ],
                occupied: [net("10.2.1.0/24")]
            )
        }
        #expect(
            error
                == .outOfSubnets(
                    network: net("10.2.0.0/16"),
                    blockedBy: ["10.2.1.0-24&fd00::-64", "10.2.2.0-24", "10.2.1.0-24"]
                )
        )
        let text = error?.description ?? ""
        #expect(text.contains("by 3 keys: 10.2.1.0-24&fd00::-64, 10.2.2.0-24, 10.2.1.0-24"), "\(text)")
        #expect(!text.contains("10.2.0.0-16") && !text.contains("10.2.9.0-24"), "\(text)")
    }

    @Test func aFullLargeNetworkNamesTheFirstKeysAndCountsTheRest() throws {
        let c = try config(#"{"Network": "10.2.0.0/16", "SubnetMin": "10.2.1.0", "SubnetMax": "10.2.20.0"}"#)
        let leases = (1...20).map { lease("10.2.\($0).0-24", "198.18.1.\($0)") }
        let error = #expect(throws: LeaseStoreError.self) { try choose(c, leases) }
        let text = error?.description ?? ""
        #expect(text.contains("by 20 keys: 10.2.1.0-24, 10.2.2.0-24,"), "\(text)")
        #expect(text.contains("10.2.8.0-24 and 12 more"), "\(text)")
    }
}
