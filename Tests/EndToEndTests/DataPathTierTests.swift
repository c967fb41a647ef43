import Foundation
import Testing

/// Every tier of the udp data path on this kernel, for real: io_uring with
/// and without multishot read, batched system calls when a seccomp filter
/// refuses io_uring (as Docker's default profile does) or when asked for,
/// and flannel's simple loop — each carrying byte-identical transfers with
/// its offloads, and all of them talking to each other.
@Suite(.serialized, .enabled(if: canRunNamespaceTests, namespaceSkipReason))
struct DataPathTierTests {
    static let batchedTiers: [TierLaunch] = [.uringSingleRead, .syscallRefused, .syscall]

    @Test(arguments: batchedTiers)
    func everyBatchedTierCarriesTransfersOfEverySizeWithItsOffloads(tier: TierLaunch) throws {
        try Lab.withLocalStore(config: seedConfig) { lab in
            let store = ["--store-dir", lab.storeDirectory]
            try lab.addHost(1, tier: tier, extra: store)
            try lab.addHost(2, tier: tier, extra: store)
            for host in ["h1", "h2"] {
                let log = lab.log(host)
                #expect(log.contains(tier.logLine), "\(host) should run \(tier): \(log)")
                #expect(log.contains("tun-vnet-hdr+udp-gso+udp-gro"), "\(host) should use every offload: \(log)")
                if tier == .syscallRefused {
                    #expect(
                        log.contains("io_uring unusable (io_uring_queue_init failed: Operation not permitted"),
                        "\(host) should say why it does without io_uring: \(log)"
                    )
                }
            }
            let ping = try lab.ping(from: 1, to: 2)
            #expect(ping.succeeded, "\(ping.output)")
            try offloadWorkout(lab)

            // `tunneld status` names the tier.
            let status = try lab.exec(
                "h1",
                [
                    tunneldBinary, "status", "--control-socket",
                    lab.directory.appendingPathComponent("h1.sock").path, "--json",
                ]
            )
            #expect(status.output.contains("\"datapathTier\" : \"\(tier.tier)\""), "\(status.output)")

            try lab.lab("stop", "h1")
            try lab.lab("stop", "h2")
            expectTheBulkWentThroughTheOffloads(
                sender: lab.dataPathCounters("h1"),
                receiver: lab.dataPathCounters("h2")
            )
        }
    }

    @Test func hostsOfEveryTierTalkToEachOther() throws {
        try Lab.withLocalStore(config: seedConfig) { lab in
            let store = ["--store-dir", lab.storeDirectory]
            let tiers: [TierLaunch] = [.uring, .syscallRefused, .uringSingleRead, .simple]
            for (i, tier) in tiers.enumerated() {
                try lab.addHost(i + 1, tier: tier, extra: store)
                #expect(lab.log("h\(i + 1)").contains(tier.logLine), "h\(i + 1): \(lab.log("h\(i + 1)"))")
            }
            var port = 5201
            for a in 1...4 {
                for b in 1...4 where a != b {
                    let ping = try lab.ping(from: a, to: b)
                    #expect(ping.succeeded, "ping c\(a) (\(tiers[a - 1])) → c\(b) (\(tiers[b - 1])): \(ping.output)")
                    try transfer(lab, from: a, to: b, bytes: 3 << 20, port: port)
                    port += 1
                }
            }
            try udpEcho(lab, from: 2, to: 3, sizes: [1, 1444, 1445, 30_000])
            try udpEcho(lab, from: 4, to: 2, sizes: [1, 1444, 1445, 30_000], port: 5302)
        }
    }
}
