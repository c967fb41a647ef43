import Foundation
import NetBase
import StatusModel
import Synchronization
import UDPEncap
import WireGuard

#if canImport(Glibc)
import Glibc
#endif

/// What the wireguard data path counts (`tunneld status`, the metrics):
/// traffic both ways, handshakes, and every drop by its reason.
public enum WireGuardCounter: Int, CaseIterable, Sendable, CustomStringConvertible {
    case tunPacketsRead, packetsSealed, datagramsSent, segmentedSends, sendErrors
    case datagramsReceived, coalescedReceives, packetsOpened, tunPacketsWritten, droppedTunWrite, keepalivesSent,
        keepalivesReceived
    case initiationsSent, responsesSent, handshakesCompleted, cookieRepliesSent
    case droppedNoPeer, droppedNotIPv4, droppedNoSession, droppedBadMAC, droppedReplay
    case droppedUnknownReceiver, droppedExpired, droppedSourceNotAllowed, droppedMalformed, droppedHandshake
    case tunSuperPacketsRead, tunSuperPacketsWritten, droppedBadOffload

    public var description: String {
        switch self {
        case .tunPacketsRead: "wg_tun_packets_read"
        case .packetsSealed: "wg_packets_sealed"
        case .datagramsSent: "wg_datagrams_sent"
        case .segmentedSends: "wg_udp_segmented_sends"
        case .sendErrors: "wg_send_errors"
        case .datagramsReceived: "wg_datagrams_received"
        case .coalescedReceives: "wg_udp_coalesced_receives"
        case .packetsOpened: "wg_packets_opened"
        case .tunPacketsWritten: "wg_tun_packets_written"
        case .droppedTunWrite: "wg_dropped_tun_write"
        case .keepalivesSent: "wg_keepalives_sent"
        case .keepalivesReceived: "wg_keepalives_received"
        case .initiationsSent: "wg_handshake_initiations_sent"
        case .responsesSent: "wg_handshake_responses_sent"
        case .handshakesCompleted: "wg_handshakes_completed"
        case .cookieRepliesSent: "wg_cookie_replies_sent"
        case .droppedNoPeer: "wg_dropped_no_peer"
        case .droppedNotIPv4: "wg_dropped_not_ipv4"
        case .droppedNoSession: "wg_dropped_no_session"
        case .droppedBadMAC: "wg_dropped_bad_mac"
        case .droppedReplay: "wg_dropped_replay"
        case .droppedUnknownReceiver: "wg_dropped_unknown_receiver"
        case .droppedExpired: "wg_dropped_expired_session"
        case .droppedSourceNotAllowed: "wg_dropped_source_not_allowed"
        case .droppedMalformed: "wg_dropped_malformed"
        case .droppedHandshake: "wg_dropped_handshake"
        case .tunSuperPacketsRead: "wg_tun_super_packets_read"
        case .tunSuperPacketsWritten: "wg_tun_super_packets_written"
        case .droppedBadOffload: "wg_dropped_bad_offload"
        }
    }

    /// The counter a rejected datagram is dropped under.
    init(_ rejection: Rejection) {
        switch rejection {
        case .badMAC1, .decryptionFailed: self = .droppedBadMAC
        case .replayedCounter, .replayedTimestamp: self = .droppedReplay
        case .unknownReceiver: self = .droppedUnknownReceiver
        case .expiredKeypair: self = .droppedExpired
        case .empty, .unknownType, .wrongLength: self = .droppedMalformed
        default: self = .droppedHandshake
        }
    }
}

/// A handshake message, keepalive or packet sealed off the batch path
/// (after a handshake): bytes of its own, so it may allocate.
struct Datagram: Sendable {
    var bytes: [UInt8]
    var to: UDPEndpoint
}

/// A batch of packet slots in one slab allocated once. Outgoing: a packet
/// read from the TUN at `MessageLayout.transportHeaderLength`, sealed into a
/// message at 0. Incoming: a datagram at 0, opened to a payload at the
/// header length. `pass[i]` says whether slot i goes on (sent or written).
final class PacketBatch {
    let capacity: Int
    let slotSize: Int
    private let slab: UnsafeMutableRawBufferPointer
    let packets: UnsafeMutableBufferPointer<PacketBuffer>
    // Per slot, in memory of the batch's own (no copy-on-write or exclusivity checks per packet).
    let endpoints: UnsafeMutableBufferPointer<UDPEndpoint>
    let pass: UnsafeMutableBufferPointer<Bool>
    /// Sealing: where each payload lies when not in its slot (the pieces of a
    /// TUN super-packet's segment), so that it is copied as it is sealed.
    let parts: UnsafeMutableBufferPointer<PayloadParts>
    var count = 0

