import Offload
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// One table case: a super-packet, how it is described, and what must come out.
struct SplitCase: CustomTestStringConvertible, Sendable {
    var name: String
    var spec: PacketSpec
    var gsoSize: Int

    var testDescription: String { name }

    static let all: [SplitCase] = {
        var rng = SplitMix64(seed: 7)
        let payload = rng.bytes(4000)
        let base = PacketSpec(flags: 0x10, payload: payload)
        var cases: [SplitCase] = []
        cases.append(SplitCase(name: "TCP without options", spec: base, gsoSize: 1460))
        var s = base
        s.tcpOptions = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]
        cases.append(SplitCase(name: "TCP with timestamp options", spec: s, gsoSize: 1448))
        s = base
        s.ipOptions = [0x94, 0x04, 0x00, 0x00, 0x01, 0x01, 0x01, 0x00]
        cases.append(SplitCase(name: "IP options", spec: s, gsoSize: 1000))
        s = base
        s.flags = 0x19
        cases.append(SplitCase(name: "FIN and PSH on the super-packet", spec: s, gsoSize: 1460))
        s = base
        s.flags = 0x90 | 0x40
        cases.append(SplitCase(name: "CWR and ECE", spec: s, gsoSize: 1460))
        s = base
        s.payload = Array(payload[0..<1460])
        s.flags = 0x18
        cases.append(SplitCase(name: "exactly one segment", spec: s, gsoSize: 1460))
        s = base
        s.payload = Array(payload[0..<100])
        cases.append(SplitCase(name: "less than one segment", spec: s, gsoSize: 1460))
        s = base
        s.payload = Array(payload[0..<2920])
        cases.append(SplitCase(name: "last segment full", spec: s, gsoSize: 1460))
        s = base
        s.payload = Array(payload[0..<2921])
        cases.append(SplitCase(name: "last segment one byte", spec: s, gsoSize: 1460))
        s = base
        s.payload = []
        s.flags = 0x11
        cases.append(SplitCase(name: "no payload", spec: s, gsoSize: 1460))
        s = base
        s.sequence = 0xffff_fe00
        s.id = 0xfffe
        cases.append(SplitCase(name: "sequence and ID wrap", spec: s, gsoSize: 1460))
        s = base
        s.udp = true
        cases.append(SplitCase(name: "UDP L4", spec: s, gsoSize: 1472))
        s.ipOptions = [1, 1, 1, 0]
        s.payload = Array(payload[0..<3001])
        cases.append(SplitCase(name: "UDP L4 with IP options, odd payload", spec: s, gsoSize: 1000))
        // IPv6 (TSO6 and USO for IPv6): no ID or header checksum, the payload length per segment.
        s = base
        s.ipv6 = true
        cases.append(SplitCase(name: "TCP over IPv6", spec: s, gsoSize: 1440))
        s.tcpOptions = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]
        s.flags = 0x19 | 0x80
        s.payload = Array(payload[0..<2881])
        cases.append(SplitCase(name: "TCP over IPv6 with options, FIN, PSH and CWR", spec: s, gsoSize: 1428))
        s = base
        s.ipv6 = true
        s.payload = Array(payload[0..<100])
        cases.append(SplitCase(name: "TCP over IPv6, less than one segment", spec: s, gsoSize: 1440))
        s = base
        s.ipv6 = true
        s.udp = true
        s.payload = Array(payload[0..<3001])
        cases.append(SplitCase(name: "UDP L4 over IPv6, odd payload", spec: s, gsoSize: 1452))
        return cases
    }()
}

@Suite struct SegmentationTests {
    @Test(arguments: SplitCase.all)
    func superPacketSplitsIntoTheModelSegments(_ c: SplitCase) throws {
        // The kernel leaves the pseudo-header sum in the checksum field (NEEDS_CSUM).
        let packet = c.spec.bytes(.pseudoOnly)
        let (result, output, intact) = runSplit(packet, header: c.spec.virtio(gsoSize: c.gsoSize))
        #expect(intact)
        let s = try result.get()
        let expected = modelSplit(packet, gsoSize: c.gsoSize)
        #expect(s.count == expected.count)
        #expect(s.totalLength == expected.reduce(0) { $0 + $1.count })
        #expect(s.segmentLength == expected[0].count)
        let got = segments(of: output, s)
        #expect(mismatch(got, expected) == nil)
        let parsed = got.map(parseChecked)
        #expect(parsed.allSatisfy { $0 != nil })
        #expect(mismatch(parsed.flatMap { $0?.payload ?? [] }, c.spec.payload) == nil)
        if !c.spec.udp {
            let flags = parsed.map { $0?.flags ?? 0 }
            #expect(flags.dropLast().allSatisfy { $0 & 0x09 == 0 })
            #expect(flags.last == c.spec.flags & (expected.count == 1 ? 0xff : 0x7f))
            #expect(flags.first! & 0x80 == c.spec.flags & 0x80)
            #expect(flags.dropFirst().allSatisfy { $0 & 0x80 == 0 })
        }
    }

