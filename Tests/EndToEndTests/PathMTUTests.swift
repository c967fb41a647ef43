import Foundation
import Testing

/// Path-MTU discovery and TTL expiry through the udp backend's tunnel
/// (MTU 1472 on the lab's 1500-byte underlay), with containers whose MTU is
/// larger than the tunnel's.
@Suite(.serialized, .enabled(if: canRunNamespaceTests, namespaceSkipReason))
struct PathMTUTests {
    static let tunnelMTU = 1472

    /// Gives container `n` (its eth0, and the host's bridge and veth) an MTU of `mtu`.
    func setContainerMTU(_ lab: Lab, _ n: Int, _ mtu: Int) throws {
        try lab.exec("h\(n)", ["ip", "link", "set", "cbr0", "mtu", "\(mtu)"])
        try lab.exec("h\(n)", ["ip", "link", "set", "veth0", "mtu", "\(mtu)"])
        try lab.exec("c\(n)", ["ip", "link", "set", "eth0", "mtu", "\(mtu)"])
    }

    /// The base address of host n's subnet: its TUN's address, and the
    /// address tunneld's ICMP errors about packets for that subnet come from.
    func subnetBase(_ lab: Lab, _ n: Int) throws -> String {
        let subnet = try #require(lab.subnetEnv(n)["FLANNEL_SUBNET"])
        return subnet.split(separator: ".").prefix(3).joined(separator: ".") + ".0"
    }

