import Offload
import Testing
import UDPEncap

@testable import PacketRing

#if canImport(Glibc)
import Glibc
#endif

/// Records what a `SendBatcher` asks of its loop: each send's datagrams
/// (split by its UDP_SEGMENT size), peer and tag, and the slots released.
final class RecordingIO: BatchIO {
    struct Send: Equatable {
        var tag: CompletionTag
        var port: UInt16
        var segmentSize: Int?
        var datagrams: [[UInt8]]
    }
    var sends: [Send] = []
    var released: [Int] = []

    func send(_ message: UnsafeMutablePointer<msghdr>, tag: CompletionTag) {
        var bytes: [UInt8] = []
        let iovecs = message.pointee.msg_iov!
        for i in 0..<Int(message.pointee.msg_iovlen) {
            let iov = iovecs[i]
            bytes += UnsafeRawBufferPointer(start: iov.iov_base, count: iov.iov_len)
        }
        let size = UDPControlMessage.segmentSize(of: message)
        var datagrams: [[UInt8]] = []
        let step = size ?? bytes.count
        var offset = 0
        while offset < bytes.count {
            datagrams.append(Array(bytes[offset..<min(bytes.count, offset + step)]))
            offset += step
        }
        let address = message.pointee.msg_name!.assumingMemoryBound(to: sockaddr_in.self).pointee
        sends.append(
            Send(
                tag: tag,
                port: UInt16(bigEndian: address.sin_port),
                segmentSize: size,
                datagrams: datagrams
            )
        )
    }

    func writeTun(_ iovecs: UnsafeMutablePointer<iovec>, count: Int, tag: CompletionTag) {}
    func release(_ group: SlotGroup, _ slot: Int) { released.append(slot) }
}

/// Peers named as an AF_INET socket takes them.
let testNames = PeerNames(addresses6: try! PeerAddresses6(capacity: 16), dualStack: false)

/// Packets in slot memory the test owns: one buffer per slot.
final class Slots {
    let memory: UnsafeMutableRawPointer
    let size = 2048
    init(_ count: Int) { memory = .allocate(byteCount: count * 2048, alignment: 64) }
    deinit { memory.deallocate() }
    func put(_ slot: Int, _ bytes: [UInt8]) -> UnsafeMutableRawPointer {
        let p = memory + slot * size
        bytes.withUnsafeBytes { p.copyMemory(from: $0.baseAddress!, byteCount: bytes.count) }
        return p
    }
}

@Suite struct SendBatcherTests {
    func packet(_ slot: Int, length: Int) -> [UInt8] { (0..<length).map { UInt8(truncatingIfNeeded: $0 ^ slot) } }

    @Test func singlePacketsForOnePeerOfOneLengthLeaveInOneSegmentedSend() {
        let stats = Statistics()
        let batcher = SendBatcher(slots: 8, names: testNames, maxSegments: 0, segmentation: true, statistics: stats)
        let io = RecordingIO(), slots = Slots(8)
        var expected: [[UInt8]] = []
        for slot in 0..<5 {
            let bytes = packet(slot, length: slot == 4 ? 300 : 500)  // the last may be shorter
            expected.append(bytes)
            batcher.add(
                slot,
                peer: SubnetTable.entry(ipv4: 0xC612_0002, port: 8285),
                start: slots.put(slot, bytes),
                length: bytes.count,
                io: io
            )
        }
        // A shorter packet ends the batch at once.
        #expect(io.sends.count == 1)
        #expect(io.sends[0].segmentSize == 500)
        #expect(io.sends[0].datagrams == expected)
        #expect(io.sends[0].tag == CompletionTag(.udpSendBatch, slot: 0))
        batcher.completed(io.sends[0].tag, result: 2300, io: io)
        #expect(io.released.sorted() == [0, 1, 2, 3, 4], "every member slot is released once")
        stats.publish()
        #expect(stats[.udpPacketsSent] == 5 && stats[.gsoSends] == 1)
    }

    @Test func anotherPeerOrALongerPacketStartsANewSend() {
        let stats = Statistics()
        let batcher = SendBatcher(slots: 8, names: testNames, maxSegments: 0, segmentation: true, statistics: stats)
        let io = RecordingIO(), slots = Slots(8)
        let plan: [(port: UInt16, length: Int)] = [(1, 100), (1, 100), (2, 100), (2, 200), (2, 200)]
        for (slot, p) in plan.enumerated() {
            batcher.add(
                slot,
                peer: SubnetTable.entry(ipv4: 0xC612_0002, port: p.port),
                start: slots.put(slot, packet(slot, length: p.length)),
                length: p.length,
                io: io
            )
        }
        batcher.flush(io)
        #expect(io.sends.map(\.port) == [1, 2, 2])
        #expect(io.sends.map(\.datagrams.count) == [2, 1, 2])
        #expect(io.sends.map(\.segmentSize) == [100, nil, 200], "a send of one datagram carries no segment size")
        for send in io.sends { batcher.completed(send.tag, result: 1, io: io) }
        #expect(io.released.sorted() == [0, 1, 2, 3, 4])
    }

