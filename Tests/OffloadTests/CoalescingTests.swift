import Offload
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// One finished write, gathered back from its iovecs.
struct GatheredWrite: Equatable, CustomTestStringConvertible {
    var header: VirtioNetHeader
    /// The bytes after the virtio header.
    var packet: [UInt8]

    // Short, so a failing comparison does not print (and diff) whole packets.
    var testDescription: String {
        "write(gso \(header.gsoType) size \(header.gsoSize), \(packet.count) bytes, sum \(slowSum(packet)))"
    }
}

/// A receive buffer holding packets back to back, as one UDP GRO receive returns them, with
/// guard bytes around it; the plan is run over it and every iovec is checked against it.
struct CoalescingRun {
    var writes: [GatheredWrite] = []
    var coalesced = 0
    var accepted = 0
    /// Every iovec pointed into the receive buffer (or the header area), no byte twice.
    var iovecsInBounds = true
    /// Bytes of the receive buffer covered by iovecs.
    var coveredBytes = 0
    var guardsIntact = true
}

/// `declaredLengths` lets a test hand `add` a length shorter than the bytes laid out.
func coalesce(
    _ packets: [[UInt8]],
    maxPackets: Int = 64,
    verifyChecksums: Bool = true,
    declaredLengths: [Int]? = nil
) -> CoalescingRun {
    let total = packets.reduce(0) { $0 + $1.count }
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: guardLength + total + guardLength, alignment: 8)
    defer { buffer.deallocate() }
    buffer.initializeMemory(as: UInt8.self, repeating: guardByte)
    let base = buffer.baseAddress! + guardLength
    var run = CoalescingRun()
    var plan = CoalescingPlan(maxPackets: maxPackets, verifyChecksums: verifyChecksums)
    var offset = 0
    for (i, packet) in packets.enumerated() {
        packet.withUnsafeBytes { (base + offset).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        if plan.add(base + offset, length: declaredLengths?[i] ?? packet.count) { run.accepted += 1 }
        offset += packet.count
    }
    plan.finish()
    run.coalesced = plan.coalescedSegments
    var covered = [Int](repeating: 0, count: total)
    for w in 0..<plan.writeCount {
        let (iovecs, count, bytes) = plan.write(w)
        guard count >= 1 else { run.iovecsInBounds = false; continue }
        let headerIovec = iovecs[0]
        guard headerIovec.iov_len == VirtioNetHeader.size, let h = headerIovec.iov_base else {
            run.iovecsInBounds = false; continue
        }
        var gathered = GatheredWrite(header: VirtioNetHeader(reading: h), packet: [])
        #expect(gathered.header == plan.header(w))
        var sum = VirtioNetHeader.size
        for i in 1..<count {
            let v = iovecs[i]
            let start = UnsafeRawPointer(v.iov_base!) - UnsafeRawPointer(base)
            guard start >= 0, start + v.iov_len <= total else { run.iovecsInBounds = false; continue }
            for j in start..<(start + v.iov_len) { covered[j] += 1 }
            gathered.packet += UnsafeRawBufferPointer(start: v.iov_base, count: v.iov_len)
            sum += v.iov_len
        }
        #expect(sum == bytes)
        run.writes.append(gathered)
    }
    if covered.contains(where: { $0 > 1 }) { run.iovecsInBounds = false }
    run.coveredBytes = covered.reduce(0, +)
    run.guardsIntact =
        buffer[0..<guardLength].allSatisfy { $0 == guardByte }
        && buffer[(guardLength + total)...].allSatisfy { $0 == guardByte }
    return run
}

/// A TCP flow whose segments are cut by hand.
struct Flow {
    var spec: PacketSpec
    var nextSequence: UInt32
    var nextID: UInt16

    init(port: UInt16, sequence: UInt32 = 1000) {
        spec = PacketSpec(sourcePort: port, sequence: sequence, tcpOptions: [1, 1, 8, 10, 0, 0, 0, 5, 0, 0, 0, 6])
        nextSequence = sequence
        nextID = 100
    }

