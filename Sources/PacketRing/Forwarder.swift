import NetBase
import Offload
import UDPEncap

#if canImport(Glibc)
import Glibc
#endif

/// The per-packet decisions of the udp backend, shared by every loop.
///
/// From the TUN: find the destination's peer, decrement TTL, or turn the
/// packet into an ICMP error for the TUN. From the network: check the
/// datagram is a well-formed IPv4 packet from the peer that owns its source
/// subnet and for our own subnet, then hand it to the TUN unchanged.
public struct Forwarder: Sendable {
    public let table: SubnetTable
    /// The IPv6 side in a dual-stack network; nil: IPv6 packets are not
    /// carried (dropped as malformed, as any non-IPv4 packet).
    public let table6: SubnetTable6?
    /// The TUN's address (kept for diagnostics; see `errorSource`).
    public let tunAddress: IPv4Address
    private let subnetMask: UInt32
    /// flannel accepts any datagram; by default tunneld accepts only packets
    /// whose source lies in the subnet of the peer that sent them. The checks
    /// that need no knowledge of the sender — the inner destination is in
    /// our subnet, the inner source is not — apply either way.
    public let acceptUnknownPeers: Bool
    /// The largest packet the tunnel carries (the underlay's MTU − 28, as the
    /// TUN's MTU is set): a bigger one gets "fragmentation needed" or is
    /// dropped, never sent as a datagram the underlay must fragment.
    public let mtu: Int

    public init(
        table: SubnetTable,
        table6: SubnetTable6? = nil,
        tunAddress: IPv4Address,
        acceptUnknownPeers: Bool = false,
        mtu: Int = DataPath.maxPacketSize
    ) {
        // One slot store for both sides: an entry of either names its IPv6
        // peers by slot, and the loops write and check addresses by it.
        precondition(
            table6 == nil || table6!.addresses6 === table.addresses6,
            "the IPv6 table must share the IPv4 table's PeerAddresses6"
        )
        self.table = table
        self.table6 = table6
        self.tunAddress = tunAddress
        self.acceptUnknownPeers = acceptUnknownPeers
        self.mtu = mtu
        self.subnetMask = IPv4Network.mask(table.subnetLength)
    }

    /// The source of an ICMP error about a packet for `destination`: the
    /// base address of the destination's subnet, i.e. "the tunnel towards
    /// that subnet". Not one of our own addresses: the kernel drops packets
    /// arriving with a local source address as martians, so an error from
    /// the TUN's address would never reach the sender.
    @inline(__always)
    func errorSource(for destination: UInt32) -> UInt32 { destination & subnetMask }

    /// What to do with a packet read from the TUN.
    public enum TunAction: Equatable {
        /// Send `length` bytes to `peer` (its table entry: IPv4 address and
        /// port, or an IPv6 address's slot and port; see `PeerNames`).
        case send(peer: UInt64, length: Int)
        /// Write `length` bytes (an ICMP error, rewritten in place) back into the TUN.
        case reply(length: Int)
        case drop
    }

    /// What to do with the packet of `length` bytes at `p` (room: `capacity`)
    /// read from the TUN; a packet sent on has its TTL decremented in place.
    /// `segmentLength`: the length of each packet a super-packet will be split
    /// into (nil: the packet goes on the wire as it is). Public (with
    /// `fromNetwork`) for the micro-benchmarks in Benchmarks/Micro; the loops
    /// of this module inline both.
    @inline(__always)
    public func fromTun(
        _ p: UnsafeMutableRawPointer,
        length: Int,
        capacity: Int,
        segmentLength: Int? = nil,
        stats: Statistics
    ) -> TunAction {
        stats.add(.tunPacketsRead)
        if let table6, Forwarder.isIPv6(p, length: length) {
            return fromTun(ipv6: p, length: length, capacity: capacity, segmentLength: segmentLength, table6, stats)
        }
        // The kernel built this packet; anything odd (IPv6 control traffic on
        // the device of an IPv4-only network) is simply not ours to carry.
        guard case .success(let total) = IPv4Header.validate(p, length: length) else {
            stats.add(.droppedMalformedFromTun)
            return .drop
        }
        let destination = IPv4Header.destination(p)
        let entry = table.entry(for: destination)
        guard SubnetTable.isAnyPeer(entry) else {
            if SubnetTable.isLocal(entry) {
                stats.add(.droppedLocalDestination)
                return .drop
            }
            stats.add(.droppedNoRoute)
            if let n = ICMPError.rewrite(
                p,
                length: total,
                capacity: capacity,
                kind: .networkUnreachable,
                source: errorSource(for: destination)
            ) {
                stats.add(.icmpUnreachableSent)
                return .reply(length: n)
            }
            return .drop
        }
        if IPv4Header.ttl(p) <= 1 {
            stats.add(.droppedTTLExpired)
            if let n = ICMPError.rewrite(
                p,
                length: total,
                capacity: capacity,
                kind: .timeExceeded,
                source: errorSource(for: destination)
            ) {
                stats.add(.icmpTimeExceededSent)
                return .reply(length: n)
            }
            return .drop
        }
        // In the order of the kernel's ip_forward: TTL, then size. The
        // kernel already holds routed packets to the TUN's MTU (fragmenting
        // or answering them itself), so this only meets packets when the
        // device's MTU was raised past the tunnel's by hand.
        if (segmentLength ?? total) > mtu {
            stats.add(.droppedTooBig)
            if IPv4Header.dontFragment(p),
                let n = ICMPError.rewrite(
                    p,
                    length: total,
                    capacity: capacity,
                    kind: .fragmentationNeeded(nextHopMTU: UInt16(clamping: mtu)),
                    source: errorSource(for: destination)
                )
            {
                stats.add(.icmpFragmentationNeededSent)
                return .reply(length: n)
            }
            return .drop
        }
        IPv4Header.decrementTTL(p)
        return .send(peer: entry, length: total)
    }

