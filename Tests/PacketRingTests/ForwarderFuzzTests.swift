import FuzzSupport
import NetBase
import Offload
import Testing
import UDPEncap

@testable import PacketRing

#if canImport(Glibc)
import Glibc
#endif

/// The data path's per-packet decisions on random tables and hostile packets, held against
/// a slow model: a list of (subnet, route) searched one by one, RFC 791 validation on arrays,
/// and the rules of docs/RELIABILITY.md written out again.
@Suite struct ForwarderFuzzTests {
    /// A random network with a local subnet, some peers and free subnets.
    struct Setup {
        var network: IPv4Network
        var subnetLength: Int
        var routes: [(IPv4Network, NextHop)]
        var table: SubnetTable
        var forwarder: Forwarder
        var local: IPv4Network

        init(_ c: FuzzCase) throws {
            let prefix = c.int(8...24)
            let subnetLength = min(30, prefix + c.int(1...8))
            let network = IPv4Network(address: IPv4Address(c.u32()), prefixLength: prefix)
            self.subnetLength = subnetLength
            self.network = network
            let table = try SubnetTable(network: network, subnetLength: subnetLength)
            self.table = table
            let count = 1 << (subnetLength - prefix)
            func subnet(_ i: Int) -> IPv4Network {
                IPv4Network(
                    address: IPv4Address(network.address.value + UInt32(i) << UInt32(32 - subnetLength)),
                    prefixLength: subnetLength
                )
            }
            var used = Set<Int>()
            let localIndex = c.int(0..<count)
            used.insert(localIndex)
            let local = subnet(localIndex)
            self.local = local
            var routes: [(IPv4Network, NextHop)] = [(local, .local)]
            for _ in 0..<c.int(0...min(6, count - 1)) {
                let i = c.int(0..<count)
                guard used.insert(i).inserted else { continue }
                let peer = UDPEndpoint(
                    address: IPv4Address(c.oneIn(4) ? 0xc612_0001 : c.u32()),
                    port: c.oneIn(3) ? c.u16() : 8285
                )
                routes.append((subnet(i), .peer(peer)))
            }
            for (s, r) in routes { try table.set(s, to: r) }
            self.routes = routes
            forwarder = Forwarder(
                table: table,
                tunAddress: local.firstHost,
                acceptUnknownPeers: c.oneIn(4),
                mtu: c.pick([1472, 1400, 65535, c.int(68...1500)])
            )
        }

        func model(_ address: UInt32) -> NextHop? {
            routes.first { $0.0.contains(IPv4Address(address)) }?.1
        }

        /// An address in a local, peer, free or outside subnet.
        func address(_ c: FuzzCase) -> UInt32 {
            let span = UInt32(truncatingIfNeeded: network.size - 1)
            switch c.int(0..<5) {
            case 0: return local.address.value | c.u32() & ~local.mask
            case 1, 2:
                let (s, _) = c.pick(routes)
                return s.address.value | c.u32() & ~s.mask
            case 3: return network.address.value | c.u32() & span
            default: return c.u32()
            }
        }

        func packet(_ c: FuzzCase, source: UInt32? = nil, destination: UInt32? = nil) -> [UInt8] {
            var b = Slow.ipv4(
                source: source ?? address(c),
                destination: destination ?? address(c),
                proto: c.pick([1, 6, 17, 17, c.byte()]),
                ttl: c.pick([0, 1, 2, 64, c.byte()]),
                flagsAndOffset: c.oneIn(5) ? c.u16() : c.pick([0, 0x4000]),
                id: c.u16(),
                options: c.oneIn(6) ? c.bytes(4 * c.int(1...10)) : [],
                payload: c.bytes(c.oneIn(6) ? c.int(0...3000) : c.int(0...100))
            )
            if b[9] == 1, b.count > Int(b[0] & 0xf) * 4 { b[Int(b[0] & 0xf) * 4] = c.pick([0, 3, 8, 11]) }
            if c.oneIn(8) { b += c.bytes(c.int(1...4)) }
            if c.oneIn(5) { c.mutate(&b, focus: 24) }
            return b
        }
    }

