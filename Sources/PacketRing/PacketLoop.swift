#if canImport(Glibc)
import Glibc
#endif
import CTunnel
import CURing
import NetBase
import Offload
import UDPEncap

/// Which offloads a loop uses; decided once at start from what the kernel
/// accepted (see `TunDevice.enableOffloads`, `UDPSocket`).
public struct LoopOffloads: Sendable, Equatable, CustomStringConvertible {
    /// The TUN fd was opened with IFF_VNET_HDR: every read and write starts
    /// with a virtio_net_hdr, reads may be super-packets (TSO/USO) and
    /// writes may be coalesced super-packets.
    public var virtioHeader: Bool
    /// One sendmsg may carry many datagrams (UDP_SEGMENT).
    public var segmentation: Bool
    /// One receive may return many datagrams (UDP_GRO is on for the socket).
    public var receiveCoalescing: Bool

    public init(virtioHeader: Bool = false, segmentation: Bool = false, receiveCoalescing: Bool = false) {
        self.virtioHeader = virtioHeader
        self.segmentation = segmentation
        self.receiveCoalescing = receiveCoalescing
    }

    public static let none = LoopOffloads()

    public var description: String {
        let names = [(virtioHeader, "tun-vnet-hdr"), (segmentation, "udp-gso"), (receiveCoalescing, "udp-gro")]
            .filter(\.0).map(\.1)
        return names.isEmpty ? "none" : names.joined(separator: "+")
    }
}

/// How a data-path loop is sized and what it reads and writes.
public struct LoopConfiguration: Sendable {
    /// Reads kept posted on each of the TUN and the UDP socket; also the
    /// most packets moved per direction by one `io_uring_enter`.
    public var depth: Int
    /// Room for one received datagram (after the headroom) when there are
    /// no offloads. TUN reads always have room for the largest IPv4 packet,
    /// so that a packet bigger than the tunnel's MTU (a device MTU raised by
    /// hand) is read whole and answered, not truncated into garbage.
    public var packetCapacity: Int
    public var offloads: LoopOffloads
    /// The most packets one super-packet is split into (more is dropped and
    /// counted; TCP's smallest MSS of 536 gives 123 for 64 KiB).
    public var maxSegments: Int
    /// After a turn that moved something, look for more completions for up
    /// to this long before sleeping (0: sleep at once). A reply usually
    /// follows a request within a few hundred microseconds; catching it
    /// awake saves a sleep and a wake-up per hop, which on a virtual
    /// machine is most of the tunnel's latency. An idle loop sleeps.
    public var busyPollMicroseconds: Int = 0

    public init(depth: Int = DataPath.defaultBatchSize, mtu: Int, offloads: LoopOffloads = .none) {
        self.depth = depth
        // Room for the largest packet the TUN may hand us, and for an ICMP
        // error (28 + 548 bytes) built in place.
        self.packetCapacity = max(mtu, 1024)
        self.offloads = offloads
        self.maxSegments = 256
    }
}

/// Runs a loop that moves packets between one TUN queue and one UDP socket
/// until `stop()`. One loop per thread; several loops (one TUN queue and one
/// socket each) can share a `Forwarder` and its table.
public protocol DataPathLoop: AnyObject, Sendable {
    var statistics: Statistics { get }
    /// Moves packets on the calling thread until `stop()` is called or a
    /// fatal error occurs.
    func run() throws
    /// Asks the loop to return from `run()`; callable from any thread.
    func stop()
}

/// What a completion belongs to: the operation and the buffer slot, packed
/// into io_uring's 64-bit user_data (operation in the top byte).
struct CompletionTag: Equatable {
    enum Op: UInt8 {
        /// `udpSend`: the sends of a split super-packet (slot: the send's
        /// message); `udpSendBatch`: a batch of single packets (slot: its
        /// leading TUN slot).
        case tunRead = 1, udpSend, tunReply, udpRecv, tunWrite, wake, udpSendBatch
    }
    var op: Op
    var slot: Int

    @inline(__always) var userData: UInt64 { UInt64(op.rawValue) << 56 | UInt64(UInt32(truncatingIfNeeded: slot)) }

    @inline(__always) init(_ op: Op, slot: Int = 0) {
        self.op = op
        self.slot = slot
    }

    @inline(__always) init?(userData: UInt64) {
        guard let op = Op(rawValue: UInt8(truncatingIfNeeded: userData >> 56)) else { return nil }
        self.op = op
        self.slot = Int(userData & 0xffff_ffff)
    }
}

