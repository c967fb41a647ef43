import Foundation
import NetBase
import Testing

/// Where the hosts find etcd, as in the seed's flanneld command line.
let labEtcdEndpoint = "http://198.18.0.250:2379"
/// The seed's -etcd-prefix (with flanneld's trailing slash).
let seedEtcdPrefix = "/docker/network/"

/// tunneld on etcd the way flanneld runs: hosts and containers in network
/// namespaces, a real etcd in a namespace of its own on the underlay, config
/// and foreign leases written with etcdctl.
@Suite(
    .serialized,
    .enabled(if: canRunNamespaceTests, namespaceSkipReason),
    .enabled(if: etcdIsInstalled, etcdSkipReason)
)
struct EtcdBackendTests {
    /// A lab with etcd running; the daemons' and etcd's logs go to the test
    /// output when the body throws (always with TUNNELD_E2E_LOGS=1).
    func withEtcdLab(tls: Bool = false, _ body: (Lab) throws -> Void) throws {
        let lab = try Lab()
        defer { lab.destroy() }
        func printLogs() {
            for process in ["h1", "h2"] where !lab.log(process).isEmpty {
                print("---- log of \(process) ----\n\(lab.log(process))")
            }
            print(
                "---- end of etcd's log ----\n"
                    + lab.log("etcd").split(separator: "\n").suffix(30).joined(separator: "\n")
            )
        }
        do {
            try lab.addEtcd(tls: tls)
            try body(lab)
            if ProcessInfo.processInfo.environment["TUNNELD_E2E_LOGS"] == "1" { printLogs() }
        } catch {
            printLogs()
            throw error
        }
    }

    /// The seed's step: `etcdctl put /docker/network/config < flannel-config.json`.
    func putSeedConfig(_ lab: Lab) throws {
        let file = lab.directory.appendingPathComponent("flannel-config.json")
        try seedConfig.write(to: file, atomically: true, encoding: .utf8)
        try lab.etcdctl(["put", "/docker/network/config"], input: file.path)
    }

    /// tunneld started with the seed's flanneld flags (plus where the lab
    /// wants subnet.env).
    func flanneldCommand(
        _ lab: Lab,
        host n: Int,
        endpoints: String = labEtcdEndpoint,
        extra: [String] = []
    ) -> [String] {
        [
            tunneldBinary, "run", "-etcd-endpoints=\(endpoints)", "-iface=eth0", "-etcd-prefix=\(seedEtcdPrefix)",
            "-subnet-file=\(lab.subnetFile(n))",
        ] + extra
    }

    struct HostLease: Equatable {
        /// "10.2.72.0/24"
        var subnet: String
        /// "/docker/network/subnets/10.2.72.0-24"
        var key: String
    }

    /// Host N's lease, from its subnet.env.
    func lease(_ lab: Lab, host n: Int) throws -> HostLease {
        let value = try #require(try lab.subnetEnv(n)["FLANNEL_SUBNET"])  // 10.2.72.1/24
        let parts = value.split(separator: "/")
        let octets = parts[0].split(separator: ".")
        try #require(parts.count == 2 && octets.count == 4, "FLANNEL_SUBNET=\(value) is not A.B.C.D/N")
        let base = octets.dropLast().joined(separator: ".") + ".0"
        return HostLease(subnet: "\(base)/\(parts[1])", key: "/docker/network/subnets/\(base)-\(parts[1])")
    }

