import Foundation
import NetBase
import Testing

/// Faults, with recovery measured: each test breaks one thing under a
/// steady ping between containers (one echo every 0.1 s), states what was
/// lost — nothing beyond the outage window — and prints the time to recover
/// as a line starting with "FAULT", the figures docs/RELIABILITY.md quotes.
///
/// The hosts use etcd (one member, or a cluster of three on the underlay)
/// with short leases (`--subnet-lease-ttl`), renewed at half-life, so that a
/// renewal falls inside each outage.
@Suite(
    .serialized,
    .enabled(if: canRunNamespaceTests, namespaceSkipReason),
    .enabled(if: etcdIsInstalled, etcdSkipReason)
)
struct FaultTests {
    static let subnetsPrefix = "/docker/network/subnets/"

    /// A lab with etcd (`members` > 1: a cluster); logs go to the test output
    /// when the body throws (always with TUNNELD_E2E_LOGS=1).
    func withFaultLab(members: Int = 1, config: String = seedConfig, _ body: (Lab) throws -> Void) throws {
        let lab = try Lab()
        defer { lab.destroy() }
        func printLogs() {
            lab.printLogs(["h1", "h2", "h3", "h4"])
            for member in lab.etcd?.members ?? [] {
                print(
                    "---- end of \(member.name)'s log ----\n"
                        + lab.log(member.name).split(separator: "\n").suffix(15).joined(separator: "\n")
                )
            }
        }
        do {
            if members == 1 { try lab.addEtcd() } else { try lab.addEtcdCluster(size: members) }
            let file = lab.directory.appendingPathComponent("flannel-config.json")
            try config.write(to: file, atomically: true, encoding: .utf8)
            try lab.etcdctl(["put", "/docker/network/config"], input: file.path)
            try body(lab)
            if ProcessInfo.processInfo.environment["TUNNELD_E2E_LOGS"] == "1" { printLogs() }
        } catch {
            printLogs()
            throw error
        }
    }

    /// tunneld with flanneld's flags, every etcd endpoint of the lab, and
    /// leases of `ttl` seconds; its control socket in the lab's directory
    /// (its own, unless `controlSocket` names one to share).
    func command(_ lab: Lab, host n: Int, ttl: Int, controlSocket: String? = nil, endpoints: String? = nil) -> [String]
    {
        [
            tunneldBinary, "run", "-etcd-endpoints=\(endpoints ?? lab.etcd?.url ?? labEtcdEndpoint)", "-iface=eth0",
            "-etcd-prefix=/docker/network/", "-subnet-file=\(lab.subnetFile(n))", "--subnet-lease-ttl", "\(ttl)",
            "--control-socket", controlSocket ?? lab.directory.appendingPathComponent("h\(n).sock").path,
        ]
    }

    /// Adds hosts `numbers`, waits until each has every other one as a peer,
    /// and returns their leases.
    func addHosts(_ lab: Lab, _ numbers: ClosedRange<Int>, ttl: Int) throws -> [Int: LabLease] {
        for n in numbers { try lab.addHost(n, command: command(lab, host: n, ttl: ttl)) }
        var leases: [Int: LabLease] = [:]
        for n in numbers { leases[n] = try LabLease(lab, host: n) }
        for n in numbers {
            for m in numbers where m != n {
                let line = "peer \(leases[m]!.subnet) → peer 198.18.0.\(m):8285"
                try #require(lab.waitForLog("h\(n)", containing: line), "h\(n) never saw h\(m): \(lab.log("h\(n)"))")
            }
        }
        return leases
    }

