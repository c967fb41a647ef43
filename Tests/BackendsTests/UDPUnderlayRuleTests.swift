import Backends
import LeaseStore
import NetBase
import PacketRing
import Testing
import UDPEncap

/// Which underlay the udp backend takes towards a peer, from the two
/// hosts' leases (docs/BACKENDS.md, "udp over the IPv6 underlay").
@Suite struct UDPUnderlayRuleTests {
    static let v4 = [nil, IPv4Address("198.18.0.1")!]
    static let v6 = [nil, IPv6Address("fd18::1")!]
    static let peer4 = IPv4Address("198.18.0.2")!
    static let peer6 = IPv6Address("fd18::2")!

    /// The rule written out the slow way, case by case.
    static func expected(ipv6Inner: Bool, ours: UnderlayAddresses, theirs: UnderlayAddresses) -> NextHop? {
        let both4 = ours.ipv4 != nil && theirs.ipv4 != nil
        let both6 = ours.ipv6 != nil && theirs.ipv6 != nil
        let over4 = NextHop.peer(UDPEndpoint(address: peer4, port: 8285))
        let over6 = NextHop.peer6(UDPEndpoint6(address: peer6, port: 8285))
        if ipv6Inner {
            if both6 { return over6 }
            if both4 { return over4 }
        } else {
            if both4 { return over4 }
            if both6 { return over6 }
        }
        return nil
    }

    @Test func everyCombinationOfUnderlaysFollowsTheRule() {
        for ours4 in Self.v4 {
            for ours6 in Self.v6 {
                for theirs4 in [nil, Self.peer4] {
                    for theirs6 in [nil, Self.peer6] {
                        let ours = UnderlayAddresses(ipv4: ours4, ipv6: ours6)
                        let theirs = UnderlayAddresses(ipv4: theirs4, ipv6: theirs6)
                        for inner6 in [false, true] {
                            #expect(
                                ours.route(ipv6Inner: inner6, to: theirs, port: 8285)
                                    == Self.expected(ipv6Inner: inner6, ours: ours, theirs: theirs),
                                "ours \(ours), theirs \(theirs), IPv6 inner \(inner6)"
                            )
                        }
                    }
                }
            }
        }
    }

    /// Both ends decide alike: what A sends B over is what B expects from A.
    @Test func bothEndsChooseTheSameUnderlay() {
        let hosts = Self.v4.flatMap { a in Self.v6.map { UnderlayAddresses(ipv4: a, ipv6: $0) } }
        for a in hosts {
            for b in hosts {
                for inner6 in [false, true] {
                    let ab = a.route(ipv6Inner: inner6, to: b, port: 1)
                    let ba = b.route(ipv6Inner: inner6, to: a, port: 1)
                    #expect((ab == nil) == (ba == nil))
                    if case .peer6? = ab { #expect({ if case .peer6? = ba { true } else { false } }()) }
                    if case .peer? = ab { #expect({ if case .peer? = ba { true } else { false } }()) }
                }
            }
        }
    }

    /// flanneld's lease (PublicIP, PublicIPv6 null) and flanneld's
    /// IPv6-only lease (PublicIP 0.0.0.0) read as they are meant.
    @Test func aFlannelLeaseIsReachedOverIPv4AndPublicIPZeroMeansNone() {
        let flannel = UnderlayAddresses(LeaseAttributes(publicIP: Self.peer4))
        let ours = UnderlayAddresses(ipv4: IPv4Address("198.18.0.1")!, ipv6: IPv6Address("fd18::1")!)
        #expect(
            ours.route(ipv6Inner: true, to: flannel, port: 8285) == .peer(UDPEndpoint(address: Self.peer4, port: 8285))
        )
        let v6Only = UnderlayAddresses(LeaseAttributes(publicIP: IPv4Address(0), publicIPv6: Self.peer6))
        #expect(v6Only.ipv4 == nil && v6Only.ipv6 == Self.peer6)
        #expect(
            ours.route(ipv6Inner: false, to: v6Only, port: 8285)
                == .peer6(UDPEndpoint6(address: Self.peer6, port: 8285))
        )
        let ipv4Only = UnderlayAddresses(ipv4: IPv4Address("198.18.0.1")!, ipv6: nil)
        #expect(ipv4Only.route(ipv6Inner: true, to: v6Only, port: 8285) == nil)
        // The one line for it names both sides and what to give.
        let line = ipv4Only.unreachable("fd00:10:2:7::/64", of: v6Only)
        #expect(
            line.contains("peer subnet fd00:10:2:7::/64 is unreachable over udp")
                && line.contains("the peer has PublicIPv6 fd18::2 and this host PublicIP 198.18.0.1")
                && line.contains("(-public-ipv6)"),
            "\(line)"
        )
    }
}
