import Offload
import Testing

@Suite struct ChecksumTests {
    @Test func partialSumMatchesTheByteByByteModelAtEveryLengthAndAlignment() {
        var rng = SplitMix64(seed: 0xC0FFEE)
        let buffer = rng.bytes(2100)
        for _ in 0..<3000 {
            let offset = Int.random(in: 0...63, using: &rng)
            let count = Int.random(in: 0...2000, using: &rng)
            let initial = UInt64.random(in: 0...0xffff_ffff, using: &rng)
            let fast = buffer.withUnsafeBytes {
                Checksum.fold(Checksum.partial($0.baseAddress! + offset, count: count, initial: initial))
            }
            let initial32 = UInt32(Checksum.fold(initial))
            let slow = slowSum(buffer[offset..<(offset + count)], initial: initial32)
            #expect(fast == slow, "offset \(offset) count \(count)")
        }
    }

    @Test func partialSumOfAllOnesBytesDoesNotLoseCarries() {
        let ones = [UInt8](repeating: 0xff, count: 4099)
        for count in [1, 2, 7, 8, 9, 31, 32, 33, 4096, 4099] {
            let fast = ones.withUnsafeBytes {
                Checksum.fold(Checksum.partial($0.baseAddress!, count: count, initial: UInt64.max))
            }
            #expect(fast == slowSum(ones[0..<count], initial: UInt32(Checksum.fold(UInt64.max))))
        }
    }

    @Test func zeroBytesLeaveTheInitialSumUnchanged() {
        let fast = [UInt8]().withUnsafeBytes {
            Checksum.partial($0.baseAddress ?? UnsafeRawPointer(bitPattern: 1)!, count: 0, initial: 42)
        }
        #expect(fast == 42)
    }

    @Test func foldCarriesTwiceWhenNeeded() {
        #expect(Checksum.fold(0) == 0)
        #expect(Checksum.fold(0xffff) == 0xffff)
        #expect(Checksum.fold(0x1_0000) == 1)
        #expect(Checksum.fold(0xffff_ffff) == 0xffff)
        #expect(Checksum.fold(UInt64.max) == 0xffff)
        #expect(Checksum.fold(0x1_fffe) == 0xffff)
    }

    @Test func pseudoHeaderSumsAddressesProtocolAndLength() {
        let sum = Checksum.pseudoHeader(source: 0xc0a8_0001, destination: 0x0a00_0002, protocol: 6, length: 1480)
        #expect(
            Checksum.fold(sum) == slowSum([0xc0, 0xa8, 0x00, 0x01, 0x0a, 0x00, 0x00, 0x02, 0x00, 0x06, 0x05, 0xc8])
        )
    }

    @Test func aValidIPv4HeaderSumsToAllOnes() {
        let packet = PacketSpec(payload: [1, 2, 3]).bytes()
        let sum = packet.withUnsafeBytes { Checksum.fold(Checksum.partial($0.baseAddress!, count: 20)) }
        #expect(sum == 0xffff)
    }
}

@Suite struct VirtioNetHeaderTests {
    @Test func headerRoundTripsThroughLittleEndianBytes() {
        let header = VirtioNetHeader(
            flags: 1,
            gsoType: 0x81,
            headerLength: 0x0134,
            gsoSize: 0x05a8,
            checksumStart: 0x14,
            checksumOffset: 0x10
        )
        var bytes = [UInt8](repeating: 0xee, count: VirtioNetHeader.size + 2)
        bytes.withUnsafeMutableBytes { header.write(to: $0.baseAddress! + 1) }
        #expect(bytes == [0xee, 1, 0x81, 0x34, 0x01, 0xa8, 0x05, 0x14, 0x00, 0x10, 0x00, 0xee])
        let read = bytes.withUnsafeBytes { VirtioNetHeader(reading: $0.baseAddress! + 1) }
        #expect(read == header)
        #expect(read.gso == .tcpv4)
        #expect(read.ecn)
        #expect(read.needsChecksum)
    }

    @Test func ecnFlagIsSeparateFromTheGSOType() {
        var header = VirtioNetHeader(gsoType: VirtioNetHeader.GSOType.tcpv4.rawValue)
        #expect(!header.ecn)
        header.ecn = true
        #expect(header.gsoType == 0x81 && header.gso == .tcpv4)
        header.ecn = false
        #expect(header.gsoType == 1)
        #expect(VirtioNetHeader(gsoType: 2).gso == nil)
    }
}
