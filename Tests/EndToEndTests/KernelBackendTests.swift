import Foundation
import Testing

func backendConfig(_ backend: String) -> String {
    #"{"Network":"10.2.0.0/16","SubnetLen":24,"SubnetMin":"10.2.1.0","SubnetMax":"10.2.254.0","Backend":"# + backend
        + "}"
}

/// Facts about host N's lease, from its subnet.env: "10.2.72.1/24" gives
/// subnet 10.2.72.0/24, base address 10.2.72.0.
struct LabLease {
    var subnet: String
    var base: String
    var key: String { subnet.replacingOccurrences(of: "/", with: "-") }

    init(_ lab: Lab, host n: Int) throws {
        let value = try #require(try lab.subnetEnv(n)["FLANNEL_SUBNET"])
        let parts = value.split(separator: "/")
        let octets = parts[0].split(separator: ".")
        try #require(parts.count == 2 && octets.count == 4, "FLANNEL_SUBNET=\(value) is not A.B.C.D/N")
        base = octets.dropLast().joined(separator: ".") + ".0"
        subnet = "\(base)/\(parts[1])"
    }
}

extension Lab {
    /// Output of a command in host N's namespace.
    func hostOutput(_ n: Int, _ arguments: [String]) throws -> String {
        try exec("h\(n)", arguments).output
    }

    /// The MAC of host N's flannel.1.
    func vtepMAC(_ n: Int, device: String = "flannel.1") throws -> String {
        try hostOutput(n, ["cat", "/sys/class/net/\(device)/address"]).trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// Waits (bounded) until `condition` holds.
    func waitUntil(timeout: Duration = .seconds(20), _ condition: () throws -> Bool) rethrows -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if try condition() { return true }
            usleep(100_000)
        }
        return try condition()
    }

    func printLogs(_ processes: [String] = ["h1", "h2", "h3"]) {
        for process in processes where !log(process).isEmpty {
            print("---- log of \(process) ----\n\(log(process))")
        }
    }
}

/// The vxlan and host-gw backends: the kernel carries the packets, tunneld
/// programs it. Hosts and containers in network namespaces, sharing the
/// embedded local store.
@Suite(.serialized, .enabled(if: canRunNamespaceTests, namespaceSkipReason))
struct KernelBackendTests {
    func withLab(backend: String, _ body: (Lab) throws -> Void) throws {
        try Lab.withLocalStore(config: backendConfig(backend), body)
    }

    func command(_ lab: Lab, host n: Int, extra: [String] = []) -> [String] {
        [
            tunneldBinary, "run", "--store-dir", lab.storeDirectory, "--iface", "eth0",
            "--subnet-file", lab.subnetFile(n),
        ] + extra
    }

    /// The lease value host N stored, from the local store's file.
    func storedLeaseValue(_ lab: Lab, _ lease: LabLease) throws -> String {
        let record = try String(contentsOfFile: "\(lab.storeDirectory)/subnets/\(lease.key)", encoding: .utf8)
        let start = try #require(record.range(of: #""Value":"#))
        return String(record[start.upperBound...].dropLast(record.hasSuffix("}\n") ? 2 : 1))
    }

    func pingBothWays(_ lab: Lab, _ a: Int, _ b: Int) throws {
        let there = try lab.ping(from: a, to: b)
        #expect(there.succeeded, "c\(a) → c\(b): \(there.output)")
        let back = try lab.ping(from: b, to: a)
        #expect(back.succeeded, "c\(b) → c\(a): \(back.output)")
    }

    @Test func vxlanHostsProgramTheKernelAndCarryTrafficWhileHostsComeAndGo() throws {
        try withLab(backend: #"{"Type":"vxlan"}"#) { lab in
            try lab.addHost(1, command: command(lab, host: 1))
            try lab.addHost(2, command: command(lab, host: 2))
            let lease1 = try LabLease(lab, host: 1), lease2 = try LabLease(lab, host: 2)

            // subnet.env: MTU = underlay 1500 − 50.
            let text = try String(contentsOfFile: lab.subnetFile(1), encoding: .utf8)
            #expect(
                text
                    == "FLANNEL_NETWORK=10.2.0.0/16\nFLANNEL_SUBNET=\(lease1.base.dropLast())1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
            )

            // The device is flanneld's.
            let device = try lab.hostOutput(1, ["ip", "-d", "-o", "link", "show", "flannel.1"])
            for part in ["mtu 1450", "vxlan id 1", "local 198.18.0.1", "dev eth0", "dstport 8472", "nolearning"] {
                #expect(device.contains(part), "flannel.1 lacks \(part): \(device)")
            }
            let address = try lab.hostOutput(1, ["ip", "-o", "-4", "addr", "show", "dev", "flannel.1"])
            #expect(address.contains("inet \(lease1.base)/32"), "\(address)")

            // The lease is what flanneld writes.
            let mac1 = try lab.vtepMAC(1), mac2 = try lab.vtepMAC(2)
            #expect(
                try storedLeaseValue(lab, lease1)
                    == #"{"PublicIP":"198.18.0.1","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":""#
                    + mac1 + #""}}"#
            )

