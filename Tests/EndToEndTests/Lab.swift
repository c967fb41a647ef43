import EtcdTestSupport
import Foundation
import NetBase
import NetTestSupport
import Testing

let hasTun = FileManager.default.fileExists(atPath: "/dev/net/tun")
let canRunNamespaceTests = isRoot && hasTun
let namespaceSkipReason: Comment =
    "needs root and /dev/net/tun: creates network namespaces and TUN devices (runs in CI as root)"

/// The repository's root, found from this file's path.
let repositoryRoot: URL = {
    var url = URL(fileURLWithPath: #filePath)
    for _ in 0..<3 { url.deleteLastPathComponent() }
    return url
}()

/// The tunneld binary built next to this test bundle (or $TUNNELD_BIN).
let tunneldBinary: String = {
    if let path = ProcessInfo.processInfo.environment["TUNNELD_BIN"] { return path }
    let bundleDirectory = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
    for candidate in [bundleDirectory, bundleDirectory.deletingLastPathComponent()] {
        let path = candidate.appendingPathComponent("tunneld").path
        if FileManager.default.isExecutableFile(atPath: path) { return path }
    }
    return repositoryRoot.appendingPathComponent(".build/debug/tunneld").path
}()

/// The seccomp helper built beside tunneld (Tests/RefuseIOURing).
let refuseIOURingBinary: String = {
    URL(fileURLWithPath: tunneldBinary).deletingLastPathComponent().appendingPathComponent("refuse-io-uring").path
}()

/// How a test host's daemon reaches each udp data-path tier on this kernel:
/// io_uring as the kernel offers it, io_uring without multishot read (the
/// tier `--datapath uring` gives on Linux 6.0–6.6, through the probe override
/// only tests set), io_uring
/// refused by a seccomp filter as Docker's default profile refuses it (the
/// daemon must fall back to batched system calls by itself), the system-call
/// tier asked for by flag, and flannel's simple loop.
enum TierLaunch: String, CaseIterable, CustomTestStringConvertible, Sendable {
    case uring, uringSingleRead, syscallRefused, syscall, simple
    var testDescription: String { rawValue }

    var prefix: [String] {
        switch self {
        case .uringSingleRead: ["env", "TUNNELD_TEST_URING_NO_MULTISHOT_READ=1"]
        case .syscallRefused: [refuseIOURingBinary]
        default: []
        }
    }

    var extra: [String] {
        switch self {
        case .syscall: ["--datapath", "syscall"]
        case .simple: ["--datapath", "simple"]
        // auto would take the system-call tier without multishot read.
        case .uringSingleRead: ["--datapath", "uring"]
        default: []
        }
    }

    /// What the daemon's start-up line says of its data path.
    var logLine: String {
        switch self {
        case .uring: "io_uring (multishot read) data path"
        case .uringSingleRead: "io_uring (single read) data path"
        case .syscallRefused, .syscall: "system-call (sendmmsg/recvmmsg) data path"
        case .simple: "simple data path"
        }
    }

    var tier: String {
        switch self {
        case .uring: "uring"
        case .uringSingleRead: "uring-single"
        case .syscallRefused, .syscall: "syscall"
        case .simple: "simple"
        }
    }
}

extension Lab {
    /// Adds host N whose daemon runs the data-path tier `launch` reaches.
    func addHost(_ n: Int, tier launch: TierLaunch, extra: [String] = []) throws {
        try addHost(n, extra: launch.extra + extra, prefix: launch.prefix)
    }

    /// Pings from container to container for each of `pairs`, over IPv4
    /// and then IPv6 as asked; each is expected to succeed.
    func expectPings(
        ipv4: Bool = true,
        ipv6: Bool = false,
        pairs: [(from: Int, to: Int)] = [(1, 2), (2, 1)],
        sourceLocation: SourceLocation = #_sourceLocation
    ) throws {
        for (from, to) in pairs {
            if ipv4 {
                let result = try ping(from: from, to: to)
                #expect(result.succeeded, "\(result.output)", sourceLocation: sourceLocation)
            }
            if ipv6 {
                let result = try ping6(from: from, to: to)
                #expect(result.succeeded, "\(result.output)", sourceLocation: sourceLocation)
            }
        }
    }

    /// Stops and starts host `n`'s daemon; true once its log holds `text`
    /// twice, once a start (bounded: 20 s).
    func restartDaemon(_ n: Int, untilLoggedTwice text: String) throws -> Bool {
        try lab("stop", "h\(n)")
        try lab("start", "h\(n)")
        return waitUntil { log("h\(n)").components(separatedBy: text).count == 3 }
    }
}

struct CommandResult {
    /// The exit status (or 128 + signal); for a command stopped at its
    /// timeout, how it ended then (a process that catches SIGTERM may exit 0).
    var status: Int32
    var output: String
    /// The timeout, when the command was still running then and was stopped.
    var timedOut: Duration? = nil
    /// Exit status 0, before the timeout: a command stopped at its timeout
    /// failed whatever status it exited with.
    var succeeded: Bool { status == 0 && timedOut == nil }
}

/// A command that was still running at its timeout (and was stopped).
struct CommandTimedOut: Error, CustomStringConvertible {
    let command: [String]
    let timeout: Duration
    /// How it ended once stopped (SIGTERM, then SIGKILL).
    let status: Int32
    let output: String
    var description: String {
        "`\(command.joined(separator: " "))` was still running after its timeout of \(timeout) and was stopped "
            + "(it then exited with \(status)); raise the timeout if it needs longer. Its output so far:\n\(output)"
    }
}

/// Starts a command (searched in PATH) with standard input from the file `input`, and
/// output and errors appended to the file `output`: a file, not a pipe, because a daemon it
/// starts in the background keeps its standard streams. The command gets SIGKILL if this
/// test process ends first.
func spawn(_ arguments: [String], output: String, input: String = "/dev/null") throws -> ChildProcess {
    do {
        return try ChildProcess.start(
            arguments[0],
            arguments: Array(arguments.dropFirst()),
            standardInput: .file(input),
            standardOutput: .file(output),
            standardError: .standardOutput,
            parentDeathSignal: SIGKILL
        )
    } catch {
        throw CommandFailed(command: arguments, status: -1, output: "\(error)")
    }
}

/// Runs a command to completion (bounded by `timeout`), output and errors together.
/// A command still running at `timeout` is stopped and has failed (`timedOut`
/// set, `succeeded` false, whatever it exited with once stopped): with `check`
/// that is a `CommandTimedOut` error; without, its output so far is returned.
@discardableResult
func run(
    _ arguments: [String],
    timeout: Duration = .seconds(60),
    check: Bool = true,
    input: String = "/dev/null"
) throws -> CommandResult {
    let outputFile = FileManager.default.temporaryDirectory
        .appendingPathComponent("td-cmd-\(UUID().uuidString)").path
    defer { unlink(outputFile) }
    let child = try spawn(arguments, output: outputFile, input: input)
    var result = CommandResult(status: -1, output: "")
    if let status = child.wait(timeout: timeout) {
        result.status = status
    } else {
        result.status = child.terminate()
        result.timedOut = timeout
    }
    result.output = (try? String(contentsOfFile: outputFile, encoding: .utf8)) ?? ""
    if check, let timeout = result.timedOut {
        throw CommandTimedOut(command: arguments, timeout: timeout, status: result.status, output: result.output)
    }
    if check && !result.succeeded {
        throw CommandFailed(command: arguments, status: result.status, output: result.output)
    }
    return result
}

/// A set of namespaced hosts built by Scripts/netns-lab.sh; destroyed (all
/// namespaces and processes) by `destroy()`, which tests call in `defer`.
final class Lab {
    let name: String
    let directory: URL
    let script = repositoryRoot.appendingPathComponent("Scripts/netns-lab.sh").path
    /// The lab's etcd, once `addEtcd` has started it.
    var etcd: LabEtcd?

    init() throws {
        // Unique per run: PID plus a random suffix, short enough for ip's names.
        // Fixed widths: without them pid 1234 with suffix 5ab1 and pid 12345
        // with suffix ab1 would name the same lab.
        let pid = String(getpid() % 100_000), suffix = String(UInt32.random(in: 0..<0x1_0000), radix: 16)
        name =
            "td" + String(repeating: "0", count: 5 - pid.count) + pid
            + String(repeating: "0", count: 4 - suffix.count) + suffix
        _ = Lab.leftoversRemoved
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("tunneld-lab-\(name)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        // Who made the lab, so that a later run can tell a crashed run's lab from a live one.
        try "\(getpid())\n".write(
            to: directory.appendingPathComponent(Lab.ownerFile),
            atomically: true,
            encoding: .utf8
        )
        try lab("create")
    }

    static let ownerFile = "owner"  // not *.pid: destroy stops the process of every *.pid

    /// Once per test process, before its first lab: the labs of runs that
    /// crashed (killed, or stopped in a debugger) before their `destroy()` —
    /// a lab directory whose owner process is gone — are destroyed, with
    /// their namespaces and processes, so that they neither pile up nor hold
    /// addresses a new lab needs. Labs of live runs (another test process
    /// beside this one) are left alone.
    static let leftoversRemoved: Void = {
        let temporary = FileManager.default.temporaryDirectory
        let script = repositoryRoot.appendingPathComponent("Scripts/netns-lab.sh").path
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: temporary.path)) ?? []
        for entry in entries where entry.hasPrefix("tunneld-lab-td") {
            let directory = temporary.appendingPathComponent(entry)
            guard let text = try? String(contentsOf: directory.appendingPathComponent(ownerFile), encoding: .utf8),
                let owner = pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)), owner > 0,
                kill(owner, 0) != 0, errno == ESRCH
            else { continue }
            let name = String(entry.dropFirst("tunneld-lab-".count))
            print("Lab: destroying \(name), left by process \(owner), which is gone")
            _ = try? run(["bash", script, "destroy", name, directory.path], timeout: .seconds(120), check: false)
            try? FileManager.default.removeItem(at: directory)
        }
    }()

    @discardableResult
    func lab(_ arguments: String..., timeout: Duration = .seconds(60)) throws -> CommandResult {
        try lab(arguments, timeout: timeout)
    }

    /// Runs `netns-lab.sh COMMAND LAB DIR ARGUMENTS…`.
    @discardableResult
    func lab(_ arguments: [String], timeout: Duration = .seconds(60)) throws -> CommandResult {
        try run(["bash", script] + [arguments[0], name, directory.path] + arguments.dropFirst(), timeout: timeout)
    }

    func namespace(_ suffix: String) -> String { "\(name)-\(suffix)" }
    var storeDirectory: String { directory.appendingPathComponent("store").path }
    func subnetFile(_ host: Int) -> String { directory.appendingPathComponent("h\(host).env").path }

    /// Adds host N running tunneld with the local store, and its container.
    /// `prefix` goes before the binary (e.g. `env VAR=1` or `refuse-io-uring`).
    func addHost(_ n: Int, iface: [String] = ["--iface", "eth0"], extra: [String] = [], prefix: [String] = []) throws {
        let command =
            prefix + [tunneldBinary, "run", "--backend", "udp"] + iface
            + ["--subnet-file", subnetFile(n), "--device", "tun0"]
            + (extra.contains("--control-socket")
                ? [] : ["--control-socket", directory.appendingPathComponent("h\(n).sock").path])
            + extra
        try addHost(n, command: command)
    }

    /// Adds host N running `command` — the whole command line, e.g. tunneld
    /// with flanneld's flags, or `env FLANNELD_…=… tunneld run` — which must
    /// write `subnetFile(n)`; then its container, from that file.
    /// With `ipv6`, the host's eth0 also has fd18::N/64 (the IPv6 underlay
    /// of a dual-stack network) and its container an address of the host's
    /// FLANNEL_IPV6_SUBNET.
    /// With `ipv6Only`, fd18::N/64 is eth0's only address (no IPv4 underlay).
    func addHost(_ n: Int, command: [String], ipv6: Bool = false, ipv6Only: Bool = false) throws {
        try run(
            ["bash", script, "add-host", name, directory.path, "\(n)"]
                + (ipv6Only ? ["--ipv6-only"] : ipv6 ? ["--ipv6"] : []) + ["--"] + command,
            timeout: .seconds(90)
        )
    }

    /// Adds a bare host N on the underlay (198.18.0.N, namespace hN) with no
    /// daemon and no container: a stranger to the overlay.
    func addNode(_ n: Int) throws {
        try lab("add-node", "\(n)")
    }

    /// The data-path counters a stopped daemon logged ("data path stopped; counters: …").
    func dataPathCounters(_ process: String) -> [String: UInt64] {
        guard let line = log(process).split(separator: "\n").last(where: { $0.contains("counters:") })
        else { return [:] }
        var values: [String: UInt64] = [:]
        for field in line.split(separator: " ") {
            let parts = field.split(separator: "=")
            if parts.count == 2, let n = UInt64(parts[1]) { values[String(parts[0])] = n }
        }
        return values
    }

    /// CPU time (user + system, seconds) a process the lab started has used so far.
    func cpuSeconds(_ process: String) throws -> Double {
        let stat = try String(contentsOfFile: "/proc/\(try pid(process))/stat", encoding: .utf8)
        // Fields after the command name: state is 3rd, utime 14th, stime 15th.
        guard let close = stat.range(of: ")", options: .backwards) else {
            throw LabError("unreadable /proc stat: \(stat)")
        }
        let fields = stat[close.upperBound...].split(separator: " ")
        guard fields.count > 12, let user = Double(fields[11]), let system = Double(fields[12]) else {
            throw LabError("unreadable /proc stat: \(stat)")
        }
        return (user + system) / Double(sysconf(Int32(_SC_CLK_TCK)))
    }

    /// The PID of a process the lab started (h1, etcd…).
    func pid(_ process: String) throws -> pid_t {
        let text = try String(contentsOf: directory.appendingPathComponent("\(process).pid"), encoding: .utf8)
        guard let pid = pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)) else {
            throw LabError("\(process).pid holds \"\(text)\", not a process ID")
        }
        return pid
    }

    /// Sends `signal` (SIGSTOP, SIGCONT…) to a process the lab started.
    func signal(_ process: String, _ signal: Int32) throws {
        let pid = try pid(process)
        guard kill(pid, signal) == 0 else {
            throw LabError("kill(\(pid), \(signal)) for \(process) failed: \(String(cString: strerror(errno)))")
        }
    }

    /// The container's IPv6 address (a host added with `ipv6` in a dual-stack network).
    func containerIPv6(_ n: Int) throws -> String {
        try String(contentsOf: directory.appendingPathComponent("c\(n).ip6"), encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines)
    }

    func containerIP(_ n: Int) throws -> String {
        try String(contentsOf: directory.appendingPathComponent("c\(n).ip"), encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines)
    }

    func log(_ process: String) -> String {
        (try? String(contentsOf: directory.appendingPathComponent("\(process).log"), encoding: .utf8)) ?? ""
    }

    func subnetEnv(_ n: Int) throws -> [String: String] {
        let text = try String(contentsOfFile: subnetFile(n), encoding: .utf8)
        var values: [String: String] = [:]
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: "=", maxSplits: 1)
            if parts.count == 2 { values[String(parts[0])] = String(parts[1]) }
        }
        return values
    }

    /// Runs a command inside one of the lab's namespaces.
    @discardableResult
    func exec(
        _ ns: String,
        _ arguments: [String],
        timeout: Duration = .seconds(60),
        check: Bool = true
    ) throws -> CommandResult {
        try run(["ip", "netns", "exec", namespace(ns)] + arguments, timeout: timeout, check: check)
    }

    /// Pings from container `from` to container `to`, retrying while routes
    /// settle (bounded: `attempts` rounds).
    func ping(from: Int, to: Int, count: Int = 3, attempts: Int = 10) throws -> CommandResult {
        let target = try containerIP(to)
        var last = CommandResult(status: -1, output: "")
        for _ in 0..<attempts {
            last = try exec(
                "c\(from)",
                ["ping", "-c", "\(count)", "-i", "0.2", "-W", "1", target],
                timeout: .seconds(30),
                check: false
            )
            if last.succeeded { return last }
            usleep(300_000)
        }
        return last
    }

    /// Pings over IPv6 from container `from` to container `to`, retrying
    /// while routes settle (bounded: `attempts` rounds).
    func ping6(from: Int, to: Int, count: Int = 3, attempts: Int = 10) throws -> CommandResult {
        let target = try containerIPv6(to)
        var last = CommandResult(status: -1, output: "")
        for _ in 0..<attempts {
            last = try exec(
                "c\(from)",
                ["ping", "-6", "-c", "\(count)", "-i", "0.2", "-W", "1", target],
                timeout: .seconds(30),
                check: false
            )
            if last.succeeded { return last }
            usleep(300_000)
        }
        return last
    }

    /// Waits (bounded) until `process`'s log contains `text`.
    func waitForLog(_ process: String, containing text: String, timeout: Duration = .seconds(20)) -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if log(process).contains(text) { return true }
            usleep(100_000)
        }
        return false
    }

    /// Waits (bounded) until `path` exists and is not empty.
    func waitForFile(_ path: String, timeout: Duration = .seconds(30)) -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if let size = (try? FileManager.default.attributesOfItem(atPath: path))?[.size] as? Int, size > 0 {
                return true
            }
            usleep(100_000)
        }
        return false
    }

    func destroy() {
        _ = try? lab("destroy", timeout: .seconds(120))
        try? FileManager.default.removeItem(at: directory)
    }
}