    @Test func packetWithoutGSOIsCopiedAndItsChecksumCompleted() throws {
        let spec = PacketSpec(flags: 0x18, payload: Array(0..<200))
        let packet = spec.bytes(.pseudoOnly)
        let header = VirtioNetHeader(flags: VirtioNetHeader.needsChecksum, checksumStart: 20, checksumOffset: 16)
        let (result, output, intact) = runSplit(packet, header: header, capacity: packet.count)
        #expect(intact)
        #expect(try result.get() == SegmentedPacket(segmentLength: packet.count, count: 1, totalLength: packet.count))
        #expect(mismatch(output, spec.bytes(.full)) == nil)
    }

    @Test func packetWithoutGSOOrChecksumIsCopiedUnchanged() throws {
        let packet = SplitMix64(seed: 3).bytesArray(333)
        let (result, output, intact) = runSplit(packet, header: VirtioNetHeader(), capacity: 333)
        #expect(intact)
        #expect(try result.get().count == 1)
        #expect(mismatch(output, packet) == nil)
    }

    @Test func completeChecksumFillsAUDPChecksumInPlace() {
        let spec = PacketSpec(udp: true, payload: Array(repeating: 9, count: 77))
        var packet = spec.bytes(.pseudoOnly)
        let ok = packet.withUnsafeMutableBytes {
            Segmentation.completeChecksum(
                $0.baseAddress!,
                length: $0.count,
                header: VirtioNetHeader(flags: 1, checksumStart: 20, checksumOffset: 6)
            )
        }
        #expect(ok)
        #expect(packet == spec.bytes(.full))
        #expect(parseChecked(packet) != nil)
    }

    @Test func completeChecksumRefusesPositionsOutsideThePacket() {
        var packet = PacketSpec(payload: [1, 2, 3]).bytes()
        let before = packet
        for (start, offset) in [(43, 0), (20, 22), (42, 0), (0, 42), (65535, 65535), (41, 1)] {
            let ok = packet.withUnsafeMutableBytes {
                Segmentation.completeChecksum(
                    $0.baseAddress!,
                    length: $0.count,
                    header: VirtioNetHeader(flags: 1, checksumStart: UInt16(start), checksumOffset: UInt16(offset))
                )
            }
            #expect(!ok, "start \(start) offset \(offset)")
        }
        #expect(packet == before)
    }

    // MARK: Malformed input

    static let goodSpec = PacketSpec(payload: Array(repeating: 0x5a, count: 3000))

    static func mutated(_ change: (inout [UInt8]) -> Void) -> [UInt8] {
        var b = goodSpec.bytes(.pseudoOnly)
        change(&b)
        return b
    }

    static let goodSpec6 = PacketSpec(ipv6: true, payload: Array(repeating: 0x5a, count: 3000))
    static let good6 = goodSpec6.bytes(.pseudoOnly)

    static func mutated6(_ change: (inout [UInt8]) -> Void) -> [UInt8] {
        var b = good6
        change(&b)
        return b
    }