    static func answerable(_ b: [UInt8]) -> Bool {
        let source = Slow.be32(b, 12)
        if Slow.be16(b, 6) & 0x1fff != 0 || source == 0 || source >> 28 == 0xe || source == 0xffff_ffff { return false }
        if b[9] == 1 {
            let ihl = Int(b[0] & 0x0f) * 4
            guard Int(Slow.be16(b, 2)) > ihl else { return false }
            return [0, 8, 13, 14, 15, 16, 17, 18].contains(b[ihl])
        }
        return true
    }

    @Test func networkDecisionsMatchTheModel() throws {
        let report = fuzz("networkDecisionsMatchTheModel", seed: 0x2F_0001, iterations: 3000) { c, count in
            let s = try Setup(c)
            let bytes = s.packet(c)
            // The sender: usually the peer that owns the source, sometimes anyone.
            var sender = c.u32(), port = c.u16()
            if bytes.count >= 20, case .peer(let e)? = s.model(Slow.be32(bytes, 12)), !c.oneIn(4) {
                sender = e.address.value
                port = c.oneIn(8) ? port : e.port
            }
            let expected: (Int?, DataPathCounter?) = {
                guard case .success(let total) = Slow.validateIPv4(bytes) else { return (nil, .droppedMalformed) }
                let source = s.model(Slow.be32(bytes, 12))
                if source == .local { return (nil, .droppedLocalSource) }
                if !s.forwarder.acceptUnknownPeers {
                    guard case .peer(let e)? = source else { return (nil, .droppedUnknownPeer) }
                    guard e.address.value == sender, e.port == port else { return (nil, .droppedSpoofedSource) }
                }
                guard s.model(Slow.be32(bytes, 16)) == .local else { return (nil, .droppedNotForUs) }
                return (total, nil)
            }()
            let buffer = GuardedBuffer(bytes, atEnd: c.bool())
            let stats = Statistics()
            let got = s.forwarder.fromNetwork(
                buffer.base,
                length: bytes.count,
                sender: sender,
                senderPort: port,
                stats: stats
            )
            stats.publish()
            c.expect(
                got == expected.0,
                "fromNetwork gave \(String(describing: got)), the model \(String(describing: expected.0))"
            )
            if let counter = expected.1 {
                c.expect(stats[counter] == 1, "not counted under \(counter)")
                count("\(counter)")
            } else {
                count("accepted")
            }
            c.expect(buffer.bytes == bytes, "fromNetwork changed the datagram")
        }
        report.expectReached("accepted", atLeast: 100)
        report.expectReached("dropped_spoofed_source", atLeast: 20)
    }