struct LabError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

// MARK: - etcd in the lab

/// The lab's etcd: one member in namespace `<lab>-etcd`, on the underlay at
/// 198.18.0.250, its data in the lab's directory.
struct LabEtcd {
    static let address = "198.18.0.250"
    /// Client URL: http://198.18.0.250:2379, or https with client certificates;
    /// for a cluster, every member's, comma-separated.
    var url: String
    /// The members' process (and namespace) names: "etcd", then "etcd2"…
    /// for a cluster. The first one's namespace runs etcdctl.
    var members: [LabEtcdMember] = [LabEtcdMember(name: "etcd", address: LabEtcd.address)]
    var certificates: TestCertificates?
    /// "root:password" for etcdctl once auth is on.
    var rootCredentials: String?
}

/// One member of the lab's etcd: its process and namespace name and its
/// underlay address.
struct LabEtcdMember: Equatable {
    var name: String
    var address: String
    var clientURL: String { "http://\(address):2379" }
    var peerURL: String { "http://\(address):2380" }
}

/// Whether etcd and etcdctl are on PATH (Debian: etcd-server, etcd-client).
let etcdIsInstalled: Bool = {
    let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
    return ["etcd", "etcdctl"].allSatisfy { program in
        path.split(separator: ":").contains { FileManager.default.isExecutableFile(atPath: "\($0)/\(program)") }
    }
}()
let etcdSkipReason: Comment = "needs etcd and etcdctl (apt-get install etcd-server etcd-client)"

