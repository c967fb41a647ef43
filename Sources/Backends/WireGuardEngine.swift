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
    case droppedNoPeer, droppedNotIP, droppedNoSession, droppedBadMAC, droppedReplay
    case droppedUnknownReceiver, droppedExpired, droppedSourceNotAllowed, droppedMalformed, droppedHandshake
    case tunSuperPacketsRead, tunSuperPacketsWritten, droppedBadOffload, droppedMulticast, segmentationRefused

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
        case .droppedNotIP: "wg_dropped_not_ip"
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
        case .droppedMulticast: "wg_dropped_multicast"
        case .segmentationRefused: "wg_udp_segmentation_refused"
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
    var to: Endpoint
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
    /// Outgoing: where slot i goes; incoming: where it came from (IPv4 or IPv6).
    let endpoints: UnsafeMutableBufferPointer<Endpoint>
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
    /// Per slot while sealing: the destination's subnet key (an IPv4 one
    /// in the low 32 bits when `destinationIsIPv6` is false).
    let destinations: UnsafeMutableBufferPointer<UInt128>
    let destinationIsIPv6: UnsafeMutableBufferPointer<Bool>
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
        endpoints.initialize(repeating: Endpoint(ipv4: 0, port: 0))
        pass = .allocate(capacity: capacity)
        pass.initialize(repeating: false)
        parts = .allocate(capacity: capacity)
        parts.initialize(repeating: .inSlot)
        destinations = .allocate(capacity: capacity)
        destinations.initialize(repeating: 0)
        destinationIsIPv6 = .allocate(capacity: capacity)
        destinationIsIPv6.initialize(repeating: false)
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
        destinationIsIPv6.deallocate()
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
/// interface (our key, the peers and their sessions), the peers by IPv4
/// and by IPv6 subnet for steering and for cryptokey routing (a peer of a
/// dual-stack device has one of each, flanneld's allowed IPs), the packets waiting for a
/// handshake, and the counters. Every call takes the one lock, but not for
/// the cryptography: a batch's send counters are reserved (and its
/// receive counters checked) under the lock, its messages sealed or opened
/// with copies of the session keys after it is let go, and what was opened
/// completed (replay window, roaming, timers) under it again. So the TUN
/// thread sealing and the UDP thread opening do not wait for each other.
final class WireGuardEngine: @unchecked Sendable {
    final class PeerEntry {
        /// The peer's allowed sources and the destinations steered to it:
        /// its IPv4 subnet, its IPv6 subnet, or both.
        let subnet: IPv4Network?
        let subnet6: IPv6Network?
        let peer: Peer
        /// Packets read before a session existed (WireGuard's staged queue).
        var staged: [[UInt8]] = []
        init(subnet: IPv4Network?, subnet6: IPv6Network?, peer: Peer) {
            self.subnet = subnet
            self.subnet6 = subnet6
            self.peer = peer
        }