/// The io_uring data path.
///
/// Each direction has `depth` buffers in a provided-buffer ring (one group
/// for the TUN, one for the socket) and one multishot request that the
/// kernel completes once per arrival, picking a free buffer itself: a
/// multishot read on the TUN and a multishot recvmsg on the socket.
///
/// TUN → network: a read is one packet, or with offloads one super-packet
/// of up to 64 KiB that `Forwarder` splits into real IPv4 packets in the
/// slot's segment buffer; they leave in one sendmsg with UDP_SEGMENT (or one
/// per datagram without it) — on the wire, one packet per datagram as
/// flannel sends. Each TUN slot owns the `msghdr`s, `iovec`s, control
/// messages and `sockaddr_in` of its sends, alive until their completions;
/// the buffer goes back into its ring when the last send completes.
///
/// Network → TUN: a receive is one datagram, or with UDP GRO many of one
/// sender back to back; each is checked like a single one, and TCP segments
/// of one flow are coalesced into one super-packet per TUN write (with a
/// virtio header) by the slot's `CoalescingPlan`, whose iovecs point into
/// the receive buffer: nothing is copied. The buffer is recycled when the
/// slot's last write completes.
///
/// One armed request per descriptor, not one parked read per buffer: a
/// packet wakes one request, not `depth` of them. Each turn of the loop
/// submits every request prepared in the previous turn and waits for
/// completions in one `io_uring_enter`, then handles all completions that
/// are ready. Nothing is allocated per packet.
public final class URingLoop: DataPathLoop, @unchecked Sendable {
    public let statistics = Statistics()
    private let forwarder: Forwarder
    private let tunFD: Int32
    private let udpFD: Int32
    private let depth: Int
    private let offloads: LoopOffloads
    private let maxSegments: Int
    private let busyPollNanoseconds: UInt64
    private let wakeFD: Int32

    // TUN side: a read lands at `tunPacket(slot) - virtioSize`, so that the
    // packet itself starts after the headroom.
    private let tunSlab: UnsafeMutableRawPointer
    private let tunStride: Int
    /// Bytes a TUN read may fill (virtio header included).
    private let tunReadCapacity: Int
    private let virtioSize: Int
    /// Per TUN slot: the headers of a super-packet's segments.
    private let headerSlab: UnsafeMutableRawPointer?
    private let headerCapacity: Int
    /// Per TUN slot, `iovecsPerSlot` of them: two per segment of a split
    /// super-packet (headers, payload in place), or one per packet of a
    /// batch the slot leads.
    private let slotIovecs: UnsafeMutablePointer<iovec>
    private let iovecsPerSlot: Int
    /// Per TUN slot, `sendsPerSlot` of each: its sends (a super-packet may
    /// take several), their UDP_SEGMENT control messages and how many
    /// datagrams each carries; one `sockaddr_in` per slot.
    private let sendsPerSlot: Int
    private let messages: UnsafeMutablePointer<msghdr>
    private let controls: UnsafeMutableRawPointer
    private let sendDatagrams: UnsafeMutablePointer<Int32>
    private let addresses: UnsafeMutablePointer<sockaddr_in>
    private let pendingSends: UnsafeMutablePointer<Int32>
    /// Single packets for one peer, all of one length (the last may be
    /// shorter), leave in one sendmsg (UDP_SEGMENT when there are several):
    /// a batch is named by its first ("leading") slot, whose iovecs, first
    /// message and datagram count it uses; these are its members' slots.
    private let batchMembers: UnsafeMutablePointer<Int32>
    /// The batch being filled this turn (-1: none), its peer and length.
    private var openLeader = -1
    private var openAddress: UInt32 = 0
    private var openPort: UInt16 = 0
    private var openLength = 0
    private var openBytes = 0
    static let maxBatch = SegmentedPacket.maxSegmentsPerSend

    /// After the kernel refused a UDP_SEGMENT send (EIO: the route's device
    /// cannot checksum), every datagram goes in a send of its own.
    private var segmentationWorks: Bool

    // Socket side.
    private let udpSlab: UnsafeMutableRawPointer
    private let udpStride: Int
    private let udpCapacity: Int
    private let plans: UnsafeMutablePointer<CoalescingPlan>
    private let pendingWrites: UnsafeMutablePointer<Int32>
    /// What the multishot recvmsg fills in before each payload: the
    /// `io_uring_recvmsg_out` header, the sender's address and the control
    /// messages (UDP_GRO's segment size).
    private let receiveTemplate: UnsafeMutablePointer<msghdr>
    private let receiveHeader: Int

