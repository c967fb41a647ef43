import FuzzSupport
import Testing
import UDPEncap

/// Random and mutated packets against the IPv4 checks and the in-place rewrites of the data
/// path. Inputs live in guarded memory (an inaccessible page right after, or right before,
/// the bytes), so a read or write outside them faults at once.
@Suite struct UDPEncapFuzzTests {
    /// A packet as the data path may meet it: valid (with options, padding, any protocol,
    /// fragments, odd sources), valid then mutated, or random bytes.
    static func packet(_ c: FuzzCase) -> [UInt8] {
        switch c.int(0..<10) {
        case 0: return c.bytes(c.int(0...80))
        default:
            let source = c.oneIn(8) ? c.pick([0, 0xffff_ffff, 0xe000_0001, 0xefff_fffe, 0x0a02_0001]) : c.u32()
            let proto: UInt8 = c.oneIn(3) ? 1 : c.pick([6, 17, 1, 47, c.byte()])
            var payload = c.bytes(c.int(0...(c.oneIn(4) ? 1400 : 60)))
            if proto == 1, !payload.isEmpty { payload[0] = c.pick([0, 3, 5, 8, 11, 12, 13, 14, 15, 16, 17, 18, 42]) }
            var b = Slow.ipv4(
                source: source,
                destination: c.u32(),
                proto: proto,
                ttl: c.pick([0, 1, 2, 64, 255, c.byte()]),
                flagsAndOffset: c.oneIn(4) ? c.u16() : c.pick([0, 0x4000, 0x2000]),
                id: c.u16(),
                tos: c.byte(),
                options: c.oneIn(4) ? c.bytes(4 * c.int(1...10)) : [],
                payload: payload
            )
            if c.oneIn(5) { b += c.bytes(c.int(1...8)) }  // padding after the total length
            if c.oneIn(3) { c.mutate(&b, focus: 24) }
            return b
        }
    }

    @Test func ipv4ValidationAgreesWithTheSlowModel() {
        let report = fuzz("ipv4ValidationAgreesWithTheSlowModel", seed: 0x1F_0001, iterations: 6000) { c, count in
            let bytes = Self.packet(c)
            let buffer = GuardedBuffer(bytes, atEnd: c.bool())
            let fast = IPv4Header.validate(buffer.base, length: bytes.count)
            let slow = Slow.validateIPv4(bytes)
            switch (fast, slow) {
            case (.success(let a), .success(let b)):
                c.expect(a == b, "validate says total \(a), the model \(b)")
                count("accepted")
            case (.failure(let a), .failure(let b)):
                c.expect("\(a)" == "\(b)" || String(describing: a) == Self.name(b), "defect \(a), the model \(b)")
                count("rejected")
            default:
                c.expect(false, "validate \(fast), the model \(slow)")
            }
        }
        report.expectReached("accepted", atLeast: 1000)
        report.expectReached("rejected", atLeast: 1000)
    }

    static func name(_ d: Slow.Defect) -> String {
        switch d {
        case .tooShort: PacketDefect.tooShort.description
        case .notIPv4: PacketDefect.notIPv4.description
        case .badHeaderLength: PacketDefect.badHeaderLength.description
        case .badTotalLength: PacketDefect.badTotalLength.description
        case .badChecksum: PacketDefect.badChecksum.description
        }
    }

    @Test func ttlDecrementKeepsTheHeaderValid() {
        let report = fuzz("ttlDecrementKeepsTheHeaderValid", seed: 0x1F_0002, iterations: 4000) { c, count in
            var bytes = Self.packet(c)
            guard case .success = Slow.validateIPv4(bytes) else { return }
            if bytes[8] < 2 { bytes[8] = UInt8(c.int(2...255)); Slow.fixIPv4Checksum(&bytes) }
            let buffer = GuardedBuffer(bytes, atEnd: c.bool())
            IPv4Header.decrementTTL(buffer.base)
            let after = buffer.bytes
            var expected = bytes
            expected[8] -= 1
            Slow.fixIPv4Checksum(&expected)
            c.expect(after[8] == bytes[8] - 1, "TTL \(bytes[8]) became \(after[8])")
            // Only the TTL and the checksum change, and the header still verifies.
            c.expect(
                after.enumerated().allSatisfy { i, b in i == 8 || i == 10 || i == 11 || b == bytes[i] },
                "bytes other than TTL and checksum changed"
            )
            c.expect(Slow.validateIPv4(after) == Slow.validateIPv4(expected), "the header no longer verifies")
            count("decremented")
        }
        report.expectReached("decremented", atLeast: 1500)
    }