extension Lab {
    /// Starts etcd in its own namespace at 198.18.0.250:2379 — https with
    /// client certificates required when `tls` — and waits until it answers.
    /// `destroy()` stops it; `lab("stop", "etcd")` / `restartEtcd()` restart it
    /// on the same data.
    func addEtcd(tls: Bool = false) throws {
        let url = "\(tls ? "https" : "http")://\(LabEtcd.address):2379"
        let certificates =
            tls
            ? try TestCertificates.make(
                // The client's CN, tunneld-host, is no etcd user: with auth
                // on, etcd would take it as the user without a password login.
                in: directory.appendingPathComponent("certs"),
                serverName: "etcd",
                serverAltNames: "IP:\(LabEtcd.address)",
                clientName: "tunneld-host"
            )
            : nil
        // Peer and metrics URLs stay on the etcd namespace's loopback.
        var arguments = [
            "etcd", "--name", "lab",
            "--data-dir", directory.appendingPathComponent("etcd-data").path,
            "--listen-client-urls", url, "--advertise-client-urls", url,
            "--listen-peer-urls", "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
            "--initial-cluster", "lab=http://127.0.0.1:2380",
            "--listen-metrics-urls", "http://127.0.0.1:2381",
            "--logger=zap", "--log-outputs=stderr",
        ]
        if let certificates {
            arguments += [
                "--client-cert-auth", "--trusted-ca-file", certificates.caFile,
                "--cert-file", certificates.serverCertFile, "--key-file", certificates.serverKeyFile,
            ]
        }
        etcd = LabEtcd(url: url, certificates: certificates)
        try lab(["add-etcd"] + arguments)
        try waitForEtcd()
    }