    /// The next segment with `size` payload bytes and `flags`.
    mutating func segment(
        _ size: Int,
        flags: UInt8 = 0x10,
        skip: Int = 0,
        change: (inout PacketSpec) -> Void = { _ in }
    ) -> [UInt8] {
        nextSequence &+= UInt32(skip)
        var s = spec
        s.sequence = nextSequence
        s.id = nextID
        s.flags = flags
        s.payload = (0..<size).map { UInt8(truncatingIfNeeded: Int(nextSequence) &+ $0 &* 7) }
        change(&s)
        nextSequence &+= UInt32(size)
        nextID &+= 1
        return s.bytes()
    }
}

/// What `finish()` must make of segments merged into one write: their headers with the first
/// packet's fields, the total length, and the pseudo-header sum in the checksum field.
func expectedSuperPacket(_ segments: [[UInt8]]) -> [UInt8] {
    let first = segments[0]
    let ip = ipHeaderLength(first)
    let headerLength = ip + Int(first[ip + 12] >> 4) * 4
    var b = first + segments.dropFirst().flatMap { $0[headerLength...] }
    if first[0] >> 4 == 6 {
        put16(&b, 4, UInt16(b.count - 40))
    } else {
        put16(&b, 2, UInt16(b.count))
        put16(&b, 10, 0)
        put16(&b, 10, ~slowSum(b[0..<20]))
    }
    if segments.last![ip + 13] & 0x08 != 0 { b[ip + 13] |= 0x08 }
    put16(&b, ip + 16, slowSum([], initial: slowPseudo(b, protocolNumber: 6, length: b.count - ip)))
    return b
}

func gsoHeader(_ segments: [[UInt8]]) -> VirtioNetHeader {
    let ip = ipHeaderLength(segments[0])
    let headerLength = ip + Int(segments[0][ip + 12] >> 4) * 4
    return VirtioNetHeader(
        flags: VirtioNetHeader.needsChecksum,
        gsoType: segments[0][0] >> 4 == 6 ? 4 : 1,
        headerLength: UInt16(headerLength),
        gsoSize: UInt16(segments[0].count - headerLength),
        checksumStart: UInt16(ip),
        checksumOffset: 16
    )
}

func merged(_ segments: [[UInt8]]) -> GatheredWrite {
    segments.count == 1
        ? GatheredWrite(header: VirtioNetHeader(), packet: segments[0])
        : GatheredWrite(header: gsoHeader(segments), packet: expectedSuperPacket(segments))
}

@Suite struct CoalescingTests {
    @Test(arguments: [false, true])
    func splitThenCoalesceGivesBackTheSuperPacket(ipv6: Bool) throws {
        var spec = PacketSpec(ipv6: ipv6, flags: 0x18, tcpOptions: [1, 1, 8, 10, 1, 2, 3, 4, 5, 6, 7, 8])
        spec.payload = SplitMix64(seed: 11).bytesArray(20000)
        let original = spec.bytes(.pseudoOnly)
        let header = spec.virtio(gsoSize: 1448)
        let (result, output, _) = runSplit(original, header: header)
        let s = try result.get()
        let wire = segments(of: output, s)
        let run = coalesce(wire)
        #expect(run.writes.count == 1)
        #expect(run.coalesced == s.count - 1)
        #expect(mismatch(run.writes.first?.packet ?? [], original) == nil)
        #expect(run.writes.first?.header == header)
        #expect(run.iovecsInBounds && run.guardsIntact)
        #expect(run.coveredBytes == s.totalLength - (s.count - 1) * spec.headerLength)

        // The write is what the kernel would accept: splitting it again gives the same segments.
        let (again, againOutput, _) = runSplit(run.writes[0].packet, header: run.writes[0].header)
        #expect(mismatch(segments(of: againOutput, try again.get()), wire) == nil)
    }

