// Network-order loads and stores at any alignment.

extension UnsafeRawPointer {
    @inline(__always)
    func u8(_ offset: Int) -> UInt8 { unsafe load(fromByteOffset: offset, as: UInt8.self) }
    @inline(__always)
    func be16(_ offset: Int) -> UInt16 {
        unsafe UInt16(bigEndian: loadUnaligned(fromByteOffset: offset, as: UInt16.self))
    }
    @inline(__always)
    func be32(_ offset: Int) -> UInt32 {
        unsafe UInt32(bigEndian: loadUnaligned(fromByteOffset: offset, as: UInt32.self))
    }
}

extension UnsafeMutableRawPointer {
    @inline(__always)
    func u8(_ offset: Int) -> UInt8 { unsafe UnsafeRawPointer(self).u8(offset) }
    @inline(__always)
    func be16(_ offset: Int) -> UInt16 { unsafe UnsafeRawPointer(self).be16(offset) }
    @inline(__always)
    func be32(_ offset: Int) -> UInt32 { unsafe UnsafeRawPointer(self).be32(offset) }
    @inline(__always)
    func setU8(_ offset: Int, _ value: UInt8) { unsafe storeBytes(of: value, toByteOffset: offset, as: UInt8.self) }
    @inline(__always)
    func setBE16(_ offset: Int, _ value: UInt16) {
        unsafe storeBytes(of: value.bigEndian, toByteOffset: offset, as: UInt16.self)
    }
    @inline(__always)
    func setBE32(_ offset: Int, _ value: UInt32) {
        unsafe storeBytes(of: value.bigEndian, toByteOffset: offset, as: UInt32.self)
    }
}

/// Header field offsets and flag bits used by segmentation and coalescing.
enum IPv4 {
    static let minimumHeaderLength = 20
    static let tcp: UInt8 = 6
    static let udp: UInt8 = 17
    static let dontFragment: UInt16 = 0x4000
    static let reservedFlag: UInt16 = 0x8000
    static let moreFragments: UInt16 = 0x2000
    static let fragmentOffsetMask: UInt16 = 0x1fff
    static let maximumLength = 65535
}

enum IPv6 {
    static let headerLength = 40
    /// The largest packet whose length the 16-bit payload length can give (no jumbograms).
    static let maximumLength = 65535 + headerLength
}

enum TCPFlag {
    static let fin: UInt8 = 0x01
    static let syn: UInt8 = 0x02
    static let rst: UInt8 = 0x04
    static let psh: UInt8 = 0x08
    static let ack: UInt8 = 0x10
    static let urg: UInt8 = 0x20
    static let ece: UInt8 = 0x40
    static let cwr: UInt8 = 0x80
}