    @Test func tunDecisionsMatchTheModel() throws {
        let report = fuzz("tunDecisionsMatchTheModel", seed: 0x2F_0002, iterations: 3000) { c, count in
            let s = try Setup(c)
            let bytes = s.packet(c, source: c.oneIn(4) ? nil : s.local.address.value | c.u32() & ~s.local.mask)
            let capacity = bytes.count + (c.oneIn(4) ? 0 : c.int(0...600))
            let buffer = GuardedBuffer(bytes, capacity: capacity)
            let stats = Statistics()
            let action = s.forwarder.fromTun(buffer.base, length: bytes.count, capacity: capacity, stats: stats)
            stats.publish()
            guard case .success(let total) = Slow.validateIPv4(bytes) else {
                c.expect(action == .drop && stats[.droppedMalformedFromTun] == 1, "malformed packet: \(action)")
                count("malformed")
                return
            }
            let ihl = Int(bytes[0] & 0x0f) * 4
            let destination = Slow.be32(bytes, 16)
            let route = s.model(destination)
            let canAnswer = Self.answerable(bytes) && capacity - 28 >= ihl
            func expectError(type: UInt8, code: UInt8, counter: DataPathCounter) {
                guard canAnswer else {
                    c.expect(action == .drop, "expected a silent drop, got \(action)")
                    count("dropped \(counter)")
                    return
                }
                guard case .reply(let n) = action else {
                    c.expect(false, "expected an ICMP \(type)/\(code), got \(action)")
                    return
                }
                let out = buffer.bytes(n)
                c.expect(n == 28 + min(total, 548, capacity - 28), "error length \(n)")
                c.expect(
                    Slow.validateIPv4(out) == .success(n) && Slow.sum(out[20...]) == 0xffff,
                    "invalid error packet"
                )
                c.expect(out[20] == type && out[21] == code, "ICMP \(out[20])/\(out[21]), expected \(type)/\(code)")
                c.expect(Slow.be32(out, 16) == Slow.be32(bytes, 12), "the error does not go back to the sender")
                c.expect(
                    Slow.be32(out, 12) == destination & IPv4Network.mask(s.subnetLength),
                    "the error's source is not the destination's subnet"
                )
                c.expect(stats[counter] == 1, "not counted under \(counter)")
                count("answered \(counter)")
            }
            switch route {
            case .local?:
                c.expect(
                    action == .drop && stats[.droppedLocalDestination] == 1,
                    "packet for our own subnet: \(action)"
                )
                count("local")
            case nil:
                expectError(type: 3, code: 0, counter: .icmpUnreachableSent)
            case .peer6?:
                c.expect(false, "the model holds IPv4 peers only")
            case .peer(let e)?:
                if bytes[8] <= 1 {
                    expectError(type: 11, code: 0, counter: .icmpTimeExceededSent)
                } else if total > s.forwarder.mtu {
                    if Slow.be16(bytes, 6) & 0x4000 != 0 {
                        expectError(type: 3, code: 4, counter: .icmpFragmentationNeededSent)
                    } else {
                        c.expect(action == .drop && stats[.droppedTooBig] == 1, "too big without DF: \(action)")
                        count("too big")
                    }
                } else {
                    let peer = try? s.forwarder.table.entry(of: .peer(e))
                    c.expect(peer != nil && action == .send(peer: peer!, length: total), "\(action)")
                    let out = buffer.bytes(total)
                    c.expect(
                        out[8] == bytes[8] - 1 && Slow.validateIPv4(out) == .success(total),
                        "TTL not decremented validly"
                    )
                    count("sent")
                }
            }
        }
        report.expectReached("sent", atLeast: 200)
        report.expectReached("answered icmp_unreachable_sent", atLeast: 50)
    }

    /// A TCP or UDP packet as the kernel hands it to a TUN with offloads: the L4 checksum
    /// field holds only the pseudo-header sum.
    static func offloadPacket(_ c: FuzzCase, source: UInt32, destination: UInt32, tcp: Bool, payload: Int) -> [UInt8] {
        let l4Header = tcp ? 20 + 4 * c.int(0...3) : 8
        var l4 = c.bytes(l4Header) + c.bytes(payload)
        if tcp {
            l4[12] = UInt8(l4Header / 4) << 4
            l4[13] = c.oneIn(4) ? c.byte() : 0x18
        } else {
            Slow.put16(&l4, 4, UInt16(truncatingIfNeeded: l4.count))
        }
        var b = Slow.ipv4(
            source: source,
            destination: destination,
            proto: tcp ? 6 : 17,
            ttl: c.pick([64, 2, 1]),
            flagsAndOffset: 0x4000,
            id: c.u16(),
            payload: l4
        )
        let at = 20 + (tcp ? 16 : 6)
        let pseudo =
            (Slow.be32(b, 12) >> 16) + (Slow.be32(b, 12) & 0xffff) + (Slow.be32(b, 16) >> 16)
            + (Slow.be32(b, 16) & 0xffff) + UInt32(tcp ? 6 : 17) + UInt32(b.count - 20)
        Slow.put16(&b, at, Slow.sum([][...], initial: pseudo))
        return b
    }