    @Test func randomSuperPacketsSurviveSplitAndCoalesce() throws {
        var rng = SplitMix64(seed: 0x5EED_0002)
        for iteration in 0..<60 {
            var spec = PacketSpec()
            spec.ipv6 = iteration % 3 == 2
            spec.tcpOptions = rng.bytes(4 * Int.random(in: 0...10, using: &rng))
            spec.flags = Bool.random(using: &rng) ? 0x10 : 0x18
            spec.sequence = UInt32.random(in: 0...UInt32.max, using: &rng)
            spec.id = UInt16.random(in: 0...0xffff, using: &rng)
            spec.payload = rng.bytes(Int.random(in: 1...(65535 - spec.headerLength), using: &rng))
            let mss = Int.random(in: 88...1460, using: &rng)
            let original = spec.bytes(.pseudoOnly)
            let (result, output, _) = runSplit(original, header: spec.virtio(gsoSize: mss), maxSegments: 1024)
            let s = try result.get()
            let wire = segments(of: output, s)
            let run = coalesce(wire, maxPackets: 1024)
            if s.count <= CoalescingPlan.maxSegmentsPerWrite {
                #expect(run.writes.count == 1, "iteration \(iteration)")
                let expected = s.count > 1 ? original : output
                #expect(mismatch(run.writes.first?.packet ?? [], expected) == nil, "iteration \(iteration)")
                #expect(
                    run.writes.first?.header == (s.count > 1 ? spec.virtio(gsoSize: mss) : VirtioNetHeader()),
                    "iteration \(iteration)"
                )
            } else {
                // Groups of at most 64 segments, in order.
                let groups = stride(from: 0, to: wire.count, by: CoalescingPlan.maxSegmentsPerWrite).map {
                    merged(Array(wire[$0..<min($0 + CoalescingPlan.maxSegmentsPerWrite, wire.count)]))
                }
                #expect(run.writes == groups, "iteration \(iteration)")
            }
            #expect(run.iovecsInBounds && run.guardsIntact, "iteration \(iteration)")
        }
    }

    @Test func interleavedFlowsEachCoalesceInOrderOfTheirFirstPacket() {
        var a = Flow(port: 1), b = Flow(port: 2)
        let a1 = a.segment(1000), b1 = b.segment(500), a2 = a.segment(1000), b2 = b.segment(500)
        let a3 = a.segment(1000), b3 = b.segment(200)
        let run = coalesce([a1, b1, a2, b2, a3, b3])
        #expect(run.writes == [merged([a1, a2, a3]), merged([b1, b2, b3])])
        #expect(run.coalesced == 4)
        #expect(run.iovecsInBounds && run.guardsIntact)
        #expect(run.coveredBytes == [a1, b1, a2, b2, a3, b3].reduce(0) { $0 + $1.count } - 4 * 52)
    }

    @Test func aSequenceGapStartsANewGroup() {
        var a = Flow(port: 1)
        let s1 = a.segment(1000), s2 = a.segment(1000), s4 = a.segment(1000, skip: 1000), s5 = a.segment(1000)
        #expect(coalesce([s1, s2, s4, s5]).writes == [merged([s1, s2]), merged([s4, s5])])
        // A retransmission (sequence going back) does not join either.
        var r = Flow(port: 2)
        let r1 = r.segment(1000), r2 = r.segment(1000)
        #expect(coalesce([r1, r2, r1]).writes == [merged([r1, r2]), merged([r1])])
    }

    @Test func aShorterSegmentEndsItsGroup() {
        var a = Flow(port: 1)
        let s1 = a.segment(1000), s2 = a.segment(500), s3 = a.segment(1000), s4 = a.segment(1000)
        #expect(coalesce([s1, s2, s3, s4]).writes == [merged([s1, s2]), merged([s3, s4])])
        // A longer segment than the first does not join.
        var b = Flow(port: 2)
        let l1 = b.segment(500), l2 = b.segment(1000)
        #expect(coalesce([l1, l2]).writes == [merged([l1]), merged([l2])])
    }

    @Test func pushJoinsAndEndsItsGroupAndIsCarriedToTheSuperPacket() {
        var a = Flow(port: 1)
        let s1 = a.segment(1000), s2 = a.segment(1000, flags: 0x18), s3 = a.segment(1000)
        let run = coalesce([s1, s2, s3])
        #expect(run.writes == [merged([s1, s2]), merged([s3])])
        #expect(run.writes[0].packet[33] == 0x18)
    }

    @Test func aFirstPacketWithPushStaysAlone() {
        var a = Flow(port: 1)
        let s1 = a.segment(1000, flags: 0x18), s2 = a.segment(1000), s3 = a.segment(1000)
        #expect(coalesce([s1, s2, s3]).writes == [merged([s1]), merged([s2, s3])])
    }

    @Test(arguments: [UInt8(0x01), 0x02, 0x04, 0x20, 0x40, 0x80])
    func flagsOtherThanAckAndPushAreNeverCoalesced(_ flag: UInt8) {
        var a = Flow(port: 1)
        let s1 = a.segment(1000), s2 = a.segment(1000), s3 = a.segment(1000, flags: 0x10 | flag), s4 = a.segment(1000),
            s5 = a.segment(1000)
        let run = coalesce([s1, s2, s3, s4, s5])
        #expect(run.writes == [merged([s1, s2]), merged([s3]), merged([s4, s5])])
        // Untouched: a packet with its own write goes out byte for byte.
        #expect(mismatch(run.writes[1].packet, s3) == nil)
    }

    @Test func headerFieldsThatDifferKeepSegmentsApart() {
        let changes: [(String, (inout PacketSpec) -> Void)] = [
            ("ack", { $0.ack &+= 1 }), ("window", { $0.window &+= 1 }), ("ttl", { $0.ttl &-= 1 }),
            ("tos", { $0.tos = 4 }), ("DF", { $0.dontFragment = false }),
            ("TCP options", { $0.tcpOptions[11] ^= 1 }), ("TCP option length", { $0.tcpOptions = [] }),
        ]
        for (name, change) in changes {
            var a = Flow(port: 1)
            let s1 = a.segment(1000), s2 = a.segment(1000, change: change)
            #expect(coalesce([s1, s2]).writes == [merged([s1]), merged([s2])], "\(name)")
        }
        var n = Flow(port: 1)
        n.spec.dontFragment = false
        let n1 = n.segment(1000), n2 = n.segment(1000), n3 = n.segment(1000, change: { $0.id &+= 5 })
        #expect(
            coalesce([n1, n2, n3]).writes == [merged([n1, n2]), merged([n3])],
            "IDs of packets without DF must count up"
        )
        var e = Flow(port: 1)
        let e1 = e.segment(1000),
            e2 = e.segment(
                1000,
                change: {
                    $0.id = 0xbad; $0.dontFragment = true
                }
            )
        #expect(coalesce([e1, e2]).writes == [merged([e1, e2])], "IDs of DF packets may jump")
        var o = Flow(port: 1)
        let o1 = o.segment(1000), o2 = o.segment(1000, change: { $0.ipOptions = [1, 1, 1, 0] })
        #expect(coalesce([o1, o2]).writes.count == 2, "IP options")
    }

    @Test func aCorruptSegmentIsNotMergedWhenChecksumsAreVerified() {
        var a = Flow(port: 1)
        let s1 = a.segment(1000)
        var s2 = a.segment(1000)
        s2[500] ^= 0x40
        #expect(coalesce([s1, s2]).writes == [merged([s1]), merged([s2])])
        #expect(coalesce([s1, s2], verifyChecksums: false).writes.count == 1)
        var bad = Flow(port: 2)
        var b1 = bad.segment(1000)
        b1[9 + 1] ^= 1  // IP header checksum
        let b2 = bad.segment(1000)
        #expect(coalesce([b1, b2]).writes == [merged([b1]), merged([b2])])
    }

    @Test func nonTCPPacketsGetTheirOwnWritesWithAZeroHeader() {
        var a = Flow(port: 1)
        let s1 = a.segment(1000), s2 = a.segment(1000)
        let udp = PacketSpec(udp: true, payload: [1, 2, 3]).bytes()
        var icmp = PacketSpec(payload: [8, 0, 0, 0]).bytes()
        icmp[9] = 1
        let junk: [UInt8] = [0x60, 1, 2]
        let empty: [UInt8] = []
        let run = coalesce([s1, udp, icmp, junk, empty, s2])
        #expect(run.writes == [merged([s1, s2]), merged([udp]), merged([icmp]), merged([junk]), merged([empty])])
        #expect(run.iovecsInBounds && run.guardsIntact)
    }

    @Test func aPureAckOrAnotherPacketOfTheFlowEndsItsGroup() {
        var a = Flow(port: 1)
        let s1 = a.segment(1000), s2 = a.segment(1000), ack = a.segment(0), s3 = a.segment(1000), s4 = a.segment(1000)
        #expect(coalesce([s1, s2, ack, s3, s4]).writes == [merged([s1, s2]), merged([ack]), merged([s3, s4])])
    }

    @Test func aGroupStopsBeforeExceedingTheIPv4MaximumLength() {
        var a = Flow(port: 1)
        a.spec.tcpOptions = []
        let segs = (0..<46).map { _ in a.segment(1460) }
        let run = coalesce(segs)
        // 40 + 44 · 1460 = 64280 fits; one more would be 65740.
        #expect(run.writes == [merged(Array(segs[0..<44])), merged(Array(segs[44...]))])
    }

    @Test func aGroupStopsAtTheSegmentLimit() {
        var a = Flow(port: 1)
        let segs = (0..<70).map { _ in a.segment(10) }
        let run = coalesce(segs, maxPackets: 70)
        #expect(CoalescingPlan.maxSegmentsPerWrite == 64)
        #expect(run.writes == [merged(Array(segs[0..<64])), merged(Array(segs[64...]))])
    }

    @Test func whenTheFlowTableIsFullTheOldestGroupIsClosed() {
        var flows = (1...9).map { Flow(port: UInt16($0)) }
        let firsts = (0..<9).map { flows[$0].segment(1000) }
        let second2 = flows[1].segment(1000), second9 = flows[8].segment(1000), second1 = flows[0].segment(1000)
        let run = coalesce(firsts + [second2, second9, second1])
        var expected = firsts.map { merged([$0]) }
        expected[1] = merged([firsts[1], second2])
        expected[8] = merged([firsts[8], second9])
        expected.append(merged([second1]))
        #expect(run.writes == expected)
        #expect(run.coalesced == 2)
    }

    @Test func aFullPlanRefusesMorePackets() {
        var a = Flow(port: 1)
        let segs = (0..<4).map { _ in a.segment(100) }
        let run = coalesce(segs, maxPackets: 3)
        #expect(run.accepted == 3)
        #expect(run.writes == [merged(Array(segs[0..<3]))])
    }

    @Test func resetStartsAnEmptyBatchAndWritesNeedFinish() {
        var a = Flow(port: 1)
        var packet = a.segment(100)
        var plan = CoalescingPlan(maxPackets: 1)
        packet.withUnsafeMutableBytes { p in
            let first = plan.add(p.baseAddress!, length: p.count)
            let second = plan.add(p.baseAddress!, length: p.count)
            #expect(first && !second)
            let beforeFinish = plan.write(0).count
            #expect(beforeFinish == 0)
            plan.finish()
            let (count, bytes) = (plan.write(0).count, plan.write(0).bytes)
            #expect(plan.writeCount == 1 && count == 2 && bytes == 10 + p.count)
            let (past, negative) = (plan.write(1).count, plan.write(-1).count)
            #expect(past == 0 && negative == 0)
            let afterFinish = plan.add(p.baseAddress!, length: p.count)
            #expect(!afterFinish)
            plan.reset()
            #expect(plan.writeCount == 0 && plan.coalescedSegments == 0)
            let afterReset = plan.add(p.baseAddress!, length: p.count)
            #expect(afterReset)
        }
        let empty = CoalescingPlan(maxPackets: 0)
        #expect(empty.writeCount == 0)
    }
}

