import Foundation
import NetBase
import Testing

let wireguardConfig = #"{"Network":"10.2.0.0/16","SubnetLen":24,"Backend":{"Type":"wireguard"}}"#

let wireguardGoIsInstalled: Bool = {
    ["/usr/bin/wireguard-go", "/usr/bin/wg"].allSatisfy { FileManager.default.isExecutableFile(atPath: $0) }
}()
let wireguardGoSkipReason: Comment = "needs wireguard-go and wg (apt-get install wireguard-go wireguard-tools)"

/// flannel's wireguard backend on tunneld's userspace data path: hosts in
/// network namespaces sharing the lab's etcd, each with a key file of its
/// own; and a host configured by hand with Debian's wireguard-go the way
/// flanneld configures a wireguard host.
@Suite(.serialized, .enabled(if: canRunNamespaceTests && etcdIsInstalled, namespaceSkipReason))
struct WireGuardBackendTests {
    func withLab(config: String = wireguardConfig, _ body: (Lab) throws -> Void) throws {
        let lab = try Lab()
        defer { lab.destroy() }
        do {
            try lab.addEtcd()
            let file = lab.directory.appendingPathComponent("flannel-config.json")
            try config.write(to: file, atomically: true, encoding: .utf8)
            try lab.etcdctl(["put", "/docker/network/config"], input: file.path)
            try body(lab)
            if ProcessInfo.processInfo.environment["TUNNELD_E2E_LOGS"] == "1" { lab.printLogs(["h1", "h2"]) }
        } catch {
            lab.printLogs(["h1", "h2", "etcd"])
            throw error
        }
    }

    func keyFile(_ lab: Lab, _ n: Int) -> String { lab.directory.appendingPathComponent("h\(n).wgkey").path }

    /// `prefix`: before the binary (e.g. the seccomp filter that refuses io_uring);
    /// `extra`: more `tunneld run` options.
    /// `ipv6`: the host also has fd18::N/64 on its underlay and its container an IPv6 address.
    func addTunneld(_ lab: Lab, _ n: Int, prefix: [String] = [], extra: [String] = [], ipv6: Bool = false) throws {
        try lab.addHost(
            n,
            command: ["env", "WIREGUARD_KEY_FILE=\(keyFile(lab, n))"] + prefix + [
                tunneldBinary, "run",
                "-etcd-endpoints=\(labEtcdEndpoint)", "-iface=eth0", "-etcd-prefix=/docker/network/",
                "-subnet-file=\(lab.subnetFile(n))",
                "--control-socket", lab.directory.appendingPathComponent("h\(n).sock").path,
            ] + extra,
            ipv6: ipv6
        )
    }

    /// "10.2.7.0/24" from FLANNEL_SUBNET=10.2.7.1/24.
    func subnet(_ lab: Lab, _ n: Int) throws -> String {
        let value = try #require(try lab.subnetEnv(n)["FLANNEL_SUBNET"])
        return value.replacingOccurrences(of: ".1/24", with: ".0/24")
    }

