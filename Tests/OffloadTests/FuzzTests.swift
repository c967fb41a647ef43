import Offload
import Testing

/// Random and mutated input: nothing traps, nothing is read or written out of bounds (guard
/// bytes around every output; inputs live in exact-size allocations), and whatever succeeds is
/// still well formed.
@Suite struct FuzzTests {
    static func randomSpec(_ rng: inout SplitMix64, maxPayload: Int) -> PacketSpec {
        var spec = PacketSpec()
        spec.udp = Int.random(in: 0..<4, using: &rng) == 0
        if Int.random(in: 0..<4, using: &rng) == 0 { spec.ipOptions = rng.bytes(4 * Int.random(in: 1...10, using: &rng)) }
        if !spec.udp { spec.tcpOptions = rng.bytes(4 * Int.random(in: 0...10, using: &rng)) }
        spec.flags = UInt8.random(in: 0...255, using: &rng)
        spec.payload = rng.bytes(Int.random(in: 0...maxPayload, using: &rng))
        return spec
    }

    static func mutate(_ bytes: inout [UInt8], _ rng: inout SplitMix64) {
        guard !bytes.isEmpty else { return }
        for _ in 0..<Int.random(in: 0...6, using: &rng) {
            // Mostly the headers, where lengths and offsets live.
            let limit = Bool.random(using: &rng) ? min(bytes.count, 64) : bytes.count
            bytes[Int.random(in: 0..<limit, using: &rng)] = UInt8.random(in: 0...255, using: &rng)
        }
        switch Int.random(in: 0..<8, using: &rng) {
        case 0: bytes.removeLast(Int.random(in: 0...bytes.count, using: &rng))
        case 1: bytes += rng.bytes(Int.random(in: 1...40, using: &rng))
        default: break
        }
    }

    @Test func splitNeverTrapsOrWritesOutOfBoundsOnMutatedInput() {
        var rng = SplitMix64(seed: 0xF022_0001)
        var successes = 0
        for iteration in 0..<2000 {
            let spec = Self.randomSpec(&rng, maxPayload: 3000)
            var packet = spec.bytes(.pseudoOnly)
            var header = spec.virtio(gsoSize: Int.random(in: 1...1500, using: &rng))
            if Int.random(in: 0..<3, using: &rng) == 0 { Self.mutate(&packet, &rng) }
            switch Int.random(in: 0..<6, using: &rng) {
            case 0: header.gsoType = [0, 1, 3, 4, 5, 0x81, 0x85, 0x7f].randomElement(using: &rng)!
            case 1: header.gsoSize = UInt16.random(in: 0...UInt16.max, using: &rng)
            case 2:
                header.checksumStart = UInt16.random(in: 0...UInt16.max, using: &rng)
                header.checksumOffset = UInt16.random(in: 0...200, using: &rng)
            case 3: header.headerLength = UInt16.random(in: 0...UInt16.max, using: &rng)
            case 4: header.flags = UInt8.random(in: 0...3, using: &rng)
            default: break
            }
            if packet.isEmpty { packet = rng.bytes(Int.random(in: 1...100, using: &rng)) }
            let capacity = Int.random(in: 0...(packet.count * 2 + 60 * 40), using: &rng)
            let maxSegments = Int.random(in: -1...64, using: &rng)
            let (result, output, intact) = runSplit(packet, header: header, capacity: capacity, maxSegments: maxSegments)
            #expect(intact, "iteration \(iteration)")
            guard case .success(let s) = result else { continue }
            successes += 1
            #expect(s.count >= 1 && s.count <= maxSegments && s.totalLength <= capacity, "iteration \(iteration)")
            #expect(s.totalLength > (s.count - 1) * s.segmentLength && s.totalLength <= s.count * s.segmentLength, "iteration \(iteration)")
            if header.gso == .tcpv4 || header.gso == .udpL4 {
                let parsed = segments(of: output, s).map(parseChecked)
                #expect(parsed.allSatisfy { $0 != nil }, "iteration \(iteration): a segment does not verify")
            }
        }
        #expect(successes > 200)  // the run exercised the success path too
    }

