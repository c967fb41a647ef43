import FuzzSupport
import Offload
import Testing

/// Random and mutated input: nothing traps, nothing is read or written out of bounds (guard
/// bytes around every output; inputs live in exact-size allocations), and whatever succeeds is
/// still well formed.
@Suite struct FuzzTests {
    static func randomSpec(_ rng: inout FuzzRandom, maxPayload: Int) -> PacketSpec {
        var spec = PacketSpec()
        spec.udp = Int.random(in: 0..<4, using: &rng) == 0
        if Int.random(in: 0..<4, using: &rng) == 0 {
            spec.ipOptions = rng.bytes(4 * Int.random(in: 1...10, using: &rng))
        }
        if !spec.udp { spec.tcpOptions = rng.bytes(4 * Int.random(in: 0...10, using: &rng)) }
        spec.flags = UInt8.random(in: 0...255, using: &rng)
        spec.payload = rng.bytes(Int.random(in: 0...maxPayload, using: &rng))
        return spec
    }

    static func mutate(_ bytes: inout [UInt8], _ rng: inout FuzzRandom) {
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
        let report = fuzz("splitNeverTrapsOrWritesOutOfBoundsOnMutatedInput", seed: 0xF022_0001, iterations: 2000) {
            c,
            count in
            let iteration = c.iteration
            let spec = Self.randomSpec(&c.rng, maxPayload: 3000)
            var packet = spec.bytes(.pseudoOnly)
            var header = spec.virtio(gsoSize: Int.random(in: 1...1500, using: &c.rng))
            if Int.random(in: 0..<3, using: &c.rng) == 0 { Self.mutate(&packet, &c.rng) }
            switch Int.random(in: 0..<6, using: &c.rng) {
            case 0: header.gsoType = [0, 1, 3, 4, 5, 0x81, 0x85, 0x7f].randomElement(using: &c.rng)!
            case 1: header.gsoSize = UInt16.random(in: 0...UInt16.max, using: &c.rng)
            case 2:
                header.checksumStart = UInt16.random(in: 0...UInt16.max, using: &c.rng)
                header.checksumOffset = UInt16.random(in: 0...200, using: &c.rng)
            case 3: header.headerLength = UInt16.random(in: 0...UInt16.max, using: &c.rng)
            case 4: header.flags = UInt8.random(in: 0...3, using: &c.rng)
            default: break
            }
            if packet.isEmpty { packet = c.rng.bytes(Int.random(in: 1...100, using: &c.rng)) }
            let capacity = Int.random(in: 0...(packet.count * 2 + 60 * 40), using: &c.rng)
            let maxSegments = Int.random(in: -1...64, using: &c.rng)
            let (result, output, intact) = runSplit(
                packet,
                header: header,
                capacity: capacity,
                maxSegments: maxSegments
            )
            c.expect(intact, "iteration \(iteration)")
            guard case .success(let s) = result else { return }
            count("success")
            c.expect(s.count >= 1 && s.count <= maxSegments && s.totalLength <= capacity, "iteration \(iteration)")
            c.expect(
                s.totalLength > (s.count - 1) * s.segmentLength && s.totalLength <= s.count * s.segmentLength,
                "iteration \(iteration)"
            )
            if header.gso == .tcpv4 || header.gso == .udpL4 {
                let parsed = segments(of: output, s).map(parseChecked)
                c.expect(parsed.allSatisfy { $0 != nil }, "iteration \(iteration): a segment does not verify")
            }
        }
        report.expectReached("success", atLeast: 200)  // the run exercised the success path too
    }

    @Test func splitNeverTrapsOnRandomBytes() {
        fuzz("splitNeverTrapsOnRandomBytes", seed: 0xF022_0002, iterations: 2000) { c, count in
            let iteration = c.iteration
            var packet = c.rng.bytes(Int.random(in: 1...200, using: &c.rng))
            if Bool.random(using: &c.rng) { packet[0] = 0x45 + UInt8.random(in: 0...10, using: &c.rng) }
            if Bool.random(using: &c.rng), packet.count > 9 { packet[9] = Bool.random(using: &c.rng) ? 6 : 17 }
            let header = VirtioNetHeader(
                flags: UInt8.random(in: 0...3, using: &c.rng),
                gsoType: [0, 1, 5].randomElement(using: &c.rng)!,
                headerLength: UInt16.random(in: 0...100, using: &c.rng),
                gsoSize: UInt16.random(in: 0...100, using: &c.rng),
                checksumStart: UInt16.random(in: 0...100, using: &c.rng),
                checksumOffset: UInt16.random(in: 0...40, using: &c.rng)
            )
            let (_, _, intact) = runSplit(packet, header: header, capacity: Int.random(in: 0...3000, using: &c.rng))
            c.expect(intact, "iteration \(iteration)")
        }
    }