    /// Sealing: runs of slots to one peer with the counters reserved for
    /// them, sealed after the engine's lock is let go.
    struct SealRun {
        var start: Int
        var count: Int
        var reservation: SealReservation
    }
    var sealRuns: [SealRun] = []
    /// Per slot while sealing: the destination's subnet key.
    let destinations: UnsafeMutableBufferPointer<UInt32>
    /// Opening: one ticket per run of messages of one session; per slot, the
    /// run it belongs to (-1: nothing to decrypt) and its counter.
    var openTickets: [OpenTicket] = []
    let ticketOf: UnsafeMutableBufferPointer<Int>
    let counters: UnsafeMutableBufferPointer<UInt64>

    /// Room a slot keeps after the payload: padding (up to 15) and the tag.
    static let trailer = MessageLayout.paddingMultiple + MessageLayout.tagLength

    init(capacity: Int, payloadSize: Int) {
        self.capacity = capacity
        slotSize = (MessageLayout.transportHeaderLength + payloadSize + Self.trailer + 63) / 64 * 64
        slab = .allocate(byteCount: capacity * slotSize, alignment: 64)
        slab.initializeMemory(as: UInt8.self, repeating: 0)
        packets = .allocate(capacity: capacity)
        for i in 0..<capacity {
            packets[i] = PacketBuffer(
                memory: UnsafeMutableRawBufferPointer(rebasing: slab[(i * slotSize)..<((i + 1) * slotSize)]),
                length: 0
            )
        }
        endpoints = .allocate(capacity: capacity)
        endpoints.initialize(repeating: UDPEndpoint(address: IPv4Address(0), port: 0))
        pass = .allocate(capacity: capacity)
        pass.initialize(repeating: false)
        parts = .allocate(capacity: capacity)
        parts.initialize(repeating: .inSlot)
        destinations = .allocate(capacity: capacity)
        destinations.initialize(repeating: 0)
        ticketOf = .allocate(capacity: capacity)
        ticketOf.initialize(repeating: -1)
        counters = .allocate(capacity: capacity)
        counters.initialize(repeating: 0)
        sealRuns.reserveCapacity(capacity)
        openTickets.reserveCapacity(capacity)
    }

    /// The start of slot i's payload (its IP header): in the slot, or its first part.
    func head(_ i: Int) -> UnsafeRawBufferPointer {
        let part = parts[i]
        if part.isInSlot {
            return UnsafeRawBufferPointer(rebasing: payloadArea(i)[0..<min(packets[i].length, payloadArea(i).count)])
        }
        return part.head
    }

    /// Slot i's payload as bytes of its own (for a packet that waits for a handshake).
    func payloadBytes(_ i: Int) -> [UInt8] {
        let part = parts[i]
        if part.isInSlot { return Array(head(i)) }
        return Array(part.head) + Array(part.body)
    }

    /// Wipes the key copies the runs and tickets held, keeping the room.
    func wipeKeys() {
        for i in sealRuns.indices { sealRuns[i].reservation.wipe() }
        sealRuns.removeAll(keepingCapacity: true)
        for i in openTickets.indices { openTickets[i].wipe() }
        openTickets.removeAll(keepingCapacity: true)
    }

    deinit {
        // Sealed and opened packets were in here.
        slab.initializeMemory(as: UInt8.self, repeating: 0)
        slab.deallocate()
        packets.deallocate()
        endpoints.deallocate()
        pass.deallocate()
        parts.deallocate()
        destinations.deallocate()
        ticketOf.deallocate()
        counters.deallocate()
    }

    /// The room a TUN read may fill in slot i (the payload area).
    func payloadArea(_ i: Int) -> UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(
            rebasing: packets[i].memory[MessageLayout.transportHeaderLength..<(slotSize - Self.trailer)]
        )
    }
}

