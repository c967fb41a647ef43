import Foundation
import NetBase
import Offload
import Synchronization
import TunDevice
import UDPEncap
import WireGuard

#if canImport(Glibc)
import Glibc
#endif

/// The wireguard backend's I/O: the TUN device, the UDP socket on
/// ListenPort (IPv4, or IPv6 for flannel-wg-v6) and, where the mode carries
/// tunnels over both underlays, a second (IPv6) one on the same port; and
/// threads around one `WireGuardEngine` — TUN → seal → UDP, UDP → open →
/// TUN (one per socket), and the timers. Each I/O thread moves batches of up
/// to `batchSize` packets per lock of the engine; the slabs are allocated
/// once. With a TUN that has a virtio header, the kernel's TSO/USO
/// super-packets are split into the batch's slots before sealing, and the
/// opened packets of a receive are coalesced into super-packets before they
/// are written (the udp backend's Offload module). With `workers` > 1 each
/// of the two threads shares its batches' crypto with that many − 1 helper
/// threads (`CryptoWorkers`). The udp backend's io_uring loops are not used.
final class WireGuardDataPath: Sendable {
    let tun: TunDevice
    let socket: UDPSocket
    /// The IPv6 underlay's socket beside an IPv4 `socket`, or nil.
    let socket6: UDPSocket?
    let engine: WireGuardEngine
    let mtu: Int
    /// What the kernel accepted of TUNSETOFFLOAD (empty without a virtio header).
    let tunOffloads: TunOffloads
    private let stopped = Atomic<Bool>(false)
    /// UDP_SEGMENT sends: on when the kernel has it, off for good after a
    /// send it refused (the messages then leave one by one).
    private let segmentation: Atomic<Bool>
    /// UDP_GRO receives: several datagrams of one sender in one receive.
    let receiveCoalescing: Bool
    /// The most bytes one UDP_SEGMENT send carries (the UDP length limit, less headers).
    static let segmentationLimit = 65000

    static let batchSize = 64
    /// Receives of up to 64 KiB one batch may span before it is processed.
    static let receiveSlabs = 4
    /// TUN reads of up to 64 KiB one batch may span before it is sealed.
    static let readSlabs = 4
    /// How often the threads look at the stop flag, and the timers run.
    static let pollMilliseconds: Int32 = 100

    /// The most bytes one read of a TUN with a virtio header returns.
    static let superPacketRoom = VirtioNetHeader.size + 65536
    /// Segments one super-packet may be split into (a 64 KiB one of tiny
    /// segments; larger ones are refused and counted).
    static let maxSegments = 1024

    /// Threads per direction that share a batch's crypto (the TUN and UDP threads count as one each).
    let workers: Int
    /// How long a thread keeps looking for packets after it moved some (`--busy-poll`; 0: off).
    let busyPollNanoseconds: UInt64

    init(
        tun: TunDevice,
        socket: UDPSocket,
        socket6: UDPSocket? = nil,
        engine: WireGuardEngine,
        mtu: Int,
        tunOffloads: TunOffloads = [],
        workers: Int = 1,
        busyPollMicroseconds: Int = 0
    ) {
        self.tun = tun
        self.workers = max(1, workers)
        busyPollNanoseconds = UInt64(max(0, busyPollMicroseconds)) * 1000
        self.socket = socket
        self.socket6 = socket6
        self.engine = engine
        self.mtu = mtu
        self.tunOffloads = tunOffloads
        segmentation = Atomic(socket.supportsSegmentation && socket6?.supportsSegmentation != false)
        let coalescing = socket.enableReceiveCoalescing()
        receiveCoalescing = (socket6?.enableReceiveCoalescing() ?? true) && coalescing
    }

    /// The socket for `endpoint`'s family, or nil when this path has none.
    @inline(__always)
    private func socketFD(for endpoint: Endpoint) -> Int32? {
        if endpoint.isIPv6 == (socket.family == .ipv6Only) { return socket.fd.rawValue }
        if let socket6, endpoint.isIPv6 { return socket6.fd.rawValue }
        return nil
    }

    /// Closes the sockets (after `stop()`).
    func closeSockets() {
        socket.close()
        socket6?.close()
    }