    func key(_ lease: LabLease) -> String { Self.subnetsPrefix + lease.key }
    func leaseJSON(_ publicIP: String) -> String { #"{"PublicIP":""# + publicIP + #"","PublicIPv6":null}"# }
    func occurrences(of text: String, in log: String) -> Int { log.components(separatedBy: text).count - 1 }
    func renewals(_ lab: Lab, _ host: String) -> Int { occurrences(of: "renewed lease", in: lab.log(host)) }
    func renewalFailures(_ lab: Lab, _ host: String) -> Int {
        lab.log(host).split(separator: "\n").filter { $0.contains("renewing lease") && $0.contains("failed") }.count
    }

    /// Whether a process the lab started is alive (not gone, not a zombie).
    func isRunning(_ lab: Lab, _ process: String) -> Bool {
        guard let pid = try? lab.pid(process),
            let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
            let close = stat.range(of: ")", options: .backwards)
        else { return false }
        return !stat[close.upperBound...].hasPrefix(" Z")
    }

    /// How long until `condition` holds (polled every 50 ms), or nil if it
    /// does not within `timeout`.
    func timeUntil(timeout: Duration = .seconds(30), _ condition: () throws -> Bool) rethrows -> Duration? {
        let start = ContinuousClock.now
        while ContinuousClock.now - start < timeout {
            if try condition() { return ContinuousClock.now - start }
            usleep(50_000)
        }
        return try condition() ? ContinuousClock.now - start : nil
    }

    func sleep(_ duration: Duration) {
        Thread.sleep(forTimeInterval: duration.inSeconds)
    }

    /// The leases in etcd, by key, as (PublicIP) text.
    func etcdLeases(_ lab: Lab, endpoints: String? = nil) throws -> [String: String] {
        let lines = try lab.etcdctl(["get", "--prefix", Self.subnetsPrefix], endpoints: endpoints).output
            .split(separator: "\n").map(String.init)
        var result: [String: String] = [:]
        var index = 0
        while index + 1 < lines.count {
            let value = lines[index + 1]
            if let range = value.range(of: #"(?<="PublicIP":")[0-9.]+"#, options: .regularExpression) {
                result[lines[index]] = String(value[range])
            }
            index += 2
        }
        return result
    }

    // MARK: - a. kill -9 and restart

    @Test func aDaemonKilledWithSIGKILLAndRestartedKeepsItsSubnetAndTrafficResumes() throws {
        try withFaultLab { lab in
            let leases = try addHosts(lab, 1...2, ttl: 20)
            let warmUp = try lab.ping(from: 2, to: 1)
            try #require(warmUp.succeeded, "\(warmUp.output)")
            let devicesBefore = try lab.hostOutput(1, ["ip", "-o", "link", "show"])

            let ping = try SteadyPing(lab, from: 2, to: 1, name: "kill9")
            defer { _ = ping.finish() }
            sleep(.seconds(1))
            try lab.signal("h1", SIGKILL)
            let killed = ContinuousClock.now
            try #require(timeUntil(timeout: .seconds(5)) { !isRunning(lab, "h1") } != nil, "h1 outlived SIGKILL")
            try lab.lab("start", "h1")
            let ready = timeUntil { occurrences(of: "tunneld ready", in: lab.log("h1")) == 2 }
            #expect(ready != nil, "the restarted daemon never got ready: \(lab.log("h1"))")
            let readyAfter = ContinuousClock.now - killed
            // A second of replies after the restart, then the ping stops.
            let repliesAtReady = ping.repliesSoFar()
            #expect(
                timeUntil(timeout: .seconds(20)) { ping.repliesSoFar() >= repliesAtReady + 10 } != nil,
                "traffic did not resume: \(ping.output)"
            )
            let result = ping.finish()

            // Lost: only the echoes while no daemon ran on h1, in one window.
            #expect(result.windows.count == 1, "losses outside one outage window: \(result.windows)\n\(result.output)")
            #expect(result.lostOutsideWindows == 0)
            // Same subnet, found in etcd by the subnet file; the peer never dropped it.
            #expect(try LabLease(lab, host: 1).subnet == leases[1]!.subnet)
            #expect(lab.log("h1").contains("reusing lease"), "\(lab.log("h1"))")
            #expect(try etcdLeases(lab)[key(leases[1]!)] == "198.18.0.1")
            #expect(!lab.log("h2").contains("is gone"), "\(lab.log("h2"))")
            // Nothing left over: the same devices as before, one flannel0, one network route.
            let devicesAfter = try lab.hostOutput(1, ["ip", "-o", "link", "show"])
            #expect(names(devicesAfter) == names(devicesBefore), "before: \(devicesBefore)\nafter: \(devicesAfter)")
            let routes = try lab.hostOutput(1, ["ip", "route", "show", "10.2.0.0/16"])
            #expect(occurrences(of: "dev flannel0", in: routes) == 1, "\(routes)")
            // The second start (between the two "ready" lines) went without an error.
            let restartLog = lab.log("h1").components(separatedBy: "tunneld ready").dropFirst().first ?? ""
            #expect(!restartLog.contains("start-up failed") && !restartLog.contains(" error "), "\(lab.log("h1"))")

            print(
                "FAULT kill -9 + restart of tunneld: \(result.lost) of \(result.transmitted) echoes lost, all in one window of \(formatSeconds(result.longestGap)); restarted daemon ready \(formatSeconds(readyAfter)) after the kill"
            )
        }
    }

    /// Interface names of `ip -o link show` output, sorted.
    func names(_ links: String) -> [String] {
        // "5: tun0: <POINTOPOINT,…" or "2: eth0@if7: <BROADCAST,…"
        links.split(separator: "\n").compactMap { line in
            let fields = line.split(separator: " ")
            guard fields.count > 1 else { return nil }
            return String(fields[1].dropLast().split(separator: "@")[0])
        }.sorted()
    }

    // MARK: - b. etcd down longer than a renewal interval

