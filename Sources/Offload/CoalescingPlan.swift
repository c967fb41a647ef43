#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Plans the TUN writes for the packets of one UDP GRO receive (or any batch of received
/// packets), coalescing consecutive TCP segments of a flow into one GSO super-packet
/// (GSO_TCPV4 or GSO_TCPV6), like Linux GRO does for a NIC, and consecutive equal-size UDP
/// datagrams of a flow into one GSO_UDP_L4 super-packet (the kernel splits it again before a socket without UDP_GRO reads
/// it, as it does for a local UDP_SEGMENT sender).
///
/// Packets stay where they are in the receive buffer: a write is a gather list of a 10-byte
/// virtio header, the first packet whole and only the payload of each following segment.
/// `finish()` patches the first packet of every coalesced group in place, so the receive
/// buffer must stay alive and unmodified until the writes are done.
///
/// Allocated once per receive slot; `add` and `finish` never allocate.
@safe
public struct CoalescingPlan: ~Copyable {
    /// Open flows tracked at once; when full, the oldest open group is closed.
    public static let flowTableSize = 8

    /// Segments merged into one write at most, like Linux GRO; it also keeps a write's gather
    /// list far below `IOV_MAX` (1024) when segments are tiny.
    public static let maxSegmentsPerWrite = 64

    @unsafe
    struct PacketSlot {
        var base: UnsafeMutableRawPointer?
        var length: Int
        var next: Int  // next packet of the same write, or -1
    }

    struct WriteSlot {
        var first: Int
        var last: Int
        var count: Int
        var iovecStart: Int
        var bytes: Int  // without the virtio header
        // Open-group state, meaningful while count may still grow.
        var totalLength: Int
        var segmentSize: Int
        var headerLength: Int
        var nextSequence: UInt32
        var push: Bool
        /// A group of UDP datagrams (written as one GSO_UDP_L4 super-packet).
        var udp: Bool = false
        /// The group's IP header length: 20 (IPv4 without options) or 40 (IPv6).
        var ipHeaderLength: Int = IPv4.minimumHeaderLength
    }

    struct FlowSlot {
        var key: FlowKey
        var write: Int  // open group's write, or -1
    }

    let maxPackets: Int
    let verifyChecksums: Bool
    let coalesce: Bool
    let iovecs: UnsafeMutablePointer<iovec>
    let headers: UnsafeMutableRawPointer
    let packets: UnsafeMutablePointer<PacketSlot>
    let writes: UnsafeMutablePointer<WriteSlot>
    let flows: UnsafeMutablePointer<FlowSlot>
    var packetCount = 0
    var writeTotal = 0
    var finished = false

    /// - Parameters:
    ///   - maxPackets: packets one batch may hold (`add` returns false past it).
    ///   - verifyChecksums: check the IPv4 and TCP checksum of a packet before merging it.
    ///     Merging hides a segment's own checksum (the kernel recomputes the super-packet's),
    ///     so a corrupt segment would be accepted; the outer UDP checksum already covers the
    ///     bytes on the wire, so a caller that trusts its peers' senders may turn this off.
    ///   - coalesce: false gives every packet a write of its own (for a TUN without a virtio
    ///     header, which cannot take a super-packet).
    public init(maxPackets: Int, verifyChecksums: Bool = true, coalesce: Bool = true) {
        self.coalesce = coalesce
        let capacity = max(maxPackets, 1)
        self.maxPackets = max(maxPackets, 0)
        self.verifyChecksums = verifyChecksums
        unsafe iovecs = .allocate(capacity: 2 * capacity)
        unsafe headers = .allocate(byteCount: capacity * VirtioNetHeader.size, alignment: 8)
        unsafe packets = .allocate(capacity: capacity)
        unsafe writes = .allocate(capacity: capacity)
        unsafe flows = .allocate(capacity: Self.flowTableSize)
        unsafe iovecs.initialize(repeating: iovec(iov_base: nil, iov_len: 0), count: 2 * capacity)
        unsafe headers.initializeMemory(as: UInt8.self, repeating: 0, count: capacity * VirtioNetHeader.size)
        unsafe packets.initialize(repeating: PacketSlot(base: nil, length: 0, next: -1), count: capacity)
        unsafe writes.initialize(
            repeating: WriteSlot(
                first: -1,
                last: -1,
                count: 0,
                iovecStart: 0,
                bytes: 0,
                totalLength: 0,
                segmentSize: 0,
                headerLength: 0,
                nextSequence: 0,
                push: false
            ),
            count: capacity
        )
        unsafe flows.initialize(
            repeating: FlowSlot(key: FlowKey(source: 0, destination: 0, ports: 0, proto: 0, ipv6: false), write: -1),
            count: Self.flowTableSize
        )
    }

