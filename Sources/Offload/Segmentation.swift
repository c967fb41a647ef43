#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The result of splitting one GSO super-packet: `count` IPv4 packets laid out back to back in
/// the output buffer, every one `segmentLength` bytes long except possibly the last (shorter,
/// never longer) — the layout one `sendmsg` with `UDP_SEGMENT = segmentLength` sends as `count`
/// datagrams.
public struct SegmentedPacket: Equatable, Sendable {
    public var segmentLength: Int
    public var count: Int
    public var totalLength: Int

    @inlinable
    public init(segmentLength: Int, count: Int, totalLength: Int) {
        self.segmentLength = segmentLength
        self.count = count
        self.totalLength = totalLength
    }
}

extension SegmentedPacket {
    /// The most bytes one IPv4 UDP send may carry (65535 − 20 − 8): Linux refuses a bigger
    /// `UDP_SEGMENT` send with EMSGSIZE, and a 64 KiB TSO packet split into full IPv4 packets
    /// grows past it (every segment repeats the headers). Checked on kernel 6.18.
    public static let maxUDPPayload = 65507

    /// The most segments one `UDP_SEGMENT` send may carry on every kernel (`UDP_MAX_SEGMENTS`
    /// is 64 on older kernels; 6.18 here takes 128 and refuses 129 with EINVAL).
    public static let maxSegmentsPerSend = 64

    /// How many segments each `sendmsg` may carry so that it stays within `maxBytes` and
    /// `maxSegments`: send `i` starts at byte `i * perSend * segmentLength`. At least 1.
    @inlinable
    public func segmentsPerSend(maxBytes: Int = maxUDPPayload, maxSegments: Int = maxSegmentsPerSend) -> Int {
        guard segmentLength > 0 else { return 1 }
        return max(1, min(maxSegments, maxBytes / segmentLength, count))
    }
}

/// Turns what a TUN with `IFF_VNET_HDR` hands us into real IPv4 packets (the flannel wire
/// format carries complete packets only, and a flannel peer has no checksum offload to lean on).
public enum Segmentation {
    /// Splits the IPv4 or IPv6 packet of `length` bytes at `packet` (the bytes after the virtio
    /// header), described by `header`, into complete packets in `out` (room `capacity`).
    ///
    /// - `none`: copies the packet; with `needsChecksum` completes its L4 checksum. Count 1.
    ///   The bytes are not parsed as IP here.
    /// - `tcpv4`, `tcpv6`: per segment: IPv4 total length, IP ID + i and IP checksum (IPv6:
    ///   payload length), sequence number + i·gsoSize, FIN/PSH only on the last, CWR only on
    ///   the first, full TCP checksum. The packet's IP version must match the GSO type.
    /// - `udpL4` (either version): per segment: the IP lengths (and for IPv4 the ID + i and
    ///   header checksum), UDP length, full UDP checksum (0 sent as 0xFFFF).
    /// - anything else: `.unsupportedGSOType`.
    ///
    /// An IPv6 super-packet must carry TCP or UDP right after the fixed header (the kernel's
    /// TSO6 and USO packets do); one with extension headers is refused as `.malformed`.
    /// Header lengths come from the IP and TCP headers themselves; the virtio `headerLength`
    /// is only a hint (the kernel may report its linear length there) and is refused only when
    /// it exceeds the packet. `out` must not overlap `packet`. Nothing past `capacity` is written,
    /// and every check happens before the first byte is, so on failure `out` is untouched.
    public static func split(
        _ packet: UnsafeRawPointer,
        length: Int,
        header: VirtioNetHeader,
        into out: UnsafeMutableRawPointer,
        capacity: Int,
        maxSegments: Int
    ) -> Result<SegmentedPacket, OffloadError> {
        guard length > 0, capacity >= 0 else { return .failure(.malformed) }
        switch header.gso {
        case .none?:
            guard maxSegments >= 1 else { return .failure(.tooManySegments) }
            if header.needsChecksum {
                guard checksumPosition(header, length: length) != nil else {
                    return .failure(.badChecksumPosition)
                }
            }
            guard length <= capacity else { return .failure(.doesNotFit) }
            unsafe out.copyMemory(from: packet, byteCount: length)
            if header.needsChecksum {
                _ = unsafe completeChecksum(out, length: length, header: header)
            }
            return .success(SegmentedPacket(segmentLength: length, count: 1, totalLength: length))
        case .tcpv4?, .tcpv6?:
            return unsafe splitGSO(
                packet,
                length: length,
                header: header,
                tcp: true,
                into: out,
                capacity: capacity,
                maxSegments: maxSegments
            )
        case .udpL4?:
            return unsafe splitGSO(
                packet,
                length: length,
                header: header,
                tcp: false,
                into: out,
                capacity: capacity,
                maxSegments: maxSegments
            )
        default:
            return .failure(.unsupportedGSOType)
        }
    }