    /// Checks a datagram from `sender` (either underlay); returns
    /// the length to write into the TUN, or nil to drop it. Peers send from
    /// the backend port they listen on, so a datagram from another port of
    /// the right host is not the peer's either. Whatever the sender, the
    /// inner packet must be for our own subnet: written into the TUN, a
    /// packet for anywhere else would be routed onwards by this host — to
    /// another peer's containers or out of the network — with this host's
    /// standing (and, with --ip-masq, its address).
    @inline(__always)
    public func fromNetwork(
        _ p: UnsafeRawPointer,
        length: Int,
        sender: UnderlaySender,
        stats: Statistics
    ) -> Int? {
        stats.add(.udpDatagramsReceived)
        if let table6, Forwarder.isIPv6(p, length: length) {
            return fromNetwork(ipv6: p, length: length, sender: sender, table6, stats)
        }
        let total: Int
        switch IPv4Header.validate(p, length: length) {
        case .success(let n): total = n
        case .failure:
            stats.add(.droppedMalformed)
            return nil
        }
        let source = table.entry(for: IPv4Header.source(p))
        guard accepts(source: source, sender: sender, stats: stats),
            isOurs(table.entry(for: IPv4Header.destination(p)), stats: stats)
        else { return nil }
        return total
    }

    /// `fromNetwork` from an IPv4 sender (host order).
    @inline(__always)
    public func fromNetwork(
        _ p: UnsafeRawPointer,
        length: Int,
        sender: UInt32,
        senderPort: UInt16,
        stats: Statistics
    ) -> Int? {
        fromNetwork(p, length: length, sender: UnderlaySender(ipv4: sender, port: senderPort), stats: stats)
    }

    /// Whether a datagram whose inner source has table entry `source` may
    /// come from `sender` (either inner family, either underlay): never from
    /// our own subnet, and — unless unknown peers are accepted — only from
    /// the peer that holds the source's subnet, from its port, over the
    /// underlay the table sends that subnet's packets by.
    @inline(__always)
    func accepts(source: UInt64, sender: UnderlaySender, stats: Statistics) -> Bool {
        if SubnetTable.isLocal(source) {
            stats.add(.droppedLocalSource)
            return false
        }
        if !acceptUnknownPeers {
            guard SubnetTable.isAnyPeer(source) else {
                stats.add(.droppedUnknownPeer)
                return false
            }
            let expected =
                SubnetTable.isPeer6(source)
                ? table.addresses6.address(SubnetTable.peerSlot(source))
                : UnderlaySender.mapped(SubnetTable.peerAddress(source))
            guard expected == sender.address, SubnetTable.peerPort(source) == sender.port else {
                stats.add(.droppedSpoofedSource)
                return false
            }
        }
        return true
    }

    /// Whether the inner destination (its table entry) is in our own subnet.
    @inline(__always)
    func isOurs(_ destination: UInt64, stats: Statistics) -> Bool {
        guard SubnetTable.isLocal(destination) else {
            stats.add(.droppedNotForUs)
            return false
        }
        return true
    }
}

// MARK: - IPv6 (dual-stack networks)

extension Forwarder {
    @inline(__always)
    static func isIPv6(_ p: UnsafeRawPointer, length: Int) -> Bool {
        length > 0 && p.load(fromByteOffset: 0, as: UInt8.self) >> 4 == 6
    }