    @Test func virtioReadsAreSplitIntoValidSegmentsWithinTheirBuffers() throws {
        let report = fuzz("virtioReadsAreSplitIntoValidSegmentsWithinTheirBuffers", seed: 0x2F_0003, iterations: 600) {
            c,
            count in
            let s = try Setup(c)
            let peers = s.routes.filter { if case .peer = $0.1 { true } else { false } }
            let destination =
                peers.isEmpty || c.oneIn(5)
                ? s.address(c)
                : {
                    let p = c.pick(peers).0
                    return p.address.value | c.u32() & ~p.mask
                }()
            let tcp = c.bool()
            let gso = c.oneIn(4) ? 0 : c.int(1...1500)
            var packet = Self.offloadPacket(
                c,
                source: s.local.address.value | c.u32() & ~s.local.mask,
                destination: destination,
                tcp: tcp,
                payload: c.int(0...(gso == 0 ? 1400 : 9000))
            )
            let ihl = 20
            var header = VirtioNetHeader(
                flags: VirtioNetHeader.needsChecksum,
                gsoType: gso == 0 ? 0 : (tcp ? 1 : 5),
                headerLength: UInt16(ihl + (tcp ? Int(packet[32] >> 4) * 4 : 8)),
                gsoSize: UInt16(gso),
                checksumStart: UInt16(ihl),
                checksumOffset: tcp ? 16 : 6
            )
            if c.oneIn(4) {
                var raw = [UInt8](repeating: 0, count: 10)
                raw.withUnsafeMutableBytes { header.write(to: $0.baseAddress!) }
                c.mutate(&raw)
                raw += [UInt8](repeating: 0, count: 10)
                header = raw.withUnsafeBytes { VirtioNetHeader(reading: $0.baseAddress!) }
            }
            let packetMutated = c.oneIn(4)
            if packetMutated { c.mutate(&packet, focus: 60) }
            var read = [UInt8](repeating: 0, count: 10) + packet
            read.withUnsafeMutableBytes { header.write(to: $0.baseAddress!) }
            let capacity = read.count + c.int(0...100)
            let buffer = GuardedBuffer(read, capacity: capacity)
            let headerCapacity = c.int(0...4096)
            let headers = GuardedBuffer(count: headerCapacity)
            let iovecCapacity = c.int(0...130)
            let iovecs = GuardedBuffer(count: iovecCapacity * MemoryLayout<iovec>.stride)
            let stats = Statistics()
            let action = s.forwarder.fromTun(
                virtioRead: buffer.base,
                length: read.count,
                capacity: capacity,
                headers: headers.base,
                headerCapacity: headerCapacity,
                iovecs: iovecs.base.assumingMemoryBound(to: iovec.self),
                iovecCapacity: iovecCapacity,
                maxSegments: c.int(1...64),
                stats: stats
            )
            switch action {
            case .drop:
                count("drop")
            case .reply(let start, let length):
                let out = Array(UnsafeRawBufferPointer(start: start, count: length))
                c.expect(
                    start == buffer.base && buffer.contains(start, length: length),
                    "reply outside the read buffer"
                )
                c.expect(out.prefix(10).allSatisfy { $0 == 0 }, "the reply's virtio header is not reset")
                let icmp = Array(out.dropFirst(10))
                c.expect(
                    Slow.validateIPv4(icmp) == .success(icmp.count) && Slow.sum(icmp[20...]) == 0xffff,
                    "invalid ICMP reply"
                )
                count("reply")
            case .send(_, let start, let length):
                c.expect(buffer.contains(start, length: length), "send outside the read buffer")
                let out = Array(UnsafeRawBufferPointer(start: start, count: length))
                c.expect(
                    Slow.validateIPv4(out) == .success(length) && length <= s.forwarder.mtu,
                    "invalid packet sent: \(Slow.validateIPv4(out)), length \(length), mtu \(s.forwarder.mtu), \(header)"
                )
                // The kernel's partial sum covers the packet as it built it: after a mutation
                // (say, a shorter total length) the completed sum is as wrong as the partial.
                if !packetMutated, header.needsChecksum, header.checksumStart == 20,
                    header.checksumOffset == (out[9] == 6 ? 16 : 6)
                {
                    c.expect(Slow.transportChecksumValid(out), "checksum not completed")
                }
                count("send")
            case .sendGathered(_, let vectors, let segments):
                c.expect(vectors == iovecs.base.assumingMemoryBound(to: iovec.self), "iovecs elsewhere")
                c.expect(2 * segments.count <= iovecCapacity, "more iovecs than room")
                var payload: [UInt8] = []
                for i in 0..<min(segments.count, iovecCapacity / 2) {
                    let h = vectors[2 * i], p = vectors[2 * i + 1]
                    c.expect(
                        headers.contains(h.iov_base, length: h.iov_len),
                        "segment \(i): header iovec outside the header buffer"
                    )
                    c.expect(
                        buffer.contains(p.iov_base, length: p.iov_len),
                        "segment \(i): payload iovec outside the read"
                    )
                    guard headers.contains(h.iov_base, length: h.iov_len),
                        buffer.contains(p.iov_base, length: p.iov_len)
                    else { return }
                    let segment =
                        Array(UnsafeRawBufferPointer(start: h.iov_base, count: h.iov_len))
                        + Array(UnsafeRawBufferPointer(start: p.iov_base, count: p.iov_len))
                    c.expect(Slow.validateIPv4(segment) == .success(segment.count), "segment \(i) is not valid IPv4")
                    c.expect(Slow.transportChecksumValid(segment), "segment \(i): bad L4 checksum")
                    c.expect(
                        segment.count <= segments.segmentLength && segment.count <= s.forwarder.mtu,
                        "segment \(i) too long"
                    )
                    c.expect(segment[8] == packet[8] &- 1, "segment \(i): TTL")
                    payload += p.iov_len > 0 ? Array(UnsafeRawBufferPointer(start: p.iov_base, count: p.iov_len)) : []
                }
                let headerLength = Int(packet[0] & 0xf) * 4 + (packet[9] == 6 ? Int(packet[32] >> 4) * 4 : 8)
                c.expect(
                    payload == Array(packet[headerLength..<Int(Slow.be16(packet, 2))]),
                    "segments do not carry the payload"
                )
                count("gathered")
            }
        }
        report.expectReached("gathered", atLeast: 50)
    }

