import PacketRing
import TunDevice

extension LoopOffloads {
    /// The offloads a data path uses, by name, for its report and metrics:
    /// the loop's (tun-vnet-hdr, udp-gso, udp-gro) and what the TUN accepted
    /// (tun-csum, tun-tso4, tun-tso6, tun-uso4).
    func reportNames(tun: TunOffloads) -> [String] {
        names + tun.names.map { "tun-\($0)" }
    }
}

extension WireGuardDataPath {
    /// The offloads in use, by name, as `UDPDataPath.offloadNames`; read at
    /// report time, since a failed GSO send turns UDP_SEGMENT off.
    var offloadNames: [String] {
        LoopOffloads(virtioHeader: tun.vnetHeader, segmentation: usesSegmentation, receiveCoalescing: receiveCoalescing)
            .reportNames(tun: tunOffloads)
    }
}
