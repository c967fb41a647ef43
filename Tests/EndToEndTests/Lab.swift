import Foundation
import Testing

let isRoot = getuid() == 0
let hasTun = FileManager.default.fileExists(atPath: "/dev/net/tun")
let canRunNamespaceTests = isRoot && hasTun
let namespaceSkipReason: Comment = "needs root and /dev/net/tun: creates network namespaces and TUN devices (runs in CI as root)"

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

struct CommandResult {
    var status: Int32
    var output: String
    var succeeded: Bool { status == 0 }
}

struct CommandFailed: Error, CustomStringConvertible {
    let command: [String]
    let result: CommandResult
    var description: String {
        "`\(command.joined(separator: " "))` exited with \(result.status):\n\(result.output)"
    }
}

/// A child process started with posix_spawn. Foundation's `Process` is not
/// used: it can keep reporting a finished child as running when a grandchild
/// (a daemon started in the background) inherits its descriptors.
final class Child {
    let pid: pid_t
    private(set) var status: Int32?

    init(_ arguments: [String], output: String) throws {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, output, O_WRONLY | O_CREAT | O_APPEND, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        let argv: [UnsafeMutablePointer<CChar>?] = arguments.map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        var pid = pid_t()
        let rc = posix_spawnp(&pid, arguments[0], &actions, nil, argv, environ)
        guard rc == 0 else {
            throw CommandFailed(command: arguments, result: CommandResult(status: -1, output: "posix_spawn: \(String(cString: strerror(rc)))"))
        }
        self.pid = pid
    }

    /// Waits until the child exits or `timeout` passes; returns its exit
    /// status, or nil if it is still running.
    @discardableResult
    func wait(timeout: Duration) -> Int32? {
        if let status { return status }
        let deadline = ContinuousClock.now + timeout
        repeat {
            var raw: Int32 = 0
            if waitpid(pid, &raw, WNOHANG) == pid {
                // WIFEXITED / WEXITSTATUS, or 128 + signal.
                status = raw & 0x7f == 0 ? (raw >> 8) & 0xff : 128 + (raw & 0x7f)
                return status
            }
            usleep(20_000)
        } while ContinuousClock.now < deadline
        return nil
    }

    /// Stops the child (TERM, then KILL after a grace period) and reaps it.
    func stop() {
        guard status == nil else { return }
        kill(pid, SIGTERM)
        if wait(timeout: .seconds(3)) == nil {
            kill(pid, SIGKILL)
            wait(timeout: .seconds(3))
        }
    }
}

/// Runs a command to completion (bounded by `timeout`), output and errors together.
@discardableResult
func run(_ arguments: [String], timeout: Duration = .seconds(60), check: Bool = true) throws -> CommandResult {
    let outputFile = FileManager.default.temporaryDirectory
        .appendingPathComponent("td-cmd-\(UUID().uuidString)").path
    defer { unlink(outputFile) }
    let child = try Child(arguments, output: outputFile)
    var status = child.wait(timeout: timeout)
    if status == nil {
        child.stop()
        status = child.status
    }
    let output = (try? String(contentsOfFile: outputFile, encoding: .utf8)) ?? ""
    let result = CommandResult(status: status ?? -1, output: output)
    if check && !result.succeeded { throw CommandFailed(command: arguments, result: result) }
    return result
}

/// A set of namespaced hosts built by Scripts/netns-lab.sh; destroyed (all
/// namespaces and processes) by `destroy()`, which tests call in `defer`.
final class Lab {
    let name: String
    let directory: URL
    let script = repositoryRoot.appendingPathComponent("Scripts/netns-lab.sh").path

    init() throws {
        // Unique per run: PID plus a random suffix, short enough for ip's names.
        name = "td\(getpid() % 100_000)\(String(UInt32.random(in: 0..<0xffff), radix: 16))"
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("tunneld-lab-\(name)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        try lab("create")
    }

    @discardableResult
    func lab(_ arguments: String..., timeout: Duration = .seconds(60)) throws -> CommandResult {
        try run(["bash", script] + [arguments[0], name, directory.path] + arguments.dropFirst(), timeout: timeout)
    }

    func namespace(_ suffix: String) -> String { "\(name)-\(suffix)" }
    var storeDirectory: String { directory.appendingPathComponent("store").path }
    func subnetFile(_ host: Int) -> String { directory.appendingPathComponent("h\(host).env").path }

    /// Adds host N running tunneld with the local store, and its container.
    func addHost(_ n: Int, iface: [String] = ["--iface", "eth0"], extra: [String] = []) throws {
        let command = [tunneldBinary, "run", "--backend", "udp"] + iface
            + ["--subnet-file", subnetFile(n), "--device", "tun0"] + extra
        try run(["bash", script, "add-host", name, directory.path, "\(n)", "--"] + command, timeout: .seconds(90))
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
    func exec(_ ns: String, _ arguments: [String], timeout: Duration = .seconds(60), check: Bool = true) throws -> CommandResult {
        try run(["ip", "netns", "exec", namespace(ns)] + arguments, timeout: timeout, check: check)
    }

    /// Pings from container `from` to container `to`, retrying while routes
    /// settle (bounded: `attempts` rounds).
    func ping(from: Int, to: Int, count: Int = 3, attempts: Int = 10) throws -> CommandResult {
        let target = try containerIP(to)
        var last = CommandResult(status: -1, output: "")
        for _ in 0..<attempts {
            last = try exec("c\(from)", ["ping", "-c", "\(count)", "-i", "0.2", "-W", "1", target],
                            timeout: .seconds(30), check: false)
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