/// The wireguard backend's packet logic, without I/O: the WireGuard
/// interface (our key, the peers and their sessions), the peers by subnet
/// for steering and for cryptokey routing, the packets waiting for a
/// handshake, and the counters. Every call takes the one lock, but not for
/// the cryptography: a batch's send counters are reserved (and its
/// receive counters checked) under the lock, its messages sealed or opened
/// with copies of the session keys after it is let go, and what was opened
/// completed (replay window, roaming, timers) under it again. So the TUN
/// thread sealing and the UDP thread opening do not wait for each other.
final class WireGuardEngine: @unchecked Sendable {
    final class PeerEntry {
        let subnet: IPv4Network
        let peer: Peer
        /// Packets read before a session existed (WireGuard's staged queue).
        var staged: [[UInt8]] = []
        init(subnet: IPv4Network, peer: Peer) {
            self.subnet = subnet
            self.peer = peer
        }
    }

    /// At most this many packets wait per peer for a handshake; older ones go.
    static let stagedLimit = 32
    /// More initiations and responses than this in one second put the
    /// interface under load: then only those with a valid mac2 (a cookie
    /// from us) cost Diffie-Hellman work, the rest get a cookie reply, and
    /// each source address is rate-limited (whitepaper §5.3). A host has a
    /// handshake per peer every two minutes; a flood has thousands.
    static let handshakesPerSecondBeforeLoad = 64

    private let lock = Mutex(())
    private let interface: WireGuardInterface
    private let presharedKey: PresharedKey
    private let keepalive: Instant.Span?
    private let subnetMask: UInt32
    private var bySubnet: [UInt32: PeerEntry] = [:]
    private var byPeer: [ObjectIdentifier: PeerEntry] = [:]
    private var counters = [UInt64](repeating: 0, count: WireGuardCounter.allCases.count)
    private var handshakeSecond = Instant(nanoseconds: .min / 2)
    private var handshakesThisSecond = 0
    /// The crypto of batches whose caller brings no workers of its own (tests).
    private let inline = CryptoWorkers(helpers: 0, name: "tunneld-wg-inline")
    private let controlCipher = CipherContext()
    let publicKey: PublicKey

    init(privateKey: PrivateKey, presharedKey: PresharedKey, persistentKeepalive: Int, subnetLength: Int) {
        interface = WireGuardInterface(privateKey: privateKey)
        publicKey = interface.publicKey
        self.presharedKey = presharedKey
        keepalive = persistentKeepalive > 0 ? .seconds(Int64(persistentKeepalive)) : nil
        subnetMask = IPv4Network.mask(subnetLength)
    }

    // MARK: Peers

    /// Adds the peer of `subnet`, or updates its endpoint; a different key
    /// for the subnet replaces the peer (and ends the old one's sessions).
    func setPeer(subnet: IPv4Network, publicKey: PublicKey, endpoint: UDPEndpoint) throws(KeyError) {
        try lock.withLock { _ throws(KeyError) in
            let ep = Endpoint(ipv4: endpoint.address.value, port: endpoint.port)
            if let entry = bySubnet[subnet.address.value], entry.peer.publicKey == publicKey {
                interface.setEndpoint(ep, of: entry.peer)
                return
            }
            if let entry = bySubnet[subnet.address.value] { removeLocked(entry) }
            // The same key under another subnet: that host moved.
            if let other = interface.peers[publicKey], let entry = byPeer[ObjectIdentifier(other)] {
                removeLocked(entry)
            }
            let peer = try interface.addPeer(publicKey, presharedKey: presharedKey, endpoint: ep)
            peer.persistentKeepalive = keepalive
            let entry = PeerEntry(subnet: subnet, peer: peer)
            bySubnet[subnet.address.value] = entry
            byPeer[ObjectIdentifier(peer)] = entry
        }
    }

    /// Removes the peer of `subnet`: its sessions end and their keys are zeroed.
    func removePeer(subnet: IPv4Network) {
        lock.withLock { _ in
            if let entry = bySubnet[subnet.address.value] { removeLocked(entry) }
        }
    }

    private func removeLocked(_ entry: PeerEntry) {
        bySubnet[entry.subnet.address.value] = nil
        byPeer[ObjectIdentifier(entry.peer)] = nil
        counters[WireGuardCounter.droppedNoSession.rawValue] += UInt64(entry.staged.count)
        entry.staged = []
        interface.removePeer(entry.peer.publicKey)
    }