    deinit {
        unsafe iovecs.deallocate()
        unsafe headers.deallocate()
        unsafe packets.deallocate()
        unsafe writes.deallocate()
        unsafe flows.deallocate()
    }

    /// Forgets every packet and write; the plan can take a new batch.
    public mutating func reset() {
        packetCount = 0
        writeTotal = 0
        finished = false
        for f in 0..<Self.flowTableSize { unsafe flows[f].write = -1 }
    }

    public var writeCount: Int { writeTotal }

    /// Packets that were merged into another packet's write.
    public var coalescedSegments: Int { packetCount - writeTotal }

    /// Packets added since the last reset.
    public var packetsAdded: Int { packetCount }

    /// Adds one IPv4 or IPv6 packet of `length` bytes (its total length) that lives in the receive
    /// buffer; packets arrive in wire order. Anything that is not a coalescable TCP segment
    /// gets a write of its own. Returns false, without keeping the packet, if the plan is full,
    /// already finished, or `length` is negative.
    public mutating func add(_ packet: UnsafeMutableRawPointer, length: Int) -> Bool {
        guard !finished, length >= 0, packetCount < maxPackets else { return false }
        let index = packetCount
        packetCount += 1
        unsafe packets[index] = unsafe PacketSlot(base: packet, length: length, next: -1)

        guard coalesce, let key = unsafe flowKey(packet, length: length) else {
            startWrite(index)
            return true
        }
        if key.proto == IPv4.udp { return unsafe addDatagram(packet, length: length, index: index, key: key) }
        let segment = unsafe parseSegment(packet, length: length, ipv6: key.ipv6)
        let flow = findFlow(key)
        if let flow {
            let w = unsafe flows[flow].write
            if let segment, unsafe join(segment, packet: packet, index: index, write: w) {
                let group = unsafe writes[w]
                if segment.flags & TCPFlag.psh != 0 || segment.payload < group.segmentSize {
                    unsafe flows[flow].write = -1
                }
                return true
            }
            // Anything else of this flow ends its group, or a later segment would be
            // written before this packet.
            unsafe flows[flow].write = -1
        }
        let w = startWrite(index)
        if let segment, segment.flags == TCPFlag.ack, segment.payload > 0,
            unsafe checksumsAreValid(packet, length: length, ipHeaderLength: segment.ipHeaderLength, proto: IPv4.tcp)
        {
            unsafe writes[w].totalLength = length
            unsafe writes[w].segmentSize = segment.payload
            unsafe writes[w].headerLength = segment.headerLength
            unsafe writes[w].ipHeaderLength = segment.ipHeaderLength
            unsafe writes[w].nextSequence = segment.sequence &+ UInt32(truncatingIfNeeded: segment.payload)
            unsafe writes[w].push = false
            let slot = flow ?? freeFlowSlot()
            unsafe flows[slot] = FlowSlot(key: key, write: w)
        }
        return true
    }

    /// Closes the open groups: patches the first packet of every coalesced group in place and
    /// lays out the gather lists. Call once after the last `add`; later calls do nothing.
    public mutating func finish() {
        guard !finished else { return }
        finished = true
        for f in 0..<Self.flowTableSize { unsafe flows[f].write = -1 }
        var next = 0
        for w in 0..<writeTotal {
            let header = unsafe headers + w * VirtioNetHeader.size
            let group = unsafe writes[w]
            if group.count >= 2, let first = unsafe packets[group.first].base {
                unsafe patchFirst(first, group: group).write(to: header)
            } else {
                unsafe VirtioNetHeader().write(to: header)
            }
            unsafe writes[w].iovecStart = next
            unsafe iovecs[next] = unsafe iovec(iov_base: header, iov_len: VirtioNetHeader.size)
            next += 1
            var p = group.first
            while p >= 0 {
                unsafe iovecs[next] = unsafe iovec(iov_base: packets[p].base, iov_len: packets[p].length)
                next += 1
                p = unsafe packets[p].next
            }
        }
    }

