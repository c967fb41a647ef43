import NetBase
import NetTestSupport
import Testing
import UDPEncap

@testable import PacketRing

/// The IPv6 side of the forwarder in a dual-stack network: the same
/// decisions as for IPv4, with ICMPv6 errors (RFC 4443) built in place.
struct ForwarderIPv6Tests {
    static let network6 = IPv6Network("fd00:10:244::/48")!
    static let local6 = IPv6Network("fd00:10:244:1::/64")!
    static let remote6 = IPv6Network("fd00:10:244:2::/64")!
    static let peer = UDPEndpoint(address: IPv4Address("198.18.0.2")!, port: 8285)
    static let mtu = 1472

    let table: SubnetTable
    let table6: SubnetTable6
    let forwarder: Forwarder
    let stats = Statistics()

    init() throws {
        table = try SubnetTable(network: IPv4Network("10.2.0.0/16")!, subnetLength: 24)
        try table.set(IPv4Network("10.2.1.0/24")!, to: .local)
        try table.set(IPv4Network("10.2.2.0/24")!, to: .peer(Self.peer))
        table6 = try SubnetTable6(network: Self.network6, subnetLength: 64, addresses6: table.addresses6)
        try table6.set(Self.local6, to: .local)
        try table6.set(Self.remote6, to: .peer(Self.peer))
        forwarder = Forwarder(table: table, table6: table6, tunAddress: IPv4Address("10.2.1.0")!, mtu: Self.mtu)
    }

    static func address(_ subnet: IPv6Network, _ host: UInt128) -> UInt128 { subnet.address.value | host }

    func fromTun(_ packet: inout [UInt8], capacity: Int = 2048) -> Forwarder.TunAction {
        let length = packet.count
        packet += [UInt8](repeating: 0, count: max(0, capacity - packet.count))
        return packet.withUnsafeMutableBytes {
            forwarder.fromTun($0.baseAddress!, length: length, capacity: capacity, stats: stats)
        }
    }

    func fromNetwork(_ packet: [UInt8], sender: UDPEndpoint = Self.peer) -> Int? {
        packet.withUnsafeBytes {
            forwarder.fromNetwork(
                $0.baseAddress!,
                length: packet.count,
                sender: sender.address.value,
                senderPort: sender.port,
                stats: stats
            )
        }
    }

    func count(_ counter: DataPathCounter) -> UInt64 { stats.local[counter.rawValue] }