    /// Like `split` for a GSO super-packet, but without copying its payload: writes each
    /// segment's headers back to back into `headers` (room `headerCapacity`) and two iovecs per
    /// segment into `iovecs` (room `iovecCapacity`): its headers, then its payload where it
    /// lies in `packet`. Gathered in order, the iovecs hold exactly the bytes `split` would
    /// write; segments `i..<j` are iovecs `2i..<2j`. The payload is only read (for the
    /// checksums), so `packet` must stay unchanged until the iovecs have been sent.
    /// A packet without GSO is refused (`.unsupportedGSOType`): send it as it is.
    public static func splitGathered(
        _ packet: UnsafeRawPointer,
        length: Int,
        header: VirtioNetHeader,
        headers: UnsafeMutableRawPointer,
        headerCapacity: Int,
        iovecs: UnsafeMutablePointer<iovec>,
        iovecCapacity: Int,
        maxSegments: Int
    ) -> Result<SegmentedPacket, OffloadError> {
        guard length > 0, headerCapacity >= 0, iovecCapacity >= 0 else { return .failure(.malformed) }
        let tcp: Bool
        switch header.gso {
        case .tcpv4?, .tcpv6?: tcp = true
        case .udpL4?: tcp = false
        default: return .failure(.unsupportedGSOType)
        }
        return unsafe splitGSO(
            packet,
            length: length,
            header: header,
            tcp: tcp,
            into: headers,
            capacity: headerCapacity,
            maxSegments: maxSegments,
            gather: (iovecs, iovecCapacity)
        )
    }

    /// Completes a `NEEDS_CSUM` checksum in place (no GSO): sums from `checksumStart` to the
    /// end (the checksum field already holds the pseudo-header sum, as the kernel leaves it) and
    /// stores the inverted fold at `checksumStart + checksumOffset`, 0 as 0xFFFF like the
    /// kernel's `skb_checksum_help`. True without `needsChecksum` (nothing to do); false, with
    /// nothing written, if the positions are out of bounds.
    public static func completeChecksum(_ packet: UnsafeMutableRawPointer, length: Int, header: VirtioNetHeader) -> Bool
    {
        guard header.needsChecksum else { return true }
        guard let (start, at) = checksumPosition(header, length: length) else { return false }
        var checksum = unsafe Checksum.compute(packet + start, count: length - start)
        if checksum == 0 { checksum = 0xffff }
        unsafe packet.setBE16(at, checksum)
        return true
    }

    /// (start, field offset) when the 2-byte field lies inside `[start, length)`.
    @inline(__always)
    static func checksumPosition(_ header: VirtioNetHeader, length: Int) -> (Int, Int)? {
        let start = Int(header.checksumStart)
        let at = start + Int(header.checksumOffset)
        guard length >= 0, start < length, at + 2 <= length else { return nil }
        return (start, at)
    }

