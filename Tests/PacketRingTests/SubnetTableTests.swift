import Foundation
import NetBase
import NetTestSupport
import Testing
import UDPEncap
@testable import PacketRing

@Suite struct SubnetTableTests {
    let network = IPv4Network("10.2.0.0/16")!

    func subnet(_ i: Int, length: Int = 24) -> IPv4Network {
        IPv4Network(address: IPv4Address(network.address.value + UInt32(i) << UInt32(32 - length)),
                    prefixLength: length)
    }

    func endpoint(_ i: Int) -> UDPEndpoint {
        UDPEndpoint(address: IPv4Address(0xC612_0000 + UInt32(i)), port: 8285)
    }

    @Test func lookupMatchesASimpleModelUnderRandomUpdates() throws {
        let table = try SubnetTable(network: network, subnetLength: 24)
        var model: [IPv4Network: Route] = [:]
        var rng = SystemRandomNumberGenerator()
        for step in 0..<5_000 {
            let s = subnet(Int.random(in: 0..<256, using: &rng))
            switch Int.random(in: 0..<3, using: &rng) {
            case 0: try table.set(s, to: .peer(endpoint(step))); model[s] = .peer(endpoint(step))
            case 1: try table.set(s, to: .local); model[s] = .local
            default: table.remove(s); model[s] = nil
            }
            // Any address: the model says which subnet holds it, if any.
            let a = IPv4Address(UInt32.random(in: 0x0A01_FF00...0x0A03_0100, using: &rng))
            let expected = model.first { $0.key.contains(a) }?.value
            #expect(table.route(for: a) == expected, "step \(step): \(a)")
        }
        #expect(table.allRoutes == model)
    }

    @Test func addressesOutsideTheNetworkHaveNoRoute() throws {
        let table = try SubnetTable(network: network, subnetLength: 24)
        try table.set(subnet(0), to: .local)
        try table.set(subnet(255), to: .peer(endpoint(1)))
        #expect(table.route(for: IPv4Address("10.1.255.255")!) == nil)
        #expect(table.route(for: IPv4Address("10.3.0.0")!) == nil)
        #expect(table.route(for: IPv4Address("10.2.255.9")!) == .peer(endpoint(1)))
        #expect(table.route(for: IPv4Address("10.2.0.1")!) == .local)
    }

    @Test func aWiderSubnetFillsEveryEntryItCovers() throws {
        let table = try SubnetTable(network: network, subnetLength: 24)
        try table.set(IPv4Network("10.2.4.0/23")!, to: .peer(endpoint(3)))
        #expect(table.route(for: IPv4Address("10.2.4.7")!) == .peer(endpoint(3)))
        #expect(table.route(for: IPv4Address("10.2.5.7")!) == .peer(endpoint(3)))
        #expect(table.route(for: IPv4Address("10.2.6.7")!) == nil)
        table.remove(IPv4Network("10.2.4.0/23")!)
        #expect(table.route(for: IPv4Address("10.2.5.7")!) == nil)
    }

    @Test func subnetsThatDoNotFitAreRejectedWithAReason() throws {
        let table = try SubnetTable(network: network, subnetLength: 24)
        #expect(throws: SubnetTableError.self) { try table.set(IPv4Network("10.3.0.0/24")!, to: .local) }
        #expect(throws: SubnetTableError.self) { try table.set(IPv4Network("10.2.0.0/25")!, to: .local) }
        #expect(throws: SubnetTableError.self) { try SubnetTable(network: network, subnetLength: 12) }
    }

    @Test func aHugeNetworkCostsOnlyWhatIsTouched() throws {
        // 2^24 entries (128 MiB of address space), almost none written.
        let table = try SubnetTable(network: IPv4Network("10.0.0.0/8")!, subnetLength: 32)
        try table.set(IPv4Network("10.200.3.4/32")!, to: .peer(endpoint(9)))
        #expect(table.route(for: IPv4Address("10.200.3.4")!) == .peer(endpoint(9)))
        #expect(table.route(for: IPv4Address("10.200.3.5")!) == nil)
    }

    /// Readers on other threads never see an entry that is neither the old
    /// nor the new value of a concurrent update.
    @Test func concurrentReadersNeverSeeHalfAnUpdate() async throws {
        let table = try SubnetTable(network: network, subnetLength: 24)
        // Each subnet only ever holds endpoints whose address and port agree
        // (port = low 16 bits of the address); a torn read would break that.
        func consistent(_ i: Int, _ n: Int) -> UDPEndpoint {
            let address = IPv4Address(0xC612_0000 | UInt32(i) << 8 | UInt32(n & 0xff))
            return UDPEndpoint(address: address, port: UInt16(truncatingIfNeeded: address.value))
        }
        let done = ManagedFlag()
        let readers = (0..<2).map { _ in
            Task.detached {
                var checked = 0, bad = 0
                while (!done.isSet || checked < 2_000_000) && checked < 50_000_000 {
                    let a = UInt32.random(in: 0x0A02_0000...0x0A02_FFFF)
                    let e = table.entry(for: a)
                    if SubnetTable.isPeer(e) {
                        if UInt32(SubnetTable.peerPort(e)) != SubnetTable.peerAddress(e) & 0xffff { bad += 1 }
                    } else if e != 0 && !SubnetTable.isLocal(e) {
                        bad += 1
                    }
                    checked += 1
                }
                return bad
            }
        }
        for n in 0..<20_000 {
            let i = n % 256
            if n % 7 == 0 { table.remove(subnet(i)) } else { try table.set(subnet(i), to: .peer(consistent(i, n))) }
        }
        done.set()
        for r in readers { #expect(await r.value == 0) }
    }
}

final class ManagedFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false
    var isSet: Bool { lock.withLock { value } }
    func set() { lock.withLock { value = true } }
}