    var peerCount: Int { lock.withLock { _ in bySubnet.count } }

    /// Every peer as `wg show` shows it, in subnet order; handshake times
    /// turned from the monotonic clock (`now`) into wall-clock dates (`wallNow`).
    func tunnels(now: Instant, wallNow: Date) -> [TunnelStatus] {
        lock.withLock { _ in
            bySubnet.values.sorted { $0.subnet.address.value < $1.subnet.address.value }.map { entry in
                let peer = entry.peer
                return TunnelStatus(
                    subnet: entry.subnet.description,
                    publicKey: peer.publicKey.base64,
                    endpoint: peer.endpoint?.description,
                    latestHandshake: peer.latestHandshake.map {
                        wallNow.addingTimeInterval(-Double((now - $0).nanoseconds) / 1e9)
                    },
                    hasSession: peer.current != nil,
                    bytesReceived: peer.bytesReceived,
                    bytesSent: peer.bytesSent
                )
            }
        }
    }

    /// Whether the peer of `subnet` has a session now (tests, status).
    func hasSession(subnet: IPv4Network) -> Bool {
        lock.withLock { _ in bySubnet[subnet.address.value]?.peer.current != nil }
    }

    func counterValues() -> [(counter: WireGuardCounter, value: UInt64)] {
        lock.withLock { _ in WireGuardCounter.allCases.map { ($0, counters[$0.rawValue]) } }
    }

    func count(_ counter: WireGuardCounter, _ n: Int = 1) {
        lock.withLock { _ in counters[counter.rawValue] += UInt64(n) }
    }

    private func bump(_ counter: WireGuardCounter, _ n: Int = 1) { counters[counter.rawValue] += UInt64(n) }

    // MARK: Packets

    /// Seals the batch read from the TUN, each packet to the peer whose
    /// subnet holds its destination. Packets without a session wait (and a
    /// handshake starts); `pass[i]` and `endpoints[i]` say what to send where.
    func outgoing(
        _ batch: PacketBatch,
        now: Instant,
        timestamp: () -> TAI64N,
        workers: CryptoWorkers? = nil
    ) -> [Datagram] {
        let control = lock.withLock { _ in reserve(batch, now: now, timestamp: timestamp) }
        let workers = workers ?? inline
        let chunks = workers.chunks(for: batch.count)
        let failed = withUnsafeTemporaryAllocation(of: Int.self, capacity: chunks) { failures in
            failures.initialize(repeating: 0)
            workers.run(chunks: chunks) { chunk in
                let slots = CryptoWorkers.range(chunk, of: chunks, count: batch.count)
                for r in batch.sealRuns.indices {
                    let start = max(batch.sealRuns[r].start, slots.lowerBound)
                    let end = min(batch.sealRuns[r].start + batch.sealRuns[r].count, slots.upperBound)
                    guard start < end else { continue }
                    let sealed = WireGuardInterface.sealReserved(
                        UnsafeMutableBufferPointer(rebasing: batch.packets[start..<end]),
                        parts: UnsafeBufferPointer(rebasing: batch.parts[start..<end]),
                        with: batch.sealRuns[r].reservation,
                        from: start - batch.sealRuns[r].start,
                        cipher: workers.ciphers[chunk]
                    )
                    for k in (start + sealed)..<end {
                        batch.pass[k] = false
                        failures[chunk] += 1
                    }
                }
            }
            return failures.reduce(0, +)
        }
        batch.wipeKeys()
        if failed > 0 { count(.sendErrors, failed) }
        return control
    }

