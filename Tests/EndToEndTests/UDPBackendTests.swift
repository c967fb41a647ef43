import Foundation
import NetBase
import Testing

/// The seed's network config.
let seedConfig =
    #"{"Network":"10.2.0.0/16","SubnetLen":24,"SubnetMin":"10.2.1.0","SubnetMax":"10.2.254.0","Backend":{"Type":"udp"}}"#

/// Container-to-container traffic through tunneld's udp backend, with hosts
/// and containers in network namespaces and the embedded local store shared
/// by the hosts (they share this machine's filesystem).
@Suite(.serialized, .enabled(if: canRunNamespaceTests, namespaceSkipReason))
struct UDPBackendTests {
    func withLab(_ body: (Lab) throws -> Void) throws {
        try Lab.withLocalStore(config: seedConfig, body)
    }

    func hostArguments(_ lab: Lab) -> [String] { ["--store-dir", lab.storeDirectory] }

    @Test func containersOnTwoHostsReachEachOtherAndHostsComeAndGo() throws {
        try withLab { lab in
            try lab.addHost(1, extra: hostArguments(lab))
            try lab.addHost(2, extra: hostArguments(lab))

            // subnet.env is flannel's, and the lease behind it is what the
            // other host sees.
            let env1 = try lab.subnetEnv(1), env2 = try lab.subnetEnv(2)
            #expect(env1["FLANNEL_NETWORK"] == "10.2.0.0/16")
            #expect(env1["FLANNEL_MTU"] == "1472")
            #expect(env1["FLANNEL_IPMASQ"] == "false")
            let subnet1 = try #require(env1["FLANNEL_SUBNET"]), subnet2 = try #require(env2["FLANNEL_SUBNET"])
            #expect(subnet1 != subnet2)
            let text = try String(contentsOfFile: lab.subnetFile(1), encoding: .utf8)
            #expect(
                text
                    == "FLANNEL_NETWORK=10.2.0.0/16\nFLANNEL_SUBNET=\(subnet1)\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n"
            )
            let base1 = subnet1.replacingOccurrences(of: ".1/24", with: ".0/24")
            let base2 = subnet2.replacingOccurrences(of: ".1/24", with: ".0/24")
            #expect(lab.waitForLog("h2", containing: "peer \(base1) → peer 198.18.0.1:8285"))
            #expect(lab.waitForLog("h1", containing: "peer \(base2) → peer 198.18.0.2:8285"))
            let leases = try run([tunneldBinary, "leases", "--store-dir", lab.storeDirectory]).output
            #expect(leases.contains(base1) && leases.contains("198.18.0.1"))
            #expect(leases.contains(base2) && leases.contains("198.18.0.2"))

            // Ping both ways.
            let there = try lab.ping(from: 1, to: 2)
            #expect(there.succeeded, "\(there.output)")
            let back = try lab.ping(from: 2, to: 1)
            #expect(back.succeeded, "\(back.output)")

            // The device is what flannel's udp backend makes.
            let link = try lab.exec("h1", ["ip", "-o", "addr", "show", "dev", "tun0"]).output
            #expect(link.contains("inet \(base1.replacingOccurrences(of: "/24", with: "/32"))"))
            #expect(!link.contains("inet6"), "the IPv4 tunnel should have no IPv6 link-local address")
            let route = try lab.exec("h1", ["ip", "route", "show", "10.2.0.0/16"]).output
            #expect(route.contains("dev tun0"))

            // 20 MB over TCP arrives byte-identical.
            try transfer(lab, from: 1, to: 2, megabytes: 20)

            // A third host joins; the first two reach it without restarting.
            try lab.addHost(3, extra: hostArguments(lab) + ["--release-on-exit"])
            let to3from1 = try lab.ping(from: 1, to: 3)
            #expect(to3from1.succeeded, "\(to3from1.output)")
            let to3from2 = try lab.ping(from: 2, to: 3)
            #expect(to3from2.succeeded, "\(to3from2.output)")
            let to1from3 = try lab.ping(from: 3, to: 1)
            #expect(to1from3.succeeded, "\(to1from3.output)")

            // It leaves, releasing its lease: the others forget it, and a
            // packet for it now gets "network unreachable" from the tunnel.
            let subnet3 = try #require(lab.subnetEnv(3)["FLANNEL_SUBNET"])
            let base3 = subnet3.replacingOccurrences(of: ".1/24", with: ".0/24")
            try lab.lab("stop", "h3")
            #expect(lab.log("h3").contains("released lease \(base3)"))
            #expect(lab.log("h3").contains("removed device tun0"))
            #expect(lab.waitForLog("h1", containing: "peer \(base3) is gone"))
            #expect(lab.waitForLog("h2", containing: "peer \(base3) is gone"))
            let gone = try lab.exec("c1", ["ping", "-c", "1", "-W", "2", try lab.containerIP(3)], check: false)
            #expect(!gone.succeeded)
            #expect(gone.output.contains("Unreachable"), "\(gone.output)")
            let after = try run([tunneldBinary, "leases", "--store-dir", lab.storeDirectory]).output
            #expect(!after.contains(base3))
        }
    }

    @Test func aRestartedHostKeepsItsSubnet() throws {
        try withLab { lab in
            try lab.addHost(1, extra: hostArguments(lab))
            try lab.addHost(2, extra: hostArguments(lab))
            let before = try lab.subnetEnv(1)["FLANNEL_SUBNET"]
            try lab.lab("stop", "h1")
            #expect(lab.log("h1").contains("kept for a restart"))
            // The device and its route went with the daemon.
            let links = try lab.exec("h1", ["ip", "-o", "link"]).output
            #expect(!links.contains("tun0"))
            try FileManager.default.removeItem(atPath: lab.subnetFile(1))
            try lab.lab("start", "h1")
            #expect(lab.waitForFile(lab.subnetFile(1)))
            #expect(try lab.subnetEnv(1)["FLANNEL_SUBNET"] == before)
            let ping = try lab.ping(from: 2, to: 1)
            #expect(ping.succeeded, "\(ping.output)")
        }
    }

    @Test func theFlannelStyleDataPathCarriesTrafficToo() throws {
        try withLab { lab in
            // flanneld's spellings: the interface found by a regex on its
            // address, and the health endpoint.
            try lab.addHost(
                1,
                iface: ["-iface=eth9", #"-iface-regex=^198\.18\.0\.1$"#],
                extra: hostArguments(lab) + ["--datapath", "simple", "-healthz-port=8471"]
            )
            try lab.addHost(2, extra: hostArguments(lab))
            #expect(lab.log("h1").contains("using interface eth0 (198.18.0.1"))
            let health = try lab.exec(
                "h1",
                [
                    "python3", "-c",
                    "import urllib.request; r = urllib.request.urlopen('http://127.0.0.1:8471/healthz', timeout=5); print(r.status, r.read().decode())",
                ]
            )
            #expect(health.output.hasPrefix("200 tunneld is running"), "\(health.output)")
            let ping = try lab.ping(from: 1, to: 2)
            #expect(ping.succeeded, "\(ping.output)")
            try transfer(lab, from: 2, to: 1, megabytes: 5)
        }
    }

    @Test func ipMasqueradeHidesContainersOnlyOutsideTheNetwork() throws {
        try withLab { lab in
            try lab.addHost(1, extra: hostArguments(lab) + ["-ip-masq"])
            try lab.addHost(2, extra: hostArguments(lab))
            let env1 = try lab.subnetEnv(1)
            #expect(env1["FLANNEL_IPMASQ"] == "true")
            let subnet1 = try #require(env1["FLANNEL_SUBNET"]).replacingOccurrences(of: ".1/24", with: ".0/24")
            let rules = try lab.exec("h1", ["iptables", "-t", "nat", "-S", "TUNNELD-POSTRTG"]).output
            #expect(rules.contains("-A TUNNELD-POSTRTG -s 10.2.0.0/16 -d 10.2.0.0/16 -j RETURN"), "\(rules)")
            #expect(rules.contains("-A TUNNELD-POSTRTG ! -s 10.2.0.0/16 -d \(subnet1) -j RETURN"), "\(rules)")
            #expect(rules.contains("MASQUERADE --random-fully"), "\(rules)")

            // To a host outside the overlay, container 1 appears as host 1…
            let c1 = try lab.containerIP(1)
            let outside = try sourceSeen(lab, listener: "h2", at: "198.18.0.2", sender: "c1")
            #expect(outside == "198.18.0.1", "traffic leaving the network should be masqueraded, seen from \(outside)")
            // …but to another container it keeps its own address.
            let inside = try sourceSeen(lab, listener: "c2", at: try lab.containerIP(2), sender: "c1")
            #expect(inside == c1, "traffic within the network must keep its container address, seen from \(inside)")

            try lab.lab("stop", "h1")
            let gone = try lab.exec("h1", ["iptables", "-t", "nat", "-S", "TUNNELD-POSTRTG"], check: false)
            #expect(!gone.succeeded, "the masquerade chain should be removed on exit")
        }
    }

    /// Sends one UDP datagram from namespace `sender` to `address` and
    /// returns the source address the listener in namespace `listener` saw.
    func sourceSeen(_ lab: Lab, listener: String, at address: String, sender: String) throws -> String {
        let seen = lab.directory.appendingPathComponent("seen-\(listener).txt").path
        let script = """
            import socket,sys
            f=socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
            s=socket.socket(f,socket.SOCK_DGRAM); s.bind((sys.argv[1],9999)); s.settimeout(20)
            _,peer=s.recvfrom(100); open(sys.argv[2],'w').write(peer[0])
            """
        let server = try spawn(
            ["ip", "netns", "exec", lab.namespace(listener), "python3", "-c", script, address, seen],
            output: lab.directory.appendingPathComponent("seen.log").path
        )
        defer { server.terminate() }
        let send =
            "import socket,sys; socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET,socket.SOCK_DGRAM).sendto(b'x',(sys.argv[1],9999))"
        // Until the listener has one (it may not be bound yet): bounded.
        for _ in 0..<40 where server.wait(timeout: .milliseconds(250)) == nil {
            try lab.exec(sender, ["python3", "-c", send, address], check: false)
        }
        return (try? String(contentsOfFile: seen, encoding: .utf8)) ?? "nothing"
    }
}
