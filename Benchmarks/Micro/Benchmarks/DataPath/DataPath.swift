// Micro-benchmarks of the per-packet work of tunneld's data path.
// (Benchmark names avoid '/' and '_': the sample files are named after them.)
//
// One iteration of every benchmark handles 1 000 000 packets (the scaling
// factor, .mega), so the framework's scaled figures are per packet;
// Benchmarks/Micro/run turns the raw per-iteration samples into ns and
// allocations per packet with decimals. Packets live in slabs of 64 buffers
// laid out like the io_uring loop's (headroom in front, cache-line stride),
// built once, outside the measurement.

import Benchmark
import NetBase
import PacketRing
import UDPEncap
import WireGuard

#if canImport(Glibc)
import Glibc
#endif

let batchSize = 64
let perIteration = 1_000_000  // packets per iteration (= .mega)
let smallPacket = 92  // 20 IPv4 + 8 UDP + 64 payload: the harness's udp64 packet
let fullPacket = 1472  // a full packet at the udp backend's MTU (1500 − 28)
let peerPort: UInt16 = 8285

/// IPv4 + UDP packet of `length` bytes with a correct header checksum.
func writePacket(_ p: UnsafeMutableRawPointer, length: Int, source: UInt32, destination: UInt32, ttl: UInt8 = 64) {
    memset(p, 0, length)
    p.storeBytes(of: 0x45, toByteOffset: 0, as: UInt8.self)
    IPv4Header.store16(p, 2, UInt16(length))
    IPv4Header.store16(p, 4, 0x1234)
    p.storeBytes(of: ttl, toByteOffset: 8, as: UInt8.self)
    p.storeBytes(of: 17, toByteOffset: 9, as: UInt8.self)
    IPv4Header.store32(p, 12, source)
    IPv4Header.store32(p, 16, destination)
    IPv4Header.store16(p + 20, 0, 40000)
    IPv4Header.store16(p + 20, 2, 5201)
    IPv4Header.store16(p + 20, 4, UInt16(length - 20))
    IPv4Header.updateChecksum(p)
}

/// 64 packet buffers in one slab, like one direction of the io_uring loop,
/// plus a pristine copy of each packet to restore what a benchmark changed.
final class PacketBatch: @unchecked Sendable {
    let stride: Int
    let capacity: Int
    private let slab: UnsafeMutableRawPointer
    private let pristine: UnsafeMutableRawPointer

    init(capacity: Int = 1500, build: (Int, UnsafeMutableRawPointer) -> Void) {
        self.capacity = capacity
        stride = (DataPath.headroom + capacity + 63) & ~63
        slab = .allocate(byteCount: batchSize * stride, alignment: 4096)
        pristine = .allocate(byteCount: batchSize * stride, alignment: 4096)
        for i in 0..<batchSize {
            build(i, slab + i * stride + DataPath.headroom)
        }
        memcpy(pristine, slab, batchSize * stride)
    }

    deinit {
        slab.deallocate()
        pristine.deallocate()
    }

    @inline(__always) func packet(_ i: Int) -> UnsafeMutableRawPointer { slab + i * stride + DataPath.headroom }
    @inline(__always) func original(_ i: Int) -> UnsafeMutableRawPointer { pristine + i * stride + DataPath.headroom }
}

/// The addresses of the harness's network: 10.2.0.0/16, SubnetLen 24, our
/// subnet 10.2.1.0/24, peers 10.2.2.0/24 … 10.2.254.0/24 at 198.18.0.x.
let network = IPv4Network(address: IPv4Address(10, 2, 0, 0), prefixLength: 16)
let ownSubnet: UInt32 = IPv4Address(10, 2, 1, 0).value
func peerSubnet(_ i: Int) -> UInt32 { IPv4Address(10, 2, UInt8(2 + i % 253), 0).value }
func peerUnderlay(_ i: Int) -> UInt32 { IPv4Address(198, 18, UInt8(i % 253 / 250), UInt8(1 + i % 250)).value }

func makeHarnessTable() throws -> SubnetTable {
    let table = try SubnetTable(network: network, subnetLength: 24)
    try table.set(IPv4Network(address: IPv4Address(ownSubnet), prefixLength: 24), to: .local)
    for i in 0..<253 {
        let endpoint = UDPEndpoint(address: IPv4Address(peerUnderlay(i)), port: peerPort)
        try table.set(IPv4Network(address: IPv4Address(peerSubnet(i)), prefixLength: 24), to: .peer(endpoint))
    }
    return table
}