    var usesSegmentation: Bool { segmentation.load(ordering: .relaxed) }

    func stop() { stopped.store(true, ordering: .releasing) }
    var isStopped: Bool { stopped.load(ordering: .acquiring) }

    enum Role: String, CaseIterable { case tx, rx, rx6, timer }

    /// Starts the threads (rx6 only with `socket6`); each finishes its stream when it returns.
    func start() -> [AsyncThrowingStream<Void, any Error>] {
        Role.allCases.filter { $0 != .rx6 || socket6 != nil }.map { role in
            let (stream, continuation) = AsyncThrowingStream<Void, any Error>.makeStream()
            let thread = Thread { [self] in
                do {
                    switch role {
                    case .tx: try tunLoop()
                    case .rx: try udpLoop(socket)
                    case .rx6: if let socket6 { try udpLoop(socket6) }
                    case .timer: timerLoop()
                    }
                    continuation.finish()
                } catch {
                    continuation.finish(throwing: error)
                }
            }
            thread.name = "tunneld-wg-\(role.rawValue)"
            thread.start()
            return stream
        }
    }

    /// Waits until `fd` is readable or the poll interval passes. Until
    /// `busyUntil` (a while after the last packets moved) it only looks, and
    /// yields the CPU between looks: the answer to what was just sent (a
    /// ping's reply, a TCP ACK) is then taken without a wake-up's delay.
    private func waitReadable(_ fd: Int32, busyUntil: UInt64) -> Bool {
        var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        if busyPollNanoseconds > 0, monotonicNanoseconds() < busyUntil {
            if poll(&pfd, 1, 0) > 0 { return true }
            sched_yield()
            return false
        }
        return poll(&pfd, 1, Self.pollMilliseconds) > 0
    }