    /// The IP header's length: the IPv4 header's, or IPv6's fixed 40 bytes.
    @inline(__always)
    static func ipHeaderLength(_ p: UnsafeRawPointer, length: Int) -> Int {
        isIPv6(p, length: length) ? IPv6Header.length : IPv4Header.headerLength(p)
    }

    /// `fromTun` for an IPv6 packet: the same decisions in the same order,
    /// with ICMPv6 errors; a packet bigger than the tunnel always gets
    /// "packet too big" (IPv6 has no fragmentation on the way).
    @inline(__always)
    func fromTun(
        ipv6 p: UnsafeMutableRawPointer,
        length: Int,
        capacity: Int,
        segmentLength: Int?,
        _ table6: SubnetTable6,
        _ stats: Statistics
    ) -> TunAction {
        guard case .success(let total) = IPv6Header.validate(p, length: length) else {
            stats.add(.droppedMalformedFromTun)
            return .drop
        }
        let destination = IPv6Header.destination(p)
        let entry = table6.entry(for: destination)
        func error(_ kind: ICMPv6Error.Kind, _ counter: DataPathCounter) -> TunAction {
            guard
                let n = ICMPv6Error.rewrite(
                    p,
                    length: total,
                    capacity: capacity,
                    kind: kind,
                    source: table6.subnetBase(of: destination)
                )
            else { return .drop }
            stats.add(counter)
            return .reply(length: n)
        }
        guard SubnetTable.isAnyPeer(entry) else {
            if SubnetTable.isLocal(entry) {
                stats.add(.droppedLocalDestination)
                return .drop
            }
            stats.add(.droppedNoRoute)
            return error(.noRoute, .icmpUnreachableSent)
        }
        if IPv6Header.hopLimit(p) <= 1 {
            stats.add(.droppedTTLExpired)
            return error(.hopLimitExceeded, .icmpTimeExceededSent)
        }
        if (segmentLength ?? total) > mtu {
            stats.add(.droppedTooBig)
            return error(.packetTooBig(mtu: UInt32(mtu)), .icmpFragmentationNeededSent)
        }
        IPv6Header.decrementHopLimit(p)
        return .send(peer: entry, length: total)
    }

    /// `fromNetwork` for an IPv6 inner packet: the inner source must lie in
    /// the sender's IPv6 subnet (unless unknown peers are accepted) and the
    /// inner destination in ours.
    @inline(__always)
    func fromNetwork(
        ipv6 p: UnsafeRawPointer,
        length: Int,
        sender: UnderlaySender,
        _ table6: SubnetTable6,
        _ stats: Statistics
    ) -> Int? {
        guard case .success(let total) = IPv6Header.validate(p, length: length) else {
            stats.add(.droppedMalformed)
            return nil
        }
        let source = table6.entry(for: IPv6Header.source(p))
        guard accepts(source: source, sender: sender, stats: stats),
            isOurs(table6.entry(for: IPv6Header.destination(p)), stats: stats)
        else { return nil }
        return total
    }
}

// MARK: - Batches with offloads

extension Forwarder {
    /// Where the packets of one TUN read go, once split.
    public enum TunBatchAction: Equatable {
        /// Send the packet of `length` bytes at `start` to `peer` (its
        /// table entry) as one datagram.
        case send(peer: UInt64, start: UnsafeMutableRawPointer, length: Int)
        /// Send the datagrams gathered by `iovecs`, two per datagram
        /// (headers, then payload where it lies in the read buffer), as
        /// `segments` describes them.
        case sendGathered(
            peer: UInt64,
            iovecs: UnsafeMutablePointer<iovec>,
            segments: SegmentedPacket
        )
        /// Write `length` bytes (an ICMP error, rewritten in place after the
        /// virtio header, which is reset) back into the TUN, from `start`.
        case reply(start: UnsafeMutableRawPointer, length: Int)
        case drop
    }

