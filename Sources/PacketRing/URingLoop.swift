import CTunnel
import CURing
import NetBase
import UDPEncap

#if canImport(Glibc)
import Glibc
#endif

/// The io_uring data path: moves buffers between the kernel and the
/// `BatchEngine`, which does everything else.
///
/// Each direction has `depth` buffers in a provided-buffer ring (one group
/// for the TUN, one for the socket). The socket has one multishot recvmsg
/// that the kernel completes once per arrival, picking a free buffer
/// itself. The TUN has either a multishot read (Linux 6.7) or, on older
/// kernels, one read that is armed again as soon as it completes: a single
/// outstanding request either way, so a packet wakes one request, not
/// `depth` parked reads (the thundering herd of earlier designs).
///
/// Each turn of the loop submits every request prepared in the previous
/// turn and waits for completions in one `io_uring_enter`, then hands all
/// completions that are ready to the engine. Sends and TUN writes the
/// engine asks for become requests of the next submit; their completions
/// go back to it. Nothing is allocated per packet.
public final class URingLoop: DataPathLoop, BatchIO, @unchecked Sendable {
    public let statistics = Statistics()
    private let engine: BatchEngine
    private let tunFD: Int32
    private let udpFD: Int32
    private let depth: Int
    private let multishotRead: Bool
    private let busyPollNanoseconds: UInt64
    private let wakeFD: Int32

    /// What the multishot recvmsg fills in before each payload: the
    /// `io_uring_recvmsg_out` header, the sender's address and the control
    /// messages (UDP_GRO's segment size).
    private let receiveTemplate: UnsafeMutablePointer<msghdr>
    private let wakeBuffer: UnsafeMutablePointer<UInt64>
    private let bufferRings:
        (tun: UnsafeMutablePointer<io_uring_buf_ring>, udp: UnsafeMutablePointer<io_uring_buf_ring>)
    /// The ring while `run` runs (only the loop's thread touches it).
    private var ring: UnsafeMutablePointer<io_uring>?
    /// Buffers of each group that the kernel handed us and we have not
    /// given back.
    private var heldTun = 0
    private var heldUDP = 0

    static let receiveControlSpace = UDPControlMessage.space

    /// - Parameter multishotRead: read the TUN with one multishot read
    ///   (Linux 6.7); false: one read re-armed after each completion.
    public init(
        forwarder: Forwarder,
        tunFD: Int32,
        udpFD: Int32,
        configuration: LoopConfiguration,
        multishotRead: Bool = true
    ) throws {
        self.tunFD = tunFD
        self.udpFD = udpFD
        self.multishotRead = multishotRead
        self.busyPollNanoseconds = UInt64(max(0, configuration.busyPollMicroseconds)) * 1000
        // Buffer rings hold a power of two of entries.
        var depth = 1
        while depth < configuration.depth { depth <<= 1 }
        self.depth = depth
        let receiveHeader =
            MemoryLayout<io_uring_recvmsg_out>.size + MemoryLayout<sockaddr_in6>.size
            + URingLoop.receiveControlSpace
        engine = try BatchEngine(
            forwarder: forwarder,
            configuration: configuration,
            slots: depth,
            receiveHeader: receiveHeader,
            statistics: statistics
        )
        receiveTemplate = .allocate(capacity: 1)
        receiveTemplate.initialize(to: msghdr())
        receiveTemplate.pointee.msg_namelen = socklen_t(MemoryLayout<sockaddr_in6>.size)
        receiveTemplate.pointee.msg_controllen = URingLoop.receiveControlSpace
        wakeBuffer = .allocate(capacity: 1)
        wakeBuffer.initialize(to: 0)
        let ringBytes = (depth * MemoryLayout<io_uring_buf>.stride + 4095) & ~4095
        let tunRing = try BatchEngine.alignedAllocation(ringBytes, "buffer ring")
        let udpRing = try BatchEngine.alignedAllocation(ringBytes, "buffer ring")
        memset(tunRing, 0, ringBytes)
        memset(udpRing, 0, ringBytes)
        bufferRings = (
            tunRing.assumingMemoryBound(to: io_uring_buf_ring.self),
            udpRing.assumingMemoryBound(to: io_uring_buf_ring.self)
        )
        wakeFD = eventfd(0, Int32(EFD_CLOEXEC))
        guard wakeFD >= 0 else {
            throw SystemError("eventfd", on: "data path", errno: .current)
        }
    }

    deinit {
        free(bufferRings.tun)
        free(bufferRings.udp)
        receiveTemplate.deallocate()
        wakeBuffer.deallocate()
        close(wakeFD)
    }

