import NetBase
import Offload
import UDPEncap

#if canImport(Glibc)
import Glibc
#endif

/// The udp data path's work on batches, whatever loop moves the buffers:
/// the slot memory, the virtio header, splitting super-packets into real
/// IPv4 packets and sending them in as few sends as the kernel allows
/// (`SendBatcher`), checking the datagrams of a (GRO) receive and
/// coalescing TCP segments of one flow into super-packets for the TUN.
///
/// A loop reads into a slot (`tunRead(_:)`, `udpPayload(_:)`), hands the
/// result to `tunRead(_:length:io:)` or `received(_:…)`, and reports the
/// results of the sends and writes the engine asked for with `completed`;
/// the engine releases a slot through the `BatchIO` when the last send or
/// write that used it is done. io_uring, plain system calls: the loop only
/// moves buffers in and out of the kernel.
///
/// Slot memory, per TUN slot: headroom, then the read (virtio header and a
/// packet of up to 64 KiB); the headers of the read's segments once split.
/// Per UDP slot: `receiveHeader` bytes for what an io_uring multishot
/// recvmsg puts before the payload (unused by other loops), then the
/// payload (one datagram, or up to 64 KiB of GRO'd datagrams).
final class BatchEngine {
    let slots: Int
    let offloads: LoopOffloads
    let statistics: Statistics
    let batcher: SendBatcher
    private let forwarder: Forwarder
    private let maxSegments: Int

    let virtioSize: Int
    private let tunSlab: UnsafeMutableRawPointer
    private let tunStride: Int
    /// Bytes a TUN read may fill (virtio header included).
    let tunReadCapacity: Int
    private let headerSlab: UnsafeMutableRawPointer?
    private let headerCapacity: Int

    private let udpSlab: UnsafeMutableRawPointer
    private let udpStride: Int
    /// Room before each UDP payload (io_uring's recvmsg_out, address, cmsgs).
    let receiveHeader: Int
    /// Bytes a UDP receive may fill.
    let udpCapacity: Int
    private let plans: UnsafeMutablePointer<CoalescingPlan>
    private let pendingWrites: UnsafeMutablePointer<Int32>

    init(
        forwarder: Forwarder,
        configuration: LoopConfiguration,
        slots: Int,
        receiveHeader: Int,
        statistics: Statistics
    ) throws {
        self.forwarder = forwarder
        self.slots = slots
        self.statistics = statistics
        self.offloads = configuration.offloads
        self.maxSegments = max(1, configuration.maxSegments)
        self.receiveHeader = receiveHeader
        let virtio = offloads.virtioHeader
        virtioSize = virtio ? VirtioNetHeader.size : 0
        // Room for the largest packet the TUN may hand us (a device MTU
        // raised by hand is read whole and answered, not truncated).
        tunReadCapacity = virtioSize + DataPath.maxPacketSize
        tunStride = (DataPath.headroom + tunReadCapacity + 63) & ~63
        udpCapacity = offloads.receiveCoalescing ? DataPath.maxPacketSize : configuration.packetCapacity
        udpStride = (receiveHeader + udpCapacity + 63) & ~63
        // An IPv4 and a TCP header, options included, per segment.
        headerCapacity = virtio ? (maxSegments * 120 + 63) & ~63 : 0
        batcher = SendBatcher(
            slots: slots,
            names: PeerNames(addresses6: forwarder.table.addresses6, dualStack: configuration.dualStackSocket),
            maxSegments: virtio ? maxSegments : 0,
            segmentation: offloads.segmentation,
            statistics: statistics
        )
        tunSlab = try BatchEngine.alignedAllocation(slots * tunStride, "TUN buffers")
        udpSlab = try BatchEngine.alignedAllocation(slots * udpStride, "socket buffers")
        headerSlab = virtio ? try BatchEngine.alignedAllocation(slots * headerCapacity, "segment headers") : nil
        pendingWrites = .allocate(capacity: slots)
        pendingWrites.initialize(repeating: 0, count: slots)
        plans = .allocate(capacity: slots)
        // Merged segments are not checksummed again here: the kernel checked
        // each datagram's UDP checksum, which covers the segment's bytes on
        // the wire, and the super-packet's own checksum is the kernel's.
        // Without a virtio header every packet is written on its own.
        for slot in 0..<slots {
            (plans + slot).initialize(to: CoalescingPlan(maxPackets: 256, verifyChecksums: false, coalesce: virtio))
        }
    }

    static func alignedAllocation(_ bytes: Int, _ what: String) throws -> UnsafeMutableRawPointer {
        var memory: UnsafeMutableRawPointer?
        guard posix_memalign(&memory, 4096, max(bytes, 4096)) == 0, let memory else {
            throw SystemError("posix_memalign \(bytes) bytes", on: what, errno: .current)
        }
        return memory
    }

    deinit {
        free(tunSlab)
        free(udpSlab)
        if let headerSlab { free(headerSlab) }
        plans.deinitialize(count: slots)
        plans.deallocate()
        pendingWrites.deallocate()
    }

    /// Where a TUN read into slot `slot` lands (`tunReadCapacity` bytes):
    /// the virtio header, if any, just before the headroom's end.
    @inline(__always) func tunRead(_ slot: Int) -> UnsafeMutableRawPointer {
        tunSlab + slot * tunStride + DataPath.headroom - virtioSize
    }

