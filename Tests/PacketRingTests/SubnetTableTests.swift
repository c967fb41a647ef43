import Foundation
import FuzzSupport
import NetBase
import NetTestSupport
import Synchronization
import Testing
import UDPEncap

@testable import PacketRing

@Suite struct SubnetTableTests {
    let network = IPv4Network("10.2.0.0/16")!

    func subnet(_ i: Int, length: Int = 24) -> IPv4Network {
        IPv4Network(
            address: IPv4Address(network.address.value + UInt32(i) << UInt32(32 - length)),
            prefixLength: length
        )
    }

    func endpoint(_ i: Int) -> UDPEndpoint {
        UDPEndpoint(address: IPv4Address(0xC612_0000 + UInt32(i)), port: 8285)
    }

    @Test func lookupMatchesASimpleModelUnderRandomUpdates() throws {
        let table = try SubnetTable(network: network, subnetLength: 24)
        var model: [IPv4Network: NextHop] = [:]
        var rng = FuzzRandom(seed: 0x2F_1000)
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
            #expect(table.nextHop(for: a) == expected, "step \(step): \(a)")
        }
        #expect(table.allNextHops == model)
    }

    @Test func addressesOutsideTheNetworkHaveNoRoute() throws {
        let table = try SubnetTable(network: network, subnetLength: 24)
        try table.set(subnet(0), to: .local)
        try table.set(subnet(255), to: .peer(endpoint(1)))
        #expect(table.nextHop(for: IPv4Address("10.1.255.255")!) == nil)
        #expect(table.nextHop(for: IPv4Address("10.3.0.0")!) == nil)
        #expect(table.nextHop(for: IPv4Address("10.2.255.9")!) == .peer(endpoint(1)))
        #expect(table.nextHop(for: IPv4Address("10.2.0.1")!) == .local)
    }

    @Test func aWiderSubnetFillsEveryEntryItCovers() throws {
        let table = try SubnetTable(network: network, subnetLength: 24)
        try table.set(IPv4Network("10.2.4.0/23")!, to: .peer(endpoint(3)))
        #expect(table.nextHop(for: IPv4Address("10.2.4.7")!) == .peer(endpoint(3)))
        #expect(table.nextHop(for: IPv4Address("10.2.5.7")!) == .peer(endpoint(3)))
        #expect(table.nextHop(for: IPv4Address("10.2.6.7")!) == nil)
        table.remove(IPv4Network("10.2.4.0/23")!)
        #expect(table.nextHop(for: IPv4Address("10.2.5.7")!) == nil)
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
        #expect(table.nextHop(for: IPv4Address("10.200.3.4")!) == .peer(endpoint(9)))
        #expect(table.nextHop(for: IPv4Address("10.200.3.5")!) == nil)
    }

    /// Subnets of 10.2.0.0/20 as /22, /23 and /24 over the same addresses, set and removed in
    /// any order: every address gets what the longest set subnet holding it says (what the
    /// kernel's routing would give), and the writers' view is exactly what was set.
    @Test func overlappingWiderAndNarrowerSubnetsMatchALongestPrefixModel() throws {
        let table = try SubnetTable(network: network, subnetLength: 24)
        var model: [IPv4Network: NextHop] = [:]
        var rng = FuzzRandom(seed: 0x2F_1001)
        let candidates = (0..<16).flatMap { i -> [IPv4Network] in
            [
                subnet(i), IPv4Network(address: subnet(i & ~1).address, prefixLength: 23),
                IPv4Network(address: subnet(i & ~3).address, prefixLength: 22),
            ]
        }
        func expected(_ address: IPv4Address) -> NextHop? {
            model.filter { $0.key.contains(address) }.max { $0.key.prefixLength < $1.key.prefixLength }?.value
        }
        var mismatches: [String] = []
        for step in 0..<3_000 where mismatches.isEmpty {
            let s = candidates[Int.random(in: 0..<candidates.count, using: &rng)]
            if Int.random(in: 0..<3, using: &rng) == 0 {
                table.remove(s); model[s] = nil
            } else {
                let route: NextHop = Bool.random(using: &rng) ? .local : .peer(endpoint(step))
                try table.set(s, to: route); model[s] = route
            }
            for i in 0..<16 {
                let a = IPv4Address(subnet(i).address.value + 7)
                if table.nextHop(for: a) != expected(a) {
                    mismatches.append(
                        "step \(step) (\(model.count) set): \(a) → \(String(describing: table.nextHop(for: a))), "
                            + "the longest set subnet says \(String(describing: expected(a)))"
                    )
                }
            }
        }
        // The most specific set subnet wins, as in a routing table: a /24 inside a removed
        // or newly set /23 keeps its own route.
        #expect(mismatches.isEmpty, "\(mismatches.prefix(3))")
        // The writers' view is right either way.
        #expect(table.allNextHops == model)
    }

    /// Readers on two threads of their own while a writer replaces routes: a reader sees, for
    /// each subnet, only values the writer stored there, never an empty or foreign entry (the
    /// writer never removes), and never an older value after a newer one. The readers must
    /// see the values change while they run, or the test proves nothing and fails.
    @Test func concurrentReadersSeeOnlyWrittenValuesInOrder() throws {
        let table = try SubnetTable(network: network, subnetLength: 24)
        let subnets = 64
        // Subnet i holds the endpoint 198.18.i.0 with version v in its port (v < 65536).
        func value(_ i: Int, version: Int) -> NextHop {
            .peer(UDPEndpoint(address: IPv4Address(0xC612_0000 | UInt32(i) << 8), port: UInt16(version)))
        }
        for i in 0..<subnets { try table.set(subnet(i), to: value(i, version: 0)) }
        let progress = ReaderProgress()
        // Threads, not tasks: spinning readers on the cooperative pool (two threads on a
        // two-core machine) would keep the writer or the other reader from running at all.
        let readers = (0..<2).map { r in
            let thread = Thread {
                var rng = FuzzRandom(seed: 0x2F_2000 + UInt64(r))
                var last = [Int](repeating: 0, count: subnets)
                var bad: [String] = [], changes = 0, reads = 0
                progress.readerStarted()
                // Bounded: stops when the writer is done, or after 200 million reads.
                while !progress.writerDone && reads < 200_000_000 && bad.isEmpty {
                    let i = Int.random(in: 0..<subnets, using: &rng)
                    let e = table.entry(for: 0x0A02_0000 | UInt32(i) << 8 | UInt32(reads & 0xff))
                    reads += 1
                    guard SubnetTable.isPeer(e), SubnetTable.peerAddress(e) == 0xC612_0000 | UInt32(i) << 8 else {
                        bad.append("subnet \(i): entry \(String(e, radix: 16)) is not a value written there")
                        break
                    }
                    let version = Int(SubnetTable.peerPort(e))
                    if version < last[i] {
                        bad.append("subnet \(i): version \(version) after \(last[i])")
                    } else if version > last[i] {
                        changes += 1
                        progress.sawChange()
                    }
                    last[i] = version
                }
                progress.readerFinished(bad: bad, changes: changes)
            }
            thread.start()
            return thread
        }
        _ = readers
        // The writer starts once both readers run, and goes on until they have seen the
        // table change many times (or it has written every version it can encode).
        let started = ContinuousClock.now
        while progress.readersStarted < 2 && ContinuousClock.now - started < .seconds(30) { sched_yield() }
        var version = 0
        while version < 65_535 && progress.changesSeen < 10_000 {
            version += 1
            for i in 0..<subnets { try table.set(subnet(i), to: value(i, version: version)) }
        }
        progress.finishWriting()
        let results = progress.waitForReaders(2, within: .seconds(60))
        #expect(results.count == 2, "only \(results.count) of 2 readers finished")
        for result in results { #expect(result.bad.isEmpty, "\(result.bad)") }
        let changes = results.reduce(0) { $0 + $1.changes }
        #expect(
            changes >= 1_000,
            "the readers saw \(changes) changes in \(version) rounds of writes: they did not overlap the writer"
        )
    }
}

/// What the readers of the concurrency test report to the writer, and their results.
final class ReaderProgress: Sendable {
    private let started = Atomic<Int>(0)
    private let changes = Atomic<Int>(0)
    private let done = Atomic<Bool>(false)
    private let results = Mutex<[(bad: [String], changes: Int)]>([])
    func readerStarted() { started.add(1, ordering: .relaxed) }
    func sawChange() { changes.add(1, ordering: .relaxed) }
    func finishWriting() { done.store(true, ordering: .releasing) }
    var readersStarted: Int { started.load(ordering: .relaxed) }
    var changesSeen: Int { changes.load(ordering: .relaxed) }
    var writerDone: Bool { done.load(ordering: .acquiring) }
    func readerFinished(bad: [String], changes: Int) { results.withLock { $0.append((bad, changes)) } }
    /// The results of `count` readers, or of those that finished within `limit`.
    func waitForReaders(_ count: Int, within limit: Duration) -> [(bad: [String], changes: Int)] {
        let deadline = ContinuousClock.now + limit
        while results.withLock({ $0.count }) < count && ContinuousClock.now < deadline { usleep(1_000) }
        return results.withLock { $0 }
    }
}