    /// A udp node's lease value, as flanneld writes it.
    func leaseJSON(_ publicIP: String) -> String { #"{"PublicIP":""# + publicIP + #"","PublicIPv6":null}"# }

    func occurrences(of text: String, in log: String) -> Int { log.components(separatedBy: text).count - 1 }

    /// CPU time (user + system) a process has used, from /proc.
    func cpuSeconds(_ pid: pid_t) throws -> Double {
        let stat = try String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)
        // Fields after the command name, which is in parentheses and may hold spaces.
        let fields = stat[stat.index(after: try #require(stat.lastIndex(of: ")")))...].split(separator: " ")
        // utime and stime are fields 14 and 15 of the line: 12th and 13th after the name.
        let ticks = try #require(Double(fields[11])) + (try #require(Double(fields[12])))
        return ticks / Double(sysconf(Int32(_SC_CLK_TCK)))
    }

    /// "N packets transmitted, M received" of ping's summary.
    func pingCounts(_ output: String) -> (transmitted: Int, received: Int)? {
        guard let range = output.range(of: #"(\d+) packets transmitted, (\d+) received"#, options: .regularExpression)
        else {
            return nil
        }
        let numbers = output[range].split(whereSeparator: { !$0.isNumber }).compactMap { Int($0) }
        return numbers.count == 2 ? (numbers[0], numbers[1]) : nil
    }

    /// One ping from container `from` to `address`.
    func pingOnce(_ lab: Lab, from: Int, to address: String) throws -> CommandResult {
        try lab.exec("c\(from)", ["ping", "-c", "1", "-W", "2", address], timeout: .seconds(10), check: false)
    }

    // MARK: - The seed's steps

    @Test func theSeedsStepsGiveEachHostALeaseInEtcdAndConnectTheirContainers() throws {
        try withEtcdLab { lab in
            // Host 1 starts before there is a config: it waits and names the
            // key to write.
            let adding = try spawn(
                ["bash", lab.script, "add-host", lab.name, lab.directory.path, "1", "--"]
                    + flanneldCommand(lab, host: 1),
                output: lab.directory.appendingPathComponent("add-h1.log").path
            )
            defer { adding.terminate() }
            #expect(lab.waitForLog("h1", containing: "etcdctl put /docker/network/config"), "\(lab.log("h1"))")
            try putSeedConfig(lab)
            let added = adding.wait(timeout: .seconds(60))
            try #require(added == 0, "add-host 1: \(lab.log("add-h1"))\n\(lab.log("h1"))")

            // Host 2 takes flanneld's flags from the environment.
            try lab.addHost(
                2,
                command: [
                    "env", "FLANNELD_ETCD_ENDPOINTS=\(labEtcdEndpoint)", "FLANNELD_IFACE=eth0",
                    "FLANNELD_ETCD_PREFIX=\(seedEtcdPrefix)",
                    "FLANNELD_SUBNET_FILE=\(lab.subnetFile(2))", tunneldBinary, "run",
                ]
            )

            // subnet.env is flannel's.
            let lease1 = try lease(lab, host: 1), lease2 = try lease(lab, host: 2)
            #expect(lease1 != lease2)
            let env1 = try String(contentsOfFile: lab.subnetFile(1), encoding: .utf8)
            let subnet1 = try #require(lab.subnetEnv(1)["FLANNEL_SUBNET"])
            #expect(
                env1
                    == "FLANNEL_NETWORK=10.2.0.0/16\nFLANNEL_SUBNET=\(subnet1)\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n"
            )
            for subnet in [lease1.subnet, lease2.subnet] {
                let third = try #require(Int(subnet.split(separator: ".")[2]))
                #expect((1...254).contains(third), "\(subnet) is outside SubnetMin…SubnetMax")
            }

            // The leases are flannel's keys and values, on 24-hour etcd leases.
            #expect(try lab.etcdValue(lease1.key) == leaseJSON("198.18.0.1"))
            #expect(try lab.etcdValue(lease2.key) == leaseJSON("198.18.0.2"))
            let keys = try lab.etcdctl(["get", "--prefix", "/docker/network/subnets/", "--keys-only"]).output
                .split(separator: "\n").map(String.init).sorted()
            #expect(keys == [lease1.key, lease2.key].sorted())
            let json = try lab.etcdctl(["get", lease1.key, "-w", "json"]).output
            let leaseRange = try #require(json.range(of: #""lease":\d+"#, options: .regularExpression))
            let leaseID = try #require(Int64(json[leaseRange].dropFirst(8)))
            let ttl = try lab.etcdctl(["lease", "timetolive", String(leaseID, radix: 16)]).output
            #expect(ttl.contains("granted with TTL(86400s)"), "\(ttl)")

            // Each daemon routes to the other.
            #expect(
                lab.waitForLog("h1", containing: "peer \(lease2.subnet) → peer 198.18.0.2:8285"),
                "\(lab.log("h1"))"
            )
            #expect(
                lab.waitForLog("h2", containing: "peer \(lease1.subnet) → peer 198.18.0.1:8285"),
                "\(lab.log("h2"))"
            )
            let there = try lab.ping(from: 1, to: 2)
            #expect(there.succeeded, "\(there.output)")
            let back = try lab.ping(from: 2, to: 1)
            #expect(back.succeeded, "\(back.output)")

            // The other commands read the same store with the same flags.
            let leases = try lab.exec(
                "h1",
                [
                    tunneldBinary, "leases", "-etcd-endpoints=\(labEtcdEndpoint)",
                    "-etcd-prefix=\(seedEtcdPrefix)",
                ]
            ).output
            #expect(leases.contains(lease1.subnet) && leases.contains("198.18.0.1"), "\(leases)")
            #expect(leases.contains(lease2.subnet) && leases.contains("198.18.0.2"), "\(leases)")
            let config = try lab.exec(
                "h2",
                [
                    tunneldBinary, "config", "get", "-etcd-endpoints=\(labEtcdEndpoint)",
                    "-etcd-prefix=\(seedEtcdPrefix)",
                ]
            ).output
            #expect(config == seedConfig + "\n")
        }
    }