    private let wakeBuffer: UnsafeMutablePointer<UInt64>
    private let bufferRings: (tun: UnsafeMutablePointer<io_uring_buf_ring>, udp: UnsafeMutablePointer<io_uring_buf_ring>)
    /// Buffers of each group that the kernel handed us and we have not
    /// given back (only the loop's thread touches this).
    private var heldTun = 0
    private var heldUDP = 0

    static let controlSpace = 32
    static let receiveControlSpace = 32

    enum Group: UInt16 { case tun = 0, udp = 1 }

    public init(forwarder: Forwarder, tunFD: Int32, udpFD: Int32, configuration: LoopConfiguration) throws {
        self.forwarder = forwarder
        self.tunFD = tunFD
        self.udpFD = udpFD
        self.offloads = configuration.offloads
        self.maxSegments = max(1, configuration.maxSegments)
        self.busyPollNanoseconds = UInt64(max(0, configuration.busyPollMicroseconds)) * 1000
        // Buffer rings hold a power of two of entries.
        var depth = 1
        while depth < configuration.depth { depth <<= 1 }
        self.depth = depth
        segmentationWorks = offloads.segmentation

        let virtio = offloads.virtioHeader
        virtioSize = virtio ? VirtioNetHeader.size : 0
        tunReadCapacity = virtioSize + DataPath.maxPacketSize
        tunStride = (DataPath.headroom + tunReadCapacity + 63) & ~63
        udpCapacity = offloads.receiveCoalescing ? DataPath.maxPacketSize : configuration.packetCapacity
        receiveHeader = MemoryLayout<io_uring_recvmsg_out>.size + MemoryLayout<sockaddr_in>.size
            + URingLoop.receiveControlSpace
        udpStride = (receiveHeader + udpCapacity + 63) & ~63
        // An IPv4 and a TCP header, options included, per segment.
        headerCapacity = virtio ? (maxSegments * 120 + 63) & ~63 : 0
        sendsPerSlot = virtio ? maxSegments : 1
        iovecsPerSlot = max(virtio ? 2 * maxSegments : 0, URingLoop.maxBatch)

        tunSlab = try URingLoop.alignedAllocation(depth * tunStride, "TUN buffers")
        udpSlab = try URingLoop.alignedAllocation(depth * udpStride, "socket buffers")
        headerSlab = virtio ? try URingLoop.alignedAllocation(depth * headerCapacity, "segment headers") : nil
        slotIovecs = .allocate(capacity: depth * iovecsPerSlot)
        slotIovecs.initialize(repeating: iovec(), count: depth * iovecsPerSlot)
        let sends = depth * sendsPerSlot
        messages = .allocate(capacity: sends)
        messages.initialize(repeating: msghdr(), count: sends)
        controls = .allocate(byteCount: sends * URingLoop.controlSpace, alignment: 8)
        memset(controls, 0, sends * URingLoop.controlSpace)
        addresses = .allocate(capacity: depth)
        addresses.initialize(repeating: sockaddr_in(), count: depth)
        batchMembers = .allocate(capacity: depth * URingLoop.maxBatch)
        batchMembers.initialize(repeating: 0, count: depth * URingLoop.maxBatch)
        sendDatagrams = .allocate(capacity: sends)
        sendDatagrams.initialize(repeating: 0, count: sends)
        pendingSends = .allocate(capacity: depth)
        pendingSends.initialize(repeating: 0, count: depth)
        pendingWrites = .allocate(capacity: depth)
        pendingWrites.initialize(repeating: 0, count: depth)
        plans = .allocate(capacity: depth)
        // Merged segments are not checksummed again here: the kernel checked
        // each datagram's UDP checksum, which covers the segment's bytes on
        // the wire, and the super-packet's own checksum is the kernel's.
        // Without a virtio header every packet is written on its own.
        for slot in 0..<depth {
            (plans + slot).initialize(to: CoalescingPlan(maxPackets: 256, verifyChecksums: false, coalesce: virtio))
        }
        receiveTemplate = .allocate(capacity: 1)
        receiveTemplate.initialize(to: msghdr())
        receiveTemplate.pointee.msg_namelen = socklen_t(MemoryLayout<sockaddr_in>.size)
        receiveTemplate.pointee.msg_controllen = URingLoop.receiveControlSpace
        wakeBuffer = .allocate(capacity: 1)
        wakeBuffer.initialize(to: 0)
        let ringBytes = (depth * MemoryLayout<io_uring_buf>.stride + 4095) & ~4095
        let tunRing = try URingLoop.alignedAllocation(ringBytes, "buffer ring")
        let udpRing = try URingLoop.alignedAllocation(ringBytes, "buffer ring")
        memset(tunRing, 0, ringBytes)
        memset(udpRing, 0, ringBytes)
        bufferRings = (tunRing.assumingMemoryBound(to: io_uring_buf_ring.self),
                       udpRing.assumingMemoryBound(to: io_uring_buf_ring.self))
        wakeFD = eventfd(0, Int32(EFD_CLOEXEC))
        guard wakeFD >= 0 else {
            throw SystemError("eventfd", on: "data path", errno: .current)
        }
        for send in 0..<sends {
            let slot = send / sendsPerSlot
            messages[send].msg_name = UnsafeMutableRawPointer(addresses + slot)
            messages[send].msg_namelen = socklen_t(MemoryLayout<sockaddr_in>.size)
            // The UDP_SEGMENT control message, filled in when a send carries
            // more than one datagram.
            let control = controls + send * URingLoop.controlSpace
            let header = control.assumingMemoryBound(to: cmsghdr.self)
            header.pointee.cmsg_len = ctunnel_cmsg_len(MemoryLayout<UInt16>.size)
            header.pointee.cmsg_level = ctunnel_SOL_UDP
            header.pointee.cmsg_type = ctunnel_UDP_SEGMENT
        }
    }