    @Test func splitNeverTrapsOnRandomBytes() {
        var rng = SplitMix64(seed: 0xF022_0002)
        for iteration in 0..<2000 {
            var packet = rng.bytes(Int.random(in: 1...200, using: &rng))
            if Bool.random(using: &rng) { packet[0] = 0x45 + UInt8.random(in: 0...10, using: &rng) }
            if Bool.random(using: &rng), packet.count > 9 { packet[9] = Bool.random(using: &rng) ? 6 : 17 }
            let header = VirtioNetHeader(
                flags: UInt8.random(in: 0...3, using: &rng), gsoType: [0, 1, 5].randomElement(using: &rng)!,
                headerLength: UInt16.random(in: 0...100, using: &rng), gsoSize: UInt16.random(in: 0...100, using: &rng),
                checksumStart: UInt16.random(in: 0...100, using: &rng), checksumOffset: UInt16.random(in: 0...40, using: &rng))
            let (_, _, intact) = runSplit(packet, header: header, capacity: Int.random(in: 0...3000, using: &rng))
            #expect(intact, "iteration \(iteration)")
        }
    }

    @Test func completeChecksumStaysInsideThePacket() {
        var rng = SplitMix64(seed: 0xF022_0003)
        for iteration in 0..<2000 {
            let length = Int.random(in: 0...200, using: &rng)
            var buffer = [UInt8](repeating: guardByte, count: guardLength) + rng.bytes(length) + [UInt8](repeating: guardByte, count: guardLength)
            let header = VirtioNetHeader(
                flags: UInt8.random(in: 0...3, using: &rng),
                checksumStart: UInt16.random(in: 0...220, using: &rng), checksumOffset: UInt16.random(in: 0...220, using: &rng))
            let start = Int(header.checksumStart), at = start + Int(header.checksumOffset)
            let inBounds = start < length && at + 2 <= length
            let before = inBounds ? be16(buffer, guardLength + at) : 0
            let ok = buffer.withUnsafeMutableBytes {
                Segmentation.completeChecksum($0.baseAddress! + guardLength, length: length, header: header)
            }
            #expect(buffer[0..<guardLength].allSatisfy { $0 == guardByte } && buffer.suffix(guardLength).allSatisfy { $0 == guardByte }, "iteration \(iteration)")
            #expect(ok == (!header.needsChecksum || inBounds), "iteration \(iteration)")
            // The field held a partial sum (the pseudo header) before: with it, the region verifies.
            if ok && header.needsChecksum && header.checksumOffset % 2 == 0 {
                #expect(slowSum(buffer[(guardLength + start)..<(guardLength + length)], initial: UInt32(before)) == 0xffff, "iteration \(iteration)")
            }
        }
    }

    @Test func coalescingNeverTrapsAndEveryMergedWriteIsAValidSuperPacket() throws {
        var rng = SplitMix64(seed: 0xF022_0004)
        var mergedWrites = 0
        for iteration in 0..<300 {
            var flows = (0..<Int.random(in: 1...10, using: &rng)).map { Flow(port: UInt16($0 + 1)) }
            var packets: [[UInt8]] = []
            var lengths: [Int] = []
            for _ in 0..<Int.random(in: 1...40, using: &rng) {
                let f = Int.random(in: 0..<flows.count, using: &rng)
                let size = Bool.random(using: &rng) ? 300 : Int.random(in: 0...400, using: &rng)
                let flags: UInt8 = Int.random(in: 0..<10, using: &rng) == 0 ? UInt8.random(in: 0...255, using: &rng) : 0x10
                var packet = flows[f].segment(size, flags: flags)
                if Int.random(in: 0..<6, using: &rng) == 0 { Self.mutate(&packet, &rng) }
                if Int.random(in: 0..<20, using: &rng) == 0 { packet = rng.bytes(Int.random(in: 0...80, using: &rng)) }
                packets.append(packet)
                lengths.append(Int.random(in: 0..<15, using: &rng) == 0 ? Int.random(in: -1...packet.count, using: &rng) : packet.count)
            }
            let run = coalesce(packets, maxPackets: Int.random(in: 0...45, using: &rng), verifyChecksums: Bool.random(using: &rng), declaredLengths: lengths)
            #expect(run.iovecsInBounds && run.guardsIntact, "iteration \(iteration)")
            for write in run.writes where write.header.gso == .tcpv4 {
                mergedWrites += 1
                // What the kernel does with it: complete the checksum and segment it.
                var packet = write.packet
                let ok = packet.withUnsafeMutableBytes { Segmentation.completeChecksum($0.baseAddress!, length: $0.count, header: write.header) }
                #expect(ok && parseChecked(packet) != nil, "iteration \(iteration)")
                let (result, output, _) = runSplit(write.packet, header: write.header)
                let s = try result.get()
                #expect(segments(of: output, s).allSatisfy { parseChecked($0) != nil }, "iteration \(iteration)")
            }
        }
        #expect(mergedWrites > 100)
    }
}