    public func stop() {
        var one: UInt64 = 1
        _ = write(wakeFD, &one, 8)
    }

    // MARK: BatchIO

    @inline(__always) func send(_ message: UnsafeMutablePointer<msghdr>, tag: CompletionTag) {
        let sqe = nextSQE()
        io_uring_prep_sendmsg(sqe, udpFD, message, 0)
        io_uring_sqe_set_data64(sqe, tag.userData)
    }

    @inline(__always) func writeTun(_ iovecs: UnsafeMutablePointer<iovec>, count: Int, tag: CompletionTag) {
        let sqe = nextSQE()
        io_uring_prep_writev(sqe, tunFD, iovecs, UInt32(count), 0)
        io_uring_sqe_set_data64(sqe, tag.userData)
    }

    /// Hands buffer `slot` back to the kernel for the next arrival of `group`.
    @inline(__always) func release(_ group: SlotGroup, _ slot: Int) {
        let bufferRing: UnsafeMutablePointer<io_uring_buf_ring>
        let address: UnsafeMutableRawPointer
        let length: Int
        if group == .tun {
            heldTun -= 1
            bufferRing = bufferRings.tun
            address = engine.tunRead(slot)
            length = engine.tunReadCapacity
        } else {
            heldUDP -= 1
            bufferRing = bufferRings.udp
            address = engine.udpBuffer(slot)
            length = engine.receiveHeader + engine.udpCapacity
        }
        io_uring_buf_ring_add(
            bufferRing,
            address,
            UInt32(length),
            UInt16(slot),
            io_uring_buf_ring_mask(UInt32(depth)),
            0
        )
        io_uring_buf_ring_advance(bufferRing, 1)
    }

    // MARK: The loop

    public func run() throws {
        let ring = UnsafeMutablePointer<io_uring>.allocate(capacity: 1)
        defer { ring.deallocate() }
        var params = io_uring_params()
        // The ring belongs to this thread alone; completions are processed
        // when we ask for them, not by interrupting us. The completion queue
        // has room for every send and write that can be in flight at once.
        let entries = UInt32(2 * depth + 4)
        let completionEntries = UInt32(min(32768, max(4 * Int(entries), depth * (engine.batcher.sendsPerSlot + 8))))
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
            throw SystemError(
                "io_uring_queue_init",
                on: "data path ring (\(entries) entries)",
                errno: Errno(-rc),
                hint: rc == -EPERM || rc == -ENOSYS
                    ? "io_uring is refused here (seccomp or kernel.io_uring_disabled); use --datapath syscall"
                    : nil
            )
        }
        self.ring = ring
        defer {
            io_uring_queue_exit(ring)
            self.ring = nil
        }

        for group in [SlotGroup.tun, .udp] {
            let bufferRing = group == .tun ? bufferRings.tun : bufferRings.udp
            var registration = io_uring_buf_reg()
            registration.ring_addr = UInt64(UInt(bitPattern: bufferRing))
            registration.ring_entries = UInt32(depth)
            registration.bgid = group.rawValue
            let r = io_uring_register_buf_ring(ring, &registration, 0)
            guard r == 0 else {
                throw SystemError(
                    "io_uring_register_buf_ring",
                    on: "data path ring",
                    errno: Errno(-r),
                    hint: "provided buffer rings need Linux 5.19 or later; use --datapath syscall"
                )
            }
            io_uring_buf_ring_init(bufferRing)
            if group == .tun { heldTun = depth } else { heldUDP = depth }
            for slot in 0..<depth { release(group, slot) }
        }