    func publicKey(ofKeyFile path: String) throws -> String {
        try run(["bash", "-c", "wg pubkey < \(path)"]).output.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    @Test func twoTunneldHostsCarryContainerTrafficEncrypted() throws {
        try withLab { lab in
            try addTunneld(lab, 1, extra: ["--workers", "1"])
            // Host 2 seals and opens its batches with helper threads (the transfers below cross them).
            try addTunneld(lab, 2, extra: ["--workers", "3"])
            let subnet1 = try subnet(lab, 1), subnet2 = try subnet(lab, 2)
            #expect(try lab.subnetEnv(1)["FLANNEL_MTU"] == "1420")
            #expect(lab.waitForLog("h2", containing: "3 crypto worker(s) each way"))
            #expect(lab.waitForLog("h1", containing: "1 crypto worker(s) each way"))

            // The key file is flanneld's: created 0400, wg's base64.
            let attributes = try FileManager.default.attributesOfItem(atPath: keyFile(lab, 1))
            #expect((attributes[.posixPermissions] as? Int) == 0o400)
            let key1 = try publicKey(ofKeyFile: keyFile(lab, 1))
            #expect(lab.log("h1").contains("public key \(key1)"))

            // The lease is flanneld's.
            let lease = try lab.etcdctl([
                "get", "--print-value-only",
                "/docker/network/subnets/\(subnet1.replacingOccurrences(of: "/", with: "-"))",
            ]).output
            #expect(lease.contains(#""BackendType":"wireguard""#), "\(lease)")
            #expect(lease.contains(#""PublicKey":"\#(key1)""#), "\(lease)")

            #expect(lab.waitForLog("h2", containing: "peer \(subnet1) → 198.18.0.1:51820, key \(key1)"))
            #expect(lab.waitForLog("h1", containing: "peer \(subnet2) → 198.18.0.2:51820"))

            // The device is what flanneld makes: address /32, one route.
            let address = try lab.exec("h1", ["ip", "-o", "addr", "show", "dev", "flannel-wg"]).output
            #expect(address.contains("inet \(subnet1.replacingOccurrences(of: "/24", with: "/32"))"), "\(address)")
            let route = try lab.exec("h1", ["ip", "route", "show", "10.2.0.0/16"]).output
            #expect(route.contains("dev flannel-wg") && route.contains("scope link"), "\(route)")

            let there = try lab.ping(from: 1, to: 2)
            #expect(there.succeeded, "\(there.output)")
            let back = try lab.ping(from: 2, to: 1)
            #expect(back.succeeded, "\(back.output)")
            try transfer(lab, from: 1, to: 2, megabytes: 20)
            try transfer(lab, from: 2, to: 1, megabytes: 20)

            // `tunneld status` shows each peer as `wg show` does: endpoint,
            // latest handshake, transfer both ways, key.
            let socket = lab.directory.appendingPathComponent("h1.sock").path
            let status = try lab.exec("h1", [tunneldBinary, "status", "--control-socket", socket]).output
            let line = status.split(separator: "\n").first { $0.contains(subnet2) }.map(String.init) ?? ""
            #expect(status.contains("tunnels: 1"), "\(status)")
            #expect(line.contains("198.18.0.2:51820") && line.contains(" ago"), "\(status)")
            #expect(line.contains("MiB received") && line.contains("MiB sent"), "\(status)")
            let key2 = try publicKey(ofKeyFile: keyFile(lab, 2))
            #expect(line.contains(key2), "\(status)")
            let json = try lab.exec("h1", [tunneldBinary, "status", "--json", "--control-socket", socket]).output
            let object = try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any]
            let tunnels = (object?["backend"] as? [String: Any])?["tunnels"] as? [[String: Any]] ?? []
            #expect(tunnels.count == 1, "\(json)")
            #expect((tunnels.first?["bytesReceived"] as? Int ?? 0) > 20 << 20, "\(json)")
            #expect((tunnels.first?["bytesSent"] as? Int ?? 0) > 20 << 20, "\(json)")
            #expect(
                tunnels.first?["latestHandshake"] != nil && tunnels.first?["hasSession"] as? Bool == true,
                "\(json)"
            )

            // The counters the daemons leave with: one handshake completed
            // (by whichever side initiated), packets opened on both.
            try lab.lab("stop", "h1")
            try lab.lab("stop", "h2")
            let logs = lab.log("h1") + lab.log("h2")
            #expect(logs.contains("wg_handshakes_completed="), "\(logs)")
            for n in [1, 2] {
                #expect(lab.log("h\(n)").contains("wg_packets_opened="))
                // Bulk TCP leaves in runs of equal-size messages: UDP_SEGMENT sends.
                #expect(lab.log("h\(n)").contains("wg_udp_segmented_sends="))
                // The peer's UDP_SEGMENT sends arrive whole across the veth: UDP_GRO receives.
                #expect(lab.log("h\(n)").contains("wg_udp_coalesced_receives="))
                // The kernel's TSO super-packets are split before sealing, and opened
                // segments of a flow are coalesced before they are written.
                #expect(lab.log("h\(n)").contains("wg_tun_super_packets_read="), "\(lab.log("h\(n)"))")
                #expect(lab.log("h\(n)").contains("wg_tun_super_packets_written="), "\(lab.log("h\(n)"))")
                #expect(!lab.log("h\(n)").contains("wg_dropped_"))
                #expect(lab.log("h\(n)").contains("removed device flannel-wg"))
            }
        }
    }

    /// A host without offloads, io_uring refused by a seccomp filter (as
    /// Docker's default profile does) and `--datapath simple` carries the
    /// same traffic with a host that has them all: the wireguard data path
    /// does not depend on either, and TUN offloads are the host's own affair.
    @Test func aHostWithoutOffloadsOrIOURingAndOneWithThemAreEachOthersPeers() throws {
        try withLab { lab in
            try addTunneld(lab, 1)
            try addTunneld(lab, 2, prefix: [refuseIOURingBinary], extra: ["--offload", "off", "--datapath", "simple"])
            let subnet1 = try subnet(lab, 1)
            #expect(lab.waitForLog("h2", containing: "peer \(subnet1) → 198.18.0.1:51820"))
            try lab.expectPings()
            try transfer(lab, from: 1, to: 2, megabytes: 20)
            try transfer(lab, from: 2, to: 1, megabytes: 20)
            try lab.lab("stop", "h1")
            try lab.lab("stop", "h2")
            #expect(lab.log("h1").contains("wg_tun_super_packets_read="), "\(lab.log("h1"))")
            #expect(!lab.log("h2").contains("wg_tun_super_packets"), "\(lab.log("h2"))")
            for n in [1, 2] {
                #expect(lab.log("h\(n)").contains("wg_packets_opened="))
                #expect(!lab.log("h\(n)").contains("wg_dropped_"), "\(lab.log("h\(n)"))")
            }
        }
    }

    @Test func aHostWithANewKeyIsReachedAgainOnceItsLeaseSaysSo() throws {
        try withLab { lab in
            try addTunneld(lab, 1)
            try addTunneld(lab, 2)
            let subnet1 = try subnet(lab, 1)
            let before = try lab.ping(from: 2, to: 1)
            #expect(before.succeeded, "\(before.output)")
            let oldKey = try publicKey(ofKeyFile: keyFile(lab, 1))
            // Rotation as OPERATIONS.md says: stop, delete the key file, start.
            try lab.lab("stop", "h1")
            try FileManager.default.removeItem(atPath: keyFile(lab, 1))
            try lab.lab("start", "h1")
            // The log goes on from the first run: wait for the second start.
            let deadline = ContinuousClock.now + .seconds(20)
            while lab.log("h1").components(separatedBy: "WireGuard data path running").count < 3
                && ContinuousClock.now < deadline
            {
                usleep(100_000)
            }
            #expect(lab.log("h1").components(separatedBy: "WireGuard key created in").count == 3)
            let newKey = try publicKey(ofKeyFile: keyFile(lab, 1))
            #expect(newKey != oldKey)
            #expect(lab.waitForLog("h2", containing: "peer \(subnet1) → 198.18.0.1:51820, key \(newKey)"))
            let after = try lab.ping(from: 2, to: 1)
            #expect(after.succeeded, "\(after.output)")
            let back = try lab.ping(from: 1, to: 2)
            #expect(back.succeeded, "\(back.output)")
        }
    }

    /// The data-path counters host N's daemon reports (`tunneld status --json`).
    func counters(_ lab: Lab, _ n: Int) throws -> [String: Int] {
        let output = try lab.exec(
            "h\(n)",
            [
                tunneldBinary, "status", "--json", "--control-socket",
                lab.directory.appendingPathComponent("h\(n).sock").path,
            ]
        ).output
        let json = try #require(try JSONSerialization.jsonObject(with: Data(output.utf8)) as? [String: Any])
        return try #require(json["counters"] as? [String: Int], "no counters in \(output)")
    }

    @Test func datagramsFromAStrangerAreDroppedAndCountedByReason() throws {
        try withLab { lab in
            try addTunneld(lab, 1)
            try addTunneld(lab, 2)
            let before = try lab.ping(from: 1, to: 2)
            #expect(before.succeeded, "\(before.output)")
            // A stranger on the underlay: an initiation of the right length
            // whose mac1 is not for host 1's key, a transport message to an
            // index nobody gave out, and a datagram of no WireGuard type.
            try lab.addNode(4)
            let script = """
                import os,socket
                s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)
                for d in [b'\\x01\\0\\0\\0'+os.urandom(144), b'\\x04\\0\\0\\0'+os.urandom(60), b'\\x09hello']:
                    s.sendto(d,('198.18.0.1',51820))
                """
            try lab.exec("h4", ["python3", "-c", script])
            var seen: [String: Int] = [:]
            for _ in 0..<40 {
                seen = try counters(lab, 1)
                if seen["wg_dropped_malformed"] ?? 0 > 0 && seen["wg_dropped_unknown_receiver"] ?? 0 > 0 { break }
                usleep(250_000)
            }
            #expect(seen["wg_dropped_bad_mac"] == 1, "\(seen)")
            #expect(seen["wg_dropped_unknown_receiver"] == 1, "\(seen)")
            #expect(seen["wg_dropped_malformed"] == 1, "\(seen)")
            // The peers never noticed.
            let after = try lab.ping(from: 2, to: 1)
            #expect(after.succeeded, "\(after.output)")
        }
    }

    @Test(.enabled(if: wireguardGoIsInstalled, wireguardGoSkipReason))
    func tunneldAndWireguardGoConfiguredLikeFlanneldAreEachOthersPeers() throws {
        try withLab { lab in
            try addTunneld(lab, 1)
            let subnet1 = try subnet(lab, 1)
            let key1 = try publicKey(ofKeyFile: keyFile(lab, 1))

            let go = try WireguardGoHost(lab, peerSubnet: subnet1, peerKey: key1)
            try go.start(lab)
            let (subnet2, key2, device) = (go.subnet, go.key, go.device)
            #expect(lab.waitForLog("h1", containing: "peer \(subnet2) → 198.18.0.2:51820, key \(key2)"))

            // wireguard-go starts the handshake.
            let fromGo = try lab.ping(from: 2, to: 1)
            #expect(fromGo.succeeded, "\(fromGo.output)")
            let handshakes = try lab.exec("h2", ["wg", "show", device, "latest-handshakes"]).output
            #expect(handshakes.contains(key1) && !handshakes.contains("\t0\n"), "\(handshakes)")
            let back = try lab.ping(from: 1, to: 2)
            #expect(back.succeeded, "\(back.output)")
            try transfer(lab, from: 1, to: 2, megabytes: 20)
            try transfer(lab, from: 2, to: 1, megabytes: 20)

            // tunneld restarts (same key file, same lease) and starts the
            // handshake itself: wireguard-go takes the newer initiation.
            try lab.lab("stop", "h1")
            let answered = try #require(stoppedLines(lab.log("h1")).last)
            #expect(answered.contains("wg_handshake_responses_sent="), "\(answered)")
            try lab.lab("start", "h1")
            #expect(lab.waitForLog("h1", containing: "WireGuard data path running"))
            let fromTunneld = try lab.ping(from: 1, to: 2)
            #expect(fromTunneld.succeeded, "\(fromTunneld.output)")
            try transfer(lab, from: 2, to: 1, megabytes: 20)
            try lab.lab("stop", "h1")
            let lines = stoppedLines(lab.log("h1"))
            #expect(lines.count == 2)
            let initiated = try #require(lines.last)
            #expect(initiated.contains("wg_handshakes_completed="), "\(initiated)")
            // Nothing wireguard-go sent was refused.
            #expect(!initiated.contains("wg_dropped_bad_mac") && !initiated.contains("wg_dropped_replay"))
        }
    }

    /// Rekeying during a long transfer, against wireguard-go: tunneld runs
    /// WireGuard's clock 24 times as fast (a test hook), so the session it
    /// initiated is renewed every 5 s (REKEY_AFTER_TIME) while a paced
    /// transfer runs for ~12 s; every byte arrives. Then wireguard-go is
    /// restarted (its sessions gone) and the hosts reach each other again.
    @Test(.enabled(if: wireguardGoIsInstalled, wireguardGoSkipReason))
    func rekeyDuringALongTransferAndAWireguardGoRestartAreSurvived() throws {
        try withLab { lab in
            try addTunneld(lab, 1, prefix: ["env", "TUNNELD_TEST_WIREGUARD_CLOCK_RATE=24"])
            #expect(lab.log("h1").contains("WireGuard's timers run 24 times as fast"), "\(lab.log("h1"))")
            let subnet1 = try subnet(lab, 1)
            let go = try WireguardGoHost(lab, peerSubnet: subnet1, peerKey: try publicKey(ofKeyFile: keyFile(lab, 1)))
            try go.start(lab)
            #expect(lab.waitForLog("h1", containing: "peer \(go.subnet) → 198.18.0.2:51820, key \(go.key)"))
            // tunneld starts the handshake, so it is the side that rekeys.
            let first = try lab.ping(from: 1, to: 2)
            #expect(first.succeeded, "\(first.output)")
            let before = try counters(lab, 1)["wg_handshakes_completed", default: 0]
            // ~12 s: 48 MiB in 256 KiB chunks every 50 ms.
            try transfer(lab, from: 1, to: 2, bytes: 48 << 20, pace: (chunk: 256 << 10, seconds: 0.05))
            let after = try counters(lab, 1)
            #expect(after["wg_handshakes_completed", default: 0] >= before + 2, "\(after)")
            #expect(
                after["wg_dropped_bad_mac", default: 0] == 0 && after["wg_dropped_replay", default: 0] == 0,
                "\(after)"
            )

            // wireguard-go restarts: a new device, no sessions; its first
            // packet starts a handshake tunneld accepts (newer timestamp).
            try lab.lab("stop", "h2")
            try go.start(lab, restart: true)
            let fromGo = try lab.ping(from: 2, to: 1)
            #expect(fromGo.succeeded, "\(fromGo.output)")
            let back = try lab.ping(from: 1, to: 2)
            #expect(back.succeeded, "\(back.output)")
            try transfer(lab, from: 2, to: 1, megabytes: 5)
        }
    }

    /// The counter lines the daemon logged each time its data path stopped.
    func stoppedLines(_ log: String) -> [Substring] {
        log.split(separator: "\n").filter { $0.contains("WireGuard data path stopped;") }
    }
}