    @Test func malformedSuperPacketsAreRefused() {
        let header = Self.goodSpec.virtio(gsoSize: 1460)
        let good = Self.goodSpec.bytes(.pseudoOnly)
        let cases: [(String, [UInt8], VirtioNetHeader, OffloadError)] = [
            ("truncated IP header", Array(good[0..<19]), header, .malformed),
            ("truncated TCP header", Self.mutated { put16(&$0, 2, 30) }.prefix(30).map { $0 }, header, .malformed),
            ("not IPv4", Self.mutated { $0[0] = 0x65 }, header, .malformed),
            ("IHL below 5", Self.mutated { $0[0] = 0x44 }, header, .malformed),
            (
                "IHL past the packet",
                Self.mutated {
                    put16(&$0, 2, 40); $0[0] = 0x4f
                }.prefix(40).map { $0 }, header, .malformed
            ),
            (
                "total length beyond the buffer", Self.mutated { put16(&$0, 2, UInt16(good.count + 1)) }, header,
                .malformed
            ),
            ("total length below the IP header", Self.mutated { put16(&$0, 2, 10) }, header, .malformed),
            ("TCP data offset below 5", Self.mutated { $0[32] = 0x40 }, header, .malformed),
            (
                "TCP data offset past the packet",
                Self.mutated { put16(&$0, 2, 50) }.prefix(50).map { $0 }.withDataOffset(15), header, .malformed
            ),
            ("fragment", Self.mutated { put16(&$0, 6, 0x2000) }, header, .malformed),
            ("protocol is UDP for a TCP GSO type", Self.mutated { $0[9] = 17 }, header, .malformed),
            ("gsoSize 0", good, Self.goodSpec.virtio(gsoSize: 0), .malformed),
            (
                "headerLength beyond the packet", good,
                VirtioNetHeader(
                    flags: 1,
                    gsoType: 1,
                    headerLength: 9999,
                    gsoSize: 1460,
                    checksumStart: 20,
                    checksumOffset: 16
                ), .malformed
            ),
            (
                "checksum start not at TCP", good,
                VirtioNetHeader(
                    flags: 1,
                    gsoType: 1,
                    headerLength: 40,
                    gsoSize: 1460,
                    checksumStart: 24,
                    checksumOffset: 16
                ), .badChecksumPosition
            ),
            (
                "checksum offset not at TCP's", good,
                VirtioNetHeader(
                    flags: 1,
                    gsoType: 1,
                    headerLength: 40,
                    gsoSize: 1460,
                    checksumStart: 20,
                    checksumOffset: 6
                ), .badChecksumPosition
            ),
            (
                "TCPv6 GSO type on an IPv4 packet", good,
                VirtioNetHeader(
                    flags: 1,
                    gsoType: 4,
                    headerLength: 40,
                    gsoSize: 1460,
                    checksumStart: 20,
                    checksumOffset: 16
                ), .malformed
            ),
            ("IP version 5", Self.mutated { $0[0] = 0x55 }, header, .malformed),
            ("TCPv4 GSO type on an IPv6 packet", Self.good6, header, .malformed),
            (
                "IPv6 with an extension header", Self.mutated6 { $0[6] = 0 }, Self.goodSpec6.virtio(gsoSize: 1440),
                .malformed
            ),
            (
                "IPv6 payload length beyond the buffer", Self.mutated6 { put16(&$0, 4, UInt16($0.count - 39)) },
                Self.goodSpec6.virtio(gsoSize: 1440), .malformed
            ),
            (
                "IPv6 truncated header", Array(Self.good6[0..<39]), Self.goodSpec6.virtio(gsoSize: 1440), .malformed
            ),
            (
                "IPv6 checksum start not at TCP", Self.good6,
                VirtioNetHeader(
                    flags: 1,
                    gsoType: 4,
                    headerLength: 60,
                    gsoSize: 1440,
                    checksumStart: 20,
                    checksumOffset: 16
                ), .badChecksumPosition
            ),
            (
                "UFO", good,
                VirtioNetHeader(
                    flags: 1,
                    gsoType: 3,
                    headerLength: 28,
                    gsoSize: 1460,
                    checksumStart: 20,
                    checksumOffset: 6
                ), .unsupportedGSOType
            ),
            ("unknown GSO type", good, VirtioNetHeader(gsoType: 9), .unsupportedGSOType),
            (
                "no-GSO checksum past the end", good,
                VirtioNetHeader(flags: 1, checksumStart: UInt16(good.count - 1), checksumOffset: 0),
                .badChecksumPosition
            ),
            (
                "no-GSO checksum start past the end", good,
                VirtioNetHeader(flags: 1, checksumStart: 4000, checksumOffset: 0), .badChecksumPosition
            ),
        ]
        for (name, packet, header, error) in cases {
            let (result, _, intact) = runSplit(packet, header: header)
            #expect(result == .failure(error), "\(name)")
            #expect(intact, "\(name)")
        }
    }

    @Test func tooSmallOutputIsRefusedWithoutWritingAByte() throws {
        let packet = Self.goodSpec.bytes(.pseudoOnly)
        // 3 segments: 3 * 40 + 3000 bytes needed.
        let (result, output, intact) = runSplit(
            packet,
            header: Self.goodSpec.virtio(gsoSize: 1460),
            capacity: 3 * 40 + 3000 - 1
        )
        #expect(result == .failure(.doesNotFit))
        #expect(intact && output.isEmpty)
        let (exact, _, exactIntact) = runSplit(
            packet,
            header: Self.goodSpec.virtio(gsoSize: 1460),
            capacity: 3 * 40 + 3000
        )
        #expect(exactIntact)
        #expect(try exact.get().count == 3)
        let (copy, _, _) = runSplit(packet, header: VirtioNetHeader(), capacity: packet.count - 1)
        #expect(copy == .failure(.doesNotFit))
    }

