#if canImport(Glibc)
import Glibc
#endif
import CTunnel
import CURing
import NetBase
import UDPEncap

/// How a data-path loop is sized and what it reads and writes.
public struct LoopConfiguration: Sendable {
    /// Reads kept posted on each of the TUN and the UDP socket; also the
    /// most packets moved per direction by one `io_uring_enter`.
    public var depth: Int
    /// Room for one packet (after the headroom).
    public var packetCapacity: Int

    public init(depth: Int = DataPath.defaultBatchSize, mtu: Int) {
        self.depth = depth
        // Room for the largest packet the TUN may hand us, and for an ICMP
        // error (28 + 548 bytes) built in place.
        self.packetCapacity = max(mtu, 1024)
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

/// The io_uring data path.
///
/// Each direction has `depth` buffers in a provided-buffer ring (one group
/// for the TUN, one for the socket) and one multishot request that the
/// kernel completes once per arriving packet, picking a free buffer itself:
/// a multishot read on the TUN and a multishot recvmsg on the socket. A
/// packet read from the TUN is sent from its own buffer (each TUN buffer
/// owns the `iovec`/`msghdr`/`sockaddr_in` of its send, alive until the
/// completion) or turned into an ICMP error written back; a datagram is
/// written into the TUN from its buffer. When that completes, the buffer
/// goes back into its ring.
///
/// One armed request per descriptor, not one parked read per buffer: a
/// packet wakes one request, not `depth` of them. Each turn of the loop
/// submits every request prepared in the previous turn and waits for
/// completions in one `io_uring_enter`, then handles all completions that
/// are ready: under load one system call moves a batch in both directions.
/// Nothing is allocated per packet.
public final class URingLoop: DataPathLoop, @unchecked Sendable {
    public let statistics = Statistics()
    private let forwarder: Forwarder
    private let tunFD: Int32
    private let udpFD: Int32
    private let depth: Int
    private let capacity: Int
    private let stride: Int
    private let wakeFD: Int32

    /// Buffers 0..<depth: the TUN group; depth..<2·depth: the socket group.
    private let slab: UnsafeMutableRawPointer
    private let iovecs: UnsafeMutablePointer<iovec>
    private let messages: UnsafeMutablePointer<msghdr>
    private let addresses: UnsafeMutablePointer<sockaddr_in>
    /// What the multishot recvmsg fills in before each payload: the
    /// `io_uring_recvmsg_out` header and the sender's address.
    private let receiveTemplate: UnsafeMutablePointer<msghdr>
    private let wakeBuffer: UnsafeMutablePointer<UInt64>
    private let bufferRings: [UnsafeMutablePointer<io_uring_buf_ring>]
    /// Buffers of each group that the kernel handed us and we have not
    /// given back (only the loop's thread touches this).
    private var heldTun = 0
    private var heldUDP = 0

    /// Bytes before a datagram's payload in a socket-group buffer.
    static let receiveHeader = MemoryLayout<io_uring_recvmsg_out>.size + MemoryLayout<sockaddr_in>.size

    /// The operation a completion belongs to, in the top byte of user_data.
    enum Op: UInt64 {
        case tunRead = 1, udpSend, tunReply, udpRecv, tunWrite, wake
    }

    enum Group: UInt16 { case tun = 0, udp = 1 }

    public init(forwarder: Forwarder, tunFD: Int32, udpFD: Int32, configuration: LoopConfiguration) throws {
        self.forwarder = forwarder
        self.tunFD = tunFD
        self.udpFD = udpFD
        // Buffer rings hold a power of two of entries.
        var depth = 1
        while depth < configuration.depth { depth <<= 1 }
        self.depth = depth
        self.capacity = configuration.packetCapacity
        // Room for the headroom (TUN group) or the recvmsg header (socket
        // group), cache-line aligned.
        self.stride = (max(DataPath.headroom, URingLoop.receiveHeader) + capacity + 63) & ~63
        let buffers = 2 * depth
        var memory: UnsafeMutableRawPointer?
        guard posix_memalign(&memory, 4096, buffers * stride) == 0, let memory else {
            throw SystemError("posix_memalign \(buffers * stride) bytes", on: "packet buffers", errno: .current)
        }
        slab = memory
        iovecs = .allocate(capacity: depth)
        iovecs.initialize(repeating: iovec(), count: depth)
        messages = .allocate(capacity: depth)
        messages.initialize(repeating: msghdr(), count: depth)
        addresses = .allocate(capacity: depth)
        addresses.initialize(repeating: sockaddr_in(), count: depth)
        receiveTemplate = .allocate(capacity: 1)
        receiveTemplate.initialize(to: msghdr())
        receiveTemplate.pointee.msg_namelen = socklen_t(MemoryLayout<sockaddr_in>.size)
        wakeBuffer = .allocate(capacity: 1)
        wakeBuffer.initialize(to: 0)
        var rings: [UnsafeMutablePointer<io_uring_buf_ring>] = []
        for _ in 0..<2 {
            var ringMemory: UnsafeMutableRawPointer?
            guard posix_memalign(&ringMemory, 4096, depth * MemoryLayout<io_uring_buf>.stride) == 0,
                  let ringMemory else {
                throw SystemError("posix_memalign", on: "buffer ring", errno: .current)
            }
            memset(ringMemory, 0, depth * MemoryLayout<io_uring_buf>.stride)
            rings.append(ringMemory.assumingMemoryBound(to: io_uring_buf_ring.self))
        }
        bufferRings = rings
        wakeFD = eventfd(0, Int32(EFD_CLOEXEC))
        guard wakeFD >= 0 else {
            throw SystemError("eventfd", on: "data path", errno: .current)
        }
        for slot in 0..<depth {
            iovecs[slot].iov_base = slab + slot * stride + DataPath.headroom
            messages[slot].msg_name = UnsafeMutableRawPointer(addresses + slot)
            messages[slot].msg_namelen = socklen_t(MemoryLayout<sockaddr_in>.size)
            messages[slot].msg_iov = iovecs + slot
            messages[slot].msg_iovlen = 1
        }
    }

    deinit {
        free(slab)
        for ring in bufferRings { free(ring) }
        iovecs.deallocate()
        messages.deallocate()
        addresses.deallocate()
        receiveTemplate.deallocate()
        wakeBuffer.deallocate()
        close(wakeFD)
    }

    public func stop() {
        var one: UInt64 = 1
        _ = write(wakeFD, &one, 8)
    }

    /// Where buffer `id` of `group` starts in the slab.
    @inline(__always) private func buffer(_ group: Group, _ id: Int) -> UnsafeMutableRawPointer {
        slab + (Int(group.rawValue) * depth + id) * stride
    }

    /// The packet of TUN buffer `id` (after the headroom).
    @inline(__always) private func packet(_ id: Int) -> UnsafeMutableRawPointer {
        buffer(.tun, id) + DataPath.headroom
    }

    /// Hands buffer `id` back to the kernel for the next packet of `group`.
    @inline(__always) private func recycle(_ group: Group, _ id: Int) {
        if group == .tun { heldTun -= 1 } else { heldUDP -= 1 }
        let ring = bufferRings[Int(group.rawValue)]
        let (address, length) = group == .tun
            ? (packet(id), capacity)
            : (buffer(.udp, id), URingLoop.receiveHeader + capacity)
        io_uring_buf_ring_add(ring, address, UInt32(length), UInt16(id), io_uring_buf_ring_mask(UInt32(depth)), 0)
        io_uring_buf_ring_advance(ring, 1)
    }

    public func run() throws {
        let ring = UnsafeMutablePointer<io_uring>.allocate(capacity: 1)
        defer { ring.deallocate() }
        var params = io_uring_params()
        // The ring belongs to this thread alone; completions are processed
        // when we ask for them, not by interrupting us.
        params.flags = UInt32(IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN)
        let entries = UInt32(2 * depth + 4)
        var rc = io_uring_queue_init_params(entries, ring, &params)
        if rc == -EINVAL {
            params = io_uring_params()
            rc = io_uring_queue_init_params(entries, ring, &params)
        }
        guard rc == 0 else {
            throw SystemError("io_uring_queue_init", on: "data path ring (\(entries) entries)", errno: Errno(-rc),
                              hint: rc == -EPERM || rc == -ENOSYS
                                ? "io_uring is disabled here (kernel.io_uring_disabled?); use --datapath simple" : nil)
        }
        defer { io_uring_queue_exit(ring) }

        for group in [Group.tun, .udp] {
            let bufferRing = bufferRings[Int(group.rawValue)]
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
            for id in 0..<depth { recycle(group, id) }
        }

        var tunArmed = false, udpArmed = false
        var tunFailures = 0, udpFailures = 0
        armTun(ring); tunArmed = true
        armUDP(ring); udpArmed = true
        postWake(ring)

        let cqes = UnsafeMutablePointer<UnsafeMutablePointer<io_uring_cqe>?>.allocate(capacity: 2 * depth + 4)
        defer { cqes.deallocate() }
        var stopping = false
        while !stopping {
            let submitted = io_uring_submit_and_wait(ring, 1)
            if submitted < 0 && submitted != -EINTR && submitted != -EAGAIN && submitted != -EBUSY {
                throw SystemError("io_uring_enter", on: "data path ring", errno: Errno(-submitted))
            }
            let count = Int(io_uring_peek_batch_cqe(ring, cqes, UInt32(2 * depth + 4)))
            if count == 0 { continue }
            statistics.add(.batches)
            for i in 0..<count {
                let cqe = cqes[i]!
                let data = cqe.pointee.user_data
                let result = cqe.pointee.res
                let flags = cqe.pointee.flags
                let id = Int(data & 0xffff_ffff)
                let op = Op(rawValue: data >> 56)
                let bufferID = Int(flags >> IORING_CQE_BUFFER_SHIFT)
                let hasBuffer = flags & IORING_CQE_F_BUFFER != 0
                if hasBuffer { if op == .udpRecv { heldUDP += 1 } else { heldTun += 1 } }
                switch op {
                case .tunRead:
                    if flags & IORING_CQE_F_MORE == 0 { tunArmed = false }
                    if result > 0 && hasBuffer {
                        tunFailures = 0
                        handleTunPacket(ring, bufferID, length: Int(result))
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
                    if result < 0 { statistics.add(.sendErrors) } else {
                        statistics.add(.udpPacketsSent)
                        statistics.add(.udpBytesSent, UInt64(result))
                    }
                    recycle(.tun, id)
                case .tunReply:
                    if result < 0 { statistics.add(.tunWriteErrors) }
                    recycle(.tun, id)
                case .udpRecv:
                    if flags & IORING_CQE_F_MORE == 0 { udpArmed = false }
                    if result >= 0 && hasBuffer {
                        udpFailures = 0
                        handleDatagram(ring, bufferID, length: Int(result))
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
                        statistics.add(.tunBytesWritten, UInt64(result))
                    }
                    recycle(.udp, id)
                case .wake:
                    stopping = true
                case nil:
                    break
                }
            }
            io_uring_cq_advance(ring, UInt32(count))
            // A multishot request ends when its group ran out of buffers
            // (ENOBUFS) or on an error; arm it again once a buffer is free.
            if !tunArmed && heldTun < depth { armTun(ring); tunArmed = true }
            if !udpArmed && heldUDP < depth { armUDP(ring); udpArmed = true }
            statistics.publish()
        }
    }

    // MARK: Completions

    @inline(__always)
    private func handleTunPacket(_ ring: UnsafeMutablePointer<io_uring>, _ id: Int, length: Int) {
        let p = packet(id)
        switch forwarder.fromTun(p, length: length, capacity: capacity, stats: statistics) {
        case .send(let address, let port, let n):
            let sa = addresses + id
            sa.pointee.sin_family = sa_family_t(AF_INET)
            sa.pointee.sin_port = port.bigEndian
            sa.pointee.sin_addr.s_addr = address.bigEndian
            iovecs[id].iov_len = n
            let sqe = nextSQE(ring)
            io_uring_prep_sendmsg(sqe, udpFD, messages + id, 0)
            io_uring_sqe_set_data64(sqe, Op.udpSend.rawValue << 56 | UInt64(id))
        case .reply(let n):
            let sqe = nextSQE(ring)
            io_uring_prep_write(sqe, tunFD, p, UInt32(n), 0)
            io_uring_sqe_set_data64(sqe, Op.tunReply.rawValue << 56 | UInt64(id))
        case .drop:
            recycle(.tun, id)
        }
    }

    @inline(__always)
    private func handleDatagram(_ ring: UnsafeMutablePointer<io_uring>, _ id: Int, length: Int) {
        let start = buffer(.udp, id)
        guard let out = io_uring_recvmsg_validate(start, Int32(length), receiveTemplate) else {
            statistics.add(.udpDatagramsReceived)
            statistics.add(.droppedMalformed)
            recycle(.udp, id)
            return
        }
        if out.pointee.flags & UInt32(MSG_TRUNC) != 0 {
            statistics.add(.udpDatagramsReceived)
            statistics.add(.droppedTruncated)
            recycle(.udp, id)
            return
        }
        let name = io_uring_recvmsg_name(out)!.assumingMemoryBound(to: sockaddr_in.self)
        let payload = io_uring_recvmsg_payload(out, receiveTemplate)!
        let payloadLength = Int(io_uring_recvmsg_payload_length(out, Int32(length), receiveTemplate))
        let sender = UInt32(bigEndian: name.pointee.sin_addr.s_addr)
        let port = UInt16(bigEndian: name.pointee.sin_port)
        guard let n = forwarder.fromNetwork(payload, length: payloadLength, sender: sender, senderPort: port,
                                            stats: statistics) else {
            recycle(.udp, id)
            return
        }
        let sqe = nextSQE(ring)
        io_uring_prep_write(sqe, tunFD, payload, UInt32(n), 0)
        io_uring_sqe_set_data64(sqe, Op.tunWrite.rawValue << 56 | UInt64(id))
    }

    // MARK: Requests

    /// An SQE, submitting what is queued if the submission queue is full.
    /// (It cannot stay full: the ring has an entry for every buffer.)
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
        io_uring_sqe_set_data64(sqe, Op.tunRead.rawValue << 56)
    }

    static let readMultishot: Int32 = 49

    /// A multishot recvmsg on the socket, into buffers of the socket group.
    private func armUDP(_ ring: UnsafeMutablePointer<io_uring>) {
        let sqe = nextSQE(ring)
        io_uring_prep_recvmsg_multishot(sqe, udpFD, receiveTemplate, 0)
        sqe.pointee.flags |= UInt8(curing_iosqe_buffer_select)
        sqe.pointee.buf_group = Group.udp.rawValue
        io_uring_sqe_set_data64(sqe, Op.udpRecv.rawValue << 56)
    }

    private func postWake(_ ring: UnsafeMutablePointer<io_uring>) {
        let sqe = nextSQE(ring)
        io_uring_prep_read(sqe, wakeFD, wakeBuffer, 8, 0)
        io_uring_sqe_set_data64(sqe, Op.wake.rawValue << 56)
    }
}
