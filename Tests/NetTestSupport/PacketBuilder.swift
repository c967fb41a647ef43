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
