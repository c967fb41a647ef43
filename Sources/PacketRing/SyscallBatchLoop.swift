import CTunnel
import NetBase
import UDPEncap

#if canImport(Glibc)
import Glibc
#endif

/// The data path without io_uring, with every offload: for kernels older
/// than io_uring's buffer rings and hosts that refuse io_uring (Docker's
/// default seccomp profile, `kernel.io_uring_disabled`, gVisor).
///
/// Each turn: TUN reads until the queue is empty or every TUN slot is used
/// (with a virtio header, one read is one super-packet of up to 64 KiB);
/// the `BatchEngine` splits them and batches their datagrams, which leave
/// in one `sendmmsg` (each message a UDP_SEGMENT send of up to 64
/// datagrams). Then one `recvmmsg` fills up to `depth` UDP slots (with
/// UDP_GRO each may hold many datagrams of one sender); the engine checks
/// and coalesces them, and each TUN write is one `writev`. A turn that
/// moved nothing ends in `poll` on the TUN, the socket and the stop event;
/// after a busy turn the loop may look again for up to the busy-poll time
/// before it sleeps. Nothing is allocated per packet.
public final class SyscallBatchLoop: DataPathLoop, BatchIO, @unchecked Sendable {
    public let statistics = Statistics()
    private let engine: BatchEngine
    private let tunFD: Int32
    private let udpFD: Int32
    private let depth: Int
    private let busyPollNanoseconds: UInt64
    private let wakeFD: Int32

    /// Sends gathered this turn for one `sendmmsg`, and their tags.
    private let sendVector: UnsafeMutablePointer<ctunnel_mmsghdr>
    private let sendTags: UnsafeMutablePointer<CompletionTag>
    private let sendCapacity: Int
    private var sendCount = 0
    /// The `recvmmsg` vector: one message per UDP slot, its address and
    /// control space.
    private let receiveVector: UnsafeMutablePointer<ctunnel_mmsghdr>
    private let receiveIovecs: UnsafeMutablePointer<iovec>
    private let receiveNames: UnsafeMutablePointer<sockaddr_in6>
    private let receiveControls: UnsafeMutableRawPointer

    public init(forwarder: Forwarder, tunFD: Int32, udpFD: Int32, configuration: LoopConfiguration) throws {
        self.tunFD = tunFD
        self.udpFD = udpFD
        depth = max(1, configuration.depth)
        busyPollNanoseconds = UInt64(max(0, configuration.busyPollMicroseconds)) * 1000
        engine = try BatchEngine(
            forwarder: forwarder,
            configuration: configuration,
            slots: depth,
            receiveHeader: 0,
            statistics: statistics
        )
        // Reads stop at an empty queue instead of blocking (a TUN queue is
        // opened non-blocking already; a test's stand-in may not be).
        let flags = fcntl(tunFD, F_GETFL)
        guard flags >= 0, fcntl(tunFD, F_SETFL, flags | O_NONBLOCK) == 0 else {
            throw SystemError("fcntl O_NONBLOCK", on: "TUN queue", errno: .current)
        }
        sendCapacity = 1024
        sendVector = .allocate(capacity: sendCapacity)
        sendVector.initialize(repeating: ctunnel_mmsghdr(), count: sendCapacity)
        sendTags = .allocate(capacity: sendCapacity)
        sendTags.initialize(repeating: CompletionTag(.udpSend), count: sendCapacity)
        receiveVector = .allocate(capacity: depth)
        receiveVector.initialize(repeating: ctunnel_mmsghdr(), count: depth)
        receiveIovecs = .allocate(capacity: depth)
        receiveNames = .allocate(capacity: depth)
        receiveNames.initialize(repeating: sockaddr_in6(), count: depth)
        receiveControls = .allocate(byteCount: depth * UDPControlMessage.space, alignment: 8)
        for slot in 0..<depth {
            receiveIovecs[slot] = iovec(iov_base: engine.udpPayload(slot), iov_len: engine.udpCapacity)
            receiveVector[slot].msg_hdr.msg_iov = receiveIovecs + slot
            receiveVector[slot].msg_hdr.msg_iovlen = 1
            receiveVector[slot].msg_hdr.msg_name = UnsafeMutableRawPointer(receiveNames + slot)
            receiveVector[slot].msg_hdr.msg_control = receiveControls + slot * UDPControlMessage.space
        }
        wakeFD = eventfd(0, Int32(EFD_CLOEXEC | EFD_NONBLOCK))
        guard wakeFD >= 0 else { throw SystemError("eventfd", on: "data path", errno: .current) }
    }