    private func tunLoop() throws {
        let batch = PacketBatch(capacity: Self.batchSize, payloadSize: mtu)
        let crypto = CryptoWorkers(helpers: workers - 1, name: "tunneld-wg-seal")
        defer { crypto.stop() }
        let tunFD = tun.fd.rawValue
        let iovecs = UnsafeMutablePointer<iovec>.allocate(capacity: Self.batchSize)
        let control = UnsafeMutableRawPointer.allocate(byteCount: UDPControlMessage.space, alignment: 8)
        // With a virtio header, reads fill one slab one after another, and a super-packet's
        // segments get their headers (written once per segment) in a second: a slot then
        // points at its segment's two pieces (headers, and its share of the payload where it
        // lies), which sealing copies and encrypts in one pass. Back to the start of both
        // only right after the batch was sealed and sent.
        let virtio = tun.vnetHeader
        let readRoom = virtio ? Self.superPacketRoom : 0
        let headerRoom = virtio ? Self.maxSegments * 120 : 0
        let readSlab = UnsafeMutableRawPointer.allocate(byteCount: max(Self.readSlabs * readRoom, 1), alignment: 64)
        let headerSlab = UnsafeMutableRawPointer.allocate(byteCount: max(2 * headerRoom, 1), alignment: 64)
        let gather = UnsafeMutablePointer<iovec>.allocate(capacity: virtio ? 2 * Self.maxSegments : 1)
        var readOffset = 0
        var headerOffset = 0
        defer {
            // Packets read from the containers were in here.
            readSlab.initializeMemory(as: UInt8.self, repeating: 0, count: max(Self.readSlabs * readRoom, 1))
            iovecs.deallocate()
            control.deallocate()
            readSlab.deallocate()
            headerSlab.deallocate()
            gather.deallocate()
        }
        UDPControlMessage.prepareSegmentSize(control)

        /// Seals and sends what the batch holds; the batch is empty afterwards.
        func flush() {
            guard batch.count > 0 else { return }
            let messages = engine.outgoing(
                batch,
                now: WireGuardClock.now(),
                timestamp: WireGuardClock.timestamp,
                workers: crypto
            )
            let (sent, failed) = sendSealed(batch, iovecs: iovecs, control: control)
            finish(messages, sent: sent, failed: failed)
            batch.count = 0
        }

        /// Takes one packet, given as its head (IP header on) and body (the rest, maybe
        /// empty), into the next slot (sealing the batch first when it is full).
        func append(head: UnsafeRawPointer, _ headLength: Int, body: UnsafeRawPointer?, _ bodyLength: Int) {
            if batch.count == batch.capacity { flush() }
            let length = headLength + bodyLength
            guard length <= batch.payloadArea(batch.count).count else {
                // Longer than the device's MTU: only when the MTU was raised by hand.
                engine.count(.droppedMalformed)
                return
            }
            batch.parts[batch.count] = PayloadParts(
                head: UnsafeRawBufferPointer(start: head, count: headLength),
                body: UnsafeRawBufferPointer(start: bodyLength > 0 ? body : nil, count: bodyLength)
            )
            batch.packets[batch.count].length = length
            batch.count += 1
        }

        var busyUntil: UInt64 = 0
        while !isStopped {
            guard waitReadable(tunFD, busyUntil: busyUntil) else { continue }
            batch.count = 0
            var moved = false
            defer { if moved, busyPollNanoseconds > 0 { busyUntil = monotonicNanoseconds() &+ busyPollNanoseconds } }
            // Counted once per round of reads: every count takes the engine's lock.
            var superPackets = 0
            var badOffloads = 0
            defer {
                if superPackets > 0 { engine.count(.tunSuperPacketsRead, superPackets) }
                if badOffloads > 0 { engine.count(.droppedBadOffload, badOffloads) }
            }
            // Bounded: at most a batch's worth of reads before the stop flag is looked at.
            readOffset = 0
            headerOffset = 0
            for _ in 0..<Self.batchSize {
                let n: Int
                if virtio {
                    if readOffset + readRoom > Self.readSlabs * readRoom || headerOffset + headerRoom > 2 * headerRoom {
                        flush()
                        readOffset = 0
                        headerOffset = 0
                    }
                    n = read(tunFD, readSlab + readOffset, readRoom)
                } else {
                    if batch.count == batch.capacity { flush() }
                    let area = batch.payloadArea(batch.count)
                    n = read(tunFD, area.baseAddress, area.count)
                }
                if n <= 0 {
                    let e = Errno.current
                    if n < 0, e == .interrupted { continue }
                    if n < 0, e != .again, !isStopped {
                        throw SystemError("read", on: "TUN device \(tun.name)", errno: e)
                    }
                    break
                }
                moved = true
                guard virtio else {
                    batch.parts[batch.count] = .inSlot
                    batch.packets[batch.count].length = n
                    batch.count += 1
                    continue
                }
                guard n > VirtioNetHeader.size else {
                    engine.count(.droppedMalformed)
                    continue
                }
                let read = readSlab + readOffset
                readOffset += (n + 63) & ~63
                let header = VirtioNetHeader(reading: read)
                let packet = read + VirtioNetHeader.size
                let length = n - VirtioNetHeader.size
                if header.gso == VirtioNetHeader.GSOType.none {
                    // One packet; its checksum may be left to us (completed in place).
                    guard Segmentation.completeChecksum(packet, length: length, header: header) else {
                        badOffloads += 1
                        continue
                    }
                    append(head: packet, length, body: nil, 0)
                    continue
                }
                // A super-packet: into the packets the container's stack would have sent
                // without offloads, each its headers and its share of the payload.
                let headers = headerSlab + headerOffset
                switch Segmentation.splitGathered(
                    packet,
                    length: length,
                    header: header,
                    headers: headers,
                    headerCapacity: headerRoom,
                    iovecs: gather,
                    iovecCapacity: 2 * Self.maxSegments,
                    maxSegments: Self.maxSegments
                ) {
                case .success(let segments):
                    if segments.count > 1 { superPackets += 1 }
                    for k in 0..<segments.count {
                        append(
                            head: gather[2 * k].iov_base!,
                            gather[2 * k].iov_len,
                            body: gather[2 * k + 1].iov_base,
                            gather[2 * k + 1].iov_len
                        )
                    }
                    if segments.count > 0 {
                        let last = gather[2 * (segments.count - 1)]
                        headerOffset += ((last.iov_base! + last.iov_len - headers) + 63) & ~63
                    }
                case .failure:
                    badOffloads += 1
                }
            }
            flush()
        }
    }

