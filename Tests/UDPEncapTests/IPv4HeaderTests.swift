import FuzzSupport
import NetTestSupport
import Testing
import UDPEncap

@Suite struct IPv4HeaderTests {
    @Test func wellFormedPacketIsAccepted() throws {
        let p = makePacket()
        let r = p.withUnsafeBytes { IPv4Header.validate($0.baseAddress!, length: $0.count) }
        #expect(try r.get() == p.count)
    }

    @Test func paddingAfterTotalLengthIsTrimmed() throws {
        let p = makePacket() + [0, 0, 0, 0]
        let r = p.withUnsafeBytes { IPv4Header.validate($0.baseAddress!, length: $0.count) }
        #expect(try r.get() == p.count - 4)
    }

    @Test func malformedPacketsAreNamed() {
        func defect(_ bytes: [UInt8]) -> PacketDefect? {
            let r = bytes.withUnsafeBytes { IPv4Header.validate($0.baseAddress!, length: $0.count) }
            if case .failure(let d) = r { return d }
            return nil
        }
        #expect(defect(Array(makePacket().prefix(19))) == .tooShort)
        var v6 = makePacket(); v6[0] = 0x65
        #expect(defect(v6) == .notIPv4)
        var shortIHL = makePacket(); shortIHL[0] = 0x44
        #expect(defect(shortIHL) == .badHeaderLength)
        var longIHL = makePacket(payload: []); longIHL[0] = 0x4f
        #expect(defect(longIHL) == .badHeaderLength)
        var longTotal = makePacket(); longTotal[2] = 0xff
        #expect(defect(longTotal) == .badTotalLength)
        var badSum = makePacket(); badSum[10] ^= 0x01
        #expect(defect(badSum) == .badChecksum)
    }

    /// Short random inputs, about half of them starting like an IPv4 header: `validate` gives
    /// the slow model's answer for each (seeded: a failure names its input and replays).
    @Test func randomBytesGetTheModelsVerdict() {
        var rng = FuzzRandom(seed: 0x1F_1001)
        var verdicts: [String: Int] = [:]
        for i in 0..<20_000 {
            let n = Int.random(in: 0...80, using: &rng)
            var bytes = rng.bytes(n)
            if n > 0 && Bool.random(using: &rng) { bytes[0] = 0x45 }
            if n >= 20 && Int.random(in: 0..<4, using: &rng) == 0 {
                // A consistent header with random contents, so that some inputs pass.
                bytes[0] = 0x45; bytes[2] = UInt8(n >> 8); bytes[3] = UInt8(n & 0xff)
                Slow.fixIPv4Checksum(&bytes)
                // Half of them with a header byte changed after the checksum.
                if Bool.random(using: &rng) { bytes[Int.random(in: 4..<20, using: &rng)] ^= 0x10 }
            }
            // One byte past the end is readable but not part of the input.
            let storage = bytes + [0x45]
            let fast = storage.withUnsafeBytes { IPv4Header.validate($0.baseAddress!, length: n) }
            let slow = Slow.validateIPv4(bytes)
            switch (fast, slow) {
            case (.success(let a), .success(let b)) where a == b:
                verdicts["accepted", default: 0] += 1
            case (.failure(let a), .failure(let b)) where "\(a)" == UDPEncapFuzzTests.name(b):
                verdicts["\(b)", default: 0] += 1
            default:
                Issue.record("input \(i) (\(bytes)): validate says \(fast), the model \(slow)")
                return
            }
        }
        // Every verdict was reached, so each branch of the check was compared with the model.
        for verdict in ["accepted", "tooShort", "notIPv4", "badHeaderLength", "badTotalLength", "badChecksum"] {
            #expect(verdicts[verdict, default: 0] >= 100, "\(verdict): \(verdicts)")
        }
    }

    @Test func ttlDecrementPatchesChecksumLikeAFullRecompute() {
        var rng = FuzzRandom(seed: 0x1F_1002)
        var checked = 0
        for i in 0..<10_000 {
            var p = makePacket(
                source: .random(in: 0...UInt32.max, using: &rng),
                destination: .random(in: 0...UInt32.max, using: &rng),
                ttl: .random(in: 2...255, using: &rng),
                proto: .random(in: 0...255, using: &rng),
                id: .random(in: 0...UInt16.max, using: &rng)
            )
            var expected = p
            expected[8] -= 1
            expected.withUnsafeMutableBytes { IPv4Header.updateChecksum($0.baseAddress!) }
            p.withUnsafeMutableBytes { IPv4Header.decrementTTL($0.baseAddress!) }
            // One's complement has two zeros; both verify, so the sums may differ only
            // as 0x0000 against 0xffff.
            let verifies = p.withUnsafeBytes { IPv4Header.checksum($0.baseAddress!, count: 20) == 0 }
            let got = UInt16(p[10]) << 8 | UInt16(p[11]), want = UInt16(expected[10]) << 8 | UInt16(expected[11])
            let sameSum = got == want || (got == 0 && want == 0xffff) || (got == 0xffff && want == 0)
            guard verifies, p[8] == expected[8], sameSum,
                p.indices.allSatisfy({ $0 == 8 || $0 == 10 || $0 == 11 || p[$0] == expected[$0] })
            else {
                Issue.record(
                    "packet \(i): after decrementTTL \(Array(p.prefix(20))), recomputed \(Array(expected.prefix(20)))"
                )
                return
            }
            checked += 1
        }
        #expect(checked == 10_000)
    }
}