        /// "10.2.1.0/24", "fd00:10:2:1::/64" or "10.2.1.0/24 and fd00:10:2:1::/64".
        var subnets: String {
            [subnet?.description, subnet6?.description].compactMap { $0 }.joined(separator: " and ")
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
    private let subnetMask6: UInt128
    private var bySubnet: [UInt32: PeerEntry] = [:]
    private var bySubnet6: [UInt128: PeerEntry] = [:]
    private var byPeer: [ObjectIdentifier: PeerEntry] = [:]
    private var counters = [UInt64](repeating: 0, count: WireGuardCounter.allCases.count)
    private var handshakeSecond = Instant(nanoseconds: .min / 2)
    private var handshakesThisSecond = 0
    /// The crypto of batches whose caller brings no workers of its own (tests).
    private let inline = CryptoWorkers(helpers: 0, name: "tunneld-wg-inline")
    private let controlCipher = CipherContext()
    let publicKey: PublicKey

    /// `subnetLength`, `subnetLength6`: the lengths of the network's IPv4
    /// and IPv6 subnets (nil: the engine carries no packets of that family).
    /// `mtu`: the device's, which padding does not pass.
    init(
        privateKey: PrivateKey,
        presharedKey: PresharedKey,
        persistentKeepalive: Int,
        subnetLength: Int?,
        subnetLength6: Int? = nil,
        mtu: Int? = nil
    ) {
        interface = WireGuardInterface(privateKey: privateKey, mtu: mtu)
        publicKey = interface.publicKey
        self.presharedKey = presharedKey
        keepalive = persistentKeepalive > 0 ? .seconds(Int64(persistentKeepalive)) : nil
        subnetMask = IPv4Network.mask(subnetLength ?? 32)
        subnetMask6 = IPv6Network.mask(subnetLength6 ?? 128)
    }

    // MARK: Peers

    /// Adds the peer of `subnet` and/or `subnet6` (a dual-stack device's
    /// peer has both), or updates its endpoint; a different key or other
    /// subnets replace the peer (and end the old one's sessions).
    func setPeer(
        subnet: IPv4Network?,
        subnet6: IPv6Network? = nil,
        publicKey: PublicKey,
        endpoint: Endpoint
    ) throws(KeyError) {
        precondition(subnet != nil || subnet6 != nil, "a peer needs a subnet")
        try lock.withLock { _ throws(KeyError) in
            let holders = [
                subnet.flatMap { bySubnet[$0.address.value] }, subnet6.flatMap { bySubnet6[$0.address.value] },
            ].compactMap { $0 }
            if let entry = holders.first, holders.allSatisfy({ $0 === entry }), entry.peer.publicKey == publicKey,
                entry.subnet == subnet, entry.subnet6 == subnet6
            {
                interface.setEndpoint(endpoint, of: entry.peer)
                return
            }
            for entry in holders { removeLocked(entry) }
            // The same key under another subnet: that host moved.
            if let other = interface.peers[publicKey], let entry = byPeer[ObjectIdentifier(other)] {
                removeLocked(entry)
            }
            let peer = try interface.addPeer(publicKey, presharedKey: presharedKey, endpoint: endpoint)
            peer.persistentKeepalive = keepalive
            let entry = PeerEntry(subnet: subnet, subnet6: subnet6, peer: peer)
            if let subnet { bySubnet[subnet.address.value] = entry }
            if let subnet6 { bySubnet6[subnet6.address.value] = entry }
            byPeer[ObjectIdentifier(peer)] = entry
        }
    }

    /// Removes the peer of `subnet` or `subnet6`: its sessions end and
    /// their keys are zeroed.
    func removePeer(subnet: IPv4Network?, subnet6: IPv6Network? = nil) {
        lock.withLock { _ in
            if let subnet, let entry = bySubnet[subnet.address.value] { removeLocked(entry) }
            if let subnet6, let entry = bySubnet6[subnet6.address.value] { removeLocked(entry) }
        }
    }

    private func removeLocked(_ entry: PeerEntry) {
        guard byPeer.removeValue(forKey: ObjectIdentifier(entry.peer)) != nil else { return }
        if let subnet = entry.subnet, bySubnet[subnet.address.value] === entry { bySubnet[subnet.address.value] = nil }
        if let subnet6 = entry.subnet6, bySubnet6[subnet6.address.value] === entry {
            bySubnet6[subnet6.address.value] = nil
        }
        counters[WireGuardCounter.droppedNoSession.rawValue] += UInt64(entry.staged.count)
        entry.staged = []
        interface.removePeer(entry.peer.publicKey)
    }

    var peerCount: Int { lock.withLock { _ in byPeer.count } }

    /// Every peer as `wg show` shows it, in subnet order; handshake times
    /// turned from the monotonic clock (`now`) into wall-clock dates (`wallNow`).
    func tunnels(now: Instant, wallNow: Date) -> [TunnelStatus] {
        lock.withLock { _ in
            byPeer.values.sorted {
                ($0.subnet?.address.value ?? 0, $0.subnet6?.address.value ?? 0)
                    < ($1.subnet?.address.value ?? 0, $1.subnet6?.address.value ?? 0)
            }.map { entry in
                let peer = entry.peer
                return TunnelStatus(
                    subnet: entry.subnets,
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

    /// Whether the peer of the IPv6 subnet `subnet6` has a session now.
    func hasSession(subnet6: IPv6Network) -> Bool {
        lock.withLock { _ in bySubnet6[subnet6.address.value]?.peer.current != nil }
    }

    func counterValues() -> [(counter: WireGuardCounter, value: UInt64)] {
        lock.withLock { _ in WireGuardCounter.allCases.map { ($0, counters[$0.rawValue]) } }
    }

    func count(_ counter: WireGuardCounter, _ n: Int = 1) {
        lock.withLock { _ in counters[counter.rawValue] += UInt64(n) }
    }

    private func bump(_ counter: WireGuardCounter, _ n: Int = 1) { counters[counter.rawValue] += UInt64(n) }

    /// The IPv6 address at `offset` of a packet, as a number (network order read).
    @inline(__always)
    static func ipv6Address(_ packet: UnsafeRawBufferPointer, at offset: Int) -> UInt128 {
        UInt128(UInt64(bigEndian: packet.loadUnaligned(fromByteOffset: offset, as: UInt64.self))) << 64
            | UInt128(UInt64(bigEndian: packet.loadUnaligned(fromByteOffset: offset + 8, as: UInt64.self)))
    }

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
            let version = payload.count > 0 ? payload[0] >> 4 : 0
            if version == 4, payload.count >= 20 {
                let destination = UInt32(bigEndian: payload.loadUnaligned(fromByteOffset: 16, as: UInt32.self))
                batch.destinations[i] = UInt128(destination & subnetMask)
                batch.destinationIsIPv6[i] = false
            } else if version == 6, payload.count >= 40 {
                batch.destinations[i] = Self.ipv6Address(payload, at: 24) & subnetMask6
                batch.destinationIsIPv6[i] = true
            } else {
                batch.pass[i] = false
                bump(.droppedNotIP)
                continue
            }
            batch.pass[i] = true
        }
        var i = 0
        while i < batch.count {
            guard batch.pass[i] else {
                i += 1
                continue
            }
            var end = i + 1
            while end < batch.count, batch.pass[end], batch.destinations[end] == batch.destinations[i],
                batch.destinationIsIPv6[end] == batch.destinationIsIPv6[i]
            {
                end += 1
            }
            defer { i = end }
            let found =
                batch.destinationIsIPv6[i]
                ? bySubnet6[batch.destinations[i]] : bySubnet[UInt32(truncatingIfNeeded: batch.destinations[i])]
            guard let entry = found, let endpoint = entry.peer.endpoint else {
                for k in i..<end { batch.pass[k] = false }
                // Multicast has no peer by design: the kernel's MLD reports (sent from :: to
                // ff02::16 when a device with IPv6 comes up) are told apart from real misses.
                let multicast =
                    batch.destinationIsIPv6[i]
                    ? batch.destinations[i] >> 120 == 0xFF && subnetMask6 >> 120 == 0xFF
                    : UInt32(truncatingIfNeeded: batch.destinations[i]) >> 28 == 0xE && subnetMask >> 28 == 0xF
                bump(multicast ? .droppedMulticast : .droppedNoPeer, end - i)
                continue
            }
            let reservation = interface.reserve(
                to: entry.peer,
                payloads: UnsafeBufferPointer(rebasing: batch.packets[i..<end]),
                now: now
            )
            let reserved = reservation?.count ?? 0
            for k in i..<(i + reserved) { batch.endpoints[k] = endpoint }
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
                handshake(
                    memory,
                    from: batch.endpoints[i],
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
        // A ticket's messages are of one peer (`OpenTicket.peer`) and come
        // one after another: the peer's entry is looked up once a ticket.
        var entryTicket = -1
        var ticketEntry: PeerEntry?
        for i in 0..<batch.count where batch.ticketOf[i] >= 0 {
            let ticket = batch.ticketOf[i]
            let received: Received
            switch interface.completeOpen(
                batch.openTickets[ticket],
                counter: batch.counters[i],
                packet: &batch.packets[i],
                from: batch.endpoints[i],
                now: now
            ) {
            case .failure(let rejection):
                bump(WireGuardCounter(rejection))
                continue
            case .success(let r): received = r
            }
            if ticket != entryTicket {
                entryTicket = ticket
                ticketEntry = byPeer[ObjectIdentifier(received.peer)]
            }
            guard let entry = ticketEntry else {
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
            // The inner packet's length from its header (the rest is padding),
            // and its source checked against the sender's subnet of that family.
            let total: Int
            let allowed: Bool
            switch inner[0] >> 4 {
            case 4 where received.payloadLength >= 20:
                total = Int(UInt16(bigEndian: inner.loadUnaligned(fromByteOffset: 2, as: UInt16.self)))
                let innerSource = UInt32(bigEndian: inner.loadUnaligned(fromByteOffset: 12, as: UInt32.self))
                allowed = entry.subnet?.contains(IPv4Address(innerSource)) ?? false
                guard total >= 20 else {
                    bump(.droppedMalformed)
                    continue
                }
            case 6 where received.payloadLength >= 40:
                total = 40 + Int(UInt16(bigEndian: inner.loadUnaligned(fromByteOffset: 4, as: UInt16.self)))
                allowed = entry.subnet6?.contains(IPv6Address(Self.ipv6Address(inner, at: 8))) ?? false
            default:
                bump(.droppedNotIP)
                continue
            }
            guard total <= received.payloadLength else {
                bump(.droppedMalformed)
                continue
            }
            guard allowed else {
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
        from source: Endpoint,
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
        switch interface.receiveHandshake(datagram, from: source, now: now, underLoad: underLoad) {
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
        return Datagram(bytes: message, to: endpoint)
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
        return Datagram(bytes: bytes, to: endpoint)
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
            for entry in byPeer.values {
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