    /// Under the lock: the peer of every slot, and send counters reserved for
    /// each run of slots to one peer (`batch.sealRuns`).
    private func reserve(_ batch: PacketBatch, now: Instant, timestamp: () -> TAI64N) -> [Datagram] {
        var control: [Datagram] = []
        bump(.tunPacketsRead, batch.count)
        for i in 0..<batch.count {
            let payload = batch.head(i)
            guard payload.count >= 20, payload[0] >> 4 == 4 else {
                batch.pass[i] = false
                bump(.droppedNotIPv4)
                continue
            }
            let destination = UInt32(bigEndian: payload.loadUnaligned(fromByteOffset: 16, as: UInt32.self))
            batch.destinations[i] = destination & subnetMask
            batch.pass[i] = true
        }
        var i = 0
        while i < batch.count {
            guard batch.pass[i] else {
                i += 1
                continue
            }
            var end = i + 1
            while end < batch.count, batch.pass[end], batch.destinations[end] == batch.destinations[i] { end += 1 }
            defer { i = end }
            guard let entry = bySubnet[batch.destinations[i]], let endpoint = entry.peer.endpoint else {
                for k in i..<end { batch.pass[k] = false }
                bump(.droppedNoPeer, end - i)
                continue
            }
            let reservation = interface.reserve(
                to: entry.peer,
                payloads: UnsafeBufferPointer(rebasing: batch.packets[i..<end]),
                now: now
            )
            let reserved = reservation?.count ?? 0
            let target = UDPEndpoint(address: IPv4Address(endpoint.ipv4), port: endpoint.port)
            for k in i..<(i + reserved) { batch.endpoints[k] = target }
            if let reservation, reserved > 0 {
                batch.sealRuns.append(PacketBatch.SealRun(start: i, count: reserved, reservation: reservation))
                bump(.packetsSealed, reserved)
            }
            for k in (i + reserved)..<end {
                batch.pass[k] = false
                if entry.staged.count >= Self.stagedLimit {
                    entry.staged.removeFirst()
                    bump(.droppedNoSession)
                }
                entry.staged.append(batch.payloadBytes(k))
            }
            let wantsHandshake = reservation?.wantsHandshake ?? !entry.peer.isHandshaking
            if wantsHandshake, let initiation = initiation(entry, now: now, timestamp: timestamp()) {
                control.append(initiation)
            }
        }
        return control
    }

    /// Authenticates and opens the datagrams received, and handles the
    /// handshake messages among them. A transport packet passes (to the TUN,
    /// at the header length, `packets[i].length` long) only when its inner
    /// source lies in the sending peer's subnet: WireGuard's cryptokey routing.
    func incoming(
        _ batch: PacketBatch,
        now: Instant,
        timestamp: () -> TAI64N,
        workers: CryptoWorkers? = nil
    ) -> [Datagram] {
        var control = lock.withLock { _ in prepare(batch, now: now, timestamp: timestamp) }
        let workers = workers ?? inline
        let chunks = workers.chunks(for: batch.count)
        let failed = withUnsafeTemporaryAllocation(of: Int.self, capacity: chunks) { failures in
            failures.initialize(repeating: 0)
            workers.run(chunks: chunks) { chunk in
                for i in CryptoWorkers.range(chunk, of: chunks, count: batch.count) where batch.ticketOf[i] >= 0 {
                    let opened = batch.openTickets[batch.ticketOf[i]].decrypt(
                        &batch.packets[i],
                        counter: batch.counters[i],
                        cipher: workers.ciphers[chunk]
                    )
                    if !opened {
                        batch.ticketOf[i] = -1
                        failures[chunk] += 1
                    }
                }
            }
            return failures.reduce(0, +)
        }
        lock.withLock { _ in
            if failed > 0 { bump(.droppedBadMAC, failed) }
            complete(batch, now: now, timestamp: timestamp, control: &control)
        }
        batch.wipeKeys()
        return control
    }

    /// Under the lock, before decryption: handshake messages are handled,
    /// and transport messages checked (session, replay window) and given
    /// their ticket; everything else is dropped and counted.
    private func prepare(_ batch: PacketBatch, now: Instant, timestamp: () -> TAI64N) -> [Datagram] {
        var control: [Datagram] = []
        bump(.datagramsReceived, batch.count)
        for i in 0..<batch.count {
            batch.pass[i] = false
            batch.ticketOf[i] = -1
            let length = batch.packets[i].length
            guard length > 0 else {
                bump(.droppedMalformed)
                continue
            }
            let memory = UnsafeRawBufferPointer(rebasing: batch.packets[i].memory[0..<length])
            guard memory[0] == MessageType.transport.rawValue else {
                let source = batch.endpoints[i]
                handshake(
                    memory,
                    from: source,
                    endpoint: Endpoint(ipv4: source.address.value, port: source.port),
                    now: now,
                    timestamp: timestamp,
                    control: &control
                )
                continue
            }
            switch interface.prepareOpen(memory, now: now) {
            case .failure(let rejection):
                bump(WireGuardCounter(rejection))
            case .success(var ticket):
                if let last = batch.openTickets.last, last.isSameSession(as: ticket) {
                    ticket.wipe()
                } else {
                    batch.openTickets.append(ticket)
                }
                batch.ticketOf[i] = batch.openTickets.count - 1
                batch.counters[i] = ticket.counter
            }
        }
        return control
    }