    @Test func groReceivesAreCheckedDatagramByDatagram() throws {
        let report = fuzz("groReceivesAreCheckedDatagramByDatagram", seed: 0x2F_0004, iterations: 300) { c, count in
            let s = try Setup(c)
            let peers = s.routes.compactMap { if case .peer(let e) = $0.1 { ($0.0, e) } else { nil } }
            guard let (peerSubnet, peer) = peers.isEmpty ? nil : c.pick(peers) else { return }
            let size = c.int(20...1500)
            var datagrams: [[UInt8]] = []
            for _ in 0..<c.int(1...20) {
                let source = c.oneIn(6) ? s.address(c) : peerSubnet.address.value | c.u32() & ~peerSubnet.mask
                let destination = c.oneIn(6) ? s.address(c) : s.local.address.value | c.u32() & ~s.local.mask
                var d = Slow.ipv4(
                    source: source,
                    destination: destination,
                    proto: c.pick([6, 17]),
                    id: c.u16(),
                    payload: c.bytes(max(0, size - 20))
                )
                if c.oneIn(6) { c.mutate(&d, focus: 24) }
                d = Array(d.prefix(size)) + [UInt8](repeating: 0, count: max(0, size - d.count))
                datagrams.append(d)
            }
            if c.bool() { datagrams[datagrams.count - 1] = Array(datagrams.last!.prefix(c.int(1...size))) }
            let receive = datagrams.flatMap { $0 }
            let buffer = GuardedBuffer(receive, atEnd: c.bool())
            var plan = CoalescingPlan(maxPackets: c.int(0...24), verifyChecksums: c.bool())
            let stats = Statistics()
            let accepted = s.forwarder.fromNetwork(
                datagrams: buffer.base,
                length: receive.count,
                segmentLength: datagrams.count > 1 || c.bool() ? size : 0,
                sender: UnderlaySender(ipv4: peer.address.value, port: peer.port),
                into: &plan,
                stats: stats
            )
            stats.publish()
            var expected = 0
            for d in datagrams {
                guard case .success = Slow.validateIPv4(d), s.model(Slow.be32(d, 16)) == .local else { continue }
                let source = s.model(Slow.be32(d, 12))
                guard source != .local, s.forwarder.acceptUnknownPeers || source == .peer(peer) else { continue }
                expected += 1
            }
            c.expect(
                accepted + Int(stats[.droppedTruncated]) == expected,
                "accepted \(accepted) (+\(stats[.droppedTruncated]) truncated), model \(expected); sizes \(datagrams.map(\.count)), counts \(stats.summary)"
            )
            c.expect(plan.packetsAdded == accepted, "the plan holds \(plan.packetsAdded) packets")
            var bytes = 0
            for w in 0..<plan.writeCount {
                let write = plan.write(w)
                bytes += write.bytes
                c.expect(write.iovecs[0].iov_len == 10, "write \(w) does not start with a virtio header")
                for i in 1..<write.count {
                    c.expect(
                        buffer.contains(write.iovecs[i].iov_base, length: write.iovecs[i].iov_len),
                        "write \(w) gathers bytes outside the receive buffer"
                    )
                }
            }
            c.expect(bytes <= receive.count + 10 * plan.writeCount, "writes carry more bytes than were received")
            count(accepted > 0 ? "accepted some" : "accepted none")
        }
        report.expectReached("accepted some", atLeast: 100)
    }

