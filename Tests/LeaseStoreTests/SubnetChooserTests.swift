import Foundation
import NetBase
import Testing

@testable import LeaseStore

@Suite struct SubnetChooserTests {
    let later = Date(timeIntervalSince1970: 2_000_000_000)

    func lease(_ subnet: String, _ publicIP: String, reserved: Bool = false, expiresAt: Date? = nil) -> Lease {
        Lease(
            subnet: net(subnet),
            attributes: LeaseAttributes(publicIP: ip(publicIP)),
            expiration: reserved ? nil : (expiresAt ?? later),
            revision: 1
        )
    }

    func choose(
        _ config: NetworkConfig,
        _ leases: [Lease],
        me: String = "198.18.0.1",
        preferred: String? = nil,
        seed: UInt64 = 1
    ) throws(LeaseStoreError) -> SubnetChoice {
        var g = SeededGenerator(seed: seed)
        return try SubnetChooser.choose(
            config: config,
            leases: leases,
            host: LeaseAttributes(publicIP: ip(me)),
            preferred: preferred.map(net),
            using: &g
        )
    }

    @Test func ownLeaseIsReusedBeforeThePreferredSubnet() throws {
        let c = try config(#"{"Network": "10.2.0.0/16"}"#)
        let mine = lease("10.2.7.0/24", "198.18.0.1")
        let choice = try choose(c, [lease("10.2.1.0/24", "198.18.0.9"), mine], preferred: "10.2.9.0/24")
        #expect(choice.source == .existingLease(mine))
        #expect(choice.subnet == net("10.2.7.0/24"))
        #expect(choice.candidates.isEmpty)
        #expect(choice.obsolete.isEmpty)
    }

    @Test func reservationIsHonouredBeforeAnExpiringLease() throws {
        let c = try config(#"{"Network": "10.2.0.0/16"}"#)
        let reservation = lease("10.2.200.0/24", "198.18.0.1", reserved: true)
        let choice = try choose(c, [lease("10.2.3.0/24", "198.18.0.1"), reservation])
        #expect(choice.source == .existingLease(reservation))
    }

    @Test func ownLeaseThatNoLongerFitsIsObsoleteAndItsSpaceFree() throws {
        // The network shrank to /28: SubnetLen 30, subnets .4 .8 .12.
        let c = try config(#"{"Network": "10.2.0.0/28"}"#)
        let old = lease("10.2.0.0/24", "198.18.0.1")  // wrong length, overlaps everything
        let oldReservation = lease("10.2.0.8/29", "198.18.0.1", reserved: true)
        let choice = try choose(c, [old, oldReservation], seed: 3)
        #expect(choice.obsolete == [old])
        #expect(choice.source == .free)
        // The reservation is the operator's: it is not deleted; but a /29
        // under SubnetLen 30 is no lease by the one rule (`LeaseRule`), so
        // it takes no subnet either.
        #expect(
            choice.candidates.sorted { $0.address < $1.address }
                == [net("10.2.0.4/30"), net("10.2.0.8/30"), net("10.2.0.12/30")]
        )
    }

    @Test func preferredSubnetIsUsedWhenFreeAndFitting() throws {
        let c = try config(#"{"Network": "10.2.0.0/16"}"#)
        let choice = try choose(c, [lease("10.2.1.0/24", "198.18.0.9")], preferred: "10.2.72.0/24")
        #expect(choice.source == .preferred)
        #expect(choice.candidates.first == net("10.2.72.0/24"))
        // The rest are the first hundred free ones, to retry after a lost race.
        #expect(choice.candidates.count == 100)
        #expect(Set(choice.candidates) == Set((1...100).map { c.subnets[$0] }))

        let beyond = try choose(c, [lease("10.2.1.0/24", "198.18.0.9")], preferred: "10.2.200.0/24")
        #expect(beyond.source == .preferred)
        #expect(beyond.candidates.first == net("10.2.200.0/24"))
        #expect(beyond.candidates.count == 101)
    }

    @Test(arguments: [
        "10.2.1.0/24",  // held by someone else
        "10.2.0.0/24",  // below SubnetMin: the network's first subnet
        "10.2.72.0/25",  // wrong length
        "10.3.72.0/24",  // outside the network
    ])
    func preferredSubnetIsSkippedWhenTakenOrNotFitting(_ preferred: String) throws {
        let c = try config(#"{"Network": "10.2.0.0/16"}"#)
        let choice = try choose(c, [lease("10.2.1.0/24", "198.18.0.9")], preferred: preferred)
        #expect(choice.source == .free)
        #expect(choice.subnet != net(preferred))
    }

    @Test func randomPickIsAmongTheFirstHundredFreeSubnetsOnly() throws {
        let c = try config(#"{"Network": "10.0.0.0/8"}"#)
        // Every other subnet of the first 300 is taken.
        let leases = stride(from: 1, to: 300, by: 2).map { i in
            Lease(
                subnet: c.subnets[i],
                attributes: LeaseAttributes(publicIP: ip("198.18.1.1")),
                expiration: later,
                revision: 1
            )
        }
        let firstHundredFree = Set(stride(from: 0, to: 200, by: 2).map { c.subnets[$0] })
        var picks = Set<IPv4Network>()
        for seed in 0..<200 as Range<UInt64> {
            let choice = try choose(c, leases, seed: seed)
            #expect(choice.source == .free)
            #expect(Set(choice.candidates) == firstHundredFree)
            picks.insert(choice.subnet)
        }
        #expect(picks.isSubset(of: firstHundredFree))
        #expect(picks.count > 50, "the pick should be random, got only \(picks.count) distinct")
    }

    @Test func outOfSubnetsWhenEverythingIsTaken() throws {
        let c = try config(#"{"Network": "10.2.0.0/28"}"#)
        let leases = [
            lease("10.2.0.4/30", "198.18.0.2"), lease("10.2.0.8/30", "198.18.0.3"),
            lease("10.2.0.12/30", "198.18.0.4"),
        ]
        #expect(
            throws: LeaseStoreError.outOfSubnets(
                network: net("10.2.0.0/28"),
                blockedBy: ["10.2.0.4-30", "10.2.0.8-30", "10.2.0.12-30"]
            )
        ) {
            try choose(c, leases, preferred: "10.2.0.8/30")
        }
    }

    @Test func leasesOutsideTheNetworkAreIgnored() throws {
        let c = try config(#"{"Network": "10.2.0.0/28"}"#)
        let leases = [
            lease("10.9.0.4/30", "198.18.0.2"), lease("192.168.0.0/16", "198.18.0.3"),
            lease("10.2.0.4/30", "198.18.0.4"),
        ]
        let choice = try choose(c, leases)
        #expect(Set(choice.candidates) == [net("10.2.0.8/30"), net("10.2.0.12/30")])
    }

    @Test func occupiedSubnetsAreNeverOffered() throws {
        let c = try config(#"{"Network": "10.2.0.0/28"}"#)
        var g = SeededGenerator(seed: 1)
        let choice = try SubnetChooser.choose(
            config: c,
            leases: [],
            host: LeaseAttributes(publicIP: ip("198.18.0.1")),
            preferred: net("10.2.0.4/30"),
            occupied: [net("10.2.0.4/30")],
            using: &g
        )
        #expect(Set(choice.candidates) == [net("10.2.0.8/30"), net("10.2.0.12/30")])
    }

    /// The fast free-subnet scan against the obvious model, on random
    /// networks and leases of every size.
    @Test func freeSubnetScanMatchesASlowModel() throws {
        var g = SeededGenerator(seed: 42)
        for _ in 0..<300 {
            let prefix = Int.random(in: 8...28, using: &g)
            let base = IPv4Network(
                address: IPv4Address(UInt32.random(in: 0...UInt32.max, using: &g)),
                prefixLength: prefix
            )
            let subnetLen = Int.random(in: (prefix + 2)...min(30, prefix + 10), using: &g)
            let c = try config(#"{"Network": "\#(base)", "SubnetLen": \#(subnetLen)}"#)
            var leases: [IPv4Network] = []
            for _ in 0..<Int.random(in: 0...40, using: &g) {
                let length = Int.random(in: max(0, prefix - 2)...32, using: &g)
                let offset = UInt32.random(in: 0...UInt32(truncatingIfNeeded: base.size &- 1), using: &g)
                leases.append(IPv4Network(address: IPv4Address(base.address.value &+ offset), prefixLength: length))
            }
            let limit = Int.random(in: 1...120, using: &g)
            let fast = SubnetChooser.firstFree(in: c.subnets, taken: OccupiedRanges(leases), limit: limit)
            let slow = Array(c.subnets.lazy.filter { s in !leases.contains { $0.overlaps(s) } }.prefix(limit))
            #expect(fast == slow, "network \(base) subnetLen \(subnetLen) leases \(leases)")
            for s in c.subnets.prefix(64) {
                #expect(OccupiedRanges(leases).overlaps(s) == leases.contains { $0.overlaps(s) })
            }
        }
    }
}