    static func splitGSO(
        _ packet: UnsafeRawPointer,
        length: Int,
        header: VirtioNetHeader,
        tcp: Bool,
        into out: UnsafeMutableRawPointer,
        capacity: Int,
        maxSegments: Int,
        gather: (iovecs: UnsafeMutablePointer<iovec>, capacity: Int)? = nil
    ) -> Result<SegmentedPacket, OffloadError> {
        // IP header: IPv4, or IPv6 with the L4 header right after the fixed one.
        guard length >= 1 else { return .failure(.malformed) }
        let ipv6 = unsafe packet.u8(0) >> 4 == 6
        switch header.gso {
        case .tcpv4?: guard !ipv6 else { return .failure(.malformed) }
        case .tcpv6?: guard ipv6 else { return .failure(.malformed) }
        default: break
        }
        let protocolNumber = tcp ? IPv4.tcp : IPv4.udp
        let ipHeaderLength: Int
        let total: Int
        if ipv6 {
            ipHeaderLength = IPv6.headerLength
            guard length >= ipHeaderLength else { return .failure(.malformed) }
            total = unsafe ipHeaderLength + Int(packet.be16(4))
            guard total <= length, unsafe packet.u8(6) == protocolNumber else { return .failure(.malformed) }
        } else {
            guard length >= IPv4.minimumHeaderLength else { return .failure(.malformed) }
            let versionAndLength = unsafe packet.u8(0)
            guard versionAndLength >> 4 == 4 else { return .failure(.malformed) }
            ipHeaderLength = Int(versionAndLength & 0x0f) * 4
            guard ipHeaderLength >= IPv4.minimumHeaderLength else { return .failure(.malformed) }
            total = unsafe Int(packet.be16(2))
            guard total >= ipHeaderLength, total <= length else { return .failure(.malformed) }
            guard unsafe packet.be16(6) & (IPv4.moreFragments | IPv4.fragmentOffsetMask) == 0 else {
                return .failure(.malformed)
            }
            guard unsafe packet.u8(9) == protocolNumber else { return .failure(.malformed) }
        }

        // L4 header.
        let l4HeaderLength: Int
        if tcp {
            guard ipHeaderLength + 20 <= total else { return .failure(.malformed) }
            l4HeaderLength = unsafe Int(packet.u8(ipHeaderLength + 12) >> 4) * 4
            guard l4HeaderLength >= 20, ipHeaderLength + l4HeaderLength <= total else {
                return .failure(.malformed)
            }
        } else {
            l4HeaderLength = 8
            guard ipHeaderLength + l4HeaderLength <= total else { return .failure(.malformed) }
        }
        let headerLength = ipHeaderLength + l4HeaderLength
        guard Int(header.headerLength) <= total else { return .failure(.malformed) }
        if header.needsChecksum {
            guard Int(header.checksumStart) == ipHeaderLength,
                Int(header.checksumOffset) == (tcp ? 16 : 6)
            else { return .failure(.badChecksumPosition) }
        }

        // Segment geometry; everything is checked before the first byte is written.
        let payload = total - headerLength
        let gsoSize = Int(header.gsoSize)
        let count: Int
        if payload == 0 {
            count = 1
        } else {
            guard gsoSize > 0 else { return .failure(.malformed) }
            count = (payload + gsoSize - 1) / gsoSize
        }
        guard count <= maxSegments else { return .failure(.tooManySegments) }
        if let gather {
            guard count * headerLength <= capacity, 2 * count <= gather.capacity else { return .failure(.doesNotFit) }
        } else {
            guard count * headerLength + payload <= capacity else { return .failure(.doesNotFit) }
        }

        // The addresses' part of every segment's pseudo-header (IPv4: 12..<20, IPv6: 8..<40).
        let addressSum = unsafe ipv6 ? Checksum.partial(packet + 8, count: 32) : Checksum.partial(packet + 12, count: 8)
        let firstID = unsafe ipv6 ? 0 : packet.be16(4)
        let firstSequence = unsafe tcp ? packet.be32(ipHeaderLength + 4) : 0
        let originalFlags = unsafe tcp ? packet.u8(ipHeaderLength + 13) : 0

        var from = headerLength
        var to = 0
        var written = 0
        for i in 0..<count {
            let chunk = min(gsoSize, payload - from + headerLength)
            let segment = unsafe out + written
            unsafe segment.copyMemory(from: packet, byteCount: headerLength)
            let segmentLength = headerLength + chunk
            let l4Length = segmentLength - ipHeaderLength
            let pseudo = addressSum &+ UInt64(protocolNumber) &+ UInt64(l4Length)
            // The payload's part of the L4 checksum: summed where it lies when gathering
            // (the L4 header is a multiple of 4 bytes long, so the sums add up), or over
            // the copy, still in cache, when laying the segment out.
            let payloadSum: UInt64
            if let gather {
                unsafe gather.iovecs[2 * i] = iovec(iov_base: segment, iov_len: headerLength)
                unsafe gather.iovecs[2 * i + 1] = iovec(
                    iov_base: UnsafeMutableRawPointer(mutating: packet + from),
                    iov_len: chunk
                )
                payloadSum = unsafe Checksum.partial(packet + from, count: chunk, initial: pseudo)
                written += headerLength
            } else {
                unsafe (segment + headerLength).copyMemory(from: packet + from, byteCount: chunk)
                payloadSum = unsafe Checksum.partial(segment + headerLength, count: chunk, initial: pseudo)
                written += headerLength + chunk
            }
            if ipv6 {
                unsafe segment.setBE16(4, UInt16(l4Length))
            } else {
                unsafe segment.setBE16(2, UInt16(segmentLength))
                unsafe segment.setBE16(4, firstID &+ UInt16(truncatingIfNeeded: i))
                unsafe segment.setBE16(10, 0)
                unsafe segment.setBE16(10, Checksum.compute(segment, count: ipHeaderLength))
            }

            let l4 = unsafe segment + ipHeaderLength
            if tcp {
                unsafe l4.setBE32(4, firstSequence &+ UInt32(truncatingIfNeeded: i &* gsoSize))
                var flags = originalFlags
                if i != count - 1 { flags &= ~(TCPFlag.fin | TCPFlag.psh) }
                if i != 0 { flags &= ~TCPFlag.cwr }
                unsafe l4.setU8(13, flags)
                unsafe l4.setBE16(16, 0)
                unsafe l4.setBE16(16, Checksum.compute(l4, count: l4HeaderLength, initial: payloadSum))
            } else {
                unsafe l4.setBE16(4, UInt16(l4Length))
                unsafe l4.setBE16(6, 0)
                var checksum = unsafe Checksum.compute(l4, count: l4HeaderLength, initial: payloadSum)
                if checksum == 0 { checksum = 0xffff }  // 0 means "no checksum" in UDP
                unsafe l4.setBE16(6, checksum)
            }
            from += chunk
            to += segmentLength
        }
        let segmentLength = count == 1 ? total : headerLength + gsoSize
        return .success(SegmentedPacket(segmentLength: segmentLength, count: count, totalLength: to))
    }
}