/// Host 2 as flanneld would set up a wireguard host with Debian's
/// wireguard-go: its key, its lease in etcd, its subnet file; `start` runs
/// wireguard-go (its TUN; the control socket is shared by every namespace,
/// so the device name is the lab's) and configures the peer (host 1), the
/// address /32 and the network's route, as flanneld would.
struct WireguardGoHost {
    let subnet: String
    let key: String
    let keyFile: String
    let device: String
    let peerSubnet: String
    let peerKey: String

    init(_ lab: Lab, peerSubnet: String, peerKey: String) throws {
        subnet = peerSubnet == "10.2.200.0/24" ? "10.2.201.0/24" : "10.2.200.0/24"
        let base = String(subnet.dropLast(5))  // "10.2.200"
        keyFile = lab.directory.appendingPathComponent("wgkey-2").path
        try run(["bash", "-c", "umask 077; wg genkey > \(keyFile)"])
        key = try run(["bash", "-c", "wg pubkey < \(keyFile)"]).output.trimmingCharacters(in: .whitespacesAndNewlines)
        device = "wg" + lab.name.suffix(9)
        self.peerSubnet = peerSubnet
        self.peerKey = peerKey
        try """
        FLANNEL_NETWORK=10.2.0.0/16
        FLANNEL_SUBNET=\(base).1/24
        FLANNEL_MTU=1420
        FLANNEL_IPMASQ=false

        """.write(toFile: lab.subnetFile(2), atomically: true, encoding: .utf8)
        try lab.etcdctl([
            "put", "/docker/network/subnets/\(base).0-24",
            #"{"PublicIP":"198.18.0.2","BackendType":"wireguard","BackendData":{"PublicKey":"\#(key)"}}"#,
        ])
    }