    /// A DF ping of 1500 bytes: the answer must be "fragmentation needed"
    /// with the tunnel's MTU, from `expectedSource`.
    func dontFragmentPing(_ lab: Lab, from: Int, to: Int, expectedSource: String) throws {
        let result = try lab.exec(
            "c\(from)",
            [
                "ping", "-M", "do", "-c", "2", "-i", "0.3", "-W", "1", "-s", "1472",
                try lab.containerIP(to),
            ],
            check: false
        )
        #expect(!result.succeeded, "a 1500-byte DF ping c\(from) → c\(to) cannot fit the tunnel: \(result.output)")
        #expect(
            result.output.contains(
                "From \(expectedSource) icmp_seq=1 Frag needed and DF set (mtu = \(Self.tunnelMTU))"
            ),
            "c\(from) → c\(to): \(result.output)"
        )
    }

    /// The kernel holds routed packets to the TUN's MTU: the host whose
    /// bridge delivers an oversize DF packet answers it itself, TCP between
    /// containers with MTU 1500 completes through PMTU discovery, and
    /// tracepath/traceroute show the tunnel's hops and path MTU.
    @Test func containersWithALargerMTUTransferThroughTheTunnelAndTraceIt() throws {
        try Lab.withLocalStore(config: seedConfig) { lab in
            let store = ["--store-dir", lab.storeDirectory]
            try lab.addHost(1, extra: store)
            try lab.addHost(2, extra: store)
            let ping = try lab.ping(from: 1, to: 2)
            #expect(ping.succeeded, "\(ping.output)")
            try setContainerMTU(lab, 1, 1500)
            try setContainerMTU(lab, 2, 1500)
            let base1 = try subnetBase(lab, 1), base2 = try subnetBase(lab, 2)
            let c1 = try lab.containerIP(1), c2 = try lab.containerIP(2)

            // tracepath first, while c2 knows nothing of the path to c1: it
            // finds the MTU itself (from h2's "fragmentation needed") and the
            // hops — h2's bridge, tunneld on h2 (speaking for the tunnel
            // towards c1's subnet, so from its base address), h1 (its TUN's
            // address: the same base), then c1.
            let trace = try lab.exec("c2", ["tracepath", "-n", "-m", "8", c1], timeout: .seconds(60), check: false)
            print("tracepath c2 → c1 (\(c1)), h1's subnet base \(base1):\n\(trace.output)")
            #expect(trace.output.contains("pmtu \(Self.tunnelMTU)"), "\(trace.output)")
            #expect(trace.output.contains(base1), "the far host should be a hop: \(trace.output)")
            #expect(trace.output.contains("\(c1)") && trace.output.contains("reached"), "\(trace.output)")
            #expect(trace.output.contains("Resume: pmtu \(Self.tunnelMTU)"), "\(trace.output)")

            // TCP in both directions, each side believing in 1500 bytes.
            try transfer(lab, from: 2, to: 1, bytes: 5 << 20)
            try transfer(lab, from: 1, to: 2, bytes: 5 << 20, port: 5202)

            // h1's kernel answers the oversize DF packet from its bridge.
            let bridge1 = base1.split(separator: ".").prefix(3).joined(separator: ".") + ".1"
            try dontFragmentPing(lab, from: 1, to: 2, expectedSource: bridge1)

            // traceroute (UDP probes, one per hop): the TTL runs out in
            // tunneld on h1 (hop 2, "time exceeded" from the base of c2's
            // subnet), then in h2's kernel (hop 3, h2's TUN address).
            let route = try lab.exec(
                "c1",
                ["traceroute", "-n", "-q", "1", "-w", "2", "-m", "6", c2],
                timeout: .seconds(60),
                check: false
            )
            print("traceroute c1 → c2 (\(c2)), h2's subnet base \(base2):\n\(route.output)")
            let hops = route.output.split(separator: "\n").dropFirst()
                .map { $0.split(separator: " ", omittingEmptySubsequences: true) }
            #expect(hops.count == 4, "\(route.output)")
            if hops.count == 4 {
                #expect(hops.map { String($0[1]) } == [bridge1, base2, base2, c2], "\(route.output)")
            }

            try lab.lab("stop", "h1")
            let counters = lab.dataPathCounters("h1")
            #expect(counters["icmp_time_exceeded_sent", default: 0] > 0, "\(counters)")
            // The kernel answered the oversize packets; none reached tunneld.
            #expect(counters["dropped_too_big", default: 0] == 0, "\(counters)")
        }
    }

    /// When a TUN's MTU has been raised past the tunnel's by hand, the kernel
    /// lets oversize packets through to tunneld, which answers DF packets
    /// with "fragmentation needed" and the tunnel's MTU (and drops the others,
    /// counted): on every data path, single packets and TSO super-packets.
    @Test(arguments: [TierLaunch.uring, .syscallRefused, .uringSingleRead])
    func tunneldAnswersOversizePacketsWhenTheDeviceMTUWasRaised(tier: TierLaunch) throws {
        try Lab.withLocalStore(config: seedConfig) { lab in
            let store = ["--store-dir", lab.storeDirectory]
            try lab.addHost(1, tier: tier, extra: store)
            #expect(lab.log("h1").contains(tier.logLine), "\(lab.log("h1"))")
            try lab.addHost(2, extra: store + ["--offload", "off"])
            try lab.addHost(3, extra: store + ["--datapath", "simple"])
            for n in 1...3 {
                try setContainerMTU(lab, n, 1500)
                try lab.exec("h\(n)", ["ip", "link", "set", "tun0", "mtu", "1500"])
            }
            for (a, b) in [(1, 2), (2, 3), (3, 1)] {
                let ping = try lab.ping(from: a, to: b)
                #expect(ping.succeeded, "c\(a) → c\(b): \(ping.output)")
            }
            // The order matters: a container that got "fragmentation needed"
            // for a destination remembers its path MTU (and advertises a
            // smaller TCP MSS to it), so each check uses a pair that has
            // learned nothing yet.
            // Without DF the packet is dropped: a ping that nothing answers.
            let plain = try lab.exec(
                "c1",
                [
                    "ping", "-M", "dont", "-c", "1", "-W", "1", "-s", "1472",
                    try lab.containerIP(3),
                ],
                check: false
            )
            #expect(!plain.succeeded, "\(plain.output)")
            // TCP learns the tunnel's MTU from tunneld and completes (from h1
            // the oversize segments come as TSO super-packets).
            var port = 5210
            for (a, b) in [(1, 2), (2, 3), (3, 1)] {
                try transfer(lab, from: a, to: b, bytes: 2 << 20, port: port)
                port += 1
            }
            // A DF ping is answered from the tunnel towards c_b's subnet: tunneld on h_a.
            for (a, b) in [(2, 1), (3, 2), (1, 3)] {
                try dontFragmentPing(lab, from: a, to: b, expectedSource: try subnetBase(lab, b))
            }
            for n in 1...3 {
                try lab.lab("stop", "h\(n)")
                let counters = lab.dataPathCounters("h\(n)")
                print("h\(n) after the raised-MTU traffic: \(counters)")
                // One for the DF ping, at least one for the TCP transfer.
                let answered = counters["icmp_frag_needed_sent", default: 0]
                #expect(answered >= 2, "h\(n): \(counters)")
                #expect(counters["dropped_too_big", default: 0] >= answered + (n == 1 ? 1 : 0), "h\(n): \(counters)")
            }
        }
    }
}
