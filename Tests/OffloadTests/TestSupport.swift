import FuzzSupport
import Offload

/// SplitMix64: small, seeded, so every random failure is reproducible from its seed.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9e37_79b9_7f4a_7c15
        var z = state
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }
    mutating func bytes(_ count: Int) -> [UInt8] {
        (0..<count).map { _ in UInt8.random(in: 0...255, using: &self) }
    }
}

/// RFC 1071 one byte pair at a time: FuzzSupport's slow model.
func slowSum(_ bytes: ArraySlice<UInt8>, initial: UInt32 = 0) -> UInt16 { Slow.sum(bytes, initial: initial) }

func slowSum(_ bytes: [UInt8], initial: UInt32 = 0) -> UInt16 { slowSum(bytes[...], initial: initial) }

/// The pseudo-header sum of an IPv4 packet (addresses at 12..<20) or an IPv6 one (8..<40).
func slowPseudo(_ packet: [UInt8], protocolNumber: UInt8, length: Int) -> UInt32 {
    let addresses = packet[0] >> 4 == 6 ? 8..<40 : 12..<20
    let words = stride(from: addresses.lowerBound, to: addresses.upperBound, by: 2).map {
        UInt32(packet[$0]) << 8 | UInt32(packet[$0 + 1])
    }
    return words.reduce(0, +) + UInt32(protocolNumber) + UInt32(length)
}

/// The IP header length of a packet the tests build: IPv4's from its IHL, IPv6's fixed 40.
func ipHeaderLength(_ b: [UInt8]) -> Int { b[0] >> 4 == 6 ? 40 : Int(b[0] & 0xf) * 4 }

/// The L4 protocol of a packet the tests build (IPv6: its next header).
func l4Protocol(_ b: [UInt8]) -> UInt8 { b[0] >> 4 == 6 ? b[6] : b[9] }

func be16(_ b: [UInt8], _ o: Int) -> UInt16 { UInt16(b[o]) << 8 | UInt16(b[o + 1]) }
func be32(_ b: [UInt8], _ o: Int) -> UInt32 { UInt32(be16(b, o)) << 16 | UInt32(be16(b, o + 2)) }
func put16(_ b: inout [UInt8], _ o: Int, _ v: UInt16) { b[o] = UInt8(v >> 8); b[o + 1] = UInt8(v & 0xff) }
func put32(_ b: inout [UInt8], _ o: Int, _ v: UInt32) {
    put16(&b, o, UInt16(v >> 16)); put16(&b, o + 2, UInt16(v & 0xffff))
}

enum L4Checksum { case full, pseudoOnly, zero }

/// One IPv4 or IPv6 TCP or UDP packet, built byte by byte.
struct PacketSpec {
    var source: UInt32 = 0x0a01_0002
    var destination: UInt32 = 0x0a02_0003
    /// IPv6 instead of IPv4 (no options, no extension headers): `source6`/`destination6`,
    /// `tos` as the traffic class, `ttl` as the hop limit; no ID or DF.
    var ipv6 = false
    var source6: UInt128 = 0xfd00_0010_0244_0001_0000_0000_0000_0002
    var destination6: UInt128 = 0xfd00_0010_0244_0002_0000_0000_0000_0003
    var flowLabel: UInt32 = 0x1_2345
    var id: UInt16 = 0x1234
    var ttl: UInt8 = 64
    var tos: UInt8 = 0
    var dontFragment = true
    var ipOptions: [UInt8] = []
    var udp = false
    var sourcePort: UInt16 = 40000
    var destinationPort: UInt16 = 5201
    var sequence: UInt32 = 1000
    var ack: UInt32 = 77
    var flags: UInt8 = 0x10
    var window: UInt16 = 512
    var tcpOptions: [UInt8] = []
    var payload: [UInt8] = []

    var ipHeaderLength: Int { ipv6 ? 40 : 20 + ipOptions.count }
    var l4HeaderLength: Int { udp ? 8 : 20 + tcpOptions.count }
    var headerLength: Int { ipHeaderLength + l4HeaderLength }