    @Test func etcdDownLongerThanARenewalIntervalLosesNoPacketAndNoSubnet() throws {
        try withFaultLab { lab in
            // Leases of 20 s, renewed every 10 s; etcd is down for 15 s.
            let leases = try addHosts(lab, 1...2, ttl: 20)
            let warmUp = try lab.ping(from: 1, to: 2)
            try #require(warmUp.succeeded, "\(warmUp.output)")

            let ping = try SteadyPing(lab, from: 1, to: 2, name: "etcd-down")
            defer { _ = ping.finish() }
            sleep(.seconds(1))
            try lab.lab("stop", "etcd")
            let renewed = (renewals(lab, "h1"), renewals(lab, "h2"))
            sleep(.seconds(15))
            let restarted = ContinuousClock.now
            try lab.lab("start", "etcd")
            try lab.waitForEtcd()
            let healthy = ContinuousClock.now - restarted

            // Each daemon tried to renew while etcd was down, said so, and
            // renews once it is back.
            for host in ["h1", "h2"] {
                #expect(renewalFailures(lab, host) > 0, "no failed renewal logged: \(lab.log(host))")
            }
            let renewedAgain = timeUntil(timeout: .seconds(30)) {
                renewals(lab, "h1") > renewed.0 && renewals(lab, "h2") > renewed.1
            }
            #expect(renewedAgain != nil, "\(lab.log("h1"))\n\(lab.log("h2"))")
            let renewedAfter = ContinuousClock.now - restarted
            // The watches resumed: a lease written now reaches both.
            try lab.etcdctl(["put", Self.subnetsPrefix + "10.2.201.0-24", leaseJSON("198.18.0.9")])
            let seen = timeUntil {
                ["h1", "h2"].allSatisfy { lab.log($0).contains("peer 10.2.201.0/24 → peer 198.18.0.9:8285") }
            }
            #expect(seen != nil)
            let watchAfter = ContinuousClock.now - restarted
            let result = ping.finish()

            #expect(result.lost == 0, "forwarding stopped while etcd was down:\n\(result.output)")
            for n in 1...2 {
                #expect(try LabLease(lab, host: n).subnet == leases[n]!.subnet)
                let log = lab.log("h\(n)")
                #expect(
                    !log.contains("was deleted from") && !log.contains("moved to") && !log.contains("is gone"),
                    "\(log)"
                )
                #expect(isRunning(lab, "h\(n)"))
            }
            let stored = try etcdLeases(lab)
            #expect(stored[key(leases[1]!)] == "198.18.0.1" && stored[key(leases[2]!)] == "198.18.0.2", "\(stored)")

            print(
                "FAULT etcd down 15 s (leases of 20 s): \(result.lost) of \(result.transmitted) echoes lost, no subnet changed; etcd healthy \(formatSeconds(healthy)) after its restart, both leases renewed \(formatSeconds(renewedAfter)) after it, a new lease seen by both \(formatSeconds(watchAfter)) after it"
            )
        }
    }

    // MARK: - c. a 3-member cluster loses its leader, then a second member

    @Test func aThreeMemberClusterLosingItsLeaderThenQuorumLosesNoPacketAndAllocatesNoSubnetTwice() throws {
        try withFaultLab(members: 3) { lab in
            let ttl = 10
            let members = try #require(lab.etcd?.members)
            func urls(_ members: [LabEtcdMember]) -> String { members.map(\.clientURL).joined(separator: ",") }
            let leases = try addHosts(lab, 1...2, ttl: ttl)
            let warmUp = try lab.ping(from: 1, to: 2)
            try #require(warmUp.succeeded, "\(warmUp.output)")
            let ping = try SteadyPing(lab, from: 1, to: 2, name: "cluster")
            defer { _ = ping.finish() }
            sleep(.seconds(1))

            // The leader crashes (SIGKILL: a graceful stop would hand over
            // the leadership first): the other two elect one and carry on.
            let leader = try lab.etcdLeader()
            let survivors = members.filter { $0 != leader }
            var renewed = (renewals(lab, "h1"), renewals(lab, "h2"))
            try lab.signal(leader.name, SIGKILL)
            let leaderStopped = ContinuousClock.now
            try lab.waitForEtcd(endpoints: urls(survivors), timeout: .seconds(20))
            let elected = ContinuousClock.now - leaderStopped
            try lab.etcdctl(
                ["put", Self.subnetsPrefix + "10.2.200.0-24", leaseJSON("198.18.0.9")],
                endpoints: urls(survivors)
            )
            let seenWithoutLeader = timeUntil {
                ["h1", "h2"].allSatisfy { lab.log($0).contains("peer 10.2.200.0/24 → peer 198.18.0.9:8285") }
            }
            #expect(seenWithoutLeader != nil, "the watch did not go on through the survivors")
            let watchAfterLeader = ContinuousClock.now - leaderStopped
            #expect(
                timeUntil(timeout: .seconds(ttl + 10)) {
                    renewals(lab, "h1") > renewed.0 && renewals(lab, "h2") > renewed.1
                } != nil,
                "no renewal through the survivors:\n\(lab.log("h1"))\n\(lab.log("h2"))"
            )
            let renewalAfterLeader = ContinuousClock.now - leaderStopped

            // The new leader crashes too: no quorum. Until both daemons
            // have seen a renewal fail (the survivor cannot answer; a
            // request gives up after 10 s) and at least a renewal interval:
            // forwarding goes on, nobody exits.
            let second = try lab.etcdLeader(among: survivors)
            let remaining = survivors.filter { $0 != second }
            let failures = (renewalFailures(lab, "h1"), renewalFailures(lab, "h2"))
            try lab.signal(second.name, SIGKILL)
            let quorumLost = ContinuousClock.now
            let failed = timeUntil(timeout: .seconds(ttl + 20)) {
                renewalFailures(lab, "h1") > failures.0 && renewalFailures(lab, "h2") > failures.1
            }
            #expect(failed != nil, "no failed renewal logged without quorum:\n\(lab.log("h1"))\n\(lab.log("h2"))")
            let rest = quorumLost + .seconds(ttl / 2 + 1) - ContinuousClock.now
            if rest > .zero { sleep(rest) }
            let outage = ContinuousClock.now - quorumLost
            #expect(isRunning(lab, "h1") && isRunning(lab, "h2"))

            // Quorum returns: renewals and the watch go on.
            renewed = (renewals(lab, "h1"), renewals(lab, "h2"))
            let restarted = ContinuousClock.now
            try lab.lab("start", second.name)
            try lab.waitForEtcd(endpoints: urls(remaining + [second]), timeout: .seconds(30))
            let quorumBack = ContinuousClock.now - restarted
            #expect(
                timeUntil(timeout: .seconds(30)) {
                    renewals(lab, "h1") > renewed.0 && renewals(lab, "h2") > renewed.1
                } != nil,
                "no renewal after quorum returned:\n\(lab.log("h1"))\n\(lab.log("h2"))"
            )
            let renewalAfterQuorum = ContinuousClock.now - restarted
            // A host joining now gets a subnet of its own, and the others see it.
            try lab.addHost(3, command: command(lab, host: 3, ttl: ttl))
            let lease3 = try LabLease(lab, host: 3)
            let joined = timeUntil {
                ["h1", "h2"].allSatisfy { lab.log($0).contains("peer \(lease3.subnet) → peer 198.18.0.3:8285") }
            }
            #expect(joined != nil, "the watch did not resume after quorum returned")
            let joinSeenAfter = ContinuousClock.now - restarted
            let toNewHost = try lab.ping(from: 3, to: 1)
            #expect(toNewHost.succeeded, "\(toNewHost.output)")

            // The old leader rejoins.
            try lab.lab("start", leader.name)
            try lab.waitForEtcd(timeout: .seconds(30))
            let result = ping.finish()

            #expect(result.lost == 0, "forwarding stopped during the cluster's outage:\n\(result.output)")
            // No subnet allocated twice: one key per host, each with its own
            // address, matching the hosts' subnet.env; h1 and h2 unchanged.
            let stored = try etcdLeases(lab)
            let hostKeys = [1: key(leases[1]!), 2: key(leases[2]!), 3: key(lease3)]
            #expect(Set(hostKeys.values).count == 3, "\(hostKeys)")
            for (n, key) in hostKeys { #expect(stored[key] == "198.18.0.\(n)", "\(stored)") }
            #expect(stored.count == 4, "\(stored)")  // and the one written by etcdctl
            for n in 1...2 { #expect(try LabLease(lab, host: n).subnet == leases[n]!.subnet) }
            for host in ["h1", "h2"] {
                #expect(
                    !lab.log(host).contains("moved to") && !lab.log(host).contains("was deleted from"),
                    "\(lab.log(host))"
                )
            }

            print(
                "FAULT 3-member etcd, leader killed: \(result.lost) echoes lost; cluster healthy again \(formatSeconds(elected)), a lease change seen by both \(formatSeconds(watchAfterLeader)) and both leases renewed \(formatSeconds(renewalAfterLeader)) after the kill"
            )
            print(
                "FAULT 3-member etcd, the new leader killed too (no quorum for \(formatSeconds(outage))): forwarding went on (\(result.lost) of \(result.transmitted) echoes lost over the whole test), failed renewals logged after \(formatSeconds(failed ?? .zero)); quorum back \(formatSeconds(quorumBack)) after the member's restart, renewals \(formatSeconds(renewalAfterQuorum)), a new host seen by both \(formatSeconds(joinSeenAfter)) after it; 3 host leases, all distinct"
            )
        }
    }

    // MARK: - c'. a member cut off from its peers

    /// How many watchers a member serves (etcd's metrics, on the member's
    /// loopback).
    func watchers(_ lab: Lab, _ member: LabEtcdMember) throws -> Int {
        let metrics = try lab.exec(
            member.name,
            [
                "python3", "-c",
                """
                import urllib.request
                print(urllib.request.urlopen("http://127.0.0.1:2381/metrics", timeout=5).read().decode())
                """,
            ],
            timeout: .seconds(15)
        ).output
        guard
            let line = metrics.split(separator: "\n").first(where: {
                $0.hasPrefix("etcd_debugging_mvcc_watcher_total ")
            }),
            let value = Double(line.split(separator: " ").last ?? "")
        else {
            throw LabError("no etcd_debugging_mvcc_watcher_total in \(member.name)'s metrics")
        }
        return Int(value)
    }

    /// A member on the minority side of a partition: iptables in its
    /// namespace drops all its peer traffic (port 2380), so it has no leader,
    /// but clients still reach it. The member serving the daemons' watch
    /// streams is the one cut off.
    @Test func aClusterMemberCutOffFromItsPeersHoldsBackNeitherWatchNorRenewal() throws {
        try withFaultLab(members: 3) { lab in
            let ttl = 10
            let members = try #require(lab.etcd?.members)
            let leases = try addHosts(lab, 1...2, ttl: ttl)
            let warmUp = try lab.ping(from: 1, to: 2)
            try #require(warmUp.succeeded, "\(warmUp.output)")
            let ping = try SteadyPing(lab, from: 1, to: 2, name: "cut-off")
            defer { _ = ping.finish() }

            let served = try members.map { (member: $0, watchers: try watchers(lab, $0)) }
            let busiest = try #require(served.max { $0.watchers < $1.watchers })
            try #require(busiest.watchers > 0, "no member serves a watch: \(served)")
            let member = busiest.member, others = members.filter { $0 != busiest.member }
            func drop(_ action: String) throws {
                // Both ends of every peer connection: those it dialed and those dialed to it.
                for chain in ["INPUT", "OUTPUT"] {
                    for port in ["--dport", "--sport"] {
                        try lab.exec(
                            member.name,
                            ["iptables", "-w", action, chain, "-p", "tcp", port, "2380", "-j", "DROP"]
                        )
                    }
                }
            }
            let renewed = (renewals(lab, "h1"), renewals(lab, "h2"))
            try drop("-A")
            let cutAt = ContinuousClock.now
            defer { try? drop("-D") }

            // A change written through the other two (retried while they
            // elect a leader, if the cut-off member led) reaches both daemons.
            var put = CommandResult(status: -1, output: "")
            for _ in 0..<10 where !put.succeeded {
                put = try lab.etcdctl(
                    ["put", Self.subnetsPrefix + "10.2.210.0-24", leaseJSON("198.18.0.20")],
                    endpoints: others.map(\.clientURL).joined(separator: ","),
                    check: false
                )
            }
            try #require(put.succeeded, "\(put.output)")
            let seen = timeUntil(timeout: .seconds(30)) {
                ["h1", "h2"].allSatisfy { lab.log($0).contains("peer 10.2.210.0/24 → peer 198.18.0.20:8285") }
            }
            #expect(
                seen != nil,
                "the change did not reach both daemons while \(member.name) served a watch without a leader"
            )
            let seenAfter = ContinuousClock.now - cutAt
            // Two renewals each through the other two: longer than a lease.
            #expect(
                timeUntil(timeout: .seconds(ttl + 15)) {
                    renewals(lab, "h1") > renewed.0 + 1 && renewals(lab, "h2") > renewed.1 + 1
                } != nil,
                "renewal stalled:\n\(lab.log("h1"))\n\(lab.log("h2"))"
            )
            let renewedAfter = ContinuousClock.now - cutAt
            try drop("-D")
            try lab.waitForEtcd(timeout: .seconds(30))
            let result = ping.finish()

            #expect(result.lost == 0, "\(result.output)")
            for n in 1...2 {
                #expect(try LabLease(lab, host: n).subnet == leases[n]!.subnet)
                let log = lab.log("h\(n)")
                #expect(
                    !log.contains("moved to") && !log.contains("was deleted from") && !log.contains("is gone"),
                    "\(log)"
                )
            }
            print(
                "FAULT 3-member etcd, the member serving \(busiest.watchers) watch(es) cut off from its peers: \(result.lost) of \(result.transmitted) echoes lost; a lease change reached both daemons \(formatSeconds(seenAfter)) and both renewed twice \(formatSeconds(renewedAfter)) after the cut"
            )
        }
    }

    // MARK: - c''. a member that goes silent

    /// A member that vanishes without a FIN or RST (power lost, a cut
    /// link): every packet in and out of its namespace is dropped. The host
    /// whose watch it serves must leave it within seconds (keepalive pings
    /// and watch progress requests, `--etcd-keepalive-time`/`-timeout`) and
    /// resume the watch on another member from its last revision, so that a
    /// host joining through the other members is learned at once.
    @Test func aHostWatchingThroughAMemberThatGoesSilentLearnsANewHostWithinSeconds() throws {
        try withFaultLab(members: 3) { lab in
            let members = try #require(lab.etcd?.members)
            try lab.addHost(1, command: command(lab, host: 1, ttl: 60))
            // The member serving h1's watch (the only watch in the cluster).
            var served: [(member: LabEtcdMember, watchers: Int)] = []
            let found = try timeUntil(timeout: .seconds(15)) {
                served = try members.map { (member: $0, watchers: try watchers(lab, $0)) }
                return served.contains { $0.watchers > 0 }
            }
            try #require(found != nil, "no member serves h1's watch: \(served)")
            let silent = try #require(served.max { $0.watchers < $1.watchers }).member
            let others = members.filter { $0 != silent }
            func drop(_ action: String) throws {
                for chain in ["INPUT", "OUTPUT"] {
                    try lab.exec(silent.name, ["iptables", "-w", action, chain, "-j", "DROP"])
                }
            }
            try drop("-A")
            let cutAt = ContinuousClock.now
            defer { try? drop("-D") }

            // h2 joins through the other two (after an election, if the
            // silent member led); its subnet.env is written once it holds a lease.
            try lab.addHost(
                2,
                command: command(
                    lab,
                    host: 2,
                    ttl: 60,
                    endpoints: others.map(\.clientURL).joined(separator: ",")
                )
            )
            let joinedAt = ContinuousClock.now
            let lease2 = try LabLease(lab, host: 2)
            let learned = timeUntil(timeout: .seconds(30)) {
                lab.log("h1").contains("peer \(lease2.subnet) → peer 198.18.0.2:8285")
            }
            let sinceCut = ContinuousClock.now - cutAt
            let sinceJoin = ContinuousClock.now - joinedAt
            try #require(
                learned != nil,
                "h1 did not learn h2 within 30 s of its join through \(others.map(\.name)) while \(silent.name) was silent"
            )
            // The watch left the silent member (and said so) rather than
            // waiting for TCP to give up, which takes minutes.
            let h1 = lab.log("h1")
            #expect(h1.contains("interrupted (no answer from the member") || h1.contains("keepalive"), "\(h1)")
            // Detection ≤ time + timeout (2 + 3 s), then the resumed watch
            // delivers h2's lease at once; slack for a loaded two-core machine.
            #expect(sinceCut < .seconds(8), "h1 learned h2 \(formatSeconds(sinceCut)) after the cut")
            let toNewHost = try lab.ping(from: 2, to: 1)
            #expect(toNewHost.succeeded, "\(toNewHost.output)")
            let toOld = try lab.ping(from: 1, to: 2)
            #expect(toOld.succeeded, "\(toOld.output)")
            print(
                "FAULT 3-member etcd, the member serving h1's watch (\(silent.name)) silent (all its packets dropped): h1 learned a host joining through the others \(formatSeconds(sinceCut)) after the cut, \(formatSeconds(sinceJoin)) after the joining host had its lease"
            )
        }
    }

    // MARK: - d. the underlay link down and up

    @Test func theUnderlayLinkDownAndUpLosesOnlyTheOutageAndNoSubnet() throws {
        try withFaultLab { lab in
            let ttl = 10
            let leases = try addHosts(lab, 1...2, ttl: ttl)
            let warmUp = try lab.ping(from: 2, to: 1)
            try #require(warmUp.succeeded, "\(warmUp.output)")
            let defaultRoute = try lab.hostOutput(1, ["ip", "route", "show", "default"])
                .trimmingCharacters(in: .whitespacesAndNewlines)
            let ping = try SteadyPing(lab, from: 2, to: 1, name: "link")
            defer { _ = ping.finish() }
            sleep(.seconds(1))

            // Down for longer than a renewal interval (5 s), starting just after a
            // renewal: the renewal due during the outage fails and the lease has
            // 5 s left then, so it outlives the 6 s outage only if the first retry
            // after the link comes up renews it. (Started at a random moment, an
            // outage beginning in the last second before a renewal outlasts the
            // lease whatever the daemon does.)
            let beforeCut = renewals(lab, "h1")
            try #require(
                timeUntil(timeout: .seconds(ttl)) { renewals(lab, "h1") > beforeCut } != nil,
                "h1 did not renew its lease: \(lab.log("h1"))"
            )
            try lab.exec("h1", ["ip", "link", "set", "eth0", "down"])
            let renewed = renewals(lab, "h1")
            sleep(.seconds(6))
            try lab.exec("h1", ["ip", "link", "set", "eth0", "up"])
            let up = ContinuousClock.now
            // The kernel dropped the default route with the link; put it
            // back as the host's network configuration would.
            if !defaultRoute.isEmpty {
                try lab.exec("h1", ["ip", "route", "replace"] + defaultRoute.split(separator: " ").map(String.init))
            }
            let repliesAtUp = ping.repliesSoFar()
            let resumed = timeUntil { ping.repliesSoFar() > repliesAtUp }
            #expect(resumed != nil, "traffic did not resume after the link came up")
            #expect(timeUntil { ping.repliesSoFar() > repliesAtUp + 10 } != nil)
            #expect(timeUntil(timeout: .seconds(30)) { renewals(lab, "h1") > renewed } != nil, "\(lab.log("h1"))")
            let renewalAfter = ContinuousClock.now - up
            try lab.etcdctl(["put", Self.subnetsPrefix + "10.2.201.0-24", leaseJSON("198.18.0.9")])
            #expect(lab.waitForLog("h1", containing: "peer 10.2.201.0/24 → peer 198.18.0.9:8285"), "\(lab.log("h1"))")
            let watchAfter = ContinuousClock.now - up
            let result = ping.finish()

            #expect(result.windows.count <= 1, "losses outside the outage: \(result.windows)\n\(result.output)")
            #expect(result.longestGap < .seconds(11), "\(result.output)")
            #expect(isRunning(lab, "h1"), "\(lab.log("h1"))")
            #expect(try LabLease(lab, host: 1).subnet == leases[1]!.subnet)
            #expect(try etcdLeases(lab)[key(leases[1]!)] == "198.18.0.1")
            for host in ["h1", "h2"] {
                #expect(!lab.log(host).contains("moved to") && !lab.log(host).contains("is gone"), "\(lab.log(host))")
            }
            let back = try lab.ping(from: 1, to: 2)
            #expect(back.succeeded, "\(back.output)")

            print(
                "FAULT underlay link down 6 s: \(result.lost) of \(result.transmitted) echoes lost, in one window of \(formatSeconds(result.longestGap)); first reply \(formatSeconds(resumed ?? .zero)) after the link came up (default route restored at once), lease renewed \(formatSeconds(renewalAfter)) and a lease change seen \(formatSeconds(watchAfter)) after it; no subnet change"
            )
        }
    }

    // MARK: - e. a peer vanishes without releasing its lease

    @Test func aPeerThatVanishesStaysUntilItsLeaseExpiresThenLeavesEveryTable() throws {
        try withFaultLab { lab in
            let ttl = 6
            let leases = try addHosts(lab, 1...3, ttl: ttl)
            let gone = "peer \(leases[3]!.subnet) is gone"
            func listed() throws -> String {
                try lab.exec(
                    "h1",
                    [
                        tunneldBinary, "leases", "-etcd-endpoints=\(labEtcdEndpoint)",
                        "-etcd-prefix=/docker/network/",
                    ]
                ).output
            }
            // h3 dies without a word and leaves the network.
            try lab.signal("h3", SIGKILL)
            let killed = ContinuousClock.now
            try lab.exec("h3", ["ip", "link", "set", "eth0", "down"])
            // Its lease is still there: the others keep routing to it.
            let before = try listed()
            #expect(before.contains(leases[3]!.subnet), "\(before)")
            #expect(!lab.log("h1").contains(gone) && !lab.log("h2").contains(gone))

            let expired = timeUntil(timeout: .seconds(ttl * 3)) {
                lab.log("h1").contains(gone) && lab.log("h2").contains(gone)
            }
            #expect(expired != nil, "h3's lease never expired:\n\(lab.log("h1"))")
            let goneAfter = ContinuousClock.now - killed
            // Renewed at half-life, its lease had between ttl/2 and ttl to run.
            #expect(
                goneAfter >= .seconds(Double(ttl) / 2 - 0.5),
                "gone after \(goneAfter), before its lease could expire"
            )
            #expect(goneAfter <= .seconds(ttl + 4), "gone only after \(goneAfter)")
            let after = try listed()
            #expect(!after.contains(leases[3]!.subnet), "\(after)")
            // The tunnel now answers "unreachable" for its subnet; the others still talk.
            let toGone = try lab.exec(
                "c1",
                ["ping", "-c", "1", "-W", "2", try lab.containerIP(3)],
                timeout: .seconds(10),
                check: false
            )
            #expect(toGone.output.contains("Unreachable"), "\(toGone.output)")
            let ping = try lab.ping(from: 1, to: 2)
            #expect(ping.succeeded, "\(ping.output)")

            print(
                "FAULT peer killed with its link down (leases of \(ttl) s): entry kept until its lease expired, gone from both others' tables \(formatSeconds(goneAfter)) after the kill"
            )
        }
    }

    // MARK: - f. hosts started at the same instant on an empty store

    @Test func fourHostsStartedAtTheSameInstantOnAnEmptyStoreGetDifferentSubnets() throws {
        // Four subnets for four hosts: every pick collides unless the race is handled.
        let config =
            #"{"Network":"10.2.0.0/16","SubnetLen":24,"SubnetMin":"10.2.1.0","SubnetMax":"10.2.4.0","Backend":{"Type":"udp"}}"#
        try withFaultLab(config: config) { lab in
            let hosts = 1...4
            let go = lab.directory.appendingPathComponent("go").path
            // One control socket for all, as four daemons on one machine
            // with the default: one takes it, the others go without — none
            // may fail to start because another took it a moment earlier.
            let socket = lab.directory.appendingPathComponent("shared.sock").path
            // Each daemon waits for the go file, so that all four start at once.
            func gated(_ n: Int) -> [String] {
                ["bash", "-c", "for _ in $(seq 1 600); do [ -e \"$0\" ] && exec \"$@\"; sleep 0.01; done; exit 1", go]
                    + command(lab, host: n, ttl: 30, controlSocket: socket)
            }
            let adding = try hosts.map { n in
                try spawn(
                    ["bash", lab.script, "add-host", lab.name, lab.directory.path, "\(n)", "--no-container", "--"]
                        + gated(n),
                    output: lab.directory.appendingPathComponent("add-h\(n).log").path
                )
            }
            defer { adding.forEach { $0.terminate() } }
            try #require(
                timeUntil {
                    hosts.allSatisfy {
                        FileManager.default.fileExists(atPath: lab.directory.appendingPathComponent("h\($0).pid").path)
                    }
                } != nil,
                "the hosts were not set up"
            )

            let rounds = 3
            var races: [Int] = []
            for round in 1...rounds {
                if round > 1 {
                    // Again from an empty store: stop all, delete every lease.
                    for n in hosts { try lab.lab("stop", "h\(n)") }
                    unlink(go)
                    try lab.etcdctl(["del", "--prefix", Self.subnetsPrefix])
                    for n in hosts { unlink(lab.subnetFile(n)) }
                    for n in hosts { try lab.lab("start", "h\(n)") }
                    sleep(.milliseconds(300))
                }
                let lostBefore = hosts.map { occurrences(of: "was taken by another node first", in: lab.log("h\($0)")) }
                FileManager.default.createFile(atPath: go, contents: nil)
                let started = ContinuousClock.now
                let allLeased = timeUntil {
                    hosts.allSatisfy {
                        ((try? FileManager.default.attributesOfItem(atPath: lab.subnetFile($0)))?[.size] as? Int ?? 0)
                            > 0
                    }
                }
                try #require(allLeased != nil, "round \(round): not every host got a subnet")
                let leasedIn = ContinuousClock.now - started
                if round == 1 { for child in adding { #expect(child.wait(timeout: .seconds(30)) == 0) } }

                let subnets = try hosts.map { try LabLease(lab, host: $0) }
                #expect(Set(subnets.map(\.subnet)).count == hosts.count, "round \(round): \(subnets.map(\.subnet))")
                let stored = try etcdLeases(lab)
                #expect(stored.count == hosts.count, "round \(round): \(stored)")
                for (n, lease) in zip(hosts, subnets) {
                    #expect(stored[key(lease)] == "198.18.0.\(n)", "round \(round): \(stored)")
                }
                sleep(.milliseconds(500))
                for n in hosts {
                    #expect(isRunning(lab, "h\(n)"), "round \(round): h\(n) exited:\n\(lab.log("h\(n)"))")
                    #expect(!lab.log("h\(n)").contains("start-up failed"), "\(lab.log("h\(n)"))")
                }
                let lost = zip(hosts, lostBefore).map {
                    occurrences(of: "was taken by another node first", in: lab.log("h\($0)")) - $1
                }
                races.append(lost.reduce(0, +))
                print(
                    "round \(round): four hosts leased \(subnets.map(\.subnet)) in \(formatSeconds(leasedIn)); \(races.last!) lost create race(s)"
                )
            }
            print(
                "FAULT four hosts started at once on an empty store with four free subnets, \(rounds) rounds: all distinct, none exited; lost create races per round: \(races)"
            )
        }
    }
}

