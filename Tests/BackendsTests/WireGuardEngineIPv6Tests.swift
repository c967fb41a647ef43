import Foundation
import NetBase
import NetTestSupport
import Testing
import WireGuard

@testable import Backends

/// IPv6 in the engine: dual-stack peers (flanneld's modes auto, ipv4 and
/// ipv6 put both subnets on one peer), IPv6-only peers (flannel-wg-v6),
/// endpoints on the IPv6 underlay.
extension WireGuardEngineTests {
    var subnetA6: IPv6Network { IPv6Network("fd00:10:2:1::/64")! }
    var subnetB6: IPv6Network { IPv6Network("fd00:10:2:2::/64")! }
    var endpointA6: Endpoint { Self.endpoint6("fd18::1", 51821) }
    var endpointB6: Endpoint { Self.endpoint6("fd18::2", 51821) }

    static func endpoint6(_ text: String, _ port: UInt16) -> Endpoint {
        Endpoint(ipv6: IPv6Address(text)!.bytes.withUnsafeBytes { Bytes16(copying: $0) }, port: port)
    }

    /// fd00:10:2:<subnet>::<host>
    static func address6(subnet: UInt128, host: UInt128) -> UInt128 {
        (0xfd00_0010_0002_0000 | subnet) << 64 | host
    }

    /// Two engines carrying both families, each the other's peer with both
    /// subnets, reached at `endpoints`.
    func dualStackEngines(endpoints: (a: Endpoint, b: Endpoint)) throws -> (WireGuardEngine, WireGuardEngine) {
        let a = engine(keyA, subnetLength6: 64)
        let b = engine(keyB, subnetLength6: 64)
        try a.setPeer(subnet: subnetB, subnet6: subnetB6, publicKey: keyB.publicKey, endpoint: endpoints.b)
        try b.setPeer(subnet: subnetA, subnet6: subnetA6, publicKey: keyA.publicKey, endpoint: endpoints.a)
        return (a, b)
    }

    var aToB6: [UInt8] {
        makePacket6(
            source: Self.address6(subnet: 1, host: 5),
            destination: Self.address6(subnet: 2, host: 7),
            payload: Array(0..<120)
        )
    }

    var bToA6: [UInt8] {
        makePacket6(source: Self.address6(subnet: 2, host: 7), destination: Self.address6(subnet: 1, host: 5))
    }

    @Test func anIPv6PacketIsSteeredByItsDestinationsIPv6SubnetOverTheIPv6Underlay() throws {
        let endpoints = (a: endpointA6, b: endpointB6)
        let (a, b) = try dualStackEngines(endpoints: endpoints)
        try handshake(a, b, first: aToB6, endpoints: endpoints)
        #expect(a.hasSession(subnet6: subnetB6) && b.hasSession(subnet6: subnetA6))
        // And back, IPv6 inside, IPv6 outside.
        let back = bToA6
        let sealed = send([back], through: b)
        #expect(sealed.map(\.to) == [endpointA6])
        #expect(deliver(sealed, to: a, from: endpointB6).written == [back])
        #expect(counter(b, .packetsOpened) == 1 && counter(a, .packetsOpened) == 1)
    }