    /// Starts a cluster of `size` etcd members (plain http), each in a
    /// namespace of its own on the underlay — "etcd" at 198.18.0.250, "etcd2"
    /// at .251, "etcd3" at .252… — with client and peer URLs there, and waits
    /// until every member is healthy. `lab("stop"/"start", name)` stops and
    /// starts one member on its data; `etcdctl` talks to all of them.
    func addEtcdCluster(size: Int) throws {
        precondition((1...4).contains(size), "a lab cluster has 1 to 4 members")
        let members = (0..<size).map { i in
            LabEtcdMember(name: i == 0 ? "etcd" : "etcd\(i + 1)", address: "198.18.0.\(250 + i)")
        }
        let initialCluster = members.map { "\($0.name)=\($0.peerURL)" }.joined(separator: ",")
        etcd = LabEtcd(url: members.map(\.clientURL).joined(separator: ","), members: members, certificates: nil)
        for member in members {
            let arguments = [
                "etcd", "--name", member.name,
                "--data-dir", directory.appendingPathComponent("\(member.name)-data").path,
                "--listen-client-urls", member.clientURL, "--advertise-client-urls", member.clientURL,
                "--listen-peer-urls", member.peerURL, "--initial-advertise-peer-urls", member.peerURL,
                "--initial-cluster", initialCluster, "--initial-cluster-state", "new",
                "--initial-cluster-token", name,
                "--listen-metrics-urls", "http://127.0.0.1:2381",
                "--logger=zap", "--log-outputs=stderr",
            ]
            try lab(["add-etcd", "--member", member.name, member.address, "--"] + arguments)
        }
        try waitForEtcd(timeout: .seconds(40))
    }