@Suite struct UDPCoalescingTests {
    @Test(arguments: [false, true])
    func splitThenCoalesceGivesBackTheUDPSuperPacket(ipv6: Bool) throws {
        var spec = PacketSpec(ipv6: ipv6, udp: true)
        spec.payload = SplitMix64(seed: 21).bytesArray(15_000)
        let original = spec.bytes(.pseudoOnly)
        let header = spec.virtio(gsoSize: 1000)
        let (result, output, _) = runSplit(original, header: header)
        let s = try result.get()
        let wire = segments(of: output, s)
        #expect(wire.count == 15)
        let run = coalesce(wire)
        #expect(run.writes.count == 1)
        #expect(run.coalesced == 14)
        #expect(mismatch(run.writes.first?.packet ?? [], original) == nil)
        #expect(run.writes.first?.header == header)
        #expect(run.iovecsInBounds && run.guardsIntact)
        // What the kernel gets splits back into the datagrams that arrived.
        let (again, againOutput, _) = runSplit(run.writes[0].packet, header: run.writes[0].header)
        #expect(mismatch(segments(of: againOutput, try again.get()), wire) == nil)
    }

    @Test func aShorterDatagramEndsItsGroupAndALongerOneStartsAnother() throws {
        func datagram(_ size: Int, id: UInt16) -> [UInt8] {
            var spec = PacketSpec(udp: true)
            spec.id = id
            spec.payload = Array(repeating: UInt8(truncatingIfNeeded: size), count: size)
            return spec.bytes()
        }
        let a = datagram(500, id: 1), b = datagram(500, id: 2), c = datagram(300, id: 3)
        let d = datagram(500, id: 4), e = datagram(800, id: 5)
        let run = coalesce([a, b, c, d, e])
        #expect(run.writes.count == 3)
        // a, b, c in one super-packet; d starts a group that e (longer) cannot join, so both
        // go alone, with a zero header.
        #expect(run.writes.map(\.header.gsoType) == [VirtioNetHeader.GSOType.udpL4.rawValue, 0, 0])
        #expect(run.writes[0].header.gsoSize == 500)
        let (split0, out0, _) = runSplit(run.writes[0].packet, header: run.writes[0].header)
        #expect(mismatch(segments(of: out0, try split0.get()), [a, b, c]) == nil)
        #expect(run.writes[1].packet == d && run.writes[2].packet == e)
        #expect(run.iovecsInBounds && run.guardsIntact)
    }
}