    /// One read from a TUN opened with a virtio header: the 10-byte header
    /// and then a packet, possibly a super-packet of up to 64 KiB (TSO/USO)
    /// or a packet whose checksum is left to us. The routing decision is
    /// `fromTun`'s, made once for the whole super-packet (every segment has
    /// the same addresses); then the packet is split into real IP packets
    /// — their headers in `headers`, gathered with the payload where it lies
    /// by `iovecs` — or has its checksum completed in place.
    @inline(__always)
    public func fromTun(
        virtioRead read: UnsafeMutableRawPointer,
        length: Int,
        capacity: Int,
        headers: UnsafeMutableRawPointer,
        headerCapacity: Int,
        iovecs: UnsafeMutablePointer<iovec>,
        iovecCapacity: Int,
        maxSegments: Int,
        stats: Statistics
    ) -> TunBatchAction {
        guard length > VirtioNetHeader.size else {
            stats.add(.tunPacketsRead)
            stats.add(.droppedMalformedFromTun)
            return .drop
        }
        let header = VirtioNetHeader(reading: read)
        if header.gsoType != VirtioNetHeader.GSOType.none.rawValue { stats.add(.tunSuperPacketsRead) }
        let p = read + VirtioNetHeader.size
        let packetLength = length - VirtioNetHeader.size
        let segmentLength =
            header.gsoType == VirtioNetHeader.GSOType.none.rawValue
            ? nil : Forwarder.segmentLength(p, length: packetLength, header: header)
        switch fromTun(
            p,
            length: packetLength,
            capacity: capacity - VirtioNetHeader.size,
            segmentLength: segmentLength,
            stats: stats
        ) {
        case .drop:
            return .drop
        case .reply(let n):
            // An error we built ourselves: complete, nothing for the kernel to do.
            VirtioNetHeader().write(to: read)
            return .reply(start: read, length: VirtioNetHeader.size + n)
        case .send(let peer, let n):
            if header.gsoType == VirtioNetHeader.GSOType.none.rawValue {
                // The checksum to complete must lie past the IPv4 header checked above: a
                // start inside it would overwrite checked fields (version, lengths) and
                // send the peer a datagram it must drop. The kernel never asks for that.
                if header.flags & VirtioNetHeader.needsChecksum != 0,
                    Int(header.checksumStart) < Forwarder.ipHeaderLength(p, length: n)
                        || !Segmentation.completeChecksum(p, length: n, header: header)
                {
                    stats.add(.droppedBadOffload)
                    return .drop
                }
                return .send(peer: peer, start: p, length: n)
            }
            switch Segmentation.splitGathered(
                p,
                length: n,
                header: header,
                headers: headers,
                headerCapacity: headerCapacity,
                iovecs: iovecs,
                iovecCapacity: iovecCapacity,
                maxSegments: maxSegments
            ) {
            case .success(let segments):
                stats.add(.segmentsMade, UInt64(segments.count))
                return .sendGathered(peer: peer, iovecs: iovecs, segments: segments)
            case .failure:
                stats.add(.droppedBadOffload)
                return .drop
            }
        }
    }

    /// The length of each full packet a TCP or UDP super-packet is split
    /// into (IP and L4 headers + gso_size), to hold against the MTU; nil
    /// when the headers do not say (the split then refuses the packet).
    @inline(__always)
    static func segmentLength(_ p: UnsafeRawPointer, length: Int, header: VirtioNetHeader) -> Int? {
        guard length >= IPv4Header.minimumLength else { return nil }
        let ipHeaderLength = Forwarder.ipHeaderLength(p, length: length)
        let transport: Int
        switch header.gso {
        case .tcpv4?, .tcpv6?:
            guard length >= ipHeaderLength + 20 else { return nil }
            transport = Int(p.load(fromByteOffset: ipHeaderLength + 12, as: UInt8.self) >> 4) * 4
        case .udpL4?:
            transport = 8
        default:
            return nil
        }
        return ipHeaderLength + transport + Int(header.gsoSize)
    }

    /// The datagrams of one receive: `length` bytes at `p`, every datagram
    /// `segmentLength` bytes but the last (UDP GRO; a receive without GRO is
    /// one datagram of `length` bytes). Each is checked exactly as
    /// `fromNetwork` checks a single datagram; those that pass go into
    /// `plan`, which coalesces TCP segments of one flow into super-packets.
    /// Returns how many were accepted.
    @inline(__always) @discardableResult
    public func fromNetwork(
        datagrams p: UnsafeMutableRawPointer,
        length: Int,
        segmentLength: Int,
        sender: UnderlaySender,
        into plan: inout CoalescingPlan,
        stats: Statistics
    ) -> Int {
        plan.reset()
        let step = segmentLength > 0 ? segmentLength : length
        var offset = 0
        var accepted = 0
        while offset < length {
            let datagram = p + offset
            let size = min(step, length - offset)
            offset += size
            guard let n = fromNetwork(datagram, length: size, sender: sender, stats: stats)
            else { continue }
            guard plan.add(datagram, length: n) else {
                stats.add(.droppedTruncated)
                continue
            }
            accepted += 1
        }
        plan.finish()
        return accepted
    }
}