    @Test func aBatchStopsAtTheDatagramLimitAndAtTheUDPPayloadLimit() {
        let stats = Statistics()
        let slotCount = 100
        let batcher = SendBatcher(
            slots: slotCount,
            names: testNames,
            maxSegments: 0,
            segmentation: true,
            statistics: stats
        )
        let io = RecordingIO(), slots = Slots(slotCount)
        for slot in 0..<slotCount {
            batcher.add(
                slot,
                peer: SubnetTable.entry(ipv4: 1, port: 1),
                start: slots.put(slot, packet(slot, length: 64)),
                length: 64,
                io: io
            )
        }
        batcher.flush(io)
        #expect(io.sends.map(\.datagrams.count) == [SendBatcher.maxBatch, slotCount - SendBatcher.maxBatch])
        // 1400-byte packets: 46 fit in 65,507 bytes.
        let big = SendBatcher(slots: slotCount, names: testNames, maxSegments: 0, segmentation: true, statistics: stats)
        let io2 = RecordingIO()
        for slot in 0..<50 {
            big.add(
                slot,
                peer: SubnetTable.entry(ipv4: 1, port: 1),
                start: slots.put(slot, packet(slot, length: 1400)),
                length: 1400,
                io: io2
            )
        }
        big.flush(io2)
        #expect(io2.sends.map(\.datagrams.count) == [46, 4])
        #expect(io2.sends.allSatisfy { $0.datagrams.reduce(0) { $0 + $1.count } <= SegmentedPacket.maxUDPPayload })
    }

    /// The kernel refuses a segmented send with EIO when the route's device
    /// cannot checksum: from then on every datagram is a send of its own.
    @Test func aRefusedSegmentedSendTurnsBatchingOffForGood() {
        let stats = Statistics()
        let batcher = SendBatcher(slots: 8, names: testNames, maxSegments: 0, segmentation: true, statistics: stats)
        let io = RecordingIO(), slots = Slots(8)
        for slot in 0..<3 {
            batcher.add(
                slot,
                peer: SubnetTable.entry(ipv4: 1, port: 1),
                start: slots.put(slot, packet(slot, length: 100)),
                length: 100,
                io: io
            )
        }
        batcher.flush(io)
        #expect(io.sends.count == 1 && io.sends[0].datagrams.count == 3)
        batcher.completed(io.sends[0].tag, result: -EIO, io: io)
        #expect(!batcher.segmentationWorks)
        stats.publish()
        #expect(stats[.gsoSendErrors] == 1 && stats[.sendErrors] == 1 && stats[.udpPacketsSent] == 0)
        #expect(io.released.sorted() == [0, 1, 2], "a failed send still releases its slots")
        io.sends = []
        for slot in 3..<6 {
            batcher.add(
                slot,
                peer: SubnetTable.entry(ipv4: 1, port: 1),
                start: slots.put(slot, packet(slot, length: 100)),
                length: 100,
                io: io
            )
        }
        batcher.flush(io)
        #expect(io.sends.map(\.datagrams.count) == [1, 1, 1])
        #expect(io.sends.allSatisfy { $0.segmentSize == nil })
        // Another error (not EIO) is counted but changes nothing.
        let other = SendBatcher(slots: 8, names: testNames, maxSegments: 0, segmentation: true, statistics: stats)
        other.completed(CompletionTag(.udpSendBatch, slot: 0), result: -ECONNREFUSED, io: io)
        #expect(other.segmentationWorks)
    }

    /// A split super-packet's segments, gathered two iovecs each (headers,
    /// payload), leave in sends of at most 64 datagrams and 65,507 bytes;
    /// the slot is released after the last of them.
    @Test func theSegmentsOfASuperPacketLeaveInAsFewSendsAsFit() {
        let stats = Statistics()
        let maxSegments = 256
        let batcher = SendBatcher(
            slots: 2,
            names: testNames,
            maxSegments: maxSegments,
            segmentation: true,
            statistics: stats
        )
        let io = RecordingIO(), slots = Slots(2)
        let headers = slots.put(0, [UInt8](repeating: 0xaa, count: 40))
        let payload = slots.put(1, (0..<2000).map { UInt8(truncatingIfNeeded: $0) })
        let count = 100
        let iov = batcher.iovecs(1)
        for i in 0..<count {
            iov[2 * i] = iovec(iov_base: headers, iov_len: 40)
            iov[2 * i + 1] = iovec(iov_base: payload, iov_len: 1000)
        }
        let segments = SegmentedPacket(segmentLength: 1040, count: count, totalLength: 1040 * count)
        batcher.addGathered(1, peer: SubnetTable.entry(ipv4: 1, port: 7), gathered: iov, segments: segments, io: io)
        let perSend = segments.segmentsPerSend()
        #expect(perSend > 1 && perSend < count, "the test needs more segments than one send takes")
        var expectedCounts: [Int] = []
        var left = count
        while left > 0 { expectedCounts.append(min(perSend, left)); left -= perSend }
        #expect(io.sends.map(\.datagrams.count) == expectedCounts)
        #expect(io.sends.allSatisfy { $0.datagrams.reduce(0) { $0 + $1.count } <= SegmentedPacket.maxUDPPayload })
        #expect(io.sends.allSatisfy { $0.datagrams.allSatisfy { $0.count == 1040 } })
        for (i, send) in io.sends.enumerated() {
            #expect(io.released.isEmpty, "released before send \(i) completed")
            batcher.completed(send.tag, result: 1, io: io)
        }
        #expect(io.released == [1])
    }
}