    deinit {
        sendVector.deallocate()
        sendTags.deallocate()
        receiveVector.deallocate()
        receiveIovecs.deallocate()
        receiveNames.deallocate()
        receiveControls.deallocate()
        close(wakeFD)
    }

    public func stop() {
        var one: UInt64 = 1
        _ = write(wakeFD, &one, 8)
    }

    // MARK: BatchIO

    @inline(__always) func send(_ message: UnsafeMutablePointer<msghdr>, tag: CompletionTag) {
        if sendCount == sendCapacity { flushSends() }
        sendVector[sendCount].msg_hdr = message.pointee
        sendTags[sendCount] = tag
        sendCount += 1
    }

    /// A TUN write happens at once: the kernel takes the packet (or drops
    /// it when the queue behind the device is full), it never waits.
    @inline(__always) func writeTun(_ iovecs: UnsafeMutablePointer<iovec>, count: Int, tag: CompletionTag) {
        var n: Int
        repeat { n = writev(tunFD, iovecs, Int32(count)) } while n < 0 && errno == EINTR
        engine.completed(tag, result: n < 0 ? -errno : Int32(truncatingIfNeeded: n), io: self)
    }

    /// Slots are reused turn by turn: every send and write of a turn is
    /// done before the next turn reads into its slots.
    @inline(__always) func release(_ group: SlotGroup, _ slot: Int) {}

    // MARK: The loop

    public func run() throws {
        var fds = [
            pollfd(fd: tunFD, events: Int16(POLLIN), revents: 0),
            pollfd(fd: udpFD, events: Int16(POLLIN), revents: 0),
            pollfd(fd: wakeFD, events: Int16(POLLIN), revents: 0),
        ]
        var active = false
        var busyUntil: UInt64 = 0
        while true {
            // After a turn that moved something, look again without
            // sleeping (and, with busy polling, keep looking a while).
            let timeout: Int32 = active || (busyPollNanoseconds > 0 && monotonicNanoseconds() < busyUntil) ? 0 : -1
            let n = poll(&fds, 3, timeout)
            if n < 0 {
                if errno == EINTR { continue }
                throw SystemError("poll", on: "data path", errno: .current)
            }
            if n == 0 {
                active = false
                if busyPollNanoseconds > 0 { sched_yield() }
                continue
            }
            if fds[2].revents != 0 { return }
            var moved = 0
            if fds[0].revents & Int16(POLLIN) != 0 {
                moved += try readTun()
            } else if fds[0].revents & Int16(POLLERR | POLLHUP | POLLNVAL) != 0 {
                throw SystemError("poll", on: "TUN device", errno: Errno(EIO), hint: "the device went away")
            }
            if fds[1].revents & Int16(POLLIN | POLLERR) != 0 {
                moved += receive()
            }
            if moved > 0 { statistics.addBatch(completions: moved) }
            statistics.publish()
            active = moved > 0
            if active && busyPollNanoseconds > 0 { busyUntil = monotonicNanoseconds() &+ busyPollNanoseconds }
        }
    }