    /// Waits (at most `timeout`) until etcd reports healthy: every member,
    /// or those of `endpoints` (comma-separated client URLs).
    func waitForEtcd(endpoints: String? = nil, timeout: Duration = .seconds(20)) throws {
        let deadline = ContinuousClock.now + timeout
        var last = CommandResult(status: -1, output: "")
        while ContinuousClock.now < deadline {
            last = try etcdctl(["endpoint", "health"], endpoints: endpoints, check: false, timeout: .seconds(10))
            if last.succeeded { return }
            usleep(100_000)
        }
        throw LabError(
            "etcd did not become healthy within \(timeout): \(last.output)\n"
                + log("etcd").split(separator: "\n").suffix(10).joined(separator: "\n")
        )
    }

    /// The member that is the cluster's leader, asked of the members of
    /// `among` (all by default; stopped ones must be left out).
    func etcdLeader(among: [LabEtcdMember]? = nil) throws -> LabEtcdMember {
        guard let etcd else { throw LabError("this lab has no etcd: call addEtcd() first") }
        let members = among ?? etcd.members
        let status = try etcdctl(
            ["endpoint", "status", "-w", "json"],
            endpoints: members.map(\.clientURL).joined(separator: ",")
        ).output
        // One object per endpoint: {"Endpoint":"http://…","Status":{"header":{…,"member_id":N,…},…,"leader":N,…}}.
        // The IDs are 64-bit: compared as digits, not parsed as JSON numbers.
        func number(_ field: String, in text: Substring) -> Substring? {
            guard let range = text.range(of: "\"\(field)\":") else { return nil }
            return text[range.upperBound...].prefix { $0.isNumber }
        }
        for entry in status.components(separatedBy: "{\"Endpoint\":").dropFirst() {
            let text = Substring(entry)
            guard let member = number("member_id", in: text), let leader = number("leader", in: text),
                member == leader
            else { continue }
            if let found = members.first(where: { entry.hasPrefix("\"\($0.clientURL)\"") }) { return found }
        }
        throw LabError("no member of \(members.map(\.name)) says it is the leader: \(status)")
    }