    @Test func completeChecksumStaysInsideThePacket() {
        fuzz("completeChecksumStaysInsideThePacket", seed: 0xF022_0003, iterations: 2000) { c, count in
            let iteration = c.iteration
            let length = Int.random(in: 0...200, using: &c.rng)
            var buffer =
                [UInt8](repeating: guardByte, count: guardLength) + c.rng.bytes(length)
                + [UInt8](repeating: guardByte, count: guardLength)
            let header = VirtioNetHeader(
                flags: UInt8.random(in: 0...3, using: &c.rng),
                checksumStart: UInt16.random(in: 0...220, using: &c.rng),
                checksumOffset: UInt16.random(in: 0...220, using: &c.rng)
            )
            let start = Int(header.checksumStart), at = start + Int(header.checksumOffset)
            let inBounds = start < length && at + 2 <= length
            let before = inBounds ? be16(buffer, guardLength + at) : 0
            let ok = buffer.withUnsafeMutableBytes {
                Segmentation.completeChecksum($0.baseAddress! + guardLength, length: length, header: header)
            }
            c.expect(
                buffer[0..<guardLength].allSatisfy { $0 == guardByte }
                    && buffer.suffix(guardLength).allSatisfy { $0 == guardByte },
                "iteration \(iteration)"
            )
            c.expect(ok == (!header.needsChecksum || inBounds), "iteration \(iteration)")
            // The field held a partial sum (the pseudo header) before: with it, the region verifies.
            if ok && header.needsChecksum && header.checksumOffset % 2 == 0 {
                c.expect(
                    slowSum(buffer[(guardLength + start)..<(guardLength + length)], initial: UInt32(before)) == 0xffff,
                    "iteration \(iteration)"
                )
            }
        }
    }

    @Test func coalescingNeverTrapsAndEveryMergedWriteIsAValidSuperPacket() throws {
        let report = fuzz(
            "coalescingNeverTrapsAndEveryMergedWriteIsAValidSuperPacket",
            seed: 0xF022_0004,
            iterations: 300
        ) { c, count in
            let iteration = c.iteration
            var flows = (0..<Int.random(in: 1...10, using: &c.rng)).map { Flow(port: UInt16($0 + 1)) }
            var packets: [[UInt8]] = []
            var lengths: [Int] = []
            for _ in 0..<Int.random(in: 1...40, using: &c.rng) {
                let f = Int.random(in: 0..<flows.count, using: &c.rng)
                let size = Bool.random(using: &c.rng) ? 300 : Int.random(in: 0...400, using: &c.rng)
                let flags: UInt8 =
                    Int.random(in: 0..<10, using: &c.rng) == 0 ? UInt8.random(in: 0...255, using: &c.rng) : 0x10
                var packet = flows[f].segment(size, flags: flags)
                if Int.random(in: 0..<6, using: &c.rng) == 0 { Self.mutate(&packet, &c.rng) }
                if Int.random(in: 0..<20, using: &c.rng) == 0 {
                    packet = c.rng.bytes(Int.random(in: 0...80, using: &c.rng))
                }
                packets.append(packet)
                lengths.append(
                    Int.random(in: 0..<15, using: &c.rng) == 0
                        ? Int.random(in: -1...packet.count, using: &c.rng) : packet.count
                )
            }
            let run = coalesce(
                packets,
                maxPackets: Int.random(in: 0...45, using: &c.rng),
                verifyChecksums: Bool.random(using: &c.rng),
                declaredLengths: lengths
            )
            c.expect(run.iovecsInBounds && run.guardsIntact, "iteration \(iteration)")
            for write in run.writes where write.header.gso == .tcpv4 {
                count("merged write")
                // What the kernel does with it: complete the checksum and segment it.
                var packet = write.packet
                let ok = packet.withUnsafeMutableBytes {
                    Segmentation.completeChecksum($0.baseAddress!, length: $0.count, header: write.header)
                }
                c.expect(ok && parseChecked(packet) != nil, "iteration \(iteration)")
                let (result, output, _) = runSplit(write.packet, header: write.header)
                let s = try result.get()
                c.expect(segments(of: output, s).allSatisfy { parseChecked($0) != nil }, "iteration \(iteration)")
            }
        }
        report.expectReached("merged write", atLeast: 100)
    }
}