@Suite struct IPv6CoalescingTests {
    /// Segments of one TCP flow over IPv6, cut by hand.
    static func flowSegments(_ count: Int, change: (Int, inout PacketSpec) -> Void = { _, _ in }) -> [[UInt8]] {
        (0..<count).map { i in
            var s = PacketSpec(
                ipv6: true,
                sequence: 5000 + UInt32(i * 1200),
                tcpOptions: [1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 8]
            )
            s.payload = (0..<1200).map { UInt8(truncatingIfNeeded: i &* 31 &+ $0) }
            change(i, &s)
            return s.bytes()
        }
    }

    @Test func tcpSegmentsOverIPv6BecomeOneTCPv6SuperPacket() throws {
        let wire = Self.flowSegments(5)
        let run = coalesce(wire)
        #expect(run.writes.count == 1 && run.coalesced == 4)
        #expect(run.writes[0].header == gsoHeader(wire))
        #expect(run.writes[0].header.gso == .tcpv6 && run.writes[0].header.checksumStart == 40)
        #expect(mismatch(run.writes[0].packet, expectedSuperPacket(wire)) == nil)
        let (again, out, _) = runSplit(run.writes[0].packet, header: run.writes[0].header)
        #expect(mismatch(segments(of: out, try again.get()), wire) == nil)
    }

