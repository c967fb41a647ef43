/// The 10-byte `virtio_net_hdr` a TUN opened with `IFF_VNET_HDR` puts before every packet
/// (legacy layout, little-endian fields, no `num_buffers`).
public struct VirtioNetHeader: Equatable, Sendable {
    public static let size = 10
    /// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the L4 checksum field holds only the pseudo-header sum.
    public static let needsChecksum: UInt8 = 1
    /// `VIRTIO_NET_HDR_F_DATA_VALID`: the checksum has already been verified.
    public static let dataValid: UInt8 = 2
    /// `VIRTIO_NET_HDR_GSO_ECN`, a flag on the TCP GSO types.
    public static let ecnFlag: UInt8 = 0x80

    public enum GSOType: UInt8, Sendable {
        case none = 0, tcpv4 = 1, udp = 3, tcpv6 = 4, udpL4 = 5
    }

    public var flags: UInt8
    /// Raw `gso_type`, may include `ecnFlag`.
    public var gsoType: UInt8
    public var headerLength: UInt16
    public var gsoSize: UInt16
    public var checksumStart: UInt16
    public var checksumOffset: UInt16

    @inlinable
    public init(
        flags: UInt8 = 0,
        gsoType: UInt8 = 0,
        headerLength: UInt16 = 0,
        gsoSize: UInt16 = 0,
        checksumStart: UInt16 = 0,
        checksumOffset: UInt16 = 0
    ) {
        self.flags = flags
        self.gsoType = gsoType
        self.headerLength = headerLength
        self.gsoSize = gsoSize
        self.checksumStart = checksumStart
        self.checksumOffset = checksumOffset
    }

    /// Reads a header from `p`, which must have at least `size` readable bytes (no alignment needed).
    @inlinable
    public init(reading p: UnsafeRawPointer) {
        flags = unsafe p.load(fromByteOffset: 0, as: UInt8.self)
        gsoType = unsafe p.load(fromByteOffset: 1, as: UInt8.self)
        headerLength = unsafe UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 2, as: UInt16.self))
        gsoSize = unsafe UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 4, as: UInt16.self))
        checksumStart = unsafe UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 6, as: UInt16.self))
        checksumOffset = unsafe UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 8, as: UInt16.self))
    }

    /// Writes the header to `p`, which must have at least `size` writable bytes (no alignment needed).
    @inlinable
    public func write(to p: UnsafeMutableRawPointer) {
        unsafe p.storeBytes(of: flags, toByteOffset: 0, as: UInt8.self)
        unsafe p.storeBytes(of: gsoType, toByteOffset: 1, as: UInt8.self)
        unsafe p.storeBytes(of: headerLength.littleEndian, toByteOffset: 2, as: UInt16.self)
        unsafe p.storeBytes(of: gsoSize.littleEndian, toByteOffset: 4, as: UInt16.self)
        unsafe p.storeBytes(of: checksumStart.littleEndian, toByteOffset: 6, as: UInt16.self)
        unsafe p.storeBytes(of: checksumOffset.littleEndian, toByteOffset: 8, as: UInt16.self)
    }

    /// The GSO type without the ECN flag; nil for a value virtio does not define.
    @inlinable
    public var gso: GSOType? { GSOType(rawValue: gsoType & ~Self.ecnFlag) }

    /// Whether the ECN flag is set on the GSO type (CWR must stay on the first segment only).
    @inlinable
    public var ecn: Bool {
        get { gsoType & Self.ecnFlag != 0 }
        set { gsoType = newValue ? gsoType | Self.ecnFlag : gsoType & ~Self.ecnFlag }
    }

    @inlinable
    public var needsChecksum: Bool { flags & Self.needsChecksum != 0 }
}