    /// TUN reads until the queue is empty or every slot holds one; their
    /// datagrams leave in one `sendmmsg`. Returns the reads.
    private func readTun() throws -> Int {
        var slot = 0
        var failures = 0
        while slot < depth {
            let r = read(tunFD, engine.tunRead(slot), engine.tunReadCapacity)
            if r > 0 {
                engine.tunRead(slot, length: r, io: self)
                slot += 1
                continue
            }
            if r < 0 && errno == EINTR { continue }
            if r < 0 && errno != EAGAIN {
                statistics.add(.readErrors)
                failures += 1
                if failures > 2 * depth {
                    throw SystemError(
                        "read",
                        on: "TUN device",
                        errno: .current,
                        hint: "the device went away or was taken down"
                    )
                }
                continue
            }
            break
        }
        engine.flush(self)
        flushSends()
        return slot
    }

    /// Sends what the turn gathered: as few `sendmmsg` calls as the socket
    /// takes. A message the kernel refuses is counted and skipped; a full
    /// socket buffer is waited for briefly (a UDP socket drains at line
    /// rate) and then its message is dropped like any congested packet.
    private func flushSends() {
        var first = 0
        var waits = 0
        while first < sendCount {
            let r = ctunnel_sendmmsg(udpFD, sendVector + first, UInt32(sendCount - first), 0)
            if r > 0 {
                for i in first..<(first + Int(r)) {
                    engine.completed(sendTags[i], result: Int32(truncatingIfNeeded: sendVector[i].msg_len), io: self)
                }
                first += Int(r)
                continue
            }
            let e = errno
            if e == EINTR { continue }
            if (e == EAGAIN || e == ENOBUFS) && waits < 8 {
                waits += 1
                var pfd = pollfd(fd: udpFD, events: Int16(POLLOUT), revents: 0)
                _ = poll(&pfd, 1, 1)
                continue
            }
            // This message failed (a peer's ICMP error surfaces here as
            // ECONNREFUSED, a device without checksum offload as EIO):
            // its result goes to the engine, the rest are tried again.
            engine.completed(sendTags[first], result: -e, io: self)
            first += 1
        }
        sendCount = 0
    }

    /// One `recvmmsg` into every UDP slot; each message goes to the engine.
    /// Returns the messages received.
    private func receive() -> Int {
        for slot in 0..<depth {
            receiveVector[slot].msg_hdr.msg_namelen = socklen_t(MemoryLayout<sockaddr_in6>.size)
            receiveVector[slot].msg_hdr.msg_controllen = UDPControlMessage.space
            receiveVector[slot].msg_hdr.msg_flags = 0
        }
        var r: Int32
        repeat {
            r = ctunnel_recvmmsg(udpFD, receiveVector, UInt32(depth), Int32(MSG_DONTWAIT))
        } while r < 0 && errno == EINTR
        if r < 0 {
            // ECONNREFUSED: a peer's ICMP port unreachable, not ours to mind.
            if errno != EAGAIN && errno != ECONNREFUSED { statistics.add(.readErrors) }
            return 0
        }
        for slot in 0..<Int(r) {
            let message = receiveVector + slot
            let length = Int(message.pointee.msg_len)
            if message.pointee.msg_hdr.msg_flags & Int32(MSG_TRUNC) != 0 {
                statistics.add(.udpDatagramsReceived)
                statistics.add(.droppedTruncated)
                continue
            }
            var segmentLength = length
            // msg_hdr is the first member of the mmsghdr.
            if engine.offloads.receiveCoalescing,
                let size = UDPControlMessage.receiveSegmentSize(
                    of: UnsafeMutableRawPointer(message).assumingMemoryBound(to: msghdr.self)
                )
            {
                segmentLength = size
            }
            guard let sender = UnderlaySender(name: UnsafeRawPointer(receiveNames + slot)) else {
                statistics.add(.udpDatagramsReceived)
                statistics.add(.droppedMalformed)
                continue
            }
            engine.received(
                slot,
                payload: engine.udpPayload(slot),
                length: length,
                segmentLength: segmentLength,
                sender: sender,
                io: self
            )
        }
        return Int(r)
    }
}
