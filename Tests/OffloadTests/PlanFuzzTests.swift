import FuzzSupport
import Offload
import Testing

/// The virtio header codec and the coalescing plan on hostile input, against models.
@Suite struct OffloadModelFuzzTests {
    @Test func virtioHeadersOfAnyTenBytesReadAndWriteBack() {
        let report = fuzz("virtioHeadersOfAnyTenBytesReadAndWriteBack", seed: 0xF022_0101, iterations: 3000) {
            c,
            count in
            let raw = c.bytes(10)
            let buffer = GuardedBuffer(raw, atEnd: c.bool())
            let header = VirtioNetHeader(reading: buffer.base)
            // Little-endian fields at fixed offsets (the legacy layout), read without alignment.
            c.expect(header.flags == raw[0] && header.gsoType == raw[1], "flags or gso_type")
            let le = { (o: Int) in UInt16(raw[o]) | UInt16(raw[o + 1]) << 8 }
            c.expect(
                header.headerLength == le(2) && header.gsoSize == le(4) && header.checksumStart == le(6)
                    && header.checksumOffset == le(8),
                "16-bit fields"
            )
            c.expect(header.ecn == (raw[1] & 0x80 != 0) && header.needsChecksum == (raw[0] & 1 != 0), "flag bits")
            c.expect(
                header.gso?.rawValue == ([0, 1, 3, 4, 5].contains(raw[1] & 0x7f) ? raw[1] & 0x7f : nil),
                "gso type"
            )
            let out = GuardedBuffer(count: 10, atEnd: c.bool())
            header.write(to: out.base)
            c.expect(out.bytes == raw, "write(to:) does not give back the bytes read")
            count(header.gso == nil ? "unknown type" : "known type")
        }
        report.expectReached("known type", atLeast: 50)
        report.expectReached("unknown type", atLeast: 1000)
    }

    /// Which flow the plan may merge a packet into (mirrors what it keys on); packets it
    /// never merges get a key of their own.
    static func flowKey(_ b: [UInt8], index: Int) -> [UInt8] {
        guard b.count >= 20, b[0] >> 4 == 4 else { return [0xff] + withUnsafeBytes(of: index) { Array($0) } }
        let ihl = Int(b[0] & 0xf) * 4
        guard ihl >= 20, ihl + 4 <= b.count, b[9] == 6 || b[9] == 17, Slow.be16(b, 6) & 0x1fff == 0 else {
            return [0xff] + withUnsafeBytes(of: index) { Array($0) }
        }
        return Array(b[12..<20]) + [b[9]] + Array(b[ihl..<(ihl + 4)])
    }

    /// Whether `delivered` (what the kernel makes of a write) is the packet that arrived:
    /// identical, except that with DF set re-segmentation numbers IP IDs afresh, and a UDP
    /// datagram that came without a checksum (0) gets one.
    static func sameDelivery(_ original: [UInt8], _ delivered: [UInt8]) -> Bool {
        guard original.count == delivered.count else { return false }
        var a = original, b = delivered
        if a.count >= 20, Slow.be16(a, 6) & 0x4000 != 0 {
            for i in [4, 5, 10, 11] { a[i] = 0; b[i] = 0 }
        }
        if a.count >= 28, a[9] == 17, Slow.be16(a, 26) == 0 { b[26] = 0; b[27] = 0 }
        // Without URG the urgent pointer means nothing; like Linux GRO, merging does not
        // compare it, and the segments get the first one's (and a checksum to match).
        if a.count >= 40, a[0] == 0x45, a[9] == 6, a[33] & 0x20 == 0, a[38..<40] != b[38..<40] {
            guard Slow.transportChecksumValid(original), Slow.transportChecksumValid(delivered) else { return false }
            for i in 36..<40 { a[i] = 0; b[i] = 0 }
        }
        return a == b
    }

    static func differences(_ a: [[UInt8]], _ b: [[UInt8]]) -> [String] {
        for (x, y) in zip(a, b) where !sameDelivery(x, y) {
            let n = min(x.count, y.count)
            return (0..<n).filter { x[$0] != y[$0] }.prefix(8).map { "\($0): \(x[$0])→\(y[$0])" } + [
                "lengths \(x.count) \(y.count)"
            ]
        }
        return []
    }