    private static func alignedAllocation(_ bytes: Int, _ what: String) throws -> UnsafeMutableRawPointer {
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
        slotIovecs.deallocate()
        free(bufferRings.tun)
        free(bufferRings.udp)
        messages.deallocate()
        controls.deallocate()
        addresses.deallocate()
        batchMembers.deallocate()
        pendingSends.deallocate()
        sendDatagrams.deallocate()
        pendingWrites.deallocate()
        plans.deinitialize(count: depth)
        plans.deallocate()
        receiveTemplate.deallocate()
        wakeBuffer.deallocate()
        close(wakeFD)
    }

    public func stop() {
        var one: UInt64 = 1
        _ = write(wakeFD, &one, 8)
    }

    /// The packet of TUN slot `slot` (after the headroom).
    @inline(__always) private func tunPacket(_ slot: Int) -> UnsafeMutableRawPointer {
        tunSlab + slot * tunStride + DataPath.headroom
    }

    @inline(__always) private func udpBuffer(_ slot: Int) -> UnsafeMutableRawPointer {
        udpSlab + slot * udpStride
    }

    /// Hands buffer `slot` back to the kernel for the next arrival of `group`.
    @inline(__always) private func recycle(_ group: Group, _ slot: Int) {
        let ring: UnsafeMutablePointer<io_uring_buf_ring>
        let address: UnsafeMutableRawPointer
        let length: Int
        if group == .tun {
            heldTun -= 1
            ring = bufferRings.tun
            address = tunPacket(slot) - virtioSize
            length = tunReadCapacity
        } else {
            heldUDP -= 1
            ring = bufferRings.udp
            address = udpBuffer(slot)
            length = receiveHeader + udpCapacity
        }
        io_uring_buf_ring_add(ring, address, UInt32(length), UInt16(slot), io_uring_buf_ring_mask(UInt32(depth)), 0)
        io_uring_buf_ring_advance(ring, 1)
    }