    /// Sends the sealed slots of `batch` in order. A run of messages to one
    /// endpoint, all of one size but the last (which may be shorter), leaves
    /// in one UDP_SEGMENT send: the kernel cuts the iovecs' bytes into
    /// datagrams of that size.
    private func sendSealed(
        _ batch: PacketBatch,
        iovecs: UnsafeMutablePointer<iovec>,
        control: UnsafeMutableRawPointer
    ) -> (sent: Int, failed: Int) {
        var sent = 0
        var failed = 0
        var i = 0
        while i < batch.count {
            guard batch.pass[i] else {
                i += 1
                continue
            }
            let size = batch.packets[i].length
            let endpoint = batch.endpoints[i]
            // No socket of its family here: a failed send, not a refused segmentation.
            guard socketFD(for: endpoint) != nil else {
                failed += 1
                i += 1
                continue
            }
            var run = 1
            var total = size
            var next = i + 1
            if usesSegmentation {
                while next < batch.count, batch.pass[next], batch.endpoints[next] == endpoint {
                    let length = batch.packets[next].length
                    guard length <= size, total + length <= Self.segmentationLimit else { break }
                    run += 1
                    total += length
                    next += 1
                    if length < size { break }
                }
            }
            if run > 1 {
                for k in 0..<run {
                    let packet = batch.packets[i + k]
                    iovecs[k] = iovec(iov_base: packet.memory.baseAddress, iov_len: packet.length)
                }
                if sendSegmented(iovecs, count: run, segmentSize: size, to: endpoint, control: control) {
                    sent += run
                    engine.count(.segmentedSends)
                    i = next
                    continue
                }
                // Refused: this run and every later one go one by one.
                segmentation.store(false, ordering: .relaxed)
                engine.count(.segmentationRefused)
            }
            for k in i..<next {
                let packet = batch.packets[k]
                if send(packet.memory.baseAddress!, packet.length, to: batch.endpoints[k]) {
                    sent += 1
                } else {
                    failed += 1
                }
            }
            i = next
        }
        return (sent, failed)
    }

    private func sendSegmented(
        _ iovecs: UnsafeMutablePointer<iovec>,
        count: Int,
        segmentSize: Int,
        to endpoint: Endpoint,
        control: UnsafeMutableRawPointer
    ) -> Bool {
        guard let fd = socketFD(for: endpoint) else { return false }
        var sa = sockaddr_storage()
        let length = endpoint.write(to: &sa)
        return withUnsafeMutablePointer(to: &sa) { address in
            var message = msghdr()
            message.msg_name = UnsafeMutableRawPointer(address)
            message.msg_namelen = length
            message.msg_iov = iovecs
            message.msg_iovlen = count
            UDPControlMessage.setSegmentSize(&message, control: control, segmentSize)
            while true {
                if sendmsg(fd, &message, 0) >= 0 { return true }
                let e = Errno.current
                if e == .interrupted { continue }
                if e == .again {
                    var pfd = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                    if poll(&pfd, 1, Self.pollMilliseconds) > 0 { continue }
                }
                return false
            }
        }
    }