        var tunArmed = false, udpArmed = false
        var tunFailures = 0, udpFailures = 0
        armTun(); tunArmed = true
        armUDP(); udpArmed = true
        postWake()

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
                        engine.tunRead(bufferID, length: Int(result), io: self)
                    } else {
                        if hasBuffer { release(.tun, bufferID) }
                        // ENOBUFS: every buffer is in flight; re-armed when one returns.
                        if result < 0 && result != -ENOBUFS && result != -EAGAIN && result != -EINTR {
                            statistics.add(.readErrors)
                            tunFailures += 1
                            if tunFailures > 2 * depth {
                                throw SystemError(
                                    "read",
                                    on: "TUN device",
                                    errno: Errno(-result),
                                    hint: "the device went away or was taken down"
                                )
                            }
                        }
                    }
                    // A single read is armed again at once, ahead of the
                    // sends it caused: the next packet may already wait.
                    if !tunArmed && !multishotRead && heldTun < depth { armTun(); tunArmed = true }
                case .udpRecv:
                    if hasBuffer { heldUDP += 1 }
                    if flags & IORING_CQE_F_MORE == 0 { udpArmed = false }
                    if result >= 0 && hasBuffer {
                        udpFailures = 0
                        handleReceive(bufferID, length: Int(result))
                    } else {
                        if hasBuffer { release(.udp, bufferID) }
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
                case .wake:
                    stopping = true
                default:
                    engine.completed(tag, result: result, io: self)
                }
            }
            io_uring_cq_advance(ring, UInt32(count))
            engine.flush(self)
            // A multishot request ends when its group ran out of buffers
            // (ENOBUFS) or on an error; arm it again once a buffer is free.
            if !tunArmed && heldTun < depth { armTun(); tunArmed = true }
            if !udpArmed && heldUDP < depth { armUDP(); udpArmed = true }
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
        let deadline = monotonicNanoseconds() &+ busyPollNanoseconds
        repeat {
            // Runs the task work that turns readiness into completions.
            _ = io_uring_get_events(ring)
            if io_uring_cq_ready(ring) > 0 { return true }
            // Whatever else wants this CPU (the kernel's softirq work,
            // the peer daemon, the application) goes first.
            sched_yield()
        } while monotonicNanoseconds() < deadline
        return false
    }

    // MARK: Receives

    @inline(__always)
    private func handleReceive(_ slot: Int, length: Int) {
        let start = engine.udpBuffer(slot)
        guard let out = io_uring_recvmsg_validate(start, Int32(length), receiveTemplate) else {
            statistics.add(.udpDatagramsReceived)
            statistics.add(.droppedMalformed)
            engine.discard(slot, io: self)
            return
        }
        if out.pointee.flags & UInt32(MSG_TRUNC) != 0 {
            statistics.add(.udpDatagramsReceived)
            statistics.add(.droppedTruncated)
            engine.discard(slot, io: self)
            return
        }
        guard let sender = UnderlaySender(name: io_uring_recvmsg_name(out)!) else {
            statistics.add(.udpDatagramsReceived)
            statistics.add(.droppedMalformed)
            engine.discard(slot, io: self)
            return
        }
        let payload = io_uring_recvmsg_payload(out, receiveTemplate)!
        let payloadLength = Int(io_uring_recvmsg_payload_length(out, Int32(length), receiveTemplate))
        var segmentLength = payloadLength
        if engine.offloads.receiveCoalescing {
            var control = io_uring_recvmsg_cmsg_firsthdr(out, receiveTemplate)
            while let header = control {
                if let size = UDPControlMessage.receiveSegmentSize(header) { segmentLength = size }
                control = io_uring_recvmsg_cmsg_nexthdr(out, receiveTemplate, header)
            }
        }
        engine.received(
            slot,
            payload: payload,
            length: payloadLength,
            segmentLength: segmentLength,
            sender: sender,
            io: self
        )
    }

    // MARK: Requests

    /// An SQE, submitting what is queued if the submission queue is full.
    @inline(__always)
    private func nextSQE() -> UnsafeMutablePointer<io_uring_sqe> {
        let ring = ring!
        if let sqe = io_uring_get_sqe(ring) { return sqe }
        _ = io_uring_submit(ring)
        return io_uring_get_sqe(ring)!
    }

    /// The TUN's read: multishot (one completion per packet) or single,
    /// each into a buffer the kernel takes from the TUN group. (liburing 2.3
    /// has no helper for IORING_OP_READ_MULTISHOT.)
    private func armTun() {
        let sqe = nextSQE()
        if multishotRead {
            io_uring_prep_rw(curing_op_read_multishot, sqe, tunFD, nil, 0, 0)
        } else {
            io_uring_prep_rw(curing_op_read, sqe, tunFD, nil, UInt32(engine.tunReadCapacity), 0)
        }
        sqe.pointee.flags |= UInt8(curing_iosqe_buffer_select)
        sqe.pointee.buf_group = SlotGroup.tun.rawValue
        io_uring_sqe_set_data64(sqe, CompletionTag(.tunRead).userData)
    }

    /// A multishot recvmsg on the socket, into buffers of the socket group.
    private func armUDP() {
        let sqe = nextSQE()
        io_uring_prep_recvmsg_multishot(sqe, udpFD, receiveTemplate, 0)
        sqe.pointee.flags |= UInt8(curing_iosqe_buffer_select)
        sqe.pointee.buf_group = SlotGroup.udp.rawValue
        io_uring_sqe_set_data64(sqe, CompletionTag(.udpRecv).userData)
    }

    private func postWake() {
        let sqe = nextSQE()
        io_uring_prep_read(sqe, wakeFD, wakeBuffer, 8, 0)
        io_uring_sqe_set_data64(sqe, CompletionTag(.wake).userData)
    }
}
