import UDPEncap

/// Builds an IPv4 packet with a correct header checksum.
public func makePacket(
    source: UInt32 = 0x0A02_0105,
    destination: UInt32 = 0x0A02_0205,
    ttl: UInt8 = 64,
    proto: UInt8 = 17,
    payload: [UInt8] = Array(repeating: 0xab, count: 32),
    fragmentOffset: UInt16 = 0,
    id: UInt16 = 0x1234
) -> [UInt8] {
    var p = [UInt8](repeating: 0, count: 20 + payload.count)
    p[0] = 0x45
    let total = UInt16(p.count)
    p[2] = UInt8(total >> 8); p[3] = UInt8(total & 0xff)
    p[4] = UInt8(id >> 8); p[5] = UInt8(id & 0xff)
    p[6] = UInt8(fragmentOffset >> 8); p[7] = UInt8(fragmentOffset & 0xff)
    p[8] = ttl; p[9] = proto
    for i in 0..<4 {
        p[12 + i] = UInt8(truncatingIfNeeded: source >> (24 - 8 * UInt32(i)))
        p[16 + i] = UInt8(truncatingIfNeeded: destination >> (24 - 8 * UInt32(i)))
    }
    p.replaceSubrange(20..., with: payload)
    p.withUnsafeMutableBytes { IPv4Header.updateChecksum($0.baseAddress!) }
    return p
}

/// Builds an IPv6 packet (fixed header, no extension headers).
public func makePacket6(
    source: UInt128 = 0xfd00_0010_0244_0001 << 64 | 5,
    destination: UInt128 = 0xfd00_0010_0244_0002 << 64 | 5,
    hopLimit: UInt8 = 64,
    nextHeader: UInt8 = 17,
    payload: [UInt8] = Array(repeating: 0xab, count: 32)
) -> [UInt8] {
    var p = [UInt8](repeating: 0, count: 40 + payload.count)
    p[0] = 0x60
    p[4] = UInt8(payload.count >> 8); p[5] = UInt8(payload.count & 0xff)
    p[6] = nextHeader; p[7] = hopLimit
    for i in 0..<16 {
        p[8 + i] = UInt8(truncatingIfNeeded: source >> (120 - 8 * UInt128(i)))
        p[24 + i] = UInt8(truncatingIfNeeded: destination >> (120 - 8 * UInt128(i)))
    }
    p.replaceSubrange(40..., with: payload)
    return p
}

/// The Internet checksum over the IPv6 pseudo-header and `message`, summed
/// the plain way (16-bit words, RFC 1071) to check the data path's faster
/// one: 0 when `message` carries a correct checksum.
public func referenceChecksum6(source: UInt128, destination: UInt128, nextHeader: UInt8, message: [UInt8]) -> UInt16 {
    var words: [UInt32] = []
    for address in [source, destination] {
        for i in 0..<8 { words.append(UInt32(truncatingIfNeeded: address >> (112 - 16 * UInt128(i))) & 0xffff) }
    }
    words.append(UInt32(message.count >> 16))
    words.append(UInt32(message.count & 0xffff))
    words.append(UInt32(nextHeader))
    var padded = message
    if padded.count % 2 == 1 { padded.append(0) }
    for i in stride(from: 0, to: padded.count, by: 2) { words.append(UInt32(padded[i]) << 8 | UInt32(padded[i + 1])) }
    var sum = words.reduce(0, +)
    while sum > 0xffff { sum = (sum & 0xffff) + (sum >> 16) }
    return ~UInt16(sum)
}