    /// UDP slot `slot` from its start (`receiveHeader + udpCapacity` bytes).
    @inline(__always) func udpBuffer(_ slot: Int) -> UnsafeMutableRawPointer {
        udpSlab + slot * udpStride
    }

    /// Where a plain receive into slot `slot` puts the payload.
    @inline(__always) func udpPayload(_ slot: Int) -> UnsafeMutableRawPointer {
        udpSlab + slot * udpStride + receiveHeader
    }

    // MARK: TUN → network

    /// A TUN read of `length` bytes in slot `slot`: sent, answered or
    /// dropped; the slot is released when that is done. The open batch of
    /// single packets is left open for the next read (`flush` ends it).
    @inline(__always)
    func tunRead<IO: BatchIO>(_ slot: Int, length: Int, io: IO) {
        let read = tunRead(slot)
        let p = read + virtioSize
        let action: Forwarder.TunBatchAction
        if let headerSlab {
            action = forwarder.fromTun(
                virtioRead: read,
                length: length,
                capacity: tunReadCapacity,
                headers: headerSlab + slot * headerCapacity,
                headerCapacity: headerCapacity,
                iovecs: batcher.iovecs(slot),
                iovecCapacity: batcher.iovecsPerSlot,
                maxSegments: maxSegments,
                stats: statistics
            )
        } else {
            action =
                switch forwarder.fromTun(p, length: length, capacity: tunReadCapacity, stats: statistics) {
                case .send(let peer, let n): .send(peer: peer, start: p, length: n)
                case .reply(let n): .reply(start: p, length: n)
                case .drop: .drop
                }
        }
        switch action {
        case .send(let peer, let start, let length):
            batcher.add(slot, peer: peer, start: start, length: length, io: io)
        case .sendGathered(let peer, let gathered, let segments):
            batcher.addGathered(slot, peer: peer, gathered: gathered, segments: segments, io: io)
        case .reply(let start, let n):
            batcher.flush(io)
            let iov = batcher.iovecs(slot)
            iov.pointee = iovec(iov_base: start, iov_len: n)
            io.writeTun(iov, count: 1, tag: CompletionTag(.tunReply, slot: slot))
        case .drop:
            io.release(.tun, slot)
        }
    }

    /// Ends the batch of single packets being gathered: its send goes out.
    @inline(__always) func flush<IO: BatchIO>(_ io: IO) { batcher.flush(io) }

    // MARK: Network → TUN

    /// A receive of `length` bytes at `payload` in slot `slot` from
    /// `sender` (either underlay): with UDP GRO, datagrams of `segmentLength`
    /// bytes back to back. Each is checked as a single datagram; TCP
    /// segments of one flow become one super-packet per TUN write. The slot
    /// is released when its last write is done.
    @inline(__always)
    func received<IO: BatchIO>(
        _ slot: Int,
        payload: UnsafeMutableRawPointer,
        length: Int,
        segmentLength: Int,
        sender: UnderlaySender,
        io: IO
    ) {
        if segmentLength < length { statistics.add(.groReceives) }
        let plan = plans + slot
        forwarder.fromNetwork(
            datagrams: payload,
            length: length,
            segmentLength: segmentLength,
            sender: sender,
            into: &plan.pointee,
            stats: statistics
        )
        let writes = plan.pointee.writeCount
        statistics.add(.segmentsCoalesced, UInt64(plan.pointee.coalescedSegments))
        guard writes > 0 else {
            io.release(.udp, slot)
            return
        }
        // Counted before the first write goes: a loop may complete it at once.
        pendingWrites[slot] = Int32(writes)
        // iovec 0 is each write's virtio header; without one it is left out.
        let skip = virtioSize > 0 ? 0 : 1
        for w in 0..<writes {
            let write = plan.pointee.write(w)
            if write.count > 2 { statistics.add(.tunSuperPacketsWritten) }
            io.writeTun(write.iovecs + skip, count: write.count - skip, tag: CompletionTag(.tunWrite, slot: slot))
        }
    }

    /// A receive that held nothing to forward (an error or a malformed
    /// message): counted by the caller, the slot goes back.
    @inline(__always) func discard<IO: BatchIO>(_ slot: Int, io: IO) { io.release(.udp, slot) }

    // MARK: Results

    /// The result of a send or write the engine asked for: counted, and
    /// its slot released when it was the last.
    @inline(__always)
    func completed<IO: BatchIO>(_ tag: CompletionTag, result: Int32, io: IO) {
        switch tag.op {
        case .udpSend, .udpSendBatch:
            batcher.completed(tag, result: result, io: io)
        case .tunReply:
            if result < 0 { statistics.add(.tunWriteErrors) }
            io.release(.tun, tag.slot)
        case .tunWrite:
            if result < 0 {
                statistics.add(.tunWriteErrors)
            } else {
                statistics.add(.tunPacketsWritten)
                statistics.add(.tunBytesWritten, UInt64(max(0, Int(result) - virtioSize)))
            }
            pendingWrites[tag.slot] -= 1
            if pendingWrites[tag.slot] == 0 { io.release(.udp, tag.slot) }
        case .tunRead, .udpRecv, .wake:
            break
        }
    }
}