    @Test func aDifferentFlowLabelTrafficClassOrHopLimitKeepsSegmentsApart() {
        let changes: [(String, (inout PacketSpec) -> Void)] = [
            ("flow label", { $0.flowLabel ^= 1 }),
            ("traffic class", { $0.tos = 0x20 }),
            ("hop limit", { $0.ttl = 63 }),
        ]
        for (name, change) in changes {
            let wire = Self.flowSegments(3) { i, s in if i == 1 { change(&s) } }
            let run = coalesce(wire)
            #expect(run.writes.count == 3, "\(name)")
            #expect(run.writes.allSatisfy { $0.header == VirtioNetHeader() }, "\(name)")
        }
    }

    @Test func anIPv4AndAnIPv6FlowWithTheSamePortsStayApart() {
        var v4 = PacketSpec(sequence: 5000 + 1200, tcpOptions: [1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 8])
        v4.payload = Array(repeating: 1, count: 1200)
        let wire = Self.flowSegments(1) + [v4.bytes()]
        let run = coalesce(wire)
        #expect(run.writes.count == 2 && run.coalesced == 0)
    }

    @Test func aCorruptSegmentOrAnExtensionHeaderIsNotMerged() {
        var wire = Self.flowSegments(3)
        wire[1][200] ^= 0xff
        #expect(coalesce(wire).writes.count == 3)
        // A hop-by-hop options header (next header 0) in front of TCP: not parsed, not merged.
        var withExtension = Self.flowSegments(3)
        withExtension[1][6] = 0
        #expect(coalesce(withExtension).writes.count == 3)
    }