    /// Stops etcd (SIGTERM, as for an upgrade), keeps it down for `downtime`,
    /// starts it again on the same data and waits until it is healthy.
    func restartEtcd(downtime: Duration = .zero) throws {
        try lab("stop", "etcd")
        Thread.sleep(
            forTimeInterval: Double(downtime.components.seconds) + Double(downtime.components.attoseconds) / 1e18
        )
        try lab("start", "etcd")
        try waitForEtcd()
    }

    /// Runs etcdctl (v3 API) in the etcd namespace against the lab's etcd,
    /// with its client certificate and root credentials when set; `input` is
    /// a file for standard input (`etcdctl put KEY < FILE`).
    @discardableResult
    func etcdctl(
        _ arguments: [String],
        endpoints: String? = nil,
        input: String = "/dev/null",
        check: Bool = true,
        timeout: Duration = .seconds(30)
    ) throws -> CommandResult {
        guard let etcd else { throw LabError("this lab has no etcd: call addEtcd() first") }
        // From the namespace of the first member asked (a cut-off member's
        // namespace may have no network).
        let urls = endpoints ?? etcd.url
        let from = etcd.members.first { urls.hasPrefix($0.clientURL) } ?? etcd.members[0]
        var command = [
            "ip", "netns", "exec", namespace(from.name), "env", "ETCDCTL_API=3", "etcdctl",
            "--endpoints", urls, "--dial-timeout=2s", "--command-timeout=10s",
        ]
        if let certificates = etcd.certificates {
            command += [
                "--cacert", certificates.caFile, "--cert", certificates.clientCertFile,
                "--key", certificates.clientKeyFile,
            ]
        }
        if let user = etcd.rootCredentials { command += ["--user", user] }
        return try run(command + arguments, timeout: timeout, check: check, input: input)
    }

