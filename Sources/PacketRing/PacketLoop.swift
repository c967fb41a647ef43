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
/// Every slot owns a buffer and the `iovec`/`msghdr`/`sockaddr_in` its
/// request needs (they must stay alive until the completion). Slots
/// `0..<depth` cycle TUN read → UDP send (or TUN write of an ICMP error) →
/// TUN read; slots `depth..<2·depth` cycle UDP recvmsg → TUN write → UDP
/// recvmsg. Each turn of the loop submits every request prepared in the
/// previous turn and waits for completions in one `io_uring_enter`, then
/// handles all completions that are ready: with traffic, one system call
/// moves a batch in both directions. Nothing is allocated per packet.
public final class URingLoop: DataPathLoop, @unchecked Sendable {
    public let statistics = Statistics()
    private let forwarder: Forwarder
    private let tunFD: Int32
    private let udpFD: Int32
    private let depth: Int
    private let capacity: Int
    private let stride: Int
    private let wakeFD: Int32

    private let slab: UnsafeMutableRawPointer
    private let iovecs: UnsafeMutablePointer<iovec>
    private let messages: UnsafeMutablePointer<msghdr>
    private let addresses: UnsafeMutablePointer<sockaddr_in>
    private let wakeBuffer: UnsafeMutablePointer<UInt64>

    /// The operation a completion belongs to, in the top byte of user_data.
    enum Op: UInt64 {
        case tunRead = 1, udpSend, tunReply, udpRecv, tunWrite, wake
    }

    public init(forwarder: Forwarder, tunFD: Int32, udpFD: Int32, configuration: LoopConfiguration) throws {
        self.forwarder = forwarder
        self.tunFD = tunFD
        self.udpFD = udpFD
        self.depth = configuration.depth
        self.capacity = configuration.packetCapacity
        // Keep buffers cache-line aligned.
        self.stride = (DataPath.headroom + capacity + 63) & ~63
        let slots = 2 * depth
        var memory: UnsafeMutableRawPointer?
        guard posix_memalign(&memory, 4096, slots * stride) == 0, let memory else {
            throw SystemError("posix_memalign \(slots * stride) bytes", on: "packet buffers", errno: .current)
        }
        slab = memory
        iovecs = .allocate(capacity: slots)
        iovecs.initialize(repeating: iovec(), count: slots)
        messages = .allocate(capacity: slots)
        messages.initialize(repeating: msghdr(), count: slots)
        addresses = .allocate(capacity: slots)
        addresses.initialize(repeating: sockaddr_in(), count: slots)
        wakeBuffer = .allocate(capacity: 1)
        wakeBuffer.initialize(to: 0)
        wakeFD = eventfd(0, Int32(EFD_CLOEXEC))
        guard wakeFD >= 0 else {
            throw SystemError("eventfd", on: "data path", errno: .current)
        }
    }

    deinit {
        free(slab)
        iovecs.deallocate()
        messages.deallocate()
        addresses.deallocate()
        wakeBuffer.deallocate()
        close(wakeFD)
    }

    public func stop() {
        var one: UInt64 = 1
        _ = write(wakeFD, &one, 8)
    }

