import FuzzSupport
import NetBase
import NetTestSupport
import Testing
import UDPEncap

@testable import PacketRing

#if canImport(Glibc)
import Glibc
#endif

/// Peers on either underlay in the data path's tables: entries naming an
/// IPv6 peer by slot, the socket address a send gets, and the sender check
/// of a receive, each held against a plain model under random updates.
@Suite struct IPv6UnderlayTableTests {
    static let network = IPv4Network("10.2.0.0/16")!
    static let network6 = IPv6Network("fd00:10:2::/48")!
    static let local = IPv4Network("10.2.0.0/24")!
    static let local6 = IPv6Network("fd00:10:2::/64")!

    static func subnet(_ i: Int) -> IPv4Network {
        IPv4Network(address: IPv4Address(network.address.value | UInt32(i) << 8), prefixLength: 24)
    }

    static func subnet6(_ i: Int) -> IPv6Network {
        IPv6Network(address: IPv6Address(network6.address.value | UInt128(i) << 64), prefixLength: 64)
    }

    /// A small pool, so that addresses come back (and slots are reused).
    static func randomHop(_ rng: inout FuzzRandom) -> NextHop {
        let port = [8285, 8286][Int.random(in: 0..<2, using: &rng)]
        let host = UInt32.random(in: 1...6, using: &rng)
        return Bool.random(using: &rng)
            ? .peer(UDPEndpoint(address: IPv4Address(0xC612_0000 | host), port: UInt16(port)))
            : .peer6(UDPEndpoint6(address: IPv6Address(0xfd18 << 112 | UInt128(host)), port: UInt16(port)))
    }

    /// The sender a datagram from `hop` has.
    static func sender(of hop: NextHop) -> UnderlaySender? {
        switch hop {
        case .peer(let e): UnderlaySender(ipv4: e.address.value, port: e.port)
        case .peer6(let e): UnderlaySender(address: e.address.value, port: e.port)
        case .local: nil
        }
    }

    @Test func bothTablesMatchAModelWithPeersOnEitherUnderlay() throws {
        let table = try SubnetTable(network: Self.network, subnetLength: 24)
        let table6 = try SubnetTable6(network: Self.network6, subnetLength: 64, addresses6: table.addresses6)
        var model: [Int: NextHop] = [:], model6: [Int: NextHop] = [:]
        var rng = FuzzRandom(seed: 0x6_0DD5)
        for step in 0..<4_000 {
            let i = Int.random(in: 0..<32, using: &rng)
            let hop = Self.randomHop(&rng)
            switch Int.random(in: 0..<5, using: &rng) {
            case 0, 1: try table.set(Self.subnet(i), to: hop); model[i] = hop
            case 2, 3: try table6.set(Self.subnet6(i), to: hop); model6[i] = hop
            default:
                table.remove(Self.subnet(i)); model[i] = nil
                table6.remove(Self.subnet6(i)); model6[i] = nil
            }
            let j = Int.random(in: 0..<32, using: &rng)
            let a = IPv4Address(Self.subnet(j).address.value | 7)
            let a6 = IPv6Address(Self.subnet6(j).address.value | 7)
            #expect(table.nextHop(for: a) == model[j], "step \(step): \(a)")
            #expect(table6.nextHop(for: a6) == model6[j], "step \(step): \(a6)")
        }
        // Twelve endpoints in the pool, six of them IPv6: at most six slots.
        #expect(table.addresses6.count <= 6)
    }

    /// The sender check of a receive, for every subnet and every sender of
    /// the pool: accepted exactly when the model's peer for the inner
    /// source's subnet is that sender (address, port and underlay).
    @Test func aDatagramIsAcceptedOnlyFromTheUnderlayAddressTheModelSays() throws {
        let table = try SubnetTable(network: Self.network, subnetLength: 24)
        let table6 = try SubnetTable6(network: Self.network6, subnetLength: 64, addresses6: table.addresses6)
        try table.set(Self.local, to: .local)
        try table6.set(Self.local6, to: .local)
        let forwarder = Forwarder(table: table, table6: table6, tunAddress: Self.local.address)
        let stats = Statistics()
        var rng = FuzzRandom(seed: 0x5E_4D)
        var model: [Int: NextHop] = [:], model6: [Int: NextHop] = [:]
        for i in 1..<24 {
            let hop = Self.randomHop(&rng), hop6 = Self.randomHop(&rng)
            try table.set(Self.subnet(i), to: hop)
            try table6.set(Self.subnet6(i), to: hop6)
            model[i] = hop
            model6[i] = hop6
        }
        var senders: [UnderlaySender] = []
        for _ in 0..<40 { senders.append(Self.sender(of: Self.randomHop(&rng))!) }
        var accepted = 0, refused = 0
        for i in 1..<24 {
            let packet = makePacket(
                source: Self.subnet(i).address.value | 9,
                destination: Self.local.address.value | 9
            )
            let packet6 = makePacket6(
                source: Self.subnet6(i).address.value | 9,
                destination: Self.local6.address.value | 9
            )
            for sender in senders + [Self.sender(of: model[i]!)!, Self.sender(of: model6[i]!)!] {
                let got = packet.withUnsafeBytes {
                    forwarder.fromNetwork($0.baseAddress!, length: packet.count, sender: sender, stats: stats)
                }
                let got6 = packet6.withUnsafeBytes {
                    forwarder.fromNetwork($0.baseAddress!, length: packet6.count, sender: sender, stats: stats)
                }
                #expect((got != nil) == (Self.sender(of: model[i]!) == sender), "\(i) from \(sender)")
                #expect((got6 != nil) == (Self.sender(of: model6[i]!) == sender), "\(i) v6 from \(sender)")
                for result in [got, got6] {
                    if result != nil { accepted += 1 } else { refused += 1 }
                }
            }
        }
        #expect(accepted >= 2 * 23 && refused > 0)
    }