    /// RFC 1122 3.2.2 / RFC 1812 4.3.2.7, from the text: the slow model of `mustNotAnswer`.
    static func mustNotAnswer(_ b: [UInt8]) -> Bool {
        let source = Slow.be32(b, 12)
        if Slow.be16(b, 6) & 0x1fff != 0 { return true }
        if source == 0 || (0xe000_0000...0xefff_ffff).contains(source) || source == 0xffff_ffff { return true }
        if b[9] == 1 {
            let ihl = Int(b[0] & 0x0f) * 4
            guard Int(Slow.be16(b, 2)) > ihl else { return true }
            return ![0, 8, 13, 14, 15, 16, 17, 18].contains(b[ihl])
        }
        return false
    }

    @Test func icmpErrorsAreWellFormedQuoteTheOriginalAndStayInTheBuffer() {
        let report = fuzz(
            "icmpErrorsAreWellFormedQuoteTheOriginalAndStayInTheBuffer",
            seed: 0x1F_0003,
            iterations: 4000
        ) { c, count in
            let original = Self.packet(c)
            guard case .success(let total) = Slow.validateIPv4(original) else { return }
            let packet = Array(original.prefix(total))
            let ihl = Int(packet[0] & 0x0f) * 4
            // Room: often exactly the packet, sometimes less than an error needs.
            let capacity = c.oneIn(4) ? c.int(0...(total + 60)) : max(total, c.int(total...(total + 600)))
            guard capacity >= total else { return }
            let buffer = GuardedBuffer(packet, capacity: capacity)
            let kinds: [ICMPError.Kind] = [
                .networkUnreachable, .timeExceeded, .fragmentationNeeded(nextHopMTU: c.u16()),
            ]
            let kind = c.pick(kinds)
            let errorSource = c.u32()
            let forbidden = Self.mustNotAnswer(packet)
            c.expect(ICMPError.mustNotAnswer(buffer.base) == forbidden, "mustNotAnswer disagrees with the model")
            guard
                let n = ICMPError.rewrite(
                    buffer.base,
                    length: total,
                    capacity: capacity,
                    kind: kind,
                    source: errorSource
                )
            else {
                c.expect(forbidden || capacity - 28 < ihl, "no error for a packet that may be answered and fits")
                count("not answered")
                return
            }
            c.expect(!forbidden, "answered a packet RFC 1122 forbids answering")
            let quoted = min(total, 548, capacity - 28)
            c.expect(
                n == 28 + quoted && n <= 576 && n <= capacity,
                "error of \(n) bytes for \(total) (room \(capacity))"
            )
            let out = buffer.bytes(n)
            c.expect(Slow.validateIPv4(out) == .success(n), "the error is not a valid IPv4 packet")
            c.expect(out[0] == 0x45 && out[9] == 1 && out[8] == 64, "header fields")
            c.expect(
                Slow.be32(out, 12) == errorSource && Slow.be32(out, 16) == Slow.be32(packet, 12),
                "addresses: must go from the given source back to the packet's source"
            )
            c.expect(Slow.sum(out[20...]) == 0xffff, "ICMP checksum")
            let (type, code, rest): (UInt8, UInt8, UInt32) =
                switch kind {
                case .networkUnreachable: (3, 0, 0)
                case .timeExceeded: (11, 0, 0)
                case .fragmentationNeeded(let mtu): (3, 4, UInt32(mtu))
                }
            c.expect(out[20] == type && out[21] == code && Slow.be32(out, 24) == rest, "ICMP type, code or MTU")
            c.expect(Array(out[28...]) == Array(packet.prefix(quoted)), "the quote is not the original's first bytes")
            // Never an error about an error: no loops between two hosts.
            c.expect(ICMPError.mustNotAnswer(buffer.base), "our own error could be answered again")
            count("answered")
        }
        report.expectReached("answered", atLeast: 500)
        report.expectReached("not answered", atLeast: 100)
    }
}