    /// Write `index` (valid after `finish()`): its gather list — iovec 0 is its virtio header,
    /// then the first packet whole, then the payload of each following segment — and its total
    /// bytes. An empty list for an index out of range or before `finish()`.
    public func write(_ index: Int) -> (iovecs: UnsafeMutablePointer<iovec>, count: Int, bytes: Int) {
        guard finished, index >= 0, index < writeTotal else { return unsafe (iovecs, 0, 0) }
        let w = unsafe writes[index]
        return unsafe (iovecs + w.iovecStart, 1 + w.count, VirtioNetHeader.size + w.bytes)
    }

    /// The virtio header of write `index` (valid after `finish()`).
    public func header(_ index: Int) -> VirtioNetHeader {
        guard finished, index >= 0, index < writeTotal else { return VirtioNetHeader() }
        return unsafe VirtioNetHeader(reading: headers + index * VirtioNetHeader.size)
    }

    // MARK: - Internals

    struct FlowKey {
        /// Addresses as loaded (native byte order: compared, never read); an IPv4 address
        /// zero-extended.
        var source: UInt128
        var destination: UInt128
        var ports: UInt32
        var proto: UInt8
        var ipv6: Bool
    }

    /// A TCP segment that may be merged: IPv4 without options or IPv6 without extension
    /// headers, not a fragment, lengths consistent (checksums are checked later, only when
    /// it matters).
    struct Segment {
        var ipHeaderLength: Int
        var headerLength: Int
        var payload: Int
        var sequence: UInt32
        var flags: UInt8
    }

    /// The TCP or UDP flow of an IPv4 packet (not a later fragment) or of an IPv6 packet with
    /// the L4 header right after the fixed one, whose ports can be read; else nil.
    func flowKey(_ p: UnsafeMutableRawPointer, length: Int) -> FlowKey? {
        guard length >= IPv4.minimumHeaderLength else { return nil }
        let b0 = unsafe p.u8(0)
        if b0 >> 4 == 6 {
            guard length >= IPv6.headerLength + 4 else { return nil }
            let proto = unsafe p.u8(6)
            guard proto == IPv4.tcp || proto == IPv4.udp else { return nil }
            return unsafe FlowKey(
                source: p.loadUnaligned(fromByteOffset: 8, as: UInt128.self),
                destination: p.loadUnaligned(fromByteOffset: 24, as: UInt128.self),
                ports: p.be32(IPv6.headerLength),
                proto: proto,
                ipv6: true
            )
        }
        let ipHeaderLength = Int(b0 & 0x0f) * 4
        let proto = unsafe p.u8(9)
        guard b0 >> 4 == 4, ipHeaderLength >= IPv4.minimumHeaderLength, ipHeaderLength + 4 <= length,
            proto == IPv4.tcp || proto == IPv4.udp, unsafe p.be16(6) & IPv4.fragmentOffsetMask == 0
        else { return nil }
        return unsafe FlowKey(
            source: UInt128(p.be32(12)),
            destination: UInt128(p.be32(16)),
            ports: p.be32(ipHeaderLength),
            proto: proto,
            ipv6: false
        )
    }

    /// The IP header length of a packet that may be merged, whose IP lengths agree with
    /// `length` and whose L4 protocol is `proto`: 20 for IPv4 without options and not a
    /// fragment, 40 for IPv6 without extension headers; else nil.
    func mergeableIPHeaderLength(_ p: UnsafeMutableRawPointer, length: Int, ipv6: Bool, proto: UInt8) -> Int? {
        if ipv6 {
            guard length >= IPv6.headerLength, unsafe p.u8(0) >> 4 == 6,
                unsafe IPv6.headerLength + Int(p.be16(4)) == length, unsafe p.u8(6) == proto
            else { return nil }
            return IPv6.headerLength
        }
        guard length >= IPv4.minimumHeaderLength, unsafe p.u8(0) == 0x45, unsafe Int(p.be16(2)) == length,
            unsafe p.be16(6) & (IPv4.moreFragments | IPv4.fragmentOffsetMask) == 0, unsafe p.u8(9) == proto
        else { return nil }
        return IPv4.minimumHeaderLength
    }