    public func run() throws {
        let ring = UnsafeMutablePointer<io_uring>.allocate(capacity: 1)
        defer { ring.deallocate() }
        var params = io_uring_params()
        // The ring belongs to this thread alone; completions are processed
        // when we ask for them, not by interrupting us. The completion queue
        // has room for every send and write that can be in flight at once.
        let entries = UInt32(2 * depth + 4)
        let completionEntries = UInt32(min(32768, max(4 * Int(entries), depth * (sendsPerSlot + 8))))
        params.flags = UInt32(IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_CQSIZE)
        params.cq_entries = completionEntries
        var rc = io_uring_queue_init_params(entries, ring, &params)
        if rc == -EINVAL {
            params = io_uring_params()
            params.flags = UInt32(IORING_SETUP_CQSIZE)
            params.cq_entries = completionEntries
            rc = io_uring_queue_init_params(entries, ring, &params)
        }
        guard rc == 0 else {
            throw SystemError("io_uring_queue_init", on: "data path ring (\(entries) entries)", errno: Errno(-rc),
                              hint: rc == -EPERM || rc == -ENOSYS
                                ? "io_uring is disabled here (kernel.io_uring_disabled?); use --datapath simple" : nil)
        }
        defer { io_uring_queue_exit(ring) }

        for group in [Group.tun, .udp] {
            let bufferRing = group == .tun ? bufferRings.tun : bufferRings.udp
            var registration = io_uring_buf_reg()
            registration.ring_addr = UInt64(UInt(bitPattern: bufferRing))
            registration.ring_entries = UInt32(depth)
            registration.bgid = group.rawValue
            let r = io_uring_register_buf_ring(ring, &registration, 0)
            guard r == 0 else {
                throw SystemError("io_uring_register_buf_ring", on: "data path ring", errno: Errno(-r),
                                  hint: "provided buffer rings need Linux 5.19 or later; use --datapath simple")
            }
            io_uring_buf_ring_init(bufferRing)
            if group == .tun { heldTun = depth } else { heldUDP = depth }
            for slot in 0..<depth { recycle(group, slot) }
        }

        var tunArmed = false, udpArmed = false
        var tunFailures = 0, udpFailures = 0
        armTun(ring); tunArmed = true
        armUDP(ring); udpArmed = true
        postWake(ring)

        let batch = Int(completionEntries)
        let cqes = UnsafeMutablePointer<UnsafeMutablePointer<io_uring_cqe>?>.allocate(capacity: batch)
        defer { cqes.deallocate() }
        var stopping = false
        var active = false
        while !stopping {
            if !(active && busyPoll(ring)) {
                let submitted = io_uring_submit_and_wait(ring, 1)
                if submitted < 0 && submitted != -EINTR && submitted != -EAGAIN && submitted != -EBUSY {
                    throw SystemError("io_uring_enter", on: "data path ring", errno: Errno(-submitted))
                }
            }
            let count = Int(io_uring_peek_batch_cqe(ring, cqes, UInt32(batch)))
            active = count > 0
            if count == 0 { continue }
            statistics.addBatch(completions: count)
            for i in 0..<count {
                let cqe = cqes[i]!
                let result = cqe.pointee.res
                let flags = cqe.pointee.flags
                guard let tag = CompletionTag(userData: cqe.pointee.user_data) else { continue }
                let bufferID = Int(flags >> IORING_CQE_BUFFER_SHIFT)
                let hasBuffer = flags & IORING_CQE_F_BUFFER != 0
                switch tag.op {
                case .tunRead:
                    if hasBuffer { heldTun += 1 }
                    if flags & IORING_CQE_F_MORE == 0 { tunArmed = false }
                    if result > 0 && hasBuffer {
                        tunFailures = 0
                        handleTunRead(ring, bufferID, length: Int(result))
                    } else {
                        if hasBuffer { recycle(.tun, bufferID) }
                        // ENOBUFS: every buffer is in flight; re-armed when one returns.
                        if result < 0 && result != -ENOBUFS && result != -EAGAIN && result != -EINTR {
                            statistics.add(.readErrors)
                            tunFailures += 1
                            if tunFailures > 2 * depth {
                                throw SystemError("read", on: "TUN device", errno: Errno(-result),
                                                  hint: "the device went away or was taken down")
                            }
                        }
                    }
                case .udpSend:
                    sendCompleted(result, datagrams: Int(sendDatagrams[tag.slot]))
                    // A send's tag names its message; the slot owns `sendsPerSlot` of them.
                    let slot = tag.slot / sendsPerSlot
                    pendingSends[slot] -= 1
                    if pendingSends[slot] == 0 { recycle(.tun, slot) }
                case .udpSendBatch:
                    let count = Int(sendDatagrams[tag.slot * sendsPerSlot])
                    sendCompleted(result, datagrams: count)
                    let members = batchMembers + tag.slot * URingLoop.maxBatch
                    for i in 0..<count { recycle(.tun, Int(members[i])) }
                case .tunReply:
                    if result < 0 { statistics.add(.tunWriteErrors) }
                    recycle(.tun, tag.slot)
                case .udpRecv:
                    if hasBuffer { heldUDP += 1 }
                    if flags & IORING_CQE_F_MORE == 0 { udpArmed = false }
                    if result >= 0 && hasBuffer {
                        udpFailures = 0
                        handleReceive(ring, bufferID, length: Int(result))
                    } else {
                        if hasBuffer { recycle(.udp, bufferID) }
                        if result < 0 && result != -ENOBUFS && result != -EAGAIN && result != -EINTR {
                            statistics.add(.readErrors)
                            // ICMP port unreachable from a peer surfaces as
                            // ECONNREFUSED on the next receive: not fatal.
                            if result != -ECONNREFUSED { udpFailures += 1 }
                            if udpFailures > 2 * depth {
                                throw SystemError("recvmsg", on: "udp socket", errno: Errno(-result))
                            }
                        }
                    }
                case .tunWrite:
                    if result < 0 { statistics.add(.tunWriteErrors) } else {
                        statistics.add(.tunPacketsWritten)
                        statistics.add(.tunBytesWritten, UInt64(max(0, Int(result) - virtioSize)))
                    }
                    pendingWrites[tag.slot] -= 1
                    if pendingWrites[tag.slot] == 0 { recycle(.udp, tag.slot) }
                case .wake:
                    stopping = true
                }
            }
            io_uring_cq_advance(ring, UInt32(count))
            flushBatch(ring)
            // A multishot request ends when its group ran out of buffers
            // (ENOBUFS) or on an error; arm it again once a buffer is free.
            if !tunArmed && heldTun < depth { armTun(ring); tunArmed = true }
            if !udpArmed && heldUDP < depth { armUDP(ring); udpArmed = true }
            statistics.publish()
        }
    }

