/// Constants shared by the data-path layers; they live here, in the lowest
/// module, so that TunDevice, UDPEncap and PacketRing agree without importing
/// each other.
public enum DataPath {
    /// flannel's udp backend port.
    public static let defaultUDPPort: UInt16 = 8285
    /// IPv4 header (20) + UDP header (8): what the udp backend costs per packet.
    public static let udpEncapsulationOverhead = 28
    /// IPv6 header (40) + UDP header (8): the same over the IPv6 underlay.
    public static let udp6EncapsulationOverhead = 48
    /// Bytes kept free before every packet in a buffer, so that a header
    /// (virtio_net_hdr today, anything else later) is written in place rather
    /// than by copying the packet.
    public static let headroom = 64
    /// Packets moved per batch by default.
    public static let defaultBatchSize = 64
    /// The largest IPv4 packet.
    public static let maxPacketSize = 65535
}