    func parseSegment(_ p: UnsafeMutableRawPointer, length: Int, ipv6: Bool) -> Segment? {
        guard let ip = unsafe mergeableIPHeaderLength(p, length: length, ipv6: ipv6, proto: IPv4.tcp),
            length >= ip + 20
        else { return nil }
        let tcpHeaderLength = unsafe Int(p.u8(ip + 12) >> 4) * 4
        guard tcpHeaderLength >= 20, ip + tcpHeaderLength <= length else { return nil }
        return unsafe Segment(
            ipHeaderLength: ip,
            headerLength: ip + tcpHeaderLength,
            payload: length - ip - tcpHeaderLength,
            sequence: p.be32(ip + 4),
            flags: p.u8(ip + 13)
        )
    }

    /// The pseudo-header sum of a packet whose IP header is `ipHeaderLength` bytes long
    /// (20: IPv4, 40: IPv6), for an L4 part of `l4Length` bytes of protocol `proto`.
    static func pseudoHeaderSum(
        _ p: UnsafeMutableRawPointer,
        ipHeaderLength: Int,
        proto: UInt8,
        l4Length: Int
    ) -> UInt64 {
        let addresses =
            unsafe ipHeaderLength == IPv6.headerLength
            ? Checksum.partial(p + 8, count: 32) : Checksum.partial(p + 12, count: 8)
        return addresses &+ UInt64(proto) &+ UInt64(UInt32(truncatingIfNeeded: l4Length) & 0xffff)
            &+ UInt64(UInt32(truncatingIfNeeded: l4Length) &>> 16)
    }

    /// Checked only for a packet about to be merged or to start a group: the kernel verifies
    /// the rest when they are written to the TUN. The IPv4 header checksum and the L4
    /// checksum; a UDP checksum of 0 means none was sent, which only IPv4 allows.
    func checksumsAreValid(_ p: UnsafeMutableRawPointer, length: Int, ipHeaderLength: Int, proto: UInt8) -> Bool {
        guard verifyChecksums else { return true }
        let ipv6 = ipHeaderLength == IPv6.headerLength
        if !ipv6 {
            guard unsafe Checksum.fold(Checksum.partial(p, count: ipHeaderLength)) == 0xffff else { return false }
        }
        if proto == IPv4.udp, unsafe p.be16(ipHeaderLength + 6) == 0 { return !ipv6 }
        let pseudo = unsafe Self.pseudoHeaderSum(
            p,
            ipHeaderLength: ipHeaderLength,
            proto: proto,
            l4Length: length - ipHeaderLength
        )
        return unsafe Checksum.fold(
            Checksum.partial(p + ipHeaderLength, count: length - ipHeaderLength, initial: pseudo)
        )
            == 0xffff
    }

    func findFlow(_ key: FlowKey) -> Int? {
        for f in 0..<Self.flowTableSize {
            let slot = unsafe flows[f]
            if slot.write >= 0, slot.key.source == key.source, slot.key.destination == key.destination,
                slot.key.ports == key.ports, slot.key.proto == key.proto, slot.key.ipv6 == key.ipv6
            {
                return f
            }
        }
        return nil
    }

    /// An empty flow slot, or the one of the oldest open group (which is closed).
    func freeFlowSlot() -> Int {
        var oldest = 0
        for f in 0..<Self.flowTableSize {
            if unsafe flows[f].write < 0 { return f }
            if unsafe flows[f].write < flows[oldest].write { oldest = f }
        }
        unsafe flows[oldest].write = -1
        return oldest
    }

    @discardableResult
    mutating func startWrite(_ packet: Int) -> Int {
        let w = writeTotal
        writeTotal += 1
        unsafe writes[w] = unsafe WriteSlot(
            first: packet,
            last: packet,
            count: 1,
            iovecStart: 0,
            bytes: packets[packet].length,
            totalLength: 0,
            segmentSize: 0,
            headerLength: 0,
            nextSequence: 0,
            push: false
        )
        return w
    }

