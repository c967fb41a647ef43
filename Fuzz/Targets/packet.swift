// libFuzzer target: what the data path does to a packet it did not build. The input is a
// 10-byte virtio header, then the packet. Checked: IPv4 validation against the RFC's rules,
// ICMP errors (valid, within their room), segmentation (every segment a valid packet, never
// past its buffer) and coalescing (every gather entry inside the receive buffer). Buffers
// are exact-size heap allocations, so AddressSanitizer catches any access outside them.

func sum16(_ p: UnsafeRawPointer, _ count: Int) -> UInt32 {
    var s: UInt32 = 0
    var i = 0
    while i < count {
        let hi = UInt32(p.load(fromByteOffset: i, as: UInt8.self)) << 8
        let lo = i + 1 < count ? UInt32(p.load(fromByteOffset: i + 1, as: UInt8.self)) : 0
        s += hi | lo
        s = (s & 0xffff) + (s >> 16)
        i += 2
    }
    return s
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzPacket(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size >= VirtioNetHeader.size else { return 0 }
    let header = VirtioNetHeader(reading: UnsafeRawPointer(data))
    let length = size - VirtioNetHeader.size
    let packet = UnsafeMutableRawPointer.allocate(byteCount: max(length, 1), alignment: 1)
    defer { packet.deallocate() }
    packet.copyMemory(from: data + VirtioNetHeader.size, byteCount: length)

    // Validation, against RFC 791 read directly.
    let result = IPv4Header.validate(packet, length: length)
    var expected = length >= 20 && packet.load(as: UInt8.self) >> 4 == 4
    let ihl = expected ? Int(packet.load(as: UInt8.self) & 0xf) * 4 : 0
    let total = expected ? Int(IPv4Header.load16(packet, 2)) : 0
    expected = expected && ihl >= 20 && ihl <= length && total >= ihl && total <= length && sum16(packet, ihl) == 0xffff
    if case .success(let n) = result { precondition(expected && n == total) } else { precondition(!expected) }

    if case .success(let n) = result {
        // An ICMP error in a buffer of exactly its room.
        let room = n + Int(header.gsoSize % 64)
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: room, alignment: 1)
        defer { buffer.deallocate() }
        buffer.copyMemory(from: packet, byteCount: n)
        if let e = ICMPError.rewrite(buffer, length: n, capacity: room, kind: .timeExceeded, source: 0x0a02_0100) {
            precondition(e <= room && e <= 576)
            guard case .success(let m) = IPv4Header.validate(buffer, length: e), m == e else {
                fatalError("invalid ICMP error")
            }
            precondition(sum16(buffer + 20, e - 20) == 0xffff, "ICMP checksum")
        }
    }

    // Segmentation into an exact-size output.
    let capacity = Int(header.headerLength % 4096) + length
    let out = UnsafeMutableRawPointer.allocate(byteCount: max(capacity, 1), alignment: 1)
    defer { out.deallocate() }
    if case .success(let s) = Segmentation.split(
        packet,
        length: length,
        header: header,
        into: out,
        capacity: capacity,
        maxSegments: 64
    ),
        header.gso == .tcpv4 || header.gso == .udpL4
    {
        precondition(s.totalLength <= capacity && s.count >= 1 && s.count <= 64)
        var offset = 0
        while offset < s.totalLength {
            let segment = min(s.segmentLength, s.totalLength - offset)
            guard case .success(let m) = IPv4Header.validate(out + offset, length: segment), m == segment else {
                fatalError("segment at \(offset) is not a valid IPv4 packet")
            }
            offset += segment
        }
    }

    // Coalescing: the packet cut into datagrams of gsoSize bytes, as one GRO receive.
    var plan = CoalescingPlan(maxPackets: 16, verifyChecksums: header.flags & 2 == 0)
    let step = max(20, Int(header.gsoSize % 2048))
    var offset = 0
    while offset < length {
        let n = min(step, length - offset)
        if case .success(let m) = IPv4Header.validate(packet + offset, length: n) {
            _ = plan.add(packet + offset, length: m)
        }
        offset += n
    }
    plan.finish()
    for w in 0..<plan.writeCount {
        let write = plan.write(w)
        for i in 1..<write.count {
            let base = UnsafeRawPointer(write.iovecs[i].iov_base!)
            precondition(
                base >= UnsafeRawPointer(packet) && base + write.iovecs[i].iov_len <= UnsafeRawPointer(packet) + length
            )
        }
    }
    return 0
}