    @inline(__always) private func packet(_ slot: Int) -> UnsafeMutableRawPointer {
        slab + slot * stride + DataPath.headroom
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

        for slot in 0..<depth { postTunRead(ring, slot) }
        for slot in depth..<2 * depth { postUDPRecv(ring, slot) }
        postWake(ring)

        let cqes = UnsafeMutablePointer<UnsafeMutablePointer<io_uring_cqe>?>.allocate(capacity: 2 * depth + 4)
        defer { cqes.deallocate() }
        var tunFailures = 0, udpFailures = 0
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
                let slot = Int(data & 0xffff_ffff)
                switch Op(rawValue: data >> 56) {
                case .tunRead:
                    if result > 0 {
                        tunFailures = 0
                        handleTunPacket(ring, slot, length: Int(result))
                    } else {
                        if result != -EAGAIN && result != -EINTR {
                            statistics.add(.readErrors)
                            tunFailures += 1
                            if tunFailures > 2 * depth {
                                throw SystemError("read", on: "TUN device", errno: Errno(-result),
                                                  hint: "the device went away or was taken down")
                            }
                        }
                        postTunRead(ring, slot)
                    }
                case .udpSend:
                    if result < 0 { statistics.add(.sendErrors) } else {
                        statistics.add(.udpPacketsSent)
                        statistics.add(.udpBytesSent, UInt64(result))
                    }
                    postTunRead(ring, slot)
                case .tunReply:
                    if result < 0 { statistics.add(.tunWriteErrors) }
                    postTunRead(ring, slot)
                case .udpRecv:
                    if result >= 0 {
                        udpFailures = 0
                        handleDatagram(ring, slot, length: Int(result))
                    } else {
                        if result != -EAGAIN && result != -EINTR {
                            statistics.add(.readErrors)
                            // ICMP port unreachable from a peer surfaces as
                            // ECONNREFUSED on the next receive: not fatal.
                            if result != -ECONNREFUSED { udpFailures += 1 }
                            if udpFailures > 2 * depth {
                                throw SystemError("recvmsg", on: "udp socket", errno: Errno(-result))
                            }
                        }
                        postUDPRecv(ring, slot)
                    }
                case .tunWrite:
                    if result < 0 { statistics.add(.tunWriteErrors) } else {
                        statistics.add(.tunPacketsWritten)
                        statistics.add(.tunBytesWritten, UInt64(result))
                    }
                    postUDPRecv(ring, slot)
                case .wake:
                    stopping = true
                case nil:
                    break
                }
            }
            io_uring_cq_advance(ring, UInt32(count))
            statistics.publish()
        }
    }

    // MARK: Completions

    @inline(__always)
    private func handleTunPacket(_ ring: UnsafeMutablePointer<io_uring>, _ slot: Int, length: Int) {
        let p = packet(slot)
        switch forwarder.fromTun(p, length: length, capacity: capacity, stats: statistics) {
        case .send(let address, let port, let n):
            let sa = addresses + slot
            sa.pointee.sin_family = sa_family_t(AF_INET)
            sa.pointee.sin_port = port.bigEndian
            sa.pointee.sin_addr.s_addr = address.bigEndian
            iovecs[slot].iov_len = n
            let m = messages + slot
            m.pointee.msg_namelen = socklen_t(MemoryLayout<sockaddr_in>.size)
            let sqe = nextSQE(ring)
            io_uring_prep_sendmsg(sqe, udpFD, m, 0)
            io_uring_sqe_set_data64(sqe, Op.udpSend.rawValue << 56 | UInt64(slot))
        case .reply(let n):
            let sqe = nextSQE(ring)
            io_uring_prep_write(sqe, tunFD, p, UInt32(n), 0)
            io_uring_sqe_set_data64(sqe, Op.tunReply.rawValue << 56 | UInt64(slot))
        case .drop:
            postTunRead(ring, slot)
        }
    }

    @inline(__always)
    private func handleDatagram(_ ring: UnsafeMutablePointer<io_uring>, _ slot: Int, length: Int) {
        let m = messages + slot
        if m.pointee.msg_flags & Int32(MSG_TRUNC) != 0 {
            statistics.add(.udpDatagramsReceived)
            statistics.add(.droppedTruncated)
            postUDPRecv(ring, slot)
            return
        }
        let sender = UInt32(bigEndian: addresses[slot].sin_addr.s_addr)
        let port = UInt16(bigEndian: addresses[slot].sin_port)
        guard let n = forwarder.fromNetwork(packet(slot), length: length, sender: sender, senderPort: port,
                                            stats: statistics) else {
            postUDPRecv(ring, slot)
            return
        }
        let sqe = nextSQE(ring)
        io_uring_prep_write(sqe, tunFD, packet(slot), UInt32(n), 0)
        io_uring_sqe_set_data64(sqe, Op.tunWrite.rawValue << 56 | UInt64(slot))
    }

    // MARK: Requests

    /// An SQE, submitting what is queued if the submission queue is full.
    /// (It cannot stay full: the ring has an entry for every slot.)
    @inline(__always)
    private func nextSQE(_ ring: UnsafeMutablePointer<io_uring>) -> UnsafeMutablePointer<io_uring_sqe> {
        if let sqe = io_uring_get_sqe(ring) { return sqe }
        _ = io_uring_submit(ring)
        return io_uring_get_sqe(ring)!
    }

    @inline(__always)
    private func postTunRead(_ ring: UnsafeMutablePointer<io_uring>, _ slot: Int) {
        let sqe = nextSQE(ring)
        io_uring_prep_read(sqe, tunFD, packet(slot), UInt32(capacity), 0)
        io_uring_sqe_set_data64(sqe, Op.tunRead.rawValue << 56 | UInt64(slot))
        // The same slot's message is used for its send; point it at the packet.
        iovecs[slot].iov_base = packet(slot)
        let m = messages + slot
        m.pointee.msg_name = UnsafeMutableRawPointer(addresses + slot)
        m.pointee.msg_iov = iovecs + slot
        m.pointee.msg_iovlen = 1
    }

    @inline(__always)
    private func postUDPRecv(_ ring: UnsafeMutablePointer<io_uring>, _ slot: Int) {
        iovecs[slot].iov_base = packet(slot)
        iovecs[slot].iov_len = capacity
        let m = messages + slot
        m.pointee.msg_name = UnsafeMutableRawPointer(addresses + slot)
        m.pointee.msg_namelen = socklen_t(MemoryLayout<sockaddr_in>.size)
        m.pointee.msg_iov = iovecs + slot
        m.pointee.msg_iovlen = 1
        m.pointee.msg_control = nil
        m.pointee.msg_controllen = 0
        m.pointee.msg_flags = 0
        let sqe = nextSQE(ring)
        io_uring_prep_recvmsg(sqe, udpFD, m, 0)
        io_uring_sqe_set_data64(sqe, Op.udpRecv.rawValue << 56 | UInt64(slot))
    }

    private func postWake(_ ring: UnsafeMutablePointer<io_uring>) {
        let sqe = nextSQE(ring)
        io_uring_prep_read(sqe, wakeFD, wakeBuffer, 8, 0)
        io_uring_sqe_set_data64(sqe, Op.wake.rawValue << 56)
    }
}