let benchmarks: @Sendable () -> Void = {
    let perPacket = Benchmark.Configuration(
        metrics: [.wallClock, .mallocCountTotal],
        timeUnits: .nanoseconds,
        // Exact counts: the automatic unit would round counts to thousands.
        units: [.mallocCountTotal: .count],
        warmupIterations: 3,
        scalingFactor: .mega,
        maxDuration: .seconds(2),
        maxIterations: 200
    )

    // MARK: SubnetTable

    // 10.0.0.0/8 with every /24 a peer: 65 536 entries, 512 KiB.
    let bigTable: SubnetTable
    do {
        bigTable = try SubnetTable(
            network: IPv4Network(address: IPv4Address(10, 0, 0, 0), prefixLength: 8),
            subnetLength: 24
        )
        for i in 0..<65536 {
            let subnet = IPv4Network(address: IPv4Address(0x0A00_0000 | UInt32(i) << 8), prefixLength: 24)
            try bigTable.set(
                subnet,
                to: .peer(UDPEndpoint(address: IPv4Address(0xC612_0000 | UInt32(i)), port: peerPort))
            )
        }
    } catch {
        fatalError("cannot build the /8 subnet table: \(error)")
    }
    // Destinations of one batch: 64 subnets, looked up again and again (in cache).
    let hotAddresses: [UInt32] = (0..<batchSize).map { 0x0A00_0000 | UInt32($0 &* 977 % 65536) << 8 | 2 }
    // One pass over 2^20 addresses drawn uniformly from the /8: every entry of
    // the table is hit about 16 times, in random order.
    var generator = SplitMix64(seed: 0x7475_6e6e_656c_64)
    let randomAddresses: [UInt32] = (0..<(1 << 20)).map { _ in
        0x0A00_0000 | UInt32(truncatingIfNeeded: generator.next()) & 0x00ff_ffff
    }

    Benchmark("SubnetTable.entry, hot (64 of 65536 subnets)", configuration: perPacket) { benchmark in
        var sum: UInt64 = 0
        hotAddresses.withUnsafeBufferPointer { addresses in
            for i in 0..<perIteration {
                sum &+= bigTable.entry(for: addresses[i & (batchSize - 1)])
            }
        }
        blackHole(sum)
    }

    Benchmark("SubnetTable.entry, random (65536 subnets)", configuration: perPacket) { benchmark in
        var sum: UInt64 = 0
        randomAddresses.withUnsafeBufferPointer { addresses in
            for i in 0..<perIteration {
                sum &+= bigTable.entry(for: addresses[i])
            }
        }
        blackHole(sum)
    }

    // MARK: IPv4Header

    // 64 udp64 packets from our container to containers behind 64 peers.
    let toPeers = PacketBatch { i, p in
        writePacket(p, length: smallPacket, source: ownSubnet | 2, destination: peerSubnet(i) | 2)
    }

    Benchmark("IPv4Header.validate (92 B packets)", configuration: perPacket) { benchmark in
        var sum = 0
        for i in 0..<perIteration {
            let slot = i & (batchSize - 1)
            if case .success(let n) = IPv4Header.validate(toPeers.packet(slot), length: smallPacket) {
                sum &+= n
            }
        }
        blackHole(sum)
    }

    // Its own batch: the TTL wraps 0 → 255 here (which the incremental
    // checksum update does not follow exactly), and the other benchmarks
    // need valid packets.
    let ttlBatch = PacketBatch { i, p in
        writePacket(p, length: smallPacket, source: ownSubnet | 2, destination: peerSubnet(i) | 2)
    }

    Benchmark("IPv4Header.decrementTTL", configuration: perPacket) { benchmark in
        for i in 0..<perIteration {
            IPv4Header.decrementTTL(ttlBatch.packet(i & (batchSize - 1)))
        }
        blackHole(ttlBatch.packet(0).load(fromByteOffset: 8, as: UInt8.self))
    }

    // MARK: Forwarder

    let table: SubnetTable
    do { table = try makeHarnessTable() } catch { fatalError("cannot build the subnet table: \(error)") }
    let forwarder = Forwarder(table: table, tunAddress: IPv4Address(ownSubnet))
    let statistics = Statistics()

    Benchmark("Forwarder.fromTun, batches of 64 (validate, lookup, TTL)", configuration: perPacket) { benchmark in
        var sum = 0
        for _ in 0..<(perIteration / batchSize) {
            for slot in 0..<batchSize {
                let p = toPeers.packet(slot)
                // Undo the previous pass's TTL decrement (TTL byte and checksum),
                // so every packet takes the forwarding path.
                p.storeBytes(
                    of: toPeers.original(slot).load(fromByteOffset: 8, as: UInt64.self),
                    toByteOffset: 8,
                    as: UInt64.self
                )
                switch forwarder.fromTun(
                    p,
                    length: smallPacket,
                    capacity: toPeers.capacity,
                    stats: statistics
                ) {
                case .send(let peer, let length): sum &+= Int(truncatingIfNeeded: peer) &+ length
                case .reply(let length): sum &+= length
                case .drop: sum &+= 1
                }
            }
        }
        blackHole(sum)
    }

    Benchmark("Forwarder.fromTun, restore only (baseline)", configuration: perPacket) { benchmark in
        for _ in 0..<(perIteration / batchSize) {
            for slot in 0..<batchSize {
                toPeers.packet(slot).storeBytes(
                    of: toPeers.original(slot).load(fromByteOffset: 8, as: UInt64.self),
                    toByteOffset: 8,
                    as: UInt64.self
                )
            }
            blackHole(toPeers.packet(0))
        }
    }

    // 64 udp64 packets from containers behind 64 peers to ours, as received.
    let fromPeers = PacketBatch { i, p in
        writePacket(p, length: smallPacket, source: peerSubnet(i) | 2, destination: ownSubnet | 2, ttl: 63)
    }
    let senders: [UInt32] = (0..<batchSize).map(peerUnderlay)

    Benchmark("Forwarder.fromNetwork, batches of 64 (validate, sender check)", configuration: perPacket) { benchmark in
        var sum = 0
        senders.withUnsafeBufferPointer { senders in
            for _ in 0..<(perIteration / batchSize) {
                for slot in 0..<batchSize {
                    if let n = forwarder.fromNetwork(
                        fromPeers.packet(slot),
                        length: smallPacket,
                        sender: senders[slot],
                        senderPort: peerPort,
                        stats: statistics
                    ) {
                        sum &+= n
                    }
                }
            }
        }
        blackHole(sum)
    }

    // MARK: ICMPError

    // Full-size packets to a subnet nobody holds: the error quotes 548 bytes.
    let unroutable = PacketBatch { i, p in
        writePacket(p, length: fullPacket, source: ownSubnet | 2, destination: IPv4Address(10, 2, 255, UInt8(i)).value)
    }
    let restoreBytes = 576

    Benchmark("ICMPError.rewrite (1472 B packet → 576 B network unreachable)", configuration: perPacket) { benchmark in
        var sum = 0
        for i in 0..<perIteration {
            let slot = i & (batchSize - 1)
            let p = unroutable.packet(slot)
            memcpy(p, unroutable.original(slot), restoreBytes)
            if let n = ICMPError.rewrite(
                p,
                length: fullPacket,
                capacity: unroutable.capacity,
                kind: .networkUnreachable,
                source: IPv4Address(10, 2, 255, 0).value
            ) {
                sum &+= n
            }
        }
        blackHole(sum)
    }

    Benchmark("ICMPError.rewrite, restore only (baseline: copy 576 B)", configuration: perPacket) { benchmark in
        for i in 0..<perIteration {
            let slot = i & (batchSize - 1)
            memcpy(unroutable.packet(slot), unroutable.original(slot), restoreBytes)
            blackHole(unroutable.packet(slot))
        }
    }

    // MARK: WireGuard transport AEAD

    // ChaCha20-Poly1305 over a full flannel-wg packet (MTU 1420, padded to
    // 1424), sealed and opened in place, through libcrypto's provider directly
    // (what the data path uses) and through EVP (the reference).
    let wireGuardPayload = 1424
    // About a microsecond a packet: a second an iteration, so more time for a
    // median over enough iterations.
    var perSealedPacket = perPacket
    perSealedPacket.warmupIterations = 1
    perSealedPacket.maxDuration = .seconds(12)
    for (name, path) in [("direct", CipherContext.Path.direct), ("EVP", CipherContext.Path.evp)] {
        guard let cipher = CipherContext(path: path) else { continue }
        let key = Bytes32((0..<32).map { UInt8($0) })!
        let slab = UnsafeMutableRawPointer.allocate(byteCount: wireGuardPayload + 16, alignment: 64)
        memset(slab, 0x5a, wireGuardPayload + 16)
        // The message is sealed and opened in place, so the slab keeps changing.
        let seal = { (counter: Int) -> Bool in
            cipher.seal(
                key: key,
                counter: UInt64(counter),
                aad: nil,
                text: slab,
                length: wireGuardPayload,
                tag: slab + wireGuardPayload
            )
        }
        Benchmark("ChaCha20-Poly1305 seal, 1424 B (\(name))", configuration: perSealedPacket) { benchmark in
            var sealed = 0
            for i in 0..<perIteration where seal(i) { sealed += 1 }
            precondition(sealed == perIteration, "libcrypto failed to seal")
        }
        Benchmark("ChaCha20-Poly1305 seal then open, 1424 B (\(name))", configuration: perSealedPacket) { benchmark in
            var opened = 0
            for i in 0..<perIteration where seal(i) {
                let ok = cipher.open(
                    key: key,
                    counter: UInt64(i),
                    aad: nil,
                    text: slab,
                    length: wireGuardPayload,
                    tag: slab + wireGuardPayload
                )
                opened += ok ? 1 : 0
            }
            precondition(opened == perIteration, "libcrypto failed to open what it sealed")
        }
    }

    // MARK: Control

    // Proves that allocations are counted: must show 1 per packet. If it
    // shows 0, the malloc interposer is not active and the zeros above mean
    // nothing (Benchmarks/Micro/run then fails).
    Benchmark("Control: one heap object per packet", configuration: perPacket) { benchmark in
        for i in 0..<perIteration {
            blackHole(Box(i))
        }
    }
}

final class Box {
    let value: Int
    init(_ value: Int) { self.value = value }
}

/// A small, fast, seedable generator, so every run looks up the same addresses.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