    /// The value of `key`, or nil if there is none.
    func etcdValue(_ key: String) throws -> String? {
        let output = try etcdctl(["get", key, "--print-value-only"]).output
        return output.isEmpty ? nil : String(output.dropLast(output.hasSuffix("\n") ? 1 : 0))
    }

    /// The store's current revision.
    func etcdRevision() throws -> Int64 {
        let json = try etcdctl(["endpoint", "status", "-w", "json"]).output
        guard let range = json.range(of: "\"revision\":"),
            let revision = Int64(json[range.upperBound...].prefix { $0.isNumber })
        else {
            throw LabError("no revision in etcdctl endpoint status: \(json)")
        }
        return revision
    }

    /// Turns on etcd's auth: a user `user` whose role may read and write only
    /// keys under `prefix`, and root (used by `etcdctl` from now on).
    func enableEtcdAuth(rootPassword: String, user: String, password: String, prefix: String) throws {
        try etcdctl(["role", "add", user])
        try etcdctl(["role", "grant-permission", user, "--prefix=true", "readwrite", prefix])
        try etcdctl(["user", "add", "\(user):\(password)"])
        try etcdctl(["user", "grant-role", user, user])
        try etcdctl(["user", "add", "root:\(rootPassword)"])
        try etcdctl(["auth", "enable"])
        etcd?.rootCredentials = "root:\(rootPassword)"
    }
}

extension Lab {
    /// Runs `body` in a fresh lab whose local store holds `config`; prints the
    /// daemons' logs when it fails, and tears the lab down either way.
    static func withLocalStore(config: String, _ body: (Lab) throws -> Void) throws {
        let lab = try Lab()
        defer { lab.destroy() }
        let configFile = lab.directory.appendingPathComponent("flannel-config.json")
        try config.write(to: configFile, atomically: true, encoding: .utf8)
        try run([tunneldBinary, "config", "set", "--store-dir", lab.storeDirectory, configFile.path])
        do {
            try body(lab)
        } catch {
            lab.printLogs()
            throw error
        }
    }
}