    /// Under the lock, after decryption: each authenticated message completes
    /// (replay window, session confirmation, roaming) and its inner packet is
    /// checked against the sender's subnet.
    private func complete(
        _ batch: PacketBatch,
        now: Instant,
        timestamp: () -> TAI64N,
        control: inout [Datagram]
    ) {
        for i in 0..<batch.count where batch.ticketOf[i] >= 0 {
            let source = batch.endpoints[i]
            let received: Received
            switch interface.completeOpen(
                batch.openTickets[batch.ticketOf[i]],
                counter: batch.counters[i],
                packet: &batch.packets[i],
                from: Endpoint(ipv4: source.address.value, port: source.port),
                now: now
            ) {
            case .failure(let rejection):
                bump(WireGuardCounter(rejection))
                continue
            case .success(let r): received = r
            }
            guard let entry = byPeer[ObjectIdentifier(received.peer)] else {
                bump(.droppedNoPeer)
                continue
            }
            if received.wantsHandshake, let initiation = initiation(entry, now: now, timestamp: timestamp()) {
                control.append(initiation)
            }
            // The responder may send once the initiator used the session.
            if !entry.staged.isEmpty { flush(entry, now: now, into: &control) }
            guard received.payloadLength > 0 else {
                bump(.keepalivesReceived)
                continue
            }
            let inner = UnsafeRawBufferPointer(
                rebasing: batch.packets[i].memory[MessageLayout.transportHeaderLength...]
            )
            guard inner[0] >> 4 == 4, received.payloadLength >= 20 else {
                bump(.droppedNotIPv4)
                continue
            }
            let total = Int(UInt16(bigEndian: inner.loadUnaligned(fromByteOffset: 2, as: UInt16.self)))
            guard total >= 20, total <= received.payloadLength else {
                bump(.droppedMalformed)
                continue
            }
            let innerSource = UInt32(bigEndian: inner.loadUnaligned(fromByteOffset: 12, as: UInt32.self))
            guard entry.subnet.contains(IPv4Address(innerSource)) else {
                bump(.droppedSourceNotAllowed)
                continue
            }
            bump(.packetsOpened)
            batch.packets[i].length = total
            batch.pass[i] = true
        }
    }

    private func handshake(
        _ datagram: UnsafeRawBufferPointer,
        from source: UDPEndpoint,
        endpoint: Endpoint,
        now: Instant,
        timestamp: () -> TAI64N,
        control: inout [Datagram]
    ) {
        var underLoad = false
        if datagram.first == MessageType.initiation.rawValue || datagram.first == MessageType.response.rawValue {
            if now - handshakeSecond >= .seconds(1) {
                handshakeSecond = now
                handshakesThisSecond = 0
            }
            handshakesThisSecond += 1
            underLoad = handshakesThisSecond > Self.handshakesPerSecondBeforeLoad
        }
        switch interface.receiveHandshake(datagram, from: endpoint, now: now, underLoad: underLoad) {
        case .respond(_, let message):
            bump(.responsesSent)
            control.append(Datagram(bytes: message, to: source))
        case .established(let peer):
            bump(.handshakesCompleted)
            guard let entry = byPeer[ObjectIdentifier(peer)] else { return }
            // Data (or a keepalive) confirms the session to the responder.
            if entry.staged.isEmpty {
                if let keepalive = keepalive(entry, now: now) { control.append(keepalive) }
            } else {
                flush(entry, now: now, into: &control)
            }
        case .cookieReply(let message):
            bump(.cookieRepliesSent)
            control.append(Datagram(bytes: message, to: source))
        case .cookieStored:
            break
        case .rejected(let rejection):
            bump(WireGuardCounter(rejection))
        }
    }