    /// Starts (or restarts, after `lab stop h2`) wireguard-go and configures it.
    func start(_ lab: Lab, restart: Bool = false) throws {
        if restart {
            try lab.lab("start", "h2")
        } else {
            try lab.addHost(2, command: ["env", "WG_PROCESS_FOREGROUND=1", "wireguard-go", device])
        }
        Self.waitForControlSocket(device)
        try Self.configure(
            lab,
            device: device,
            keyFile: keyFile,
            peerKey: peerKey,
            allowedIPs: peerSubnet,
            address: "\(subnet.dropLast(5)).0"
        )
    }

    /// Waits (bounded: 10 s) for wireguard-go's control socket for `device`.
    static func waitForControlSocket(_ device: String) {
        let socket = "/var/run/wireguard/\(device).sock"
        let deadline = ContinuousClock.now + .seconds(10)
        while !FileManager.default.fileExists(atPath: socket) && ContinuousClock.now < deadline {
            usleep(100_000)
        }
    }

    /// Configures wireguard-go's `device` on host 2 as flanneld configures
    /// its device: the key and port, host 1 as the peer at `endpoint` for
    /// `allowedIPs`, the subnet's `address` (/32, or /128 with `ipv6`), MTU
    /// 1420 and the route of the network of that family. The port and
    /// endpoint default to the IPv4 device's.
    static func configure(
        _ lab: Lab,
        device: String,
        keyFile: String,
        port: Int = 51820,
        peerKey: String,
        endpoint: String = "198.18.0.1:51820",
        allowedIPs: String,
        address: String,
        ipv6: Bool = false
    ) throws {
        try lab.exec(
            "h2",
            [
                "wg", "set", device, "private-key", keyFile, "listen-port", "\(port)", "peer", peerKey,
                "endpoint", endpoint, "allowed-ips", allowedIPs,
            ]
        )
        if ipv6 {
            try lab.exec("h2", ["ip", "-6", "addr", "add", "\(address)/128", "dev", device, "nodad"])
        } else {
            try lab.exec("h2", ["ip", "addr", "add", "\(address)/32", "dev", device])
        }
        try lab.exec("h2", ["ip", "link", "set", device, "mtu", "1420", "up"])
        if ipv6 {
            try lab.exec("h2", ["ip", "-6", "route", "add", "fd00:10:2::/48", "dev", device])
        } else {
            try lab.exec("h2", ["ip", "route", "add", "10.2.0.0/16", "dev", device, "scope", "link"])
        }
    }
}