    /// Appends the segment to open group `w` if it continues it (Linux GRO's rules for TCP).
    func join(_ segment: Segment, packet p: UnsafeMutableRawPointer, index: Int, write w: Int) -> Bool {
        let group = unsafe writes[w]
        guard segment.flags & ~TCPFlag.psh == TCPFlag.ack,
            segment.headerLength == group.headerLength,
            segment.sequence == group.nextSequence,
            segment.ipHeaderLength == group.ipHeaderLength,
            segment.payload > 0, segment.payload <= group.segmentSize,
            group.totalLength + segment.payload <= IPv4.maximumLength,
            group.count < Self.maxSegmentsPerWrite,
            let first = unsafe packets[group.first].base
        else { return false }
        // Same ack, window, data offset and option bytes.
        let ip = segment.ipHeaderLength
        guard unsafe sameIPHeader(p, as: first, ipHeaderLength: ip, joining: group.count),
            unsafe p.be32(ip + 8) == first.be32(ip + 8), unsafe p.be16(ip + 14) == first.be16(ip + 14),
            unsafe p.u8(ip + 12) == first.u8(ip + 12),
            unsafe memcmp(p + ip + 20, first + ip + 20, segment.headerLength - ip - 20) == 0,
            unsafe checksumsAreValid(
                p,
                length: segment.headerLength + segment.payload,
                ipHeaderLength: ip,
                proto: IPv4.tcp
            )
        else { return false }

        unsafe packets[index].base = unsafe p + segment.headerLength
        unsafe packets[index].length = segment.payload
        unsafe packets[group.last].next = index
        unsafe writes[w].last = index
        unsafe writes[w].count += 1
        unsafe writes[w].bytes += segment.payload
        unsafe writes[w].totalLength += segment.payload
        unsafe writes[w].nextSequence &+= UInt32(truncatingIfNeeded: segment.payload)
        if segment.flags & TCPFlag.psh != 0 { unsafe writes[w].push = true }
        return true
    }

    /// A UDP datagram: joins its flow's open group when it continues it, else starts a write
    /// (and a group, when it may be merged at all).
    mutating func addDatagram(_ p: UnsafeMutableRawPointer, length: Int, index: Int, key: FlowKey) -> Bool {
        let ip = unsafe mergeableIPHeaderLength(p, length: length, ipv6: key.ipv6, proto: IPv4.udp)
        let payload = unsafe ip.flatMap { ip in unsafe udpPayload(p, length: length, ipHeaderLength: ip) }
        let flow = findFlow(key)
        if let flow {
            let w = unsafe flows[flow].write
            if let ip, let payload, unsafe joinDatagram(p, payload: payload, ipHeaderLength: ip, index: index, write: w)
            {
                // Only the last datagram of a UDP GSO packet may be shorter.
                if unsafe payload < writes[w].segmentSize { unsafe flows[flow].write = -1 }
                return true
            }
            unsafe flows[flow].write = -1
        }
        let w = startWrite(index)
        // Like a TCP segment, the first datagram of a group is checked before others may
        // join it: merging rewrites its checksum field, which would hide a corrupt one.
        if let ip, let payload, payload > 0,
            unsafe checksumsAreValid(p, length: length, ipHeaderLength: ip, proto: IPv4.udp)
        {
            unsafe writes[w].totalLength = length
            unsafe writes[w].segmentSize = payload
            unsafe writes[w].headerLength = ip + 8
            unsafe writes[w].ipHeaderLength = ip
            unsafe writes[w].udp = true
            let slot = flow ?? freeFlowSlot()
            unsafe flows[slot] = FlowSlot(key: key, write: w)
        }
        return true
    }

    /// The payload length of a UDP datagram whose IP header (`ipHeaderLength` bytes, from
    /// `mergeableIPHeaderLength`) passed: its UDP length must agree; else nil.
    func udpPayload(_ p: UnsafeMutableRawPointer, length: Int, ipHeaderLength ip: Int) -> Int? {
        guard length >= ip + 8, unsafe Int(p.be16(ip + 4)) == length - ip else { return nil }
        return length - ip - 8
    }