    // MARK: - Leases written by others

    @Test func aLeaseWrittenWithEtcdctlJoinsEveryTableAndLeavesWithItsKey() throws {
        try withEtcdLab { lab in
            try putSeedConfig(lab)
            try lab.addHost(1, command: flanneldCommand(lab, host: 1))
            try lab.addHost(2, command: flanneldCommand(lab, host: 2))
            let lease1 = try lease(lab, host: 1), lease2 = try lease(lab, host: 2)
            #expect(
                lab.waitForLog("h1", containing: "peer \(lease2.subnet) → peer 198.18.0.2:8285"),
                "\(lab.log("h1"))"
            )
            #expect(
                lab.waitForLog("h2", containing: "peer \(lease1.subnet) → peer 198.18.0.1:8285"),
                "\(lab.log("h2"))"
            )

            // A host that is not tunneld (a flanneld, say) writes its lease.
            try lab.etcdctl(["put", "/docker/network/subnets/10.2.200.0-24", leaseJSON("198.18.0.9")])
            for host in ["h1", "h2"] {
                #expect(
                    lab.waitForLog(host, containing: "peer 10.2.200.0/24 → peer 198.18.0.9:8285"),
                    "\(lab.log(host))"
                )
            }
            // The data path sends its packets towards 198.18.0.9, which is not
            // there: no answer, and no "unreachable" from the tunnel.
            let toForeign = try pingOnce(lab, from: 1, to: "10.2.200.2")
            #expect(!toForeign.succeeded)
            #expect(!toForeign.output.contains("Unreachable"), "\(toForeign.output)")

            // Its key is deleted: every table forgets it, and the tunnel now
            // answers "network unreachable" for it.
            try lab.etcdctl(["del", "/docker/network/subnets/10.2.200.0-24"])
            for host in ["h1", "h2"] {
                #expect(lab.waitForLog(host, containing: "peer 10.2.200.0/24 is gone"), "\(lab.log(host))")
            }
            let gone = try pingOnce(lab, from: 1, to: "10.2.200.2")
            #expect(gone.output.contains("Unreachable"), "\(gone.output)")

            // Keys that are not leases are skipped; the hosts still reach each other.
            try lab.etcdctl(["put", "/docker/network/subnets/not-a-subnet", leaseJSON("198.18.0.8")])
            try lab.etcdctl(["put", "/docker/network/subnets/10.2.201.0-24", leaseJSON("198.18.0.7")])
            #expect(lab.waitForLog("h1", containing: "peer 10.2.201.0/24 → peer 198.18.0.7:8285"), "\(lab.log("h1"))")
            #expect(!lab.log("h1").contains("198.18.0.8"))
            let ping = try lab.ping(from: 2, to: 1)
            #expect(ping.succeeded, "\(ping.output)")
        }
    }

    // MARK: - Restarts

    /// One rule for what a lease is: keys that are malformed, wider or
    /// narrower than SubnetLen, outside the Network or conflicting with a
    /// host's key are ignored by every reader — the running hosts' tables,
    /// a new host's subnet choice, `tunneld leases` — and each is reported
    /// once. The range holds four subnets: two hosts, and two free ones that
    /// the stray keys would have blocked.
    @Test func strayLeaseKeysBesideRunningHostsNeitherBlockNorCoverAHostThatJoins() throws {
        try withEtcdLab { lab in
            let config =
                #"{"Network":"10.2.0.0/16","SubnetLen":24,"SubnetMin":"10.2.1.0","SubnetMax":"10.2.4.0","Backend":{"Type":"udp"}}"#
            let file = lab.directory.appendingPathComponent("flannel-config.json")
            try config.write(to: file, atomically: true, encoding: .utf8)
            try lab.etcdctl(["put", "/docker/network/config"], input: file.path)
            try lab.addHost(1, command: flanneldCommand(lab, host: 1))
            try lab.addHost(2, command: flanneldCommand(lab, host: 2))
            let lease1 = try lease(lab, host: 1), lease2 = try lease(lab, host: 2)
            #expect(
                lab.waitForLog("h1", containing: "peer \(lease2.subnet) → peer 198.18.0.2:8285"),
                "\(lab.log("h1"))"
            )
            #expect(
                lab.waitForLog("h2", containing: "peer \(lease1.subnet) → peer 198.18.0.1:8285"),
                "\(lab.log("h2"))"
            )
            let free = (1...4).map { "10.2.\($0).0" }.filter {
                "\($0)/24" != lease1.subnet && "\($0)/24" != lease2.subnet
            }
            try #require(free.count == 2, "\(free)")

            let prefix = "/docker/network/subnets/"
            let stray: [(key: String, publicIP: String, reason: String)] = [
                ("10.2.0.0-16", "198.18.0.66", "wider than SubnetLen"),  // covers every subnet
                ("\(free[0])-28", "198.18.0.67", "narrower than SubnetLen"),
                ("\(free[1].dropLast(1))128-25", "198.18.0.68", "narrower than SubnetLen"),
                ("10.9.1.0-24", "198.18.0.69", "outside the network"),
                (
                    "\(lease1.key.dropFirst(prefix.count))&fd00:10:244:1::-64", "198.18.0.70",
                    "names the same subnet as the lease"
                ),
                ("10.2.003.0-24", "198.18.0.71", "is not a lease key"),
                ("garbage", "198.18.0.72", "is not a lease key"),
            ]
            for key in stray {
                try lab.etcdctl(["put", prefix + key.key, leaseJSON(key.publicIP)])
            }
            // Written again: still one line each.
            try lab.etcdctl(["put", prefix + "10.2.0.0-16", leaseJSON("198.18.0.66")])
            for host in ["h1", "h2"] {
                #expect(lab.waitForLog(host, containing: "lease key garbage"), "\(lab.log(host))")
                for key in stray {
                    let lines = lab.log(host).split(separator: "\n").filter { $0.contains("lease key \(key.key) ") }
                    #expect(lines.count == 1 && lines[0].contains(key.reason), "\(host), \(key.key): \(lines)")
                }
            }

            // A host joins: it starts, takes a free subnet, and every host routes to every other.
            try lab.addHost(3, command: flanneldCommand(lab, host: 3))
            let lease3 = try lease(lab, host: 3)
            #expect(free.map { "\($0)/24" }.contains(lease3.subnet), "\(lease3.subnet) is not one of the free \(free)")
            #expect(
                lab.waitForLog("h1", containing: "peer \(lease3.subnet) → peer 198.18.0.3:8285"),
                "\(lab.log("h1"))"
            )
            #expect(
                lab.waitForLog("h2", containing: "peer \(lease3.subnet) → peer 198.18.0.3:8285"),
                "\(lab.log("h2"))"
            )
            #expect(
                lab.waitForLog("h3", containing: "peer \(lease1.subnet) → peer 198.18.0.1:8285"),
                "\(lab.log("h3"))"
            )
            #expect(
                lab.waitForLog("h3", containing: "peer \(lease2.subnet) → peer 198.18.0.2:8285"),
                "\(lab.log("h3"))"
            )
            for (from, to) in [(3, 1), (3, 2), (1, 3), (2, 1)] {
                let ping = try lab.ping(from: from, to: to)
                #expect(ping.succeeded, "c\(from) → c\(to): \(ping.output)")
            }
            // No stray key reached a table, and the joining host reports each once too.
            for host in ["h1", "h2", "h3"] {
                let log = lab.log(host)
                for key in stray {
                    #expect(
                        !log.contains("peer 198.18.0.\(key.publicIP.split(separator: ".").last!):8285"),
                        "\(host): \(log)"
                    )
                }
            }
            for key in stray {
                #expect(
                    lab.log("h3").split(separator: "\n").filter { $0.contains("lease key \(key.key) ") }.count == 1,
                    "h3, \(key.key): \(lab.log("h3"))"
                )
            }

            // `tunneld leases` lists the three hosts and names every ignored key.
            let listing = try lab.exec(
                "h1",
                [
                    tunneldBinary, "leases", "-etcd-endpoints=\(labEtcdEndpoint)",
                    "-etcd-prefix=\(seedEtcdPrefix)",
                ]
            ).output
            let rows = listing.split(separator: "\n").filter { $0.hasPrefix("10.") }
            #expect(rows.count == 3, "\(listing)")
            for key in stray {
                #expect(listing.contains("ignored: lease key \(key.key) "), "\(key.key): \(listing)")
            }
        }
    }

    /// A dual-stack lease written by a flanneld host (etcdctl, flanneld's
    /// key and value): `tunneld leases` lists both families. (tunneld hosts
    /// on dual-stack networks: DualStackBackendTests.)
    @Test func aFlanneldDualStackLeaseIsListedWithBothFamilies() throws {
        try withEtcdLab { lab in
            let config =
                #"{"Network":"10.2.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:2::/48","Backend":{"Type":"udp"}}"#
            let file = lab.directory.appendingPathComponent("dual.json")
            try config.write(to: file, atomically: true, encoding: .utf8)
            try lab.etcdctl(["put", "/docker/network/config"], input: file.path)
            try lab.etcdctl([
                "put", "/docker/network/subnets/10.2.72.0-24&fd00:10:2:48::-64",
                #"{"PublicIP":"198.18.0.72","PublicIPv6":"2001:db8::72","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:01"},"BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:02"}}"#,
            ])
            let placeholder =
                "printf 'FLANNEL_NETWORK=10.2.0.0/16\\nFLANNEL_SUBNET=10.2.250.1/24\\nFLANNEL_MTU=1450\\nFLANNEL_IPMASQ=false\\n' > \(lab.subnetFile(1)); exec sleep 600"
            try lab.addHost(1, command: ["bash", "-c", placeholder])
            let listing = try lab.exec(
                "h1",
                [
                    tunneldBinary, "leases", "-etcd-endpoints=\(labEtcdEndpoint)",
                    "-etcd-prefix=\(seedEtcdPrefix)",
                ]
            ).output
            let header = try #require(listing.split(separator: "\n").first)
            #expect(
                header.hasPrefix("SUBNET") && header.contains("IPV6-SUBNET") && header.contains("PUBLIC-IPV6"),
                "\(listing)"
            )
            let row = try #require(listing.split(separator: "\n").first { $0.hasPrefix("10.2.72.0/24") }, "\(listing)")
            let columns = row.split(separator: " ")
            #expect(
                Array(columns.prefix(5)) == [
                    "10.2.72.0/24", "198.18.0.72", "fd00:10:2:48::/64", "2001:db8::72", "vxlan",
                ],
                "\(row)"
            )
            #expect(!listing.contains("ignored"), "\(listing)")
        }
    }

    @Test func aHostKeepsItsSubnetAcrossARestartAndTakesBackItsDeletedLease() throws {
        try withEtcdLab { lab in
            try putSeedConfig(lab)
            try lab.addHost(1, command: flanneldCommand(lab, host: 1))
            try lab.addHost(2, command: flanneldCommand(lab, host: 2))
            let before = try lease(lab, host: 1)
            #expect(
                lab.waitForLog("h2", containing: "peer \(before.subnet) → peer 198.18.0.1:8285"),
                "\(lab.log("h2"))"
            )

            // Restarted without its subnet file, it finds its lease in etcd by
            // its public IP.
            try lab.lab("stop", "h1")
            #expect(lab.log("h1").contains("lease \(before.subnet) kept for a restart"), "\(lab.log("h1"))")
            #expect(try lab.etcdValue(before.key) == leaseJSON("198.18.0.1"))
            try FileManager.default.removeItem(atPath: lab.subnetFile(1))
            try lab.lab("start", "h1")
            #expect(lab.waitForFile(lab.subnetFile(1)), "\(lab.log("h1"))")
            #expect(try lease(lab, host: 1) == before)
            #expect(lab.log("h1").contains("reusing lease"), "\(lab.log("h1"))")
            let afterRestart = try lab.ping(from: 2, to: 1)
            #expect(afterRestart.succeeded, "\(afterRestart.output)")
            #expect(!lab.log("h2").contains("peer \(before.subnet) is gone"), "\(lab.log("h2"))")

            // Its lease deleted behind its back, it takes the same subnet again
            // and says so; the other host sees it leave and come back.
            try lab.etcdctl(["del", before.key])
            #expect(lab.waitForLog("h1", containing: "lease \(before.subnet) acquired again"), "\(lab.log("h1"))")
            #expect(lab.log("h1").contains("our lease \(before.subnet) was deleted"))
            #expect(try lab.waitUntil { try lab.etcdValue(before.key) == leaseJSON("198.18.0.1") })
            #expect(try lease(lab, host: 1) == before)
            #expect(lab.waitForLog("h2", containing: "peer \(before.subnet) is gone"), "\(lab.log("h2"))")
            #expect(
                lab.waitUntil {
                    occurrences(of: "peer \(before.subnet) → peer 198.18.0.1:8285", in: lab.log("h2")) >= 2
                },
                "\(lab.log("h2"))"
            )
            let afterDelete = try lab.ping(from: 2, to: 1)
            #expect(afterDelete.succeeded, "\(afterDelete.output)")
        }
    }

    @Test func anEtcdRestartDuringTrafficLosesNoPingAndChangesNoSubnet() throws {
        try withEtcdLab { lab in
            try putSeedConfig(lab)
            // Short leases, renewed every few seconds: the outage hits renewals.
            let ttl = 8
            let short = ["--subnet-lease-ttl", "\(ttl)"]
            try lab.addHost(1, command: flanneldCommand(lab, host: 1, extra: short))
            try lab.addHost(2, command: flanneldCommand(lab, host: 2, extra: short))
            let lease1 = try lease(lab, host: 1), lease2 = try lease(lab, host: 2)
            #expect(
                lab.waitForLog("h1", containing: "peer \(lease2.subnet) → peer 198.18.0.2:8285"),
                "\(lab.log("h1"))"
            )
            #expect(
                lab.waitForLog("h2", containing: "peer \(lease1.subnet) → peer 198.18.0.1:8285"),
                "\(lab.log("h2"))"
            )
            let warmUp = try lab.ping(from: 1, to: 2)
            try #require(warmUp.succeeded, "\(warmUp.output)")

            // 60 pings, 0.2 s apart, across the restart.
            let pingLog = lab.directory.appendingPathComponent("ping-across-restart.log").path
            let ping = try spawn(
                [
                    "ip", "netns", "exec", lab.namespace("c1"), "ping", "-c", "60", "-i", "0.2",
                    "-W", "1", try lab.containerIP(2),
                ],
                output: pingLog
            )
            defer { ping.terminate() }
            usleep(1_000_000)
            try lab.restartEtcd(downtime: .seconds(3))
            let back = ContinuousClock.now
            let renewals = (
                occurrences(of: "renewed lease", in: lab.log("h1")),
                occurrences(of: "renewed lease", in: lab.log("h2"))
            )

            // A change made as soon as etcd is back reaches both daemons
            // through their resumed watches.
            try lab.etcdctl(["put", "/docker/network/subnets/10.2.201.0-24", leaseJSON("198.18.0.9")])
            for host in ["h1", "h2"] {
                #expect(
                    lab.waitForLog(host, containing: "peer 10.2.201.0/24 → peer 198.18.0.9:8285"),
                    "\(lab.log(host))"
                )
            }

            let finished = ping.wait(timeout: .seconds(40))
            let output = (try? String(contentsOfFile: pingLog, encoding: .utf8)) ?? ""
            #expect(finished != nil, "ping did not finish: \(output)")
            let counts = try #require(pingCounts(output), "\(output)")
            #expect(counts.transmitted == 60 && counts.received == 60, "\(output)")

            // Renewals go on after the restart, and a full TTL later both
            // leases are still there, unchanged.
            #expect(
                lab.waitUntil { occurrences(of: "renewed lease", in: lab.log("h1")) > renewals.0 },
                "\(lab.log("h1"))"
            )
            #expect(
                lab.waitUntil { occurrences(of: "renewed lease", in: lab.log("h2")) > renewals.1 },
                "\(lab.log("h2"))"
            )
            let wait = back + .seconds(ttl + 1) - ContinuousClock.now
            if wait > .zero {
                Thread.sleep(
                    forTimeInterval: Double(wait.components.seconds) + Double(wait.components.attoseconds) / 1e18
                )
            }
            #expect(try lab.etcdValue(lease1.key) == leaseJSON("198.18.0.1"))
            #expect(try lab.etcdValue(lease2.key) == leaseJSON("198.18.0.2"))
            #expect(try lease(lab, host: 1) == lease1)
            #expect(try lease(lab, host: 2) == lease2)
            for host in ["h1", "h2"] {
                let log = lab.log(host)
                #expect(!log.contains("was deleted from"), "a lease was lost during the outage:\n\(log)")
                #expect(!log.contains("moved to"), "\(log)")
                #expect(!log.contains("is gone"), "a peer was dropped during the outage:\n\(log)")
            }
            let after = try lab.ping(from: 2, to: 1)
            #expect(after.succeeded, "\(after.output)")
        }
    }

    // MARK: - Compaction

    @Test func aWatchThatFallsBehindACompactionListsAgainOnceAndCatchesUp() throws {
        try withEtcdLab { lab in
            try putSeedConfig(lab)
            try lab.addHost(1, command: flanneldCommand(lab, host: 1))
            try lab.addHost(2, command: flanneldCommand(lab, host: 2))
            let lease1 = try lease(lab, host: 1), lease2 = try lease(lab, host: 2)
            // Two foreign leases the daemons know before the gap.
            try lab.etcdctl(["put", "/docker/network/subnets/10.2.200.0-24", leaseJSON("198.18.0.9")])
            try lab.etcdctl(["put", "/docker/network/subnets/10.2.202.0-24", leaseJSON("198.18.0.11")])
            for host in ["h1", "h2"] {
                #expect(
                    lab.waitForLog(host, containing: "peer 10.2.202.0/24 → peer 198.18.0.11:8285"),
                    "\(lab.log(host))"
                )
            }

            // Host 1's daemon is frozen while etcd restarts (breaking its
            // watch connection) and the leases change; then the changes are
            // compacted away. Thawed, its watch must resume from a revision
            // etcd no longer has.
            try lab.signal("h1", SIGSTOP)
            defer { try? lab.signal("h1", SIGCONT) }
            try lab.restartEtcd()
            try lab.etcdctl(["del", "/docker/network/subnets/10.2.200.0-24"])  // removed
            try lab.etcdctl(["put", "/docker/network/subnets/10.2.201.0-24", leaseJSON("198.18.0.10")])  // added
            try lab.etcdctl(["put", "/docker/network/subnets/10.2.202.0-24", leaseJSON("198.18.0.12")])  // moved
            for n in 0..<5 { try lab.etcdctl(["put", "/docker/network/unrelated", "\(n)"]) }
            let revision = try lab.etcdRevision()
            try lab.etcdctl(["compact", "\(revision)"])
            try lab.signal("h1", SIGCONT)

            #expect(lab.waitForLog("h1", containing: "re-list #1"), "\(lab.log("h1"))")
            for host in ["h1", "h2"] {
                #expect(lab.waitForLog(host, containing: "peer 10.2.200.0/24 is gone"), "\(lab.log(host))")
                #expect(
                    lab.waitForLog(host, containing: "peer 10.2.201.0/24 → peer 198.18.0.10:8285"),
                    "\(lab.log(host))"
                )
                #expect(
                    lab.waitForLog(host, containing: "peer 10.2.202.0/24 → peer 198.18.0.12:8285"),
                    "\(lab.log(host))"
                )
            }

            // No busy loop: over the next 3 s the daemon stays idle and lists
            // no more than twice in all.
            let pid = try lab.pid("h1")
            let cpuBefore = try cpuSeconds(pid)
            usleep(3_000_000)
            let cpu = try cpuSeconds(pid) - cpuBefore
            #expect(cpu < 0.5, "host 1's daemon used \(cpu) s of CPU in 3 s after the compaction")
            for host in ["h1", "h2"] {
                let relists = occurrences(of: "re-list #", in: lab.log(host))
                #expect(relists <= 2, "\(host) listed \(relists) times:\n\(lab.log(host))")
            }

            // The tables are right: the peers are reached, the removed lease
            // is unreachable, and a change after the recovery still arrives.
            let ping = try lab.ping(from: 1, to: 2)
            #expect(ping.succeeded, "\(ping.output)")
            let back = try lab.ping(from: 2, to: 1)
            #expect(back.succeeded, "\(back.output)")
            let gone = try pingOnce(lab, from: 1, to: "10.2.200.2")
            #expect(gone.output.contains("Unreachable"), "\(gone.output)")
            try lab.etcdctl(["put", "/docker/network/subnets/10.2.203.0-24", leaseJSON("198.18.0.13")])
            #expect(lab.waitForLog("h1", containing: "peer 10.2.203.0/24 → peer 198.18.0.13:8285"), "\(lab.log("h1"))")
            #expect(try lease(lab, host: 1) == lease1)
            #expect(try lease(lab, host: 2) == lease2)
        }
    }

    // MARK: - TLS, auth, failover

    @Test func mutualTLSAndAPasswordLoginWorkPastADeadFirstEndpoint() throws {
        try withEtcdLab(tls: true) { lab in
            let certificates = try #require(lab.etcd?.certificates)
            try lab.enableEtcdAuth(
                rootPassword: "root-pw",
                user: "tunneld",
                password: "s3cret",
                prefix: seedEtcdPrefix
            )
            try putSeedConfig(lab)
            let https = "https://198.18.0.250:2379"
            let files = [
                "-etcd-cafile=\(certificates.caFile)", "-etcd-certfile=\(certificates.clientCertFile)",
                "-etcd-keyfile=\(certificates.clientKeyFile)",
            ]
            let login = ["-etcd-username=tunneld", "-etcd-password=s3cret"]
            func configGet(_ flags: [String]) throws -> CommandResult {
                try lab.exec(
                    "etcd",
                    [
                        tunneldBinary, "config", "get", "-etcd-endpoints=\(https)",
                        "-etcd-prefix=\(seedEtcdPrefix)",
                    ] + flags,
                    timeout: .seconds(40),
                    check: false
                )
            }

            // Each credential is needed.
            let good = try configGet(files + login)
            #expect(good.succeeded && good.output == seedConfig + "\n", "\(good.output)")
            let wrongPassword = try configGet(files + ["-etcd-username=tunneld", "-etcd-password=wrong"])
            #expect(!wrongPassword.succeeded, "\(wrongPassword.output)")
            #expect(wrongPassword.output.contains("authentication failed"), "\(wrongPassword.output)")
            // The certificate alone names no etcd user (its CN is none).
            let noLogin = try configGet(files)
            #expect(!noLogin.succeeded, "\(noLogin.output)")
            #expect(noLogin.output.contains("permission denied"), "\(noLogin.output)")
            let noCertificate = try configGet(["-etcd-cafile=\(certificates.caFile)"] + login)
            #expect(!noCertificate.succeeded, "\(noCertificate.output)")
            #expect(noCertificate.output.lowercased().contains("certificate"), "\(noCertificate.output)")

            // Host 1 lists a dead endpoint first; host 2 takes everything
            // from the environment.
            let started = ContinuousClock.now
            try lab.addHost(
                1,
                command: [
                    tunneldBinary, "run", "-etcd-endpoints=https://198.18.0.251:2379,\(https)",
                    "-iface=eth0", "-etcd-prefix=\(seedEtcdPrefix)",
                    "-subnet-file=\(lab.subnetFile(1))",
                ] + files + login
            )
            let startUp = ContinuousClock.now - started
            try lab.addHost(
                2,
                command: [
                    "env", "FLANNELD_ETCD_ENDPOINTS=\(https)", "FLANNELD_IFACE=eth0",
                    "FLANNELD_ETCD_PREFIX=\(seedEtcdPrefix)",
                    "FLANNELD_ETCD_CAFILE=\(certificates.caFile)",
                    "FLANNELD_ETCD_CERTFILE=\(certificates.clientCertFile)",
                    "FLANNELD_ETCD_KEYFILE=\(certificates.clientKeyFile)",
                    "FLANNELD_ETCD_USERNAME=tunneld", "FLANNELD_ETCD_PASSWORD=s3cret",
                    "FLANNELD_SUBNET_FILE=\(lab.subnetFile(2))", tunneldBinary, "run",
                ]
            )
            print("host 1 (dead first endpoint, TLS, login) was up in \(startUp)")

            let lease1 = try lease(lab, host: 1), lease2 = try lease(lab, host: 2)
            #expect(try lab.etcdValue(lease1.key) == leaseJSON("198.18.0.1"))
            #expect(try lab.etcdValue(lease2.key) == leaseJSON("198.18.0.2"))
            #expect(
                lab.waitForLog("h1", containing: "peer \(lease2.subnet) → peer 198.18.0.2:8285"),
                "\(lab.log("h1"))"
            )
            #expect(
                lab.waitForLog("h2", containing: "peer \(lease1.subnet) → peer 198.18.0.1:8285"),
                "\(lab.log("h2"))"
            )
            let there = try lab.ping(from: 1, to: 2)
            #expect(there.succeeded, "\(there.output)")
            let back = try lab.ping(from: 2, to: 1)
            #expect(back.succeeded, "\(back.output)")

            // Over TLS too, a lease written by someone else arrives.
            try lab.etcdctl(["put", "/docker/network/subnets/10.2.200.0-24", leaseJSON("198.18.0.9")])
            for host in ["h1", "h2"] {
                #expect(
                    lab.waitForLog(host, containing: "peer 10.2.200.0/24 → peer 198.18.0.9:8285"),
                    "\(lab.log(host))"
                )
            }
        }
    }
}
