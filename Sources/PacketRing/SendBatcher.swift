import Offload
import UDPEncap

#if canImport(Glibc)
import Glibc
#endif

/// Where the engine's output goes: a loop moves the buffers in and out of
/// the kernel, by io_uring requests or by system calls, and reports each
/// send's and write's result back (`BatchEngine.completed`).
protocol BatchIO: AnyObject {
    /// Sends `message` on the UDP socket; its result comes back under `tag`.
    func send(_ message: UnsafeMutablePointer<msghdr>, tag: CompletionTag)
    /// Writes the packet gathered by `count` iovecs into the TUN.
    func writeTun(_ iovecs: UnsafeMutablePointer<iovec>, count: Int, tag: CompletionTag)
    /// Buffer `slot` of `group` is free again (every send or write that
    /// used it has completed).
    func release(_ group: SlotGroup, _ slot: Int)
}

/// The two kinds of buffer slot: TUN reads (sent to the network) and UDP
/// receives (written into the TUN).
enum SlotGroup: UInt16 { case tun = 0, udp = 1 }

/// Turns the packets of TUN reads into UDP sends, as few as the kernel
/// allows: the segments of a split super-packet leave in sends of up to
/// `SegmentedPacket.maxSegmentsPerSend` equal datagrams (UDP_SEGMENT);
/// single packets for one peer read one after another, all of one length
/// (the last may be shorter), are batched into one such send. A kernel
/// that refuses a segmented send (EIO: the route's device cannot checksum)
/// turns batching off for good: from then on every datagram is a send of
/// its own.
///
/// Each TUN slot owns the `msghdr`s, iovecs, control messages and
/// socket address (room for a `sockaddr_in6`) its sends use, alive until their results come back; the
/// slot is released when the last of its sends has completed. A batch of
/// single packets is named by its first ("leading") slot and uses that
/// slot's iovecs and first message; its members are released together.
/// Nothing is allocated per packet.
final class SendBatcher {
    let sendsPerSlot: Int
    let iovecsPerSlot: Int
    static let maxBatch = SegmentedPacket.maxSegmentsPerSend

    private let iovecStorage: UnsafeMutablePointer<iovec>
    private let messages: UnsafeMutablePointer<msghdr>
    private let controls: UnsafeMutableRawPointer
    /// Datagrams carried by each send.
    private let sendDatagrams: UnsafeMutablePointer<Int32>
    /// One socket address per slot (`SocketAddress.capacity` bytes each).
    private let addresses: UnsafeMutableRawPointer
    private let names: PeerNames
    /// Sends of a slot's split super-packet still in flight.
    private let pendingSends: UnsafeMutablePointer<Int32>
    private let batchMembers: UnsafeMutablePointer<Int32>
    private let statistics: Statistics

    /// The batch being filled (-1: none), its peer (table entry: equal
    /// entries are the same peer) and datagram length.
    private var openLeader = -1
    private var openPeer: UInt64 = 0
    private var openLength = 0
    private var openBytes = 0

    /// False once the kernel refused a UDP_SEGMENT send.
    private(set) var segmentationWorks: Bool

    /// - Parameters:
    ///   - slots: TUN slots.
    ///   - maxSegments: the most segments one super-packet is split into
    ///     (0: reads are never split, one send per slot).
    ///   - segmentation: UDP_SEGMENT may be used.
    init(slots: Int, names: PeerNames, maxSegments: Int, segmentation: Bool, statistics: Statistics) {
        self.statistics = statistics
        self.names = names
        sendsPerSlot = max(1, maxSegments)
        iovecsPerSlot = max(2 * maxSegments, SendBatcher.maxBatch)
        segmentationWorks = segmentation
        iovecStorage = .allocate(capacity: slots * iovecsPerSlot)
        iovecStorage.initialize(repeating: iovec(), count: slots * iovecsPerSlot)
        let sends = slots * sendsPerSlot
        messages = .allocate(capacity: sends)
        messages.initialize(repeating: msghdr(), count: sends)
        controls = .allocate(byteCount: sends * UDPControlMessage.space, alignment: 8)
        sendDatagrams = .allocate(capacity: sends)
        sendDatagrams.initialize(repeating: 0, count: sends)
        addresses = .allocate(byteCount: slots * SocketAddress.capacity, alignment: 8)
        memset(addresses, 0, slots * SocketAddress.capacity)
        pendingSends = .allocate(capacity: slots)
        pendingSends.initialize(repeating: 0, count: slots)
        batchMembers = .allocate(capacity: slots * SendBatcher.maxBatch)
        batchMembers.initialize(repeating: 0, count: slots * SendBatcher.maxBatch)
        for send in 0..<sends {
            messages[send].msg_name = addresses + (send / sendsPerSlot) * SocketAddress.capacity
            UDPControlMessage.prepareSegmentSize(controls + send * UDPControlMessage.space)
        }
    }

    deinit {
        iovecStorage.deallocate()
        messages.deallocate()
        controls.deallocate()
        sendDatagrams.deallocate()
        addresses.deallocate()
        pendingSends.deallocate()
        batchMembers.deallocate()
    }

    /// Slot `slot`'s iovecs (`iovecsPerSlot` of them): where a super-packet
    /// is gathered into segments, or the packets of a batch it leads.
    @inline(__always) func iovecs(_ slot: Int) -> UnsafeMutablePointer<iovec> {
        iovecStorage + slot * iovecsPerSlot
    }