    /// Receives with UDP_GRO where the kernel offers it: one receive may
    /// hold many datagrams of one sender back to back, each `segment` bytes
    /// (the last may be shorter). Receives fill one slab one after another;
    /// the batch's slots point at the datagrams where they lie, and each is
    /// opened there in place (no copy). The batch is opened and written
    /// whenever it is full, when the slab has no room for another receive,
    /// and after the socket is drained.
    private func udpLoop(_ socket: UDPSocket) throws {
        let batch = PacketBatch(capacity: Self.batchSize, payloadSize: 0)
        let crypto = CryptoWorkers(helpers: workers - 1, name: "tunneld-wg-open")
        defer { crypto.stop() }
        let udpFD = socket.fd.rawValue
        let tunFD = tun.fd.rawValue
        let receiveRoom = 1 << 16
        let slab = UnsafeMutableRawBufferPointer.allocate(byteCount: Self.receiveSlabs * receiveRoom, alignment: 64)
        let control = UnsafeMutableRawPointer.allocate(byteCount: UDPControlMessage.space * 2, alignment: 8)
        let address = UnsafeMutablePointer<sockaddr_storage>.allocate(capacity: 1)
        let vector = UnsafeMutablePointer<iovec>.allocate(capacity: 1)
        defer {
            // Opened packets were in here.
            slab.initializeMemory(as: UInt8.self, repeating: 0)
            slab.deallocate()
            control.deallocate()
            address.deallocate()
            vector.deallocate()
        }
        // Where the next receive goes; back to 0 only right after a batch was processed, so
        // that no slot of a pending batch is overwritten.
        var offset = 0
        // Counted with the batch's counts: every count takes the engine's lock.
        var coalescedReceives = 0

        // With a virtio header, the opened packets of a batch are coalesced like the udp
        // backend's receives: TCP segments of a flow into one super-packet, each write a
        // virtio header and the packets where they lie in the slots.
        let virtio = tun.vnetHeader
        var plan = CoalescingPlan(maxPackets: Self.batchSize, coalesce: virtio)

        func process() {
            guard batch.count > 0 else { return }
            let messages = engine.incoming(
                batch,
                now: WireGuardClock.now(),
                timestamp: WireGuardClock.timestamp,
                workers: crypto
            )
            var written = 0
            var dropped = 0
            var superPackets = 0
            if virtio {
                plan.reset()
                for i in 0..<batch.count where batch.pass[i] {
                    let packet = batch.packets[i]
                    _ = plan.add(
                        packet.memory.baseAddress! + MessageLayout.transportHeaderLength,
                        length: packet.length
                    )
                }
                plan.finish()
                for w in 0..<plan.writeCount {
                    let (iovecs, count, bytes) = plan.write(w)
                    let segments = count - 1
                    var n: Int
                    repeat { n = writev(tunFD, iovecs, Int32(count)) } while n < 0 && Errno.current == .interrupted
                    // A full TUN queue drops, as the kernel's own devices do.
                    if n == bytes {
                        written += segments
                        if segments > 1 { superPackets += 1 }
                    } else {
                        dropped += segments
                    }
                }
            } else {
                for i in 0..<batch.count where batch.pass[i] {
                    let packet = batch.packets[i]
                    let payload = UnsafeRawBufferPointer(
                        rebasing: packet.memory[
                            MessageLayout.transportHeaderLength..<(MessageLayout.transportHeaderLength + packet.length)
                        ]
                    )
                    if case .success = writeAll(tunFD, payload) { written += 1 } else { dropped += 1 }
                }
            }
            if written > 0 { engine.count(.tunPacketsWritten, written) }
            if dropped > 0 { engine.count(.droppedTunWrite, dropped) }
            if superPackets > 0 { engine.count(.tunSuperPacketsWritten, superPackets) }
            if coalescedReceives > 0 {
                engine.count(.coalescedReceives, coalescedReceives)
                coalescedReceives = 0
            }
            finish(messages, sent: 0, failed: 0)
            batch.count = 0
        }

        var busyUntil: UInt64 = 0
        while !isStopped {
            guard waitReadable(udpFD, busyUntil: busyUntil) else { continue }
            batch.count = 0
            offset = 0
            var moved = false
            defer { if moved, busyPollNanoseconds > 0 { busyUntil = monotonicNanoseconds() &+ busyPollNanoseconds } }
            // Bounded: at most a batch's worth of receives before the timers and stop flag are looked at.
            for _ in 0..<Self.batchSize {
                if offset + receiveRoom > slab.count {
                    process()
                    offset = 0
                }
                let buffer = slab.baseAddress! + offset
                vector.pointee = iovec(iov_base: buffer, iov_len: receiveRoom)
                var message = msghdr()
                message.msg_name = UnsafeMutableRawPointer(address)
                message.msg_namelen = socklen_t(MemoryLayout<sockaddr_storage>.size)
                message.msg_iov = vector
                message.msg_iovlen = 1
                message.msg_control = control
                message.msg_controllen = UDPControlMessage.space * 2
                let n = recvmsg(udpFD, &message, 0)
                if n < 0 {
                    let e = Errno.current
                    if e == .interrupted { continue }
                    if e != .again, !isStopped {
                        throw SystemError("recvmsg", on: "udp port \(socket.port)", errno: e)
                    }
                    break
                }
                moved = true
                let segment = UDPControlMessage.receiveSegmentSize(of: &message) ?? n
                let source = Endpoint(address)
                if segment < n { coalescedReceives += 1 }
                var at = 0
                repeat {
                    let length = min(segment, n - at)
                    if batch.count == batch.capacity { process() }
                    batch.packets[batch.count] = PacketBuffer(
                        memory: UnsafeMutableRawBufferPointer(start: buffer + at, count: length),
                        length: length
                    )
                    batch.endpoints[batch.count] = source
                    batch.count += 1
                    at += max(length, 1)
                } while at < n
                offset += (n + 63) & ~63
            }
            process()
        }
    }