@Suite struct ICMPErrorTests {
    func rewrite(_ packet: [UInt8], kind: ICMPError.Kind, capacity: Int = 2048) -> [UInt8]? {
        var buffer = packet + [UInt8](repeating: 0, count: capacity - packet.count)
        let n = buffer.withUnsafeMutableBytes {
            ICMPError.rewrite(
                $0.baseAddress!,
                length: packet.count,
                capacity: capacity,
                kind: kind,
                source: 0x0A02_0100
            )
        }
        return n.map { Array(buffer.prefix($0)) }
    }

    @Test func unreachableQuotesTheOriginalAndGoesBackToTheSender() throws {
        let original = makePacket(source: 0x0A02_0105, destination: 0x0A02_6305)
        let icmp = try #require(rewrite(original, kind: .networkUnreachable))
        let ok = icmp.withUnsafeBytes { try? IPv4Header.validate($0.baseAddress!, length: $0.count).get() }
        #expect(ok == icmp.count)
        icmp.withUnsafeBytes {
            #expect(IPv4Header.source($0.baseAddress!) == 0x0A02_0100)
            #expect(IPv4Header.destination($0.baseAddress!) == 0x0A02_0105)
            #expect(IPv4Header.proto($0.baseAddress!) == 1)
            #expect(IPv4Header.checksum($0.baseAddress! + 20, count: icmp.count - 20) == 0)
        }
        #expect(icmp[20] == 3 && icmp[21] == 0)
        #expect(Array(icmp[28...]) == original)
    }

    @Test func timeExceededIsType11() throws {
        let icmp = try #require(rewrite(makePacket(ttl: 1), kind: .timeExceeded))
        #expect(icmp[20] == 11 && icmp[21] == 0)
    }

    @Test func fragmentationNeededCarriesTheNextHopMTU() throws {
        let original = makePacket(payload: Array(repeating: 9, count: 1480), fragmentOffset: 0x4000)
        #expect(original.withUnsafeBytes { IPv4Header.dontFragment($0.baseAddress!) })
        let icmp = try #require(rewrite(original, kind: .fragmentationNeeded(nextHopMTU: 1472)))
        #expect(icmp[20] == 3 && icmp[21] == 4)
        // RFC 1191: unused 16 bits, then the next-hop MTU.
        #expect(Array(icmp[24..<28]) == [0, 0, 0x05, 0xc0])
        #expect(icmp.withUnsafeBytes { IPv4Header.checksum($0.baseAddress! + 20, count: icmp.count - 20) } == 0)
        #expect(Array(icmp[28...]) == Array(original.prefix(548)))
        #expect(!makePacket().withUnsafeBytes { IPv4Header.dontFragment($0.baseAddress!) })
    }

    @Test func longPacketsAreQuotedUpTo576Bytes() throws {
        let original = makePacket(payload: Array(repeating: 7, count: 1400))
        let icmp = try #require(rewrite(original, kind: .networkUnreachable))
        #expect(icmp.count == 576)
        #expect(Array(icmp[28...]) == Array(original.prefix(548)))
    }

    @Test func icmpErrorsAndLaterFragmentsGetNoAnswer() {
        // An ICMP error (type 3) must never cause another.
        let error = makePacket(proto: 1, payload: [3, 0, 0, 0, 0, 0, 0, 0])
        #expect(rewrite(error, kind: .networkUnreachable) == nil)
        // An echo request does.
        let echo = makePacket(proto: 1, payload: [8, 0, 0, 0, 0, 0, 0, 0])
        #expect(rewrite(echo, kind: .networkUnreachable) != nil)
        let fragment = makePacket(fragmentOffset: 185)
        #expect(rewrite(fragment, kind: .networkUnreachable) == nil)
        let multicastSource = makePacket(source: 0xE000_0001)
        #expect(rewrite(multicastSource, kind: .networkUnreachable) == nil)
    }
}