    /// Appends the datagram to open group `w` if it continues it: same addresses, ports and IP
    /// header fields (`sameIPHeader`), a payload no longer than the group's.
    func joinDatagram(
        _ p: UnsafeMutableRawPointer,
        payload: Int,
        ipHeaderLength ip: Int,
        index: Int,
        write w: Int
    ) -> Bool {
        let group = unsafe writes[w]
        guard group.udp, group.ipHeaderLength == ip, payload > 0, payload <= group.segmentSize,
            group.totalLength + payload <= IPv4.maximumLength,
            group.count < Self.maxSegmentsPerWrite,
            let first = unsafe packets[group.first].base
        else { return false }
        guard unsafe sameIPHeader(p, as: first, ipHeaderLength: ip, joining: group.count),
            unsafe checksumsAreValid(p, length: ip + 8 + payload, ipHeaderLength: ip, proto: IPv4.udp)
        else { return false }
        unsafe packets[index].base = unsafe p + ip + 8
        unsafe packets[index].length = payload
        unsafe packets[group.last].next = index
        unsafe writes[w].last = index
        unsafe writes[w].count += 1
        unsafe writes[w].bytes += payload
        unsafe writes[w].totalLength += payload
        return true
    }

    /// Whether packet `p` may follow `first` in a super-packet as its `index`th. IPv4: same
    /// TOS, TTL, DF and reserved bit; without DF its ID must count up by one from the
    /// first's, as re-segmentation will make them. IPv6: same traffic class, flow label and
    /// hop limit.
    func sameIPHeader(
        _ p: UnsafeMutableRawPointer,
        as first: UnsafeMutableRawPointer,
        ipHeaderLength: Int,
        joining index: Int
    ) -> Bool {
        if ipHeaderLength == IPv6.headerLength {
            return unsafe p.be32(0) == first.be32(0) && p.u8(7) == first.u8(7)
        }
        let ipFlags = unsafe p.be16(6) & (IPv4.dontFragment | IPv4.reservedFlag)
        return unsafe p.u8(1) == first.u8(1) && p.u8(8) == first.u8(8)
            && ipFlags == first.be16(6) & (IPv4.dontFragment | IPv4.reservedFlag)
            && (ipFlags & IPv4.dontFragment != 0 || p.be16(4) == first.be16(4) &+ UInt16(truncatingIfNeeded: index))
    }

    /// Turns the first packet of a group into the header of its super-packet, as a NIC's GRO
    /// hands it to the stack with CHECKSUM_PARTIAL: the IP total length (and for UDP the UDP
    /// length) of the whole, a fresh header checksum, PSH if a merged TCP segment had it, and
    /// the L4 checksum field holding the pseudo-header sum. Returns the virtio header that
    /// describes it.
    func patchFirst(_ p: UnsafeMutableRawPointer, group: WriteSlot) -> VirtioNetHeader {
        let ip = group.ipHeaderLength
        let ipv6 = ip == IPv6.headerLength
        let l4Length = group.totalLength - ip
        if ipv6 {
            unsafe p.setBE16(4, UInt16(l4Length))
        } else {
            unsafe p.setBE16(2, UInt16(group.totalLength))
            unsafe p.setBE16(10, 0)
            unsafe p.setBE16(10, Checksum.compute(p, count: ip))
        }
        if group.udp {
            unsafe p.setBE16(ip + 4, UInt16(l4Length))
        } else if group.push {
            unsafe p.setU8(ip + 13, p.u8(ip + 13) | TCPFlag.psh)
        }
        let checksumOffset = group.udp ? 6 : 16
        let pseudo = unsafe Self.pseudoHeaderSum(
            p,
            ipHeaderLength: ip,
            proto: group.udp ? IPv4.udp : IPv4.tcp,
            l4Length: l4Length
        )
        unsafe p.setBE16(ip + checksumOffset, Checksum.fold(pseudo))
        let gso: VirtioNetHeader.GSOType = group.udp ? .udpL4 : (ipv6 ? .tcpv6 : .tcpv4)
        return VirtioNetHeader(
            flags: VirtioNetHeader.needsChecksum,
            gsoType: gso.rawValue,
            headerLength: UInt16(group.headerLength),
            gsoSize: UInt16(group.segmentSize),
            checksumStart: UInt16(ip),
            checksumOffset: UInt16(checksumOffset)
        )
    }
}

// The plan owns its memory uniquely (it is ~Copyable), so moving it to another thread is safe.
extension CoalescingPlan: @unchecked Sendable {}