    func bytes(_ checksum: L4Checksum = .full) -> [UInt8] {
        precondition(ipOptions.count % 4 == 0 && tcpOptions.count % 4 == 0)
        var b = [UInt8](repeating: 0, count: headerLength + payload.count)
        if ipv6 {
            precondition(ipOptions.isEmpty)
            put32(&b, 0, 6 << 28 | UInt32(tos) << 20 | flowLabel & 0xf_ffff)
            put16(&b, 4, UInt16(truncatingIfNeeded: b.count - 40))
            b[6] = udp ? 17 : 6
            b[7] = ttl
            for i in 0..<16 {
                b[8 + i] = UInt8(truncatingIfNeeded: source6 >> (120 - 8 * i))
                b[24 + i] = UInt8(truncatingIfNeeded: destination6 >> (120 - 8 * i))
            }
        } else {
            b[0] = 0x40 | UInt8(ipHeaderLength / 4)
            b[1] = tos
            put16(&b, 2, UInt16(b.count))
            put16(&b, 4, id)
            put16(&b, 6, dontFragment ? 0x4000 : 0)
            b[8] = ttl
            b[9] = udp ? 17 : 6
            put32(&b, 12, source)
            put32(&b, 16, destination)
            b.replaceSubrange(20..<ipHeaderLength, with: ipOptions)
            put16(&b, 10, ~slowSum(b[0..<ipHeaderLength]))
        }
        let l4 = ipHeaderLength
        put16(&b, l4, sourcePort)
        put16(&b, l4 + 2, destinationPort)
        if udp {
            put16(&b, l4 + 4, UInt16(truncatingIfNeeded: b.count - l4))
        } else {
            put32(&b, l4 + 4, sequence)
            put32(&b, l4 + 8, ack)
            b[l4 + 12] = UInt8(l4HeaderLength / 4) << 4
            b[l4 + 13] = flags
            put16(&b, l4 + 14, window)
            b.replaceSubrange(l4 + 20..<l4 + l4HeaderLength, with: tcpOptions)
        }
        b.replaceSubrange(headerLength..<b.count, with: payload)
        let at = l4 + (udp ? 6 : 16)
        let pseudo = slowPseudo(b, protocolNumber: udp ? 17 : 6, length: b.count - l4)
        switch checksum {
        case .full:
            var c = ~slowSum(b[l4...], initial: pseudo)
            if udp && c == 0 { c = 0xffff }
            put16(&b, at, c)
        case .pseudoOnly:
            put16(&b, at, slowSum([], initial: pseudo))
        case .zero:
            break
        }
        return b
    }

    /// The virtio header the kernel puts before this packet as a GSO super-packet.
    func virtio(gsoSize: Int) -> VirtioNetHeader {
        VirtioNetHeader(
            flags: VirtioNetHeader.needsChecksum,
            gsoType: (udp ? VirtioNetHeader.GSOType.udpL4 : ipv6 ? .tcpv6 : .tcpv4).rawValue,
            headerLength: UInt16(headerLength),
            gsoSize: UInt16(gsoSize),
            checksumStart: UInt16(ipHeaderLength),
            checksumOffset: udp ? 6 : 16
        )
    }
}

/// What a parsed packet says, after its checksums were checked with the slow model.
struct ParsedPacket: Equatable {
    var ipHeaderLength: Int
    var l4HeaderLength: Int
    var id: UInt16
    var sequence: UInt32
    var flags: UInt8
    var payload: [UInt8]
}

/// Parses `b` as one complete IPv4 or IPv6 TCP/UDP packet; nil unless lengths and checksums
/// are right. An IPv6 packet's `id` is 0.
func parseChecked(_ b: [UInt8]) -> ParsedPacket? {
    guard b.count >= 20 else { return nil }
    let ihl = ipHeaderLength(b)
    if b[0] >> 4 == 6 {
        guard b.count >= 40, 40 + Int(be16(b, 4)) == b.count else { return nil }
    } else {
        guard b[0] >> 4 == 4, ihl >= 20, ihl <= b.count, Int(be16(b, 2)) == b.count else { return nil }
        guard slowSum(b[0..<ihl]) == 0xffff else { return nil }
    }
    let proto = l4Protocol(b)
    let udp = proto == 17
    let l4Length = b.count - ihl
    let pseudo = slowPseudo(b, protocolNumber: proto, length: l4Length)
    guard slowSum(b[ihl...], initial: pseudo) == 0xffff else { return nil }
    if udp {
        guard l4Length >= 8, Int(be16(b, ihl + 4)) == l4Length, be16(b, ihl + 6) != 0 else { return nil }
        return ParsedPacket(
            ipHeaderLength: ihl,
            l4HeaderLength: 8,
            id: b[0] >> 4 == 6 ? 0 : be16(b, 4),
            sequence: 0,
            flags: 0,
            payload: Array(b[(ihl + 8)...])
        )
    }
    guard proto == 6, l4Length >= 20 else { return nil }
    let doff = Int(b[ihl + 12] >> 4) * 4
    guard doff >= 20, ihl + doff <= b.count else { return nil }
    return ParsedPacket(
        ipHeaderLength: ihl,
        l4HeaderLength: doff,
        id: b[0] >> 4 == 6 ? 0 : be16(b, 4),
        sequence: be32(b, ihl + 4),
        flags: b[ihl + 13],
        payload: Array(b[(ihl + doff)...])
    )
}