    /// Checks `packet` is an ICMPv6 error of `type`/`code` from `source` to
    /// `destination` with a correct checksum, quoting `original`'s start.
    func expectError(
        _ packet: [UInt8],
        length: Int,
        type: UInt8,
        code: UInt8,
        from source: UInt128,
        to destination: UInt128,
        quoting original: [UInt8]
    ) {
        let reply = Array(packet[..<length])
        reply.withUnsafeBytes { p in
            #expect(IPv6Header.validate(p.baseAddress!, length: length) == .success(length))
            #expect(IPv6Header.nextHeader(p.baseAddress!) == 58)
            #expect(IPv6Header.source(p.baseAddress!) == source)
            #expect(IPv6Header.destination(p.baseAddress!) == destination)
        }
        #expect(reply[40] == type)
        #expect(reply[41] == code)
        #expect(
            referenceChecksum6(source: source, destination: destination, nextHeader: 58, message: Array(reply[40...]))
                == 0
        )
        #expect(Array(reply[48..<min(length, 48 + original.count)]) == Array(original.prefix(length - 48)))
    }

    @Test func aPacketForAPeersIPv6SubnetGoesToThatPeerWithItsHopLimitDecremented() throws {
        var packet = makePacket6(
            source: Self.address(Self.local6, 5),
            destination: Self.address(Self.remote6, 7),
            hopLimit: 64
        )
        let length = packet.count
        let action = fromTun(&packet)
        #expect(action == .send(peer: try table.entry(of: .peer(Self.peer)), length: length))
        #expect(packet[7] == 63)
    }

    @Test func noPeerForTheDestinationGetsDestinationUnreachableFromTheSubnetsBase() {
        let destination = Self.address(IPv6Network("fd00:10:244:9::/64")!, 0x42)
        let source = Self.address(Self.local6, 5)
        var packet = makePacket6(source: source, destination: destination)
        let original = packet
        guard case .reply(let n) = fromTun(&packet) else {
            Issue.record("no ICMPv6 error")
            return
        }
        expectError(
            packet,
            length: n,
            type: 1,
            code: 0,
            from: IPv6Network("fd00:10:244:9::/64")!.address.value,
            to: source,
            quoting: original
        )
        #expect(count(.droppedNoRoute) == 1)
        #expect(count(.icmpUnreachableSent) == 1)
    }

    @Test func aPacketWhoseHopLimitRunsOutGetsTimeExceeded() {
        let source = Self.address(Self.local6, 5)
        var packet = makePacket6(source: source, destination: Self.address(Self.remote6, 7), hopLimit: 1)
        let original = packet
        guard case .reply(let n) = fromTun(&packet) else {
            Issue.record("no ICMPv6 error")
            return
        }
        expectError(
            packet,
            length: n,
            type: 3,
            code: 0,
            from: Self.remote6.address.value,
            to: source,
            quoting: original
        )
        #expect(count(.droppedTTLExpired) == 1)
    }

    @Test func aPacketBiggerThanTheTunnelGetsPacketTooBigWithTheMTU() {
        let source = Self.address(Self.local6, 5)
        var packet = makePacket6(
            source: source,
            destination: Self.address(Self.remote6, 7),
            payload: [UInt8](repeating: 7, count: Self.mtu)
        )
        let original = packet
        guard case .reply(let n) = fromTun(&packet, capacity: 4096) else {
            Issue.record("no ICMPv6 error")
            return
        }
        // The error is at most the IPv6 minimum MTU long.
        #expect(n == 1280)
        expectError(
            packet,
            length: n,
            type: 2,
            code: 0,
            from: Self.remote6.address.value,
            to: source,
            quoting: original
        )
        let mtu = UInt32(packet[44]) << 24 | UInt32(packet[45]) << 16 | UInt32(packet[46]) << 8 | UInt32(packet[47])
        #expect(mtu == UInt32(Self.mtu))
        #expect(count(.droppedTooBig) == 1)
    }

    @Test func errorsAreNeverSentAboutErrorsOrToUnanswerableSources() {
        // An ICMPv6 error (type 1) for nowhere: dropped without an answer.
        let nowhere = Self.address(IPv6Network("fd00:10:244:9::/64")!, 1)
        var error = makePacket6(
            source: Self.address(Self.local6, 5),
            destination: nowhere,
            nextHeader: 58,
            payload: [1, 0, 0, 0] + [UInt8](repeating: 0, count: 12)
        )
        #expect(fromTun(&error) == .drop)
        // An echo request (type 128) is answered.
        var echo = makePacket6(
            source: Self.address(Self.local6, 5),
            destination: nowhere,
            nextHeader: 58,
            payload: [128, 0, 0, 0] + [UInt8](repeating: 0, count: 12)
        )
        if case .reply = fromTun(&echo) {} else { Issue.record("an echo request for nowhere got no error") }
        // From the unspecified address or a multicast address: no answer.
        var unspecified = makePacket6(source: 0, destination: nowhere)
        #expect(fromTun(&unspecified) == .drop)
        var multicast = makePacket6(source: 0xff02 << 112 | 1, destination: nowhere)
        #expect(fromTun(&multicast) == .drop)
    }

    @Test func packetsForOurOwnSubnetOrMalformedAreDropped() {
        var own = makePacket6(source: Self.address(Self.local6, 5), destination: Self.address(Self.local6, 6))
        #expect(fromTun(&own) == .drop)
        #expect(count(.droppedLocalDestination) == 1)
        var short = Array(makePacket6().prefix(30))
        #expect(fromTun(&short) == .drop)
        // A payload length beyond the read, and a jumbogram's 0.
        var long = makePacket6()
        long[5] = 200
        #expect(fromTun(&long) == .drop)
        var jumbo = makePacket6()
        jumbo[4] = 0
        jumbo[5] = 0
        #expect(fromTun(&jumbo) == .drop)
        #expect(count(.droppedMalformedFromTun) == 3)
    }

    @Test func aDatagramIsAcceptedOnlyFromThePeerOfItsSourceSubnetAndForOurs() {
        let good = makePacket6(source: Self.address(Self.remote6, 7), destination: Self.address(Self.local6, 5))
        #expect(fromNetwork(good) == good.count)
        // The right peer address from another port, or another host.
        #expect(fromNetwork(good, sender: UDPEndpoint(address: Self.peer.address, port: 9999)) == nil)
        #expect(fromNetwork(good, sender: UDPEndpoint(address: IPv4Address("198.18.0.9")!, port: 8285)) == nil)
        #expect(count(.droppedSpoofedSource) == 2)
        // A source no peer holds; our own subnet as source; not for us.
        let unknown = makePacket6(
            source: Self.address(IPv6Network("fd00:10:244:9::/64")!, 1),
            destination: Self.address(Self.local6, 5)
        )
        #expect(fromNetwork(unknown) == nil)
        #expect(count(.droppedUnknownPeer) == 1)
        let forged = makePacket6(source: Self.address(Self.local6, 9), destination: Self.address(Self.local6, 5))
        #expect(fromNetwork(forged) == nil)
        #expect(count(.droppedLocalSource) == 1)
        let onwards = makePacket6(source: Self.address(Self.remote6, 7), destination: Self.address(Self.remote6, 8))
        #expect(fromNetwork(onwards) == nil)
        #expect(count(.droppedNotForUs) == 1)
    }

    @Test func anIPv4OnlyForwarderCarriesNoIPv6() {
        let v4only = Forwarder(table: table, tunAddress: IPv4Address("10.2.1.0")!, mtu: Self.mtu)
        var packet = makePacket6(source: Self.address(Self.local6, 5), destination: Self.address(Self.remote6, 7))
        let length = packet.count
        let action = packet.withUnsafeMutableBytes {
            v4only.fromTun($0.baseAddress!, length: length, capacity: length, stats: stats)
        }
        #expect(action == .drop)
        #expect(count(.droppedMalformedFromTun) == 1)
    }
}