    /// Found by virtioReadsAreSplitIntoValidSegmentsWithinTheirBuffers: a read whose virtio
    /// header asks for a checksum at offset 0 had the first bytes of its (already validated)
    /// IPv4 header overwritten and was sent to the peer as a datagram that is not IPv4.
    @Test func checksumOffloadInsideTheIPv4HeaderIsDropped() throws {
        let table = try SubnetTable(network: IPv4Network("10.2.0.0/16")!, subnetLength: 24)
        try table.set(IPv4Network("10.2.1.0/24")!, to: .local)
        try table.set(
            IPv4Network("10.2.2.0/24")!,
            to: .peer(UDPEndpoint(address: IPv4Address("198.18.0.2")!, port: 8285))
        )
        let forwarder = Forwarder(table: table, tunAddress: IPv4Address("10.2.1.0")!)
        var packet = Slow.ipv4(
            source: 0x0a02_0105,
            destination: 0x0a02_0205,
            proto: 17,
            payload: [0x9c, 0x40, 0x14, 0x51, 0, 12, 0, 0, 1, 2, 3, 4]
        )
        // As the kernel leaves it: the UDP checksum field holds the pseudo-header sum.
        Slow.put16(&packet, 26, Slow.sum([][...], initial: 0x0a02 + 0x0105 + 0x0a02 + 0x0205 + 17 + 12))
        for (start, offset) in [(0, 0), (0, 10), (8, 2), (20, 6)] {
            var read = [UInt8](repeating: 0, count: 10) + packet
            read.withUnsafeMutableBytes {
                VirtioNetHeader(
                    flags: VirtioNetHeader.needsChecksum,
                    checksumStart: UInt16(start),
                    checksumOffset: UInt16(offset)
                ).write(to: $0.baseAddress!)
            }
            let stats = Statistics()
            var iovecs = [iovec](repeating: iovec(), count: 4)
            var headers = [UInt8](repeating: 0, count: 256)
            let action = read.withUnsafeMutableBytes { r in
                headers.withUnsafeMutableBytes { h in
                    iovecs.withUnsafeMutableBufferPointer { v in
                        forwarder.fromTun(
                            virtioRead: r.baseAddress!,
                            length: r.count,
                            capacity: r.count,
                            headers: h.baseAddress!,
                            headerCapacity: h.count,
                            iovecs: v.baseAddress!,
                            iovecCapacity: v.count,
                            maxSegments: 2,
                            stats: stats
                        )
                    }
                }
            }
            stats.publish()
            if start < 20 {
                #expect(action == .drop && stats[.droppedBadOffload] == 1, "checksum start \(start)")
            } else {
                guard case .send(_, _, let length) = action else { Issue.record("start 20: \(action)"); continue }
                let sent = Array(read[10..<(10 + length)])
                #expect(Slow.validateIPv4(sent) == .success(packet.count) && Slow.transportChecksumValid(sent))
            }
        }
    }
}