/// The slow, obviously-right segmentation: arrays and the slow checksum.
func modelSplit(_ superPacket: [UInt8], gsoSize: Int) -> [[UInt8]] {
    let ihl = ipHeaderLength(superPacket)
    let ipv6 = superPacket[0] >> 4 == 6
    let udp = l4Protocol(superPacket) == 17
    let l4h = udp ? 8 : Int(superPacket[ihl + 12] >> 4) * 4
    let headers = Array(superPacket[0..<(ihl + l4h)])
    let payload = Array(superPacket[(ihl + l4h)...])
    let chunks: [ArraySlice<UInt8>] =
        payload.isEmpty
        ? [payload[...]]
        : stride(from: 0, to: payload.count, by: gsoSize).map { payload[$0..<min($0 + gsoSize, payload.count)] }
    return chunks.enumerated().map { i, chunk in
        var s = headers + chunk
        if ipv6 {
            put16(&s, 4, UInt16(s.count - 40))
        } else {
            put16(&s, 2, UInt16(s.count))
            put16(&s, 4, be16(headers, 4) &+ UInt16(truncatingIfNeeded: i))
            put16(&s, 10, 0)
            put16(&s, 10, ~slowSum(s[0..<ihl]))
        }
        let pseudo = slowPseudo(s, protocolNumber: l4Protocol(superPacket), length: s.count - ihl)
        if udp {
            put16(&s, ihl + 4, UInt16(s.count - ihl))
            put16(&s, ihl + 6, 0)
            let c = ~slowSum(s[ihl...], initial: pseudo)
            put16(&s, ihl + 6, c == 0 ? 0xffff : c)
        } else {
            put32(&s, ihl + 4, be32(headers, ihl + 4) &+ UInt32(i * gsoSize))
            var flags = headers[ihl + 13]
            if i != chunks.count - 1 { flags &= ~0x09 }
            if i != 0 { flags &= ~0x80 }
            s[ihl + 13] = flags
            put16(&s, ihl + 16, 0)
            put16(&s, ihl + 16, ~slowSum(s[ihl...], initial: pseudo))
        }
        return s
    }
}

let guardByte: UInt8 = 0xa5
let guardLength = 64

/// Runs `split` on a copy of `packet` with `guardLength` sentinel bytes after `capacity`
/// (and before the output); returns the result, the output bytes and whether the guards held.
func runSplit(
    _ packet: [UInt8],
    header: VirtioNetHeader,
    capacity: Int? = nil,
    maxSegments: Int = 256
) -> (result: Result<SegmentedPacket, OffloadError>, output: [UInt8], guardsIntact: Bool) {
    let room = capacity ?? (packet.count * 2 + 60 * 256)
    var out = [UInt8](repeating: guardByte, count: guardLength + room + guardLength)
    // The input also lives in an exact-size buffer so reads past it would be caught by ASan.
    let input = UnsafeMutableRawBufferPointer.allocate(byteCount: max(packet.count, 1), alignment: 1)
    defer { input.deallocate() }
    input.copyBytes(from: packet)
    let result = out.withUnsafeMutableBytes { o in
        Segmentation.split(
            UnsafeRawPointer(input.baseAddress!),
            length: packet.count,
            header: header,
            into: o.baseAddress! + guardLength,
            capacity: room,
            maxSegments: maxSegments
        )
    }
    let intact =
        out[0..<guardLength].allSatisfy { $0 == guardByte }
        && out[(guardLength + room)...].allSatisfy { $0 == guardByte }
    var produced: [UInt8] = []
    if case .success(let s) = result, s.totalLength <= room {
        produced = Array(out[guardLength..<(guardLength + s.totalLength)])
    }
    return (result, produced, intact)
}

/// Cuts the output of `split` into its packets.
func segments(of output: [UInt8], _ s: SegmentedPacket) -> [[UInt8]] {
    stride(from: 0, to: s.totalLength, by: max(s.segmentLength, 1)).map {
        Array(output[$0..<min($0 + s.segmentLength, s.totalLength)])
    }
}

/// nil when equal, else a short account of where the bytes differ. (`#expect(a == b)` on
/// whole packets makes Swift Testing diff them element by element on failure, which takes
/// minutes for 64 KiB buffers.)
func mismatch(_ a: [UInt8], _ b: [UInt8]) -> String? {
    if a == b { return nil }
    var i = 0
    while i < min(a.count, b.count), a[i] == b[i] { i += 1 }
    return "lengths \(a.count) and \(b.count), first difference at byte \(i)"
}

func mismatch(_ a: [[UInt8]], _ b: [[UInt8]]) -> String? {
    if a.count != b.count { return "\(a.count) packets, expected \(b.count)" }
    for (i, (x, y)) in zip(a, b).enumerated() {
        if let m = mismatch(x, y) { return "packet \(i): \(m)" }
    }
    return nil
}