    private func timerLoop() {
        while !isStopped {
            usleep(UInt32(Self.pollMilliseconds) * 1000)
            finish(engine.tick(now: WireGuardClock.now(), timestamp: WireGuardClock.timestamp), sent: 0, failed: 0)
        }
    }

    /// Sends the handshake messages and keepalives a batch led to, and counts.
    private func finish(_ control: [Datagram], sent: Int, failed: Int) {
        var sent = sent
        var failed = failed
        for datagram in control {
            let ok = datagram.bytes.withUnsafeBytes { send($0.baseAddress!, $0.count, to: datagram.to) }
            if ok { sent += 1 } else { failed += 1 }
        }
        if sent > 0 { engine.count(.datagramsSent, sent) }
        if failed > 0 { engine.count(.sendErrors, failed) }
    }

    private func send(_ bytes: UnsafeRawPointer, _ count: Int, to endpoint: Endpoint) -> Bool {
        guard let fd = socketFD(for: endpoint) else { return false }
        var sa = sockaddr_storage()
        let length = endpoint.write(to: &sa)
        while true {
            let n = withUnsafePointer(to: &sa) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { sendto(fd, bytes, count, 0, $0, length) }
            }
            if n >= 0 { return true }
            if Errno.current == .interrupted { continue }
            if Errno.current == .again {
                // The socket's buffer is full: wait for room rather than drop.
                var pfd = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                if poll(&pfd, 1, Self.pollMilliseconds) > 0 { continue }
            }
            return false
        }
    }
}

extension Endpoint {
    /// Fills `storage` with this endpoint as a `sockaddr_in` or
    /// `sockaddr_in6`; returns that address's length.
    @inline(__always)
    func write(to storage: UnsafeMutablePointer<sockaddr_storage>) -> socklen_t {
        storage.pointee = sockaddr_storage()
        if isIPv6 {
            return storage.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { sa in
                sa.pointee.sin6_family = sa_family_t(AF_INET6)
                sa.pointee.sin6_port = port.bigEndian
                withUnsafeMutableBytes(of: &sa.pointee.sin6_addr) { raw in
                    address.withUnsafeBytes { raw.copyMemory(from: $0) }
                }
                return socklen_t(MemoryLayout<sockaddr_in6>.size)
            }
        }
        return storage.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { sa in
            sa.pointee.sin_family = sa_family_t(AF_INET)
            sa.pointee.sin_port = port.bigEndian
            sa.pointee.sin_addr.s_addr = ipv4.bigEndian
            return socklen_t(MemoryLayout<sockaddr_in>.size)
        }
    }

    /// The endpoint a received datagram came from (`sockaddr_in` or
    /// `sockaddr_in6`; the IPv6 socket is IPV6_V6ONLY, so never a v4-mapped one).
    @inline(__always)
    init(_ storage: UnsafePointer<sockaddr_storage>) {
        if Int32(storage.pointee.ss_family) == AF_INET6 {
            let sa = UnsafeRawPointer(storage).assumingMemoryBound(to: sockaddr_in6.self).pointee
            let bytes = withUnsafeBytes(of: sa.sin6_addr) { Bytes16(copying: $0) }
            self.init(ipv6: bytes, port: UInt16(bigEndian: sa.sin6_port))
            return
        }
        let sa = UnsafeRawPointer(storage).assumingMemoryBound(to: sockaddr_in.self).pointee
        self.init(ipv4: UInt32(bigEndian: sa.sin_addr.s_addr), port: UInt16(bigEndian: sa.sin_port))
    }
}