    /// Submits what is queued and looks for completions without sleeping,
    /// for at most the busy-poll time; true when some are ready.
    @inline(__always)
    private func busyPoll(_ ring: UnsafeMutablePointer<io_uring>) -> Bool {
        guard busyPollNanoseconds > 0 else { return false }
        _ = io_uring_submit_and_get_events(ring)
        if io_uring_cq_ready(ring) > 0 { return true }
        let deadline = URingLoop.now() &+ busyPollNanoseconds
        repeat {
            // Runs the task work that turns readiness into completions.
            _ = io_uring_get_events(ring)
            if io_uring_cq_ready(ring) > 0 { return true }
            // Whatever else wants this CPU (the kernel's softirq work,
            // the peer daemon, the application) goes first.
            sched_yield()
        } while URingLoop.now() < deadline
        return false
    }

    @inline(__always)
    private static func now() -> UInt64 {
        var t = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t)
        return UInt64(t.tv_sec) &* 1_000_000_000 &+ UInt64(t.tv_nsec)
    }

    // MARK: Completions

    @inline(__always)
    private func handleTunRead(_ ring: UnsafeMutablePointer<io_uring>, _ slot: Int, length: Int) {
        let p = tunPacket(slot)
        let action: Forwarder.TunBatchAction
        if let headerSlab {
            action = forwarder.fromTun(virtioRead: p - virtioSize, length: length, capacity: tunReadCapacity,
                                       headers: headerSlab + slot * headerCapacity, headerCapacity: headerCapacity,
                                       iovecs: slotIovecs + slot * iovecsPerSlot, iovecCapacity: iovecsPerSlot,
                                       maxSegments: maxSegments, stats: statistics)
        } else {
            action = switch forwarder.fromTun(p, length: length, capacity: tunReadCapacity, stats: statistics) {
            case .send(let address, let port, let n): .send(address: address, port: port, start: p, length: n)
            case .reply(let n): .reply(start: p, length: n)
            case .drop: .drop
            }
        }
        switch action {
        case .send(let address, let port, let start, let length):
            // One packet: join this turn's batch for its peer, or start one;
            // without UDP_SEGMENT a batch is one packet, sent at once.
            if segmentationWorks && openLeader >= 0 && address == openAddress && port == openPort
                && length <= openLength && openBytes + length <= SegmentedPacket.maxUDPPayload {
                let n = Int(sendDatagrams[openLeader * sendsPerSlot])
                if n < URingLoop.maxBatch {
                    slotIovecs[openLeader * iovecsPerSlot + n] = iovec(iov_base: start, iov_len: length)
                    batchMembers[openLeader * URingLoop.maxBatch + n] = Int32(slot)
                    sendDatagrams[openLeader * sendsPerSlot] = Int32(n + 1)
                    openBytes += length
                    // Only the last datagram of a UDP_SEGMENT send may be shorter.
                    if length < openLength { flushBatch(ring) }
                    return
                }
            }
            flushBatch(ring)
            setPeer(slot, address: address, port: port)
            slotIovecs[slot * iovecsPerSlot] = iovec(iov_base: start, iov_len: length)
            batchMembers[slot * URingLoop.maxBatch] = Int32(slot)
            sendDatagrams[slot * sendsPerSlot] = 1
            openLeader = slot
            openAddress = address
            openPort = port
            openLength = length
            openBytes = length
            if !segmentationWorks { flushBatch(ring) }
        case .sendGathered(let address, let port, let gathered, let segments):
            // Whatever was batched goes first: a flow's packets keep their order.
            flushBatch(ring)
            setPeer(slot, address: address, port: port)
            let perSend = segmentationWorks ? segments.segmentsPerSend() : 1
            let (segmentLength, count) = (segments.segmentLength, segments.count)
            var first = 0
            var sends: Int32 = 0
            var index = slot * sendsPerSlot
            while first < count {
                let k = min(perSend, count - first)
                let message = messages + index
                message.pointee.msg_iov = gathered + 2 * first
                message.pointee.msg_iovlen = 2 * k
                setSegmentSize(message, control: k > 1 ? controls + index * URingLoop.controlSpace : nil, segmentLength)
                sendDatagrams[index] = Int32(k)
                let sqe = nextSQE(ring)
                io_uring_prep_sendmsg(sqe, udpFD, message, 0)
                io_uring_sqe_set_data64(sqe, CompletionTag(.udpSend, slot: index).userData)
                first += k
                sends += 1
                index += 1
            }
            pendingSends[slot] = sends
        case .reply(let start, let n):
            flushBatch(ring)
            let sqe = nextSQE(ring)
            io_uring_prep_write(sqe, tunFD, start, UInt32(n), 0)
            io_uring_sqe_set_data64(sqe, CompletionTag(.tunReply, slot: slot).userData)
        case .drop:
            recycle(.tun, slot)
        }
    }

    @inline(__always)
    private func handleReceive(_ ring: UnsafeMutablePointer<io_uring>, _ slot: Int, length: Int) {
        let start = udpBuffer(slot)
        guard let out = io_uring_recvmsg_validate(start, Int32(length), receiveTemplate) else {
            statistics.add(.udpDatagramsReceived)
            statistics.add(.droppedMalformed)
            recycle(.udp, slot)
            return
        }
        if out.pointee.flags & UInt32(MSG_TRUNC) != 0 {
            statistics.add(.udpDatagramsReceived)
            statistics.add(.droppedTruncated)
            recycle(.udp, slot)
            return
        }
        let name = io_uring_recvmsg_name(out)!.assumingMemoryBound(to: sockaddr_in.self)
        let payload = io_uring_recvmsg_payload(out, receiveTemplate)!
        let payloadLength = Int(io_uring_recvmsg_payload_length(out, Int32(length), receiveTemplate))
        let sender = UInt32(bigEndian: name.pointee.sin_addr.s_addr)
        let port = UInt16(bigEndian: name.pointee.sin_port)
        var segmentLength = payloadLength
        if offloads.receiveCoalescing {
            var control = io_uring_recvmsg_cmsg_firsthdr(out, receiveTemplate)
            while let header = control {
                if header.pointee.cmsg_level == ctunnel_SOL_UDP && header.pointee.cmsg_type == ctunnel_UDP_GRO {
                    let size = ctunnel_cmsg_data(header).withMemoryRebound(to: Int32.self, capacity: 1) { $0.pointee }
                    if size > 0 { segmentLength = Int(size) }
                }
                control = io_uring_recvmsg_cmsg_nexthdr(out, receiveTemplate, header)
            }
            if segmentLength < payloadLength { statistics.add(.groReceives) }
        }

        let plan = plans + slot
        forwarder.fromNetwork(datagrams: payload, length: payloadLength, segmentLength: segmentLength,
                              sender: sender, senderPort: port, into: &plan.pointee, stats: statistics)
        let writes = Int32(plan.pointee.writeCount)
        statistics.add(.segmentsCoalesced, UInt64(plan.pointee.coalescedSegments))
        for w in 0..<plan.pointee.writeCount {
            // iovec 0 is the write's virtio header; without one it is left out.
            let write = plan.pointee.write(w)
            if write.count > 2 { statistics.add(.tunSuperPacketsWritten) }
            let sqe = nextSQE(ring)
            let skip = virtioSize > 0 ? 0 : 1
            io_uring_prep_writev(sqe, tunFD, write.iovecs + skip, UInt32(write.count - skip), 0)
            io_uring_sqe_set_data64(sqe, CompletionTag(.tunWrite, slot: slot).userData)
        }
        if writes == 0 {
            recycle(.udp, slot)
        } else {
            pendingWrites[slot] = writes
        }
    }

    /// Counts a completed send of `datagrams` datagrams.
    @inline(__always)
    private func sendCompleted(_ result: Int32, datagrams: Int) {
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

    /// Where the sends of TUN slot `slot` go (host order in, network order stored).
    @inline(__always)
    private func setPeer(_ slot: Int, address: UInt32, port: UInt16) {
        let sa = addresses + slot
        sa.pointee.sin_family = sa_family_t(AF_INET)
        sa.pointee.sin_port = port.bigEndian
        sa.pointee.sin_addr.s_addr = address.bigEndian
    }

    /// Gives `message` a UDP_SEGMENT control message (its prepared header
    /// at `control`) saying the datagrams are `size` bytes, or none (nil:
    /// the send is one datagram).
    @inline(__always)
    private func setSegmentSize(_ message: UnsafeMutablePointer<msghdr>, control: UnsafeMutableRawPointer?, _ size: Int) {
        guard let control else {
            message.pointee.msg_control = nil
            message.pointee.msg_controllen = 0
            return
        }
        ctunnel_cmsg_data(control.assumingMemoryBound(to: cmsghdr.self))
            .withMemoryRebound(to: UInt16.self, capacity: 1) { $0.pointee = UInt16(size) }
        message.pointee.msg_control = control
        message.pointee.msg_controllen = ctunnel_cmsg_space(MemoryLayout<UInt16>.size)
        statistics.add(.gsoSends)
    }

    /// Sends the open batch: one sendmsg, with UDP_SEGMENT when it holds
    /// more than one datagram.
    @inline(__always)
    private func flushBatch(_ ring: UnsafeMutablePointer<io_uring>) {
        let leader = openLeader
        guard leader >= 0 else { return }
        openLeader = -1
        let index = leader * sendsPerSlot
        let count = Int(sendDatagrams[index])
        let message = messages + index
        message.pointee.msg_iov = slotIovecs + leader * iovecsPerSlot
        message.pointee.msg_iovlen = count
        setSegmentSize(message, control: count > 1 ? controls + index * URingLoop.controlSpace : nil, openLength)
        let sqe = nextSQE(ring)
        io_uring_prep_sendmsg(sqe, udpFD, message, 0)
        io_uring_sqe_set_data64(sqe, CompletionTag(.udpSendBatch, slot: leader).userData)
    }

    // MARK: Requests

    /// An SQE, submitting what is queued if the submission queue is full.
    @inline(__always)
    private func nextSQE(_ ring: UnsafeMutablePointer<io_uring>) -> UnsafeMutablePointer<io_uring_sqe> {
        if let sqe = io_uring_get_sqe(ring) { return sqe }
        _ = io_uring_submit(ring)
        return io_uring_get_sqe(ring)!
    }

    /// A multishot read on the TUN: one completion per packet, each in a
    /// buffer the kernel takes from the TUN group. (liburing 2.3 has no
    /// helper for IORING_OP_READ_MULTISHOT, opcode 49.)
    private func armTun(_ ring: UnsafeMutablePointer<io_uring>) {
        let sqe = nextSQE(ring)
        io_uring_prep_rw(URingLoop.readMultishot, sqe, tunFD, nil, 0, 0)
        sqe.pointee.flags |= UInt8(curing_iosqe_buffer_select)
        sqe.pointee.buf_group = Group.tun.rawValue
        io_uring_sqe_set_data64(sqe, CompletionTag(.tunRead).userData)
    }

    static let readMultishot: Int32 = 49

    /// A multishot recvmsg on the socket, into buffers of the socket group.
    private func armUDP(_ ring: UnsafeMutablePointer<io_uring>) {
        let sqe = nextSQE(ring)
        io_uring_prep_recvmsg_multishot(sqe, udpFD, receiveTemplate, 0)
        sqe.pointee.flags |= UInt8(curing_iosqe_buffer_select)
        sqe.pointee.buf_group = Group.udp.rawValue
        io_uring_sqe_set_data64(sqe, CompletionTag(.udpRecv).userData)
    }

    private func postWake(_ ring: UnsafeMutablePointer<io_uring>) {
        let sqe = nextSQE(ring)
        io_uring_prep_read(sqe, wakeFD, wakeBuffer, 8, 0)
        io_uring_sqe_set_data64(sqe, CompletionTag(.wake).userData)
    }
}