            // Host 1 has host 2's ARP entry, FDB entry and onlink route.
            #expect(
                try lab.waitUntil {
                    try lab.hostOutput(1, ["ip", "route", "show", lease2.subnet]).contains(
                        "via \(lease2.base) dev flannel.1 onlink"
                    )
                },
                "\(lab.log("h1"))"
            )
            let neighbours = try lab.hostOutput(1, ["ip", "neigh", "show", "dev", "flannel.1"])
            #expect(neighbours.contains("\(lease2.base) lladdr \(mac2) PERMANENT"), "\(neighbours)")
            let fdb = try lab.hostOutput(1, ["bridge", "fdb", "show", "dev", "flannel.1"])
            #expect(fdb.contains("\(mac2) dst 198.18.0.2 self permanent"), "\(fdb)")

            try pingBothWays(lab, 1, 2)
            try transfer(lab, from: 1, to: 2, megabytes: 20)

            // A third host joins, and leaves releasing its lease.
            try lab.addHost(3, command: command(lab, host: 3, extra: ["--release-on-exit"]))
            let lease3 = try LabLease(lab, host: 3)
            let mac3 = try lab.vtepMAC(3)
            try pingBothWays(lab, 1, 3)
            try pingBothWays(lab, 2, 3)
            try lab.lab("stop", "h3")
            #expect(lab.log("h3").contains("released lease \(lease3.subnet)"))
            #expect(try !lab.hostOutput(3, ["ip", "-o", "link"]).contains("flannel.1"), "h3 kept its flannel.1")
            for host in [1, 2] {
                #expect(
                    try lab.waitUntil { try !lab.hostOutput(host, ["ip", "route"]).contains(lease3.subnet) },
                    "h\(host) kept the route to \(lease3.subnet)"
                )
                #expect(try !lab.hostOutput(host, ["ip", "neigh", "show", "dev", "flannel.1"]).contains(lease3.base))
                #expect(try !lab.hostOutput(host, ["bridge", "fdb", "show", "dev", "flannel.1"]).contains(mac3))
            }
            try pingBothWays(lab, 1, 2)

            // A restart keeps the device and its MAC: the peers' entries stay right.
            try lab.lab("stop", "h1")
            #expect(lab.log("h1").contains("kept for a restart"))
            try lab.lab("start", "h1")
            #expect(lab.waitForLog("h1", containing: "tunneld ready"))
            #expect(try lab.vtepMAC(1) == mac1)
            try pingBothWays(lab, 1, 2)
        }
    }

    @Test func hostGatewayHostsRouteViaEachOtherAndRestoreDeletedRoutes() throws {
        try withLab(backend: #"{"Type":"host-gw"}"#) { lab in
            try lab.addHost(1, command: command(lab, host: 1))
            try lab.addHost(2, command: command(lab, host: 2))
            let lease1 = try LabLease(lab, host: 1), lease2 = try LabLease(lab, host: 2)
            #expect(try lab.subnetEnv(1)["FLANNEL_MTU"] == "1500")
            #expect(
                try storedLeaseValue(lab, lease1)
                    == #"{"PublicIP":"198.18.0.1","PublicIPv6":null,"BackendType":"host-gw"}"#
            )
            #expect(
                try lab.waitUntil {
                    try lab.hostOutput(1, ["ip", "route", "show", lease2.subnet]).contains("via 198.18.0.2 dev eth0")
                },
                "\(lab.log("h1"))"
            )
            #expect(
                try lab.waitUntil {
                    try lab.hostOutput(2, ["ip", "route", "show", lease1.subnet]).contains("via 198.18.0.1 dev eth0")
                }
            )
            #expect(try !lab.hostOutput(1, ["ip", "-o", "link"]).contains("flannel"))

            try pingBothWays(lab, 1, 2)
            try transfer(lab, from: 1, to: 2, megabytes: 20)

            // Someone deletes the route: it is back within the check interval.
            try lab.exec("h1", ["ip", "route", "del", lease2.subnet])
            #expect(
                try lab.waitUntil(timeout: .seconds(25)) {
                    try lab.hostOutput(1, ["ip", "route", "show", lease2.subnet]).contains("via 198.18.0.2 dev eth0")
                },
                "\(lab.log("h1"))"
            )
            #expect(lab.log("h1").contains("restored route \(lease2.subnet) via 198.18.0.2 dev eth0"))

            try lab.addHost(3, command: command(lab, host: 3, extra: ["--release-on-exit"]))
            let lease3 = try LabLease(lab, host: 3)
            try pingBothWays(lab, 1, 3)
            try pingBothWays(lab, 2, 3)
            try lab.lab("stop", "h3")
            #expect(lab.log("h3").contains("released lease \(lease3.subnet)"))
            for host in [1, 2] {
                #expect(
                    try lab.waitUntil { try !lab.hostOutput(host, ["ip", "route"]).contains(lease3.subnet) },
                    "h\(host) kept the route to \(lease3.subnet)"
                )
            }
            let left = try lab.hostOutput(3, ["ip", "route"])
            #expect(
                !left.contains(lease1.subnet) && !left.contains(lease2.subnet),
                "h3 kept its routes to peers: \(left)"
            )
            try pingBothWays(lab, 1, 2)
        }
    }

    /// Restarts hosts 1 and 2 after a new config, and waits until both are ready again.
    func switchTo(_ lab: Lab, backend: String, readyCount: Int) throws {
        let file = lab.directory.appendingPathComponent("flannel-config.json")
        try backendConfig(backend).write(to: file, atomically: true, encoding: .utf8)
        try run([tunneldBinary, "config", "set", "--store-dir", lab.storeDirectory, file.path])
        for host in ["h1", "h2"] {
            try lab.lab("stop", host)
            try lab.lab("start", host)
        }
        for host in ["h1", "h2"] {
            #expect(
                lab.waitUntil { lab.log(host).components(separatedBy: "tunneld ready").count == readyCount + 1 },
                "\(lab.log(host))"
            )
        }
    }

    /// (vxlan → host-gw, the deployment's switch, is BackendSwitchTests' with etcd.)
    @Test func switchingFromHostGatewayToUDPToVXLANLeavesNothingOfTheOldModes() throws {
        try withLab(backend: #"{"Type":"host-gw"}"#) { lab in
            try lab.addHost(1, command: command(lab, host: 1))
            try lab.addHost(2, command: command(lab, host: 2))
            let lease1 = try LabLease(lab, host: 1), lease2 = try LabLease(lab, host: 2)
            #expect(
                try lab.waitUntil {
                    try lab.hostOutput(1, ["ip", "route", "show", lease2.subnet]).contains("via 198.18.0.2 dev eth0")
                }
            )

            // host-gw's routes would take the udp backend's traffic past the tunnel.
            try switchTo(lab, backend: #"{"Type":"udp"}"#, readyCount: 2)
            for (host, peer) in [(1, lease2), (2, lease1)] {
                let routes = try lab.hostOutput(host, ["ip", "route"])
                #expect(routes.contains("10.2.0.0/16 dev flannel0"), "\(routes)")
                #expect(!routes.contains(peer.subnet), "host-gw's route to \(peer.subnet) is left: \(routes)")
                #expect(
                    lab.log("h\(host)").contains("removed route \(peer.subnet) via 198.18.0."),
                    "\(lab.log("h\(host)"))"
                )
            }
            #expect(try lab.subnetEnv(1)["FLANNEL_MTU"] == "1472")
            let viaUDP = try lab.ping(from: 1, to: 2)
            #expect(viaUDP.succeeded, "\(viaUDP.output)")

            try switchTo(lab, backend: #"{"Type":"vxlan"}"#, readyCount: 3)
            for (host, peer) in [(1, lease2), (2, lease1)] {
                #expect(
                    try lab.waitUntil {
                        try lab.hostOutput(host, ["ip", "route", "show", peer.subnet]).contains(
                            "via \(peer.base) dev flannel.1 onlink"
                        )
                    },
                    "\(lab.log("h\(host)"))"
                )
                #expect(try !lab.hostOutput(host, ["ip", "-o", "link"]).contains("flannel0"))
            }
            #expect(try lab.subnetEnv(1)["FLANNEL_MTU"] == "1450")
            let viaVXLAN = try lab.ping(from: 1, to: 2)
            #expect(viaVXLAN.succeeded, "\(viaVXLAN.output)")
            let back = try lab.ping(from: 2, to: 1)
            #expect(back.succeeded, "\(back.output)")
        }
    }

    @Test func aBackendFlagThatDisagreesWithTheConfigStopsTheDaemonWithWhatToDo() throws {
        try withLab(backend: #"{"Type":"host-gw"}"#) { lab in
            let result = try lab.exec("u", command(lab, host: 1, extra: ["--backend", "vxlan"]), check: false)
            #expect(!result.succeeded)
            #expect(
                result.output.contains(#"--backend vxlan disagrees with the network config's Backend.Type "host-gw""#),
                "\(result.output)"
            )
        }
    }

    @Test func aBackendTunneldDoesNotHaveStopsTheDaemonNamingTheOnesItHas() throws {
        try withLab(backend: #"{"Type":"ipip"}"#) { lab in
            let result = try lab.exec("u", command(lab, host: 1), check: false)
            #expect(!result.succeeded)
            #expect(
                result.output.contains(
                    #"backend "ipip" is not supported by tunneld (udp, vxlan, host-gw and wireguard are)"#
                ),
                "\(result.output)"
            )
        }
    }
}