struct SubnetTable6Tests {
    @Test func lookupsFindTheSubnetSetAndNothingOutsideTheNetwork() throws {
        let table = try SubnetTable6(network: IPv6Network("fd00:10:244::/48")!, subnetLength: 64)
        #expect(table.entryCount == 65536)
        let peer = UDPEndpoint(address: IPv4Address("198.18.0.2")!, port: 8285)
        try table.set(IPv6Network("fd00:10:244:ffff::/64")!, to: .peer(peer))
        #expect(table.nextHop(for: IPv6Address("fd00:10:244:ffff::1")!) == .peer(peer))
        #expect(table.nextHop(for: IPv6Address("fd00:10:244:ffff:ffff:ffff:ffff:ffff")!) == .peer(peer))
        #expect(table.nextHop(for: IPv6Address("fd00:10:244:fffe::1")!) == nil)
        // Below and above the network: no entry (the offset wraps).
        #expect(table.nextHop(for: IPv6Address("fd00:10:243:ffff::1")!) == nil)
        #expect(table.nextHop(for: IPv6Address("fd00:10:245::1")!) == nil)
        #expect(table.nextHop(for: IPv6Address("::1")!) == nil)
        table.remove(IPv6Network("fd00:10:244:ffff::/64")!)
        #expect(table.nextHop(for: IPv6Address("fd00:10:244:ffff::1")!) == nil)
        #expect(table.allNextHops.isEmpty)
    }

    @Test func subnetsOutsideTheNetworkOrOfAnotherLengthAreRefused() throws {
        let table = try SubnetTable6(network: IPv6Network("fd00:10:244::/48")!, subnetLength: 64)
        #expect(throws: SubnetTable6Error.self) { try table.set(IPv6Network("fd00:10:245::/64")!, to: .local) }
        #expect(throws: SubnetTable6Error.self) { try table.set(IPv6Network("fd00:10:244:1::/80")!, to: .local) }
        #expect(throws: SubnetTable6Error.self) { try table.set(IPv6Network("fd00:10:244::/56")!, to: .local) }
    }

    @Test func aNetworkWithMoreSubnetsThanTheTableTakesIsOneClearError() {
        #expect {
            _ = try SubnetTable6(network: IPv6Network("fd00::/32")!, subnetLength: 64)
        } throws: { error in
            "\(error)".contains("IPv6Network fd00::/32 holds 2^32 subnets of /64")
        }
    }
}