    @Test func bothFamiliesInOneBatchGoToTheOnePeerInOrder() throws {
        let (a, b) = try dualStackEngines(endpoints: (endpointA, endpointB))
        try handshake(a, b, first: aToB)
        // v4, v6, v6, v4, v6: one peer for both subnets, so one run.
        let packets = (0..<5).map { i in
            [true, false, false, true, false][i]
                ? makePacket(
                    source: 0x0A02_0105,
                    destination: 0x0A02_0207,
                    payload: Array(repeating: UInt8(i), count: 30)
                )
                : makePacket6(
                    source: Self.address6(subnet: 1, host: 5),
                    destination: Self.address6(subnet: 2, host: UInt128(i)),
                    payload: Array(repeating: UInt8(i), count: 40 + i)
                )
        }
        let sealed = send(packets, through: a)
        #expect(sealed.map(\.to) == Array(repeating: endpointB, count: 5))
        let counters = sealed.map { d in d.bytes[8..<16].reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) } }
        #expect(counters == (0..<5).map { counters[0] + UInt64($0) })
        #expect(deliver(sealed, to: b, from: endpointA).written == packets)
    }

    @Test func aBatchToTwoPeersByIPv6SubnetIsSplitByDestination() throws {
        let keyC = PrivateKey.generate()
        let subnetC6 = IPv6Network("fd00:10:2:3::/64")!
        let endpointC6 = Self.endpoint6("fd18::3", 51821)
        // flannel-wg-v6: IPv6 only, as mode separate makes it.
        let a = engine(keyA, subnetLength: nil, subnetLength6: 64)
        let b = engine(keyB, subnetLength: nil, subnetLength6: 64)
        let c = engine(keyC, subnetLength: nil, subnetLength6: 64)
        try a.setPeer(subnet: nil, subnet6: subnetB6, publicKey: keyB.publicKey, endpoint: endpointB6)
        try a.setPeer(subnet: nil, subnet6: subnetC6, publicKey: keyC.publicKey, endpoint: endpointC6)
        try b.setPeer(subnet: nil, subnet6: subnetA6, publicKey: keyA.publicKey, endpoint: endpointA6)
        try c.setPeer(subnet: nil, subnet6: subnetA6, publicKey: keyA.publicKey, endpoint: endpointA6)
        #expect(a.peerCount == 2)
        try handshake(a, b, first: aToB6, endpoints: (endpointA6, endpointB6))
        let aToC6 = makePacket6(
            source: Self.address6(subnet: 1, host: 5),
            destination: Self.address6(subnet: 3, host: 9)
        )
        try handshake(a, c, first: aToC6, endpoints: (endpointA6, endpointC6))
        let toB = [true, false, true, false]
        let packets = toB.enumerated().map { i, b in
            makePacket6(
                source: Self.address6(subnet: 1, host: 5),
                destination: Self.address6(subnet: b ? 2 : 3, host: UInt128(100 + i)),
                payload: Array(repeating: UInt8(i), count: 64)
            )
        }
        let sealed = send(packets, through: a)
        #expect(sealed.map(\.to) == toB.map { $0 ? endpointB6 : endpointC6 })
        #expect(
            deliver(sealed.enumerated().filter { toB[$0.offset] }.map(\.element), to: b, from: endpointA6).written
                == packets.enumerated().filter { toB[$0.offset] }.map(\.element)
        )
        #expect(
            deliver(sealed.enumerated().filter { !toB[$0.offset] }.map(\.element), to: c, from: endpointA6).written
                == packets.enumerated().filter { !toB[$0.offset] }.map(\.element)
        )
        // IPv4 has no peers on this device.
        #expect(send([aToB], through: a).isEmpty)
        #expect(counter(a, .droppedNoPeer) == 1)
    }

    @Test func anIPv6InnerSourceOutsideThePeersIPv6SubnetIsDropped() throws {
        let endpoints = (a: endpointA6, b: endpointB6)
        let (a, b) = try dualStackEngines(endpoints: endpoints)
        try handshake(a, b, first: aToB6, endpoints: endpoints)
        // A source in another host's IPv6 subnet, and one in no subnet at all.
        let spoofed = [
            makePacket6(source: Self.address6(subnet: 9, host: 5), destination: Self.address6(subnet: 2, host: 7)),
            makePacket6(source: 0x2001_0db8 << 96 | 1, destination: Self.address6(subnet: 2, host: 7)),
        ]
        let sealed = send(spoofed, through: a)
        try #require(sealed.count == 2)
        #expect(deliver(sealed, to: b, from: endpointA6).written.isEmpty)
        #expect(counter(b, .droppedSourceNotAllowed) == 2)
    }

    @Test func anIPv6PacketFromAPeerWithOnlyAnIPv4SubnetIsDropped() throws {
        // A sends IPv6 to B (A has B's IPv6 subnet); B knows A by its IPv4 subnet only.
        let a = engine(keyA, subnetLength6: 64)
        let b = engine(keyB)
        try a.setPeer(subnet: subnetB, subnet6: subnetB6, publicKey: keyB.publicKey, endpoint: endpointB)
        try b.setPeer(subnet: subnetA, publicKey: keyA.publicKey, endpoint: endpointA)
        try handshake(a, b, first: aToB)
        let sealed = send([aToB6], through: a)
        try #require(sealed.count == 1)
        #expect(deliver(sealed, to: b, from: endpointA).written.isEmpty)
        #expect(counter(b, .droppedSourceNotAllowed) == 1)
        // And B, carrying no IPv6, has nowhere to send an IPv6 packet.
        #expect(send([aToB6], through: b).isEmpty)
        #expect(counter(b, .droppedNoPeer) == 1)
    }

    @Test func anAuthenticatedPacketFromANewIPv6AddressMovesThePeersEndpoint() throws {
        let endpoints = (a: endpointA6, b: endpointB6)
        let (a, b) = try dualStackEngines(endpoints: endpoints)
        try handshake(a, b, first: aToB6, endpoints: endpoints)
        let roamed = Self.endpoint6("fd18::99", 40000)
        #expect(deliver(send([aToB6], through: a), to: b, from: roamed).written == [aToB6])
        let back = bToA6
        #expect(send([back], through: b).map(\.to) == [roamed])
        // A datagram that does not authenticate moves nothing.
        var forged = send([aToB6], through: a)[0]
        forged.bytes[forged.bytes.count - 1] ^= 1
        _ = deliver([forged], to: b, from: Self.endpoint6("fd18::66", 1))
        #expect(send([back], through: b).map(\.to) == [roamed])
    }

    @Test func aPacketOfNeitherFamilyIsDroppedAndCounted() throws {
        let (a, _) = try dualStackEngines(endpoints: (endpointA, endpointB))
        var packet = aToB6
        packet[0] = 0x50
        #expect(send([packet, [0x60, 0, 0]], through: a).isEmpty)
        #expect(counter(a, .droppedNotIP) == 2)
    }

    @Test func multicastWithoutAPeerIsCountedApartFromAMissingPeer() throws {
        let (a, _) = try dualStackEngines(endpoints: (endpointA, endpointB))
        // An MLDv2 report as the kernel sends it from :: on a device with no link-local address.
        let mld = makePacket6(source: 0, destination: 0xff02 << 112 | 0x16, nextHeader: 0)
        let igmp = makePacket(source: 0x0A02_0100, destination: 0xE000_0016, proto: 2)
        let nowhere = makePacket6(
            source: Self.address6(subnet: 1, host: 5),
            destination: Self.address6(subnet: 9, host: 1)
        )
        #expect(send([mld, igmp, nowhere], through: a).isEmpty)
        #expect(counter(a, .droppedMulticast) == 2)
        #expect(counter(a, .droppedNoPeer) == 1)
    }

    @Test func ipv6EndpointsPrintAsRFC5952() {
        #expect(Self.endpoint6("fd18::2", 51821).description == "[fd18::2]:51821")
        #expect(Self.endpoint6("2001:db8:0:1:0:0:0:1", 1).description == "[2001:db8:0:1::1]:1")
        #expect(Self.endpoint6("2001:db8:1:1:1:1:1:1", 2).description == "[2001:db8:1:1:1:1:1:1]:2")
        #expect(Self.endpoint6("::", 3).description == "[::]:3")
        #expect(Self.endpoint6("2001:0:0:1:0:0:0:5", 4).description == "[2001:0:0:1::5]:4")
    }

    @Test func modeAutoPicksTheUnderlayAsFlanneldDoes() {
        let host = (v4: ip("198.18.0.1"), v6: IPv6Address("2001:db8::1"))
        let ula = (v4: ip("10.0.0.1"), v6: IPv6Address("fd18::1"))
        // No IPv6 on the peer: IPv4.
        #expect(!WireGuardBackend.autoPicksIPv6(peer: (ip("198.18.0.2"), nil), host: host))
        // A public IPv4 on the peer and IPv4 here: IPv4.
        #expect(!WireGuardBackend.autoPicksIPv6(peer: (ip("198.18.0.2"), IPv6Address("2001:db8::2")), host: host))
        // A private IPv4 on the peer, public IPv6 on both: IPv6.
        #expect(WireGuardBackend.autoPicksIPv6(peer: (ip("10.1.0.2"), IPv6Address("2001:db8::2")), host: host))
        #expect(WireGuardBackend.autoPicksIPv6(peer: (ip("172.20.0.2"), IPv6Address("2001:db8::2")), host: host))
        // Private both ways (ULA IPv6): IPv4, and cross fingers.
        #expect(!WireGuardBackend.autoPicksIPv6(peer: (ip("192.168.0.2"), IPv6Address("fd18::2")), host: host))
        #expect(!WireGuardBackend.autoPicksIPv6(peer: (ip("10.1.0.2"), IPv6Address("2001:db8::2")), host: ula))
        // A peer without IPv4 (IPv6-only host): IPv6.
        #expect(WireGuardBackend.autoPicksIPv6(peer: (ip("0.0.0.0"), IPv6Address("fd18::2")), host: ula))
    }
}
