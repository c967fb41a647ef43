import PacketRing
import Testing
import TunDevice

@testable import Backends

/// The offload names both data paths report (and the metrics label).
@Suite struct DataPathOffloadsTests {
    @Test func theLoopsOffloadsComeFirstThenTheTunsPrefixed() {
        #expect(LoopOffloads.none.reportNames(tun: []).isEmpty)
        let some = LoopOffloads(virtioHeader: true, segmentation: false, receiveCoalescing: true)
        #expect(some.reportNames(tun: [.checksum, .tso6]) == ["tun-vnet-hdr", "udp-gro", "tun-csum", "tun-tso6"])
        let all = LoopOffloads(virtioHeader: true, segmentation: true, receiveCoalescing: true)
        #expect(
            all.reportNames(tun: [.checksum, .tso4, .tso6, .uso4])
                == ["tun-vnet-hdr", "udp-gso", "udp-gro", "tun-csum", "tun-tso4", "tun-tso6", "tun-uso4"]
        )
        // The log's one-word forms are the same names.
        #expect(all.description == "tun-vnet-hdr+udp-gso+udp-gro" && LoopOffloads.none.description == "none")
        #expect(TunOffloads([.checksum, .uso4]).description == "csum+uso4" && TunOffloads().description == "none")
    }
}