func formatSeconds(_ duration: Duration) -> String { String(format: "%.1f s", duration.inSeconds) }

extension Duration {
    var inSeconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
}

/// `ping -i 0.1` from one container to another, in the background (at most
/// 300 s), with the replies it got sorted into loss windows.
final class SteadyPing {
    static let interval = Duration.milliseconds(100)
    let child: ChildProcess
    let outputFile: String
    private var result: Result?

    struct Result {
        var transmitted: Int
        var received: Int
        /// Runs of consecutive echo sequence numbers with no reply (the last
        /// two, possibly still in flight when the ping stopped, left out).
        var windows: [ClosedRange<Int>]
        var output: String
        /// Echoes with no reply, not counting the last two, which may still
        /// have been in flight when the ping was stopped (as `windows`).
        var lost: Int { windows.map(\.count).reduce(0, +) }
        var longestGap: Duration { SteadyPing.interval * (windows.map(\.count).max() ?? 0) }
        /// Losses not in the longest window.
        var lostOutsideWindows: Int { windows.map(\.count).reduce(0, +) - (windows.map(\.count).max() ?? 0) }
    }

    init(_ lab: Lab, from: Int, to: Int, name: String) throws {
        outputFile = lab.directory.appendingPathComponent("\(name).ping.log").path
        child = try spawn(
            [
                "ip", "netns", "exec", lab.namespace("c\(from)"), "ping", "-i", "0.1", "-W", "1",
                "-w", "300", try lab.containerIP(to),
            ],
            output: outputFile
        )
    }