    /// A packet from the TUN goes to the entry of its destination's subnet,
    /// and the socket address written for that entry is the model's peer,
    /// in the form the socket takes: `sockaddr_in6` on a dual-stack socket
    /// (IPv4 peers mapped), `sockaddr_in` for IPv4 peers on an AF_INET one.
    @Test func theAddressASendGetsIsThePeersOnEitherKindOfSocket() throws {
        let table = try SubnetTable(network: Self.network, subnetLength: 24)
        let table6 = try SubnetTable6(network: Self.network6, subnetLength: 64, addresses6: table.addresses6)
        let forwarder = Forwarder(table: table, table6: table6, tunAddress: Self.local.address)
        let stats = Statistics()
        var rng = FuzzRandom(seed: 0xADD5)
        let name = UnsafeMutableRawPointer.allocate(byteCount: SocketAddress.capacity, alignment: 8)
        defer { name.deallocate() }
        for i in 1..<64 {
            let hop = Self.randomHop(&rng)
            let inner6 = Bool.random(using: &rng)
            var packet: [UInt8]
            if inner6 {
                try table6.set(Self.subnet6(i % 32), to: hop)
                packet = makePacket6(destination: Self.subnet6(i % 32).address.value | 3)
            } else {
                try table.set(Self.subnet(i % 32), to: hop)
                packet = makePacket(destination: Self.subnet(i % 32).address.value | 3)
            }
            let length = packet.count
            packet += [UInt8](repeating: 0, count: 2048 - length)
            let action = packet.withUnsafeMutableBytes {
                forwarder.fromTun($0.baseAddress!, length: length, capacity: 2048, stats: stats)
            }
            guard case .send(let peer, let n) = action else {
                Issue.record("packet \(i) for \(hop): \(action)")
                continue
            }
            #expect(n == length)
            for dualStack in [true, false] {
                if case .peer6 = hop, !dualStack { continue }  // an AF_INET socket never gets one
                let names = PeerNames(addresses6: table.addresses6, dualStack: dualStack)
                let nameLength = names.write(peer, to: name)
                let family = Int32(name.load(as: sa_family_t.self))
                if dualStack {
                    #expect(family == AF_INET6 && nameLength == socklen_t(MemoryLayout<sockaddr_in6>.size))
                } else {
                    #expect(family == AF_INET && nameLength == socklen_t(MemoryLayout<sockaddr_in>.size))
                }
                #expect(UnderlaySender(name: name) == Self.sender(of: hop), "\(hop), dual stack \(dualStack)")
            }
        }
    }

    @Test func oneAddressHasOneSlotWhateverItsPortAndTheStoreIsBounded() throws {
        let addresses = try PeerAddresses6(capacity: 2)
        let a = IPv6Address("fd18::1")!, b = IPv6Address("fd18::2")!
        let slotA = try addresses.slot(for: a)
        #expect(try addresses.slot(for: b) != slotA)
        #expect(try addresses.slot(for: a) == slotA)
        #expect(addresses.address(slotA) == a.value)
        #expect(throws: SubnetTableError.self) { try addresses.slot(for: IPv6Address("fd18::3")!) }
        let table = try SubnetTable6(network: Self.network6, subnetLength: 64, addresses6: addresses)
        try table.set(Self.subnet6(1), to: .peer6(UDPEndpoint6(address: a, port: 1)))
        try table.set(Self.subnet6(2), to: .peer6(UDPEndpoint6(address: a, port: 2)))
        #expect(
            table.nextHop(for: IPv6Address(Self.subnet6(2).address.value | 1))
                == .peer6(UDPEndpoint6(address: a, port: 2))
        )
        #expect(throws: SubnetTableError.self) {
            try table.set(Self.subnet6(3), to: .peer6(UDPEndpoint6(address: IPv6Address("fd18::9")!, port: 1)))
        }
        #expect(table.nextHop(for: IPv6Address(Self.subnet6(3).address.value | 1)) == nil)
    }
}