    @Test func aUDPDatagramOverIPv6WithoutChecksumIsNeverMerged() {
        // IPv6 makes the UDP checksum mandatory: a zero one is not valid, so the datagram starts
        // no group (the kernel drops it after the write).
        func datagram(_ checksum: L4Checksum) -> [UInt8] {
            var s = PacketSpec(ipv6: true, udp: true)
            s.payload = Array(repeating: 7, count: 800)
            return s.bytes(checksum)
        }
        let run = coalesce([datagram(.zero), datagram(.full), datagram(.full)])
        #expect(run.writes.count == 2)
        #expect(run.writes[0].header == VirtioNetHeader())
        #expect(run.writes[1].header.gso == .udpL4 && run.writes[1].header.checksumStart == 40)
    }
}

@Suite struct UncoalescedPlanTests {
    /// For a TUN without a virtio header: the same plan, one write per packet, nothing changed.
    @Test func withoutCoalescingEveryPacketIsWrittenAloneAndUntouched() {
        var a = Flow(port: 1)
        let segments = (0..<5).map { _ in a.segment(1000) }
        var plan = CoalescingPlan(maxPackets: 8, coalesce: false)
        let buffers = segments.map { bytes -> UnsafeMutableRawBufferPointer in
            let b = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes.count, alignment: 8)
            b.copyBytes(from: bytes)
            return b
        }
        defer { buffers.forEach { $0.deallocate() } }
        for b in buffers {
            let added = plan.add(b.baseAddress!, length: b.count)
            #expect(added)
        }
        plan.finish()
        let (writes, coalesced) = (plan.writeCount, plan.coalescedSegments)
        #expect(writes == 5)
        #expect(coalesced == 0)
        for (i, original) in segments.enumerated() {
            let write = plan.write(i)
            let header = plan.header(i)
            #expect(write.count == 2)
            #expect(header == VirtioNetHeader())
            #expect(
                Array(UnsafeRawBufferPointer(start: write.iovecs[1].iov_base, count: write.iovecs[1].iov_len))
                    == original
            )
        }
    }
}