    var output: String { (try? String(contentsOfFile: outputFile, encoding: .utf8)) ?? "" }

    /// Sequence numbers of the replies so far.
    func replies(in output: String) -> Set<Int> {
        var sequences = Set<Int>()
        for line in output.split(separator: "\n") where line.contains("bytes from") {
            if let range = line.range(of: #"(?<=icmp_seq=)\d+"#, options: .regularExpression), let n = Int(line[range])
            {
                sequences.insert(n)
            }
        }
        return sequences
    }

    func repliesSoFar() -> Int { replies(in: output).count }

    /// Stops the ping (SIGINT: it prints its summary) and sorts its replies.
    @discardableResult
    func finish() -> Result {
        if let result { return result }
        kill(child.pid, SIGINT)
        if child.wait(timeout: .seconds(5)) == nil { child.terminate() }
        let text = output
        let received = replies(in: text)
        var transmitted = received.max() ?? 0
        if let range = text.range(of: #"\d+(?= packets transmitted)"#, options: .regularExpression) {
            transmitted = Int(text[range]) ?? transmitted
        }
        var windows: [ClosedRange<Int>] = []
        var start: Int?
        let considered = max(0, transmitted - 2)
        for seq in 1...max(1, considered) {
            if !received.contains(seq) {
                if start == nil { start = seq }
            } else if let first = start {
                windows.append(first...(seq - 1))
                start = nil
            }
        }
        if let first = start, considered >= first { windows.append(first...considered) }
        let result = Result(transmitted: transmitted, received: received.count, windows: windows, output: text)
        self.result = result
        return result
    }
}