    @Test func moreSegmentsThanAllowedAreRefused() {
        let packet = Self.goodSpec.bytes(.pseudoOnly)
        #expect(
            runSplit(packet, header: Self.goodSpec.virtio(gsoSize: 100), maxSegments: 29).result
                == .failure(.tooManySegments)
        )
        #expect(
            (try? runSplit(packet, header: Self.goodSpec.virtio(gsoSize: 100), maxSegments: 30).result.get().count)
                == 30
        )
        #expect(runSplit(packet, header: VirtioNetHeader(), maxSegments: 0).result == .failure(.tooManySegments))
    }

    @Test func trailingBytesAfterTheIPTotalLengthAreIgnored() throws {
        let packet = Self.goodSpec.bytes(.pseudoOnly)
        let (result, output, _) = runSplit(packet + [1, 2, 3], header: Self.goodSpec.virtio(gsoSize: 1460))
        let s = try result.get()
        #expect(mismatch(segments(of: output, s), modelSplit(packet, gsoSize: 1460)) == nil)
    }

    @Test func aFullSizeSplitIsSentInTwoUDPSegmentSends() throws {
        var spec = PacketSpec()
        spec.payload = [UInt8](repeating: 1, count: 65535 - 40)
        let (result, _, _) = runSplit(spec.bytes(.pseudoOnly), header: spec.virtio(gsoSize: 1448))
        let s = try result.get()
        #expect(s.count == 46 && s.totalLength > SegmentedPacket.maxUDPPayload)
        let perSend = s.segmentsPerSend()
        #expect(perSend == 44 && perSend * s.segmentLength <= SegmentedPacket.maxUDPPayload)
        #expect(s.segmentsPerSend(maxSegments: 16) == 16)
        #expect(SegmentedPacket(segmentLength: 100, count: 3, totalLength: 250).segmentsPerSend() == 3)
        #expect(SegmentedPacket(segmentLength: 0, count: 1, totalLength: 0).segmentsPerSend() == 1)
    }

    // MARK: Against the model

    @Test func randomSuperPacketsSplitExactlyLikeTheModel() throws {
        var rng = SplitMix64(seed: 0x5EED_0001)
        for iteration in 0..<150 {
            let (spec, mss) = randomSuperPacket(using: &rng)
            let packet = spec.bytes(.pseudoOnly)
            let (result, output, intact) = runSplit(packet, header: spec.virtio(gsoSize: mss), maxSegments: 1024)
            #expect(intact)
            let s = try result.get()
            let got = segments(of: output, s)
            let expected = modelSplit(packet, gsoSize: mss)
            #expect(mismatch(got, expected) == nil, "iteration \(iteration)")
            let parsed = got.compactMap(parseChecked)
            #expect(parsed.count == got.count, "iteration \(iteration): a segment does not verify")
            #expect(mismatch(parsed.flatMap(\.payload), spec.payload) == nil, "iteration \(iteration)")
            for (i, p) in parsed.enumerated() {
                #expect(p.id == (spec.ipv6 ? 0 : spec.id &+ UInt16(truncatingIfNeeded: i)))
                if !spec.udp { #expect(p.sequence == spec.sequence &+ UInt32(i * mss)) }
            }
            #expect(got.dropLast().allSatisfy { $0.count == s.segmentLength } && got.last!.count <= s.segmentLength)
        }
    }
}

extension SplitMix64 {
    func bytesArray(_ count: Int) -> [UInt8] {
        var copy = self
        return copy.bytes(count)
    }
}

extension Array where Element == UInt8 {
    func withDataOffset(_ words: UInt8) -> [UInt8] {
        var b = self
        b[32] = words << 4
        return b
    }
}