    private func initiation(_ entry: PeerEntry, now: Instant, timestamp: TAI64N) -> Datagram? {
        guard let endpoint = entry.peer.endpoint else { return nil }
        let message = interface.makeInitiation(for: entry.peer, now: now, timestamp: timestamp)
        bump(.initiationsSent)
        return Datagram(bytes: message, to: UDPEndpoint(address: IPv4Address(endpoint.ipv4), port: endpoint.port))
    }

    /// Seals `payload` (empty: a keepalive) into a datagram of its own.
    private func sealAlone(_ payload: [UInt8], to entry: PeerEntry, now: Instant) -> Datagram? {
        guard let endpoint = entry.peer.endpoint else { return nil }
        var bytes = [UInt8](
            repeating: 0,
            count: MessageLayout.transportHeaderLength + payload.count + PacketBatch.trailer
        )
        let sealed = bytes.withUnsafeMutableBytes { memory -> Int? in
            payload.withUnsafeBytes {
                if !$0.isEmpty {
                    (memory.baseAddress! + MessageLayout.transportHeaderLength).copyMemory(
                        from: $0.baseAddress!,
                        byteCount: $0.count
                    )
                }
            }
            var packet = PacketBuffer(memory: memory, length: payload.count)
            let outcome = withUnsafeMutablePointer(to: &packet) {
                interface.seal(
                    UnsafeMutableBufferPointer(start: $0, count: 1),
                    to: entry.peer,
                    cipher: controlCipher,
                    now: now
                )
            }
            return outcome.sealed == 1 ? packet.length : nil
        }
        guard let sealed else { return nil }
        bytes.removeLast(bytes.count - sealed)
        return Datagram(bytes: bytes, to: UDPEndpoint(address: IPv4Address(endpoint.ipv4), port: endpoint.port))
    }

    private func keepalive(_ entry: PeerEntry, now: Instant) -> Datagram? {
        guard let datagram = sealAlone([], to: entry, now: now) else { return nil }
        bump(.keepalivesSent)
        return datagram
    }

    /// Sends what waited for a session, in order, as far as the session allows.
    private func flush(_ entry: PeerEntry, now: Instant, into control: inout [Datagram]) {
        var sent = 0
        for payload in entry.staged {
            guard let datagram = sealAlone(payload, to: entry, now: now) else { break }
            control.append(datagram)
            sent += 1
        }
        bump(.packetsSealed, sent)
        entry.staged.removeFirst(sent)
    }

    /// The timers of every peer: handshake retries, keepalives, expiry.
    func tick(now: Instant, timestamp: () -> TAI64N) -> [Datagram] {
        lock.withLock { _ in
            var control: [Datagram] = []
            for entry in bySubnet.values {
                let actions = interface.tick(entry.peer, now: now)
                if actions.contains(.sendInitiation),
                    let initiation = initiation(entry, now: now, timestamp: timestamp())
                {
                    control.append(initiation)
                }
                if actions.contains(.sendKeepalive), let keepalive = keepalive(entry, now: now) {
                    control.append(keepalive)
                }
                if actions.contains(.gaveUpHandshake) {
                    bump(.droppedNoSession, entry.staged.count)
                    entry.staged = []
                }
            }
            return control
        }
    }
}

/// The clocks the engine is given: monotonic for timers, wall for TAI64N.
enum WireGuardClock {
    /// Test hook: `TUNNELD_TEST_WIREGUARD_CLOCK_RATE=N` (2…1000) makes the
    /// protocol's clock run N times as fast, so that rekeys (every 120 s)
    /// happen within a test's transfer. The daemon warns at start when it
    /// is set; 1 (the real clock) otherwise.
    static let rate: Int64 = {
        guard let text = ProcessInfo.processInfo.environment["TUNNELD_TEST_WIREGUARD_CLOCK_RATE"],
            let n = Int64(text), (2...1000).contains(n)
        else { return 1 }
        return n
    }()
    private static let origin = monotonic()

    private static func monotonic() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec)
    }

    static func now() -> Instant {
        let t = monotonic()
        return Instant(nanoseconds: rate == 1 ? t : origin + (t - origin) * rate)
    }

    static func timestamp() -> TAI64N {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return TAI64N(unixSeconds: Int64(ts.tv_sec), nanoseconds: Int64(ts.tv_nsec))
    }
}