    /// One packet of slot `slot` for `peer` (its table entry): joins the
    /// open batch when it can, or starts one.
    @inline(__always)
    func add<IO: BatchIO>(
        _ slot: Int,
        peer: UInt64,
        start: UnsafeMutableRawPointer,
        length: Int,
        io: IO
    ) {
        if segmentationWorks && openLeader >= 0 && peer == openPeer
            && length <= openLength && openBytes + length <= SegmentedPacket.maxUDPPayload
        {
            let n = Int(sendDatagrams[openLeader * sendsPerSlot])
            if n < SendBatcher.maxBatch {
                iovecs(openLeader)[n] = iovec(iov_base: start, iov_len: length)
                batchMembers[openLeader * SendBatcher.maxBatch + n] = Int32(slot)
                sendDatagrams[openLeader * sendsPerSlot] = Int32(n + 1)
                openBytes += length
                // Only the last datagram of a UDP_SEGMENT send may be shorter.
                if length < openLength { flush(io) }
                return
            }
        }
        flush(io)
        setPeer(slot, peer)
        iovecs(slot)[0] = iovec(iov_base: start, iov_len: length)
        batchMembers[slot * SendBatcher.maxBatch] = Int32(slot)
        sendDatagrams[slot * sendsPerSlot] = 1
        openLeader = slot
        openPeer = peer
        openLength = length
        openBytes = length
        if !segmentationWorks { flush(io) }
    }

    /// The segments of slot `slot`'s split super-packet, gathered by its
    /// iovecs two per datagram: sent at once, after whatever is batched (a
    /// flow's packets keep their order).
    @inline(__always)
    func addGathered<IO: BatchIO>(
        _ slot: Int,
        peer: UInt64,
        gathered: UnsafeMutablePointer<iovec>,
        segments: SegmentedPacket,
        io: IO
    ) {
        flush(io)
        let nameLength = setPeer(slot, peer)
        let perSend = segmentationWorks ? segments.segmentsPerSend() : 1
        let (segmentLength, count) = (segments.segmentLength, segments.count)
        var first = 0
        var index = slot * sendsPerSlot
        // Count them all before the first goes: a loop that completes a
        // send at once must not see the slot finished half way.
        pendingSends[slot] = Int32((count + perSend - 1) / perSend)
        while first < count {
            let k = min(perSend, count - first)
            let message = messages + index
            message.pointee.msg_namelen = nameLength
            message.pointee.msg_iov = gathered + 2 * first
            message.pointee.msg_iovlen = 2 * k
            setSegmentSize(message, index: index, count: k, segmentLength)
            sendDatagrams[index] = Int32(k)
            io.send(message, tag: CompletionTag(.udpSend, slot: index))
            first += k
            index += 1
        }
    }

    /// Sends the open batch: one message, segmented when it holds more
    /// than one datagram.
    @inline(__always)
    func flush<IO: BatchIO>(_ io: IO) {
        let leader = openLeader
        guard leader >= 0 else { return }
        openLeader = -1
        let index = leader * sendsPerSlot
        let count = Int(sendDatagrams[index])
        let message = messages + index
        message.pointee.msg_iov = iovecs(leader)
        message.pointee.msg_iovlen = count
        setSegmentSize(message, index: index, count: count, openLength)
        io.send(message, tag: CompletionTag(.udpSendBatch, slot: leader))
    }

    /// A send's result: counts it, releases what it held, and turns
    /// segmentation off when the kernel refused it.
    @inline(__always)
    func completed<IO: BatchIO>(_ tag: CompletionTag, result: Int32, io: IO) {
        switch tag.op {
        case .udpSend:
            count(result, datagrams: Int(sendDatagrams[tag.slot]))
            let slot = tag.slot / sendsPerSlot
            pendingSends[slot] -= 1
            if pendingSends[slot] == 0 { io.release(.tun, slot) }
        case .udpSendBatch:
            let n = Int(sendDatagrams[tag.slot * sendsPerSlot])
            count(result, datagrams: n)
            let members = batchMembers + tag.slot * SendBatcher.maxBatch
            for i in 0..<n { io.release(.tun, Int(members[i])) }
        default:
            break
        }
    }

    @inline(__always)
    private func count(_ result: Int32, datagrams: Int) {
        guard result >= 0 else {
            if result == -EIO && segmentationWorks {
                // The device on the route cannot checksum segments: send
                // them one by one from now on.
                segmentationWorks = false
                statistics.add(.gsoSendErrors)
            }
            statistics.add(.sendErrors)
            return
        }
        statistics.add(.udpPacketsSent, UInt64(datagrams))
        statistics.add(.udpBytesSent, UInt64(result))
    }

    /// Where the sends of slot `slot` go: `peer`'s socket address, written
    /// into the slot's; returns its length. A batch's message gets it too.
    @inline(__always) @discardableResult
    private func setPeer(_ slot: Int, _ peer: UInt64) -> socklen_t {
        let length = names.write(peer, to: addresses + slot * SocketAddress.capacity)
        messages[slot * sendsPerSlot].msg_namelen = length
        return length
    }

    @inline(__always)
    private func setSegmentSize(_ message: UnsafeMutablePointer<msghdr>, index: Int, count: Int, _ size: Int) {
        if count > 1 {
            UDPControlMessage.setSegmentSize(message, control: controls + index * UDPControlMessage.space, size)
            statistics.add(.gsoSends)
        } else {
            UDPControlMessage.setSegmentSize(message, control: nil, size)
        }
    }
}