@Suite struct GatheredSplitTests {
    /// The gathered split must send exactly the bytes the copying split lays out.
    @Test func gatheredSegmentsAreByteForByteTheCopiedOnes() throws {
        var rng = SplitMix64(seed: 0x5EED_0A7E)
        for iteration in 0..<120 {
            let (spec, mss) = randomSuperPacket(using: &rng)
            let packet = spec.bytes(.pseudoOnly)
            let header = spec.virtio(gsoSize: mss)
            let (copied, output, _) = runSplit(packet, header: header, maxSegments: 1024)
            let expected = segments(of: output, try copied.get()).flatMap { $0 }

            let headerRoom = 1024 * 120
            let headers = UnsafeMutableRawPointer.allocate(byteCount: headerRoom, alignment: 8)
            defer { headers.deallocate() }
            let iovecs = UnsafeMutablePointer<iovec>.allocate(capacity: 2048)
            defer { iovecs.deallocate() }
            let result = packet.withUnsafeBytes { raw in
                Segmentation.splitGathered(
                    raw.baseAddress!,
                    length: raw.count,
                    header: header,
                    headers: headers,
                    headerCapacity: headerRoom,
                    iovecs: iovecs,
                    iovecCapacity: 2048,
                    maxSegments: 1024
                )
                .map { s -> ([UInt8], SegmentedPacket) in
                    var bytes: [UInt8] = []
                    for i in 0..<(2 * s.count) {
                        let v = iovecs[i]
                        bytes += UnsafeRawBufferPointer(start: v.iov_base, count: v.iov_len)
                    }
                    return (bytes, s)
                }
            }
            let (gathered, s) = try result.get()
            #expect(s == (try copied.get()), "iteration \(iteration)")
            #expect(mismatch(gathered, expected) == nil, "iteration \(iteration)")
        }
    }

    @Test func aPacketWithoutGSOIsNotGathered() {
        let packet = PacketSpec().bytes()
        let headers = UnsafeMutableRawPointer.allocate(byteCount: 256, alignment: 8)
        defer { headers.deallocate() }
        let iovecs = UnsafeMutablePointer<iovec>.allocate(capacity: 4)
        defer { iovecs.deallocate() }
        let result = packet.withUnsafeBytes {
            Segmentation.splitGathered(
                $0.baseAddress!,
                length: $0.count,
                header: VirtioNetHeader(),
                headers: headers,
                headerCapacity: 256,
                iovecs: iovecs,
                iovecCapacity: 4,
                maxSegments: 64
            )
        }
        #expect(result == .failure(.unsupportedGSOType))
    }

    @Test func tooFewIovecsAreRefusedBeforeAnythingIsWritten() {
        var spec = PacketSpec()
        spec.payload = Array(repeating: 7, count: 5000)
        let packet = spec.bytes(.pseudoOnly)
        let headers = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 8)
        defer { headers.deallocate() }
        let iovecs = UnsafeMutablePointer<iovec>.allocate(capacity: 7)
        defer { iovecs.deallocate() }
        let result = packet.withUnsafeBytes {
            Segmentation.splitGathered(
                $0.baseAddress!,
                length: $0.count,
                header: spec.virtio(gsoSize: 1000),
                headers: headers,
                headerCapacity: 4096,
                iovecs: iovecs,
                iovecCapacity: 7,
                maxSegments: 64
            )
        }
        #expect(result == .failure(.doesNotFit))
    }
}

/// A random TCP or UDP super-packet over IPv4 or IPv6 (options, flags, addresses, 1…65000
/// bytes of payload) and an MSS to split it with.
func randomSuperPacket(using rng: inout SplitMix64) -> (PacketSpec, Int) {
    var spec = PacketSpec()
    spec.udp = Int.random(in: 0..<4, using: &rng) == 0
    spec.ipv6 = Int.random(in: 0..<3, using: &rng) == 0
    if spec.ipv6 {
        spec.source6 = UInt128.random(in: 0...UInt128.max, using: &rng)
        spec.destination6 = UInt128.random(in: 0...UInt128.max, using: &rng)
        spec.flowLabel = UInt32.random(in: 0...0xf_ffff, using: &rng)
    } else {
        spec.ipOptions = rng.bytes(4 * Int.random(in: 0...(Bool.random(using: &rng) ? 0 : 10), using: &rng))
    }
    if !spec.udp { spec.tcpOptions = rng.bytes(4 * Int.random(in: 0...10, using: &rng)) }
    spec.id = UInt16.random(in: 0...0xffff, using: &rng)
    spec.sequence = UInt32.random(in: 0...UInt32.max, using: &rng)
    spec.flags = UInt8.random(in: 0...255, using: &rng)
    spec.source = UInt32.random(in: 0...UInt32.max, using: &rng)
    spec.destination = UInt32.random(in: 0...UInt32.max, using: &rng)
    spec.payload = rng.bytes(Int.random(in: 1...min(65000, 65535 - spec.headerLength), using: &rng))
    return (spec, Int.random(in: 88...1460, using: &rng))
}