    @Test func coalescedWritesSplitBackIntoExactlyThePacketsThatArrived() throws {
        let report = fuzz(
            "coalescedWritesSplitBackIntoExactlyThePacketsThatArrived",
            seed: 0xF022_0102,
            iterations: 300
        ) { c, count in
            var tcpFlows = (0..<c.int(1...4)).map { Flow(port: UInt16($0 + 1)) }
            var udpIDs = [UInt16](repeating: 7, count: 3)
            var packets: [[UInt8]] = []
            for _ in 0..<c.int(1...40) {
                var p: [UInt8]
                if c.oneIn(3) {
                    let f = c.int(0..<udpIDs.count)
                    var spec = PacketSpec(udp: true)
                    spec.sourcePort = UInt16(100 + f)
                    spec.dontFragment = !c.oneIn(4)
                    spec.id = udpIDs[f]
                    udpIDs[f] &+= c.oneIn(5) ? 2 : 1
                    spec.payload = c.bytes(c.bool() ? 200 : c.int(0...300))
                    p = spec.bytes(c.oneIn(6) ? .zero : .full)
                } else {
                    let f = c.int(0..<tcpFlows.count)
                    p = tcpFlows[f].segment(
                        c.bool() ? 300 : c.int(0...400),
                        flags: c.oneIn(8) ? c.pick([0x18, 0x11, 0x12, 0x90, c.byte()]) : 0x10,
                        skip: c.oneIn(15) ? c.int(1...10) : 0
                    )
                }
                if c.oneIn(6) { c.mutate(&p, focus: 60) }
                if c.oneIn(10) {
                    // A checksum broken in the payload: must never be hidden by a merge.
                    if p.count > 40 { p[p.count - 1] ^= 0x5a }
                }
                packets.append(p)
            }
            let run = coalesce(packets, maxPackets: 64, verifyChecksums: true)
            c.expect(run.iovecsInBounds && run.guardsIntact && run.accepted == packets.count, "bounds or acceptance")
            var delivered: [[UInt8]] = []
            for write in run.writes {
                if write.header.gso == nil || write.header.gsoType == 0 {
                    delivered.append(write.packet)
                    continue
                }
                let (result, output, intact) = runSplit(write.packet, header: write.header)
                guard case .success(let s) = result, intact else {
                    c.fail("a merged write does not split: \(result)")
                    return
                }
                delivered += segments(of: output, s)
                count("merged write")
            }
            // Per flow, in arrival order.
            var arrived: [[UInt8]: [[UInt8]]] = [:], got: [[UInt8]: [[UInt8]]] = [:]
            for (i, p) in packets.enumerated() { arrived[Self.flowKey(p, index: i), default: []].append(p) }
            c.expect(delivered.count == packets.count, "\(packets.count) packets arrived, \(delivered.count) delivered")
            for (i, p) in delivered.enumerated() {
                // A delivered packet keys like the one that arrived except for fields the
                // key does not read, so find its flow by the same function.
                got[Self.flowKey(p, index: packets.firstIndex(of: p) ?? -1 - i), default: []].append(p)
            }
            for (key, originals) in arrived {
                let mine = got[key] ?? []
                c.expect(
                    mine.count == originals.count && zip(originals, mine).allSatisfy(Self.sameDelivery),
                    "flow \(key.prefix(13)): what the kernel gets is not what arrived: \(originals.count) arrived, "
                        + "\(mine.count) delivered, first difference at packet \(Array(zip(originals, mine)).firstIndex { !Self.sameDelivery($0.0, $0.1) } ?? -1) "
                        + "(bytes differ at \(Self.differences(originals, mine))) "
                        + "(checksums of those that arrived: \(originals.map { $0.count >= 28 && Slow.validateIPv4($0) == .success($0.count) && Slow.transportChecksumValid($0) }))"
                )
            }
        }
        report.expectReached("merged write", atLeast: 200)
    }

    /// Found by coalescedWritesSplitBackIntoExactlyThePacketsThatArrived: the first datagram
    /// of a UDP group was not checked, so a corrupt one followed by good ones of its flow was
    /// merged, its checksum field rewritten, and delivered as if it were intact.
    @Test func aCorruptFirstDatagramIsNotMergedIntoAGroup() throws {
        func datagram(_ id: UInt16) -> [UInt8] {
            var spec = PacketSpec(udp: true)
            spec.id = id
            spec.payload = Array(repeating: UInt8(id), count: 400)
            return spec.bytes()
        }
        var corrupt = datagram(1)
        corrupt[corrupt.count - 1] ^= 0x5a
        let b = datagram(2), c = datagram(3)
        let run = coalesce([corrupt, b, c])
        #expect(run.writes.count == 2)
        #expect(run.writes.first?.header == VirtioNetHeader())
        #expect(run.writes.first?.packet == corrupt)
        let (split, output, _) = runSplit(run.writes[1].packet, header: run.writes[1].header)
        #expect(mismatch(segments(of: output, try split.get()), [b, c]) == nil)
        // Without checking (a caller that trusts its peers), the group forms as before.
        #expect(coalesce([corrupt, b, c], verifyChecksums: false).writes.count == 1)
    }
}
