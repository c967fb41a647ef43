// Test support: scratch network namespaces and running `ip` to set up and
// check what the code under test did.
import Foundation
import NetBase
import Netlink
import Testing

/// Tests that create namespaces, devices and routes need root.
public let isRoot = getuid() == 0
public let needsRootMessage: Comment = "needs root: creates network namespaces, devices and routes"

/// A command that did not exit with 0: what ran, how it ended and what it printed.
public struct CommandFailed: Error, CustomStringConvertible {
    public let command: [String]
    public let status: Int32
    public let output: String
    public init(command: [String], status: Int32, output: String) {
        self.command = command
        self.status = status
        self.output = output
    }
    public var description: String { "`\(command.joined(separator: " "))` exited with \(status):\n\(output)" }
}

/// Runs a command and returns its standard output; throws with its standard
/// error when it fails. A command still running after 30 s is ended, and has
/// failed whatever it exits with then.
@discardableResult
public func command(_ arguments: [String]) throws -> String {
    let timeout = Duration.seconds(30)
    let output = try ChildProcess.run(
        arguments[0],
        arguments: Array(arguments.dropFirst()),
        timeout: timeout,
        parentDeathSignal: SIGKILL
    )
    let stdout = String(decoding: output.stdout, as: UTF8.self)
    guard !output.timedOut else {
        throw CommandFailed(
            command: arguments,
            status: output.status,
            output: "still running after its timeout of \(timeout), stopped; its output so far:\n"
                + String(decoding: output.stderr, as: UTF8.self) + stdout
        )
    }
    guard output.status == 0 else {
        throw CommandFailed(
            command: arguments,
            status: output.status,
            output: String(decoding: output.stderr, as: UTF8.self) + stdout
        )
    }
    return stdout
}

/// A network namespace named tdtest-<pid>-<random>, made with `ip netns add`.
public struct TestNamespace: Sendable {
    public let name: String
    public var path: String { "/var/run/netns/\(name)" }

    public init() throws {
        name = "tdtest-\(getpid())-\(String(UInt32.random(in: 0...UInt32.max), radix: 16))"
        try command(["ip", "netns", "add", name])
    }

    /// `ip -n <namespace> <arguments>`.
    @discardableResult
    public func ip(_ arguments: String...) throws -> String {
        try command(["ip", "-n", name] + arguments)
    }

    /// An rtnetlink socket bound to this namespace.
    public func socket() throws -> RouteSocket { try RouteSocket(namespacePath: path) }

    public func remove() {
        do { try command(["ip", "netns", "del", name]) } catch {
            Issue.record("could not remove namespace \(name): \(error)")
        }
    }
}

/// Runs `body` with a fresh namespace that is removed afterwards, whether
/// `body` returns or throws.
@discardableResult
public func withNamespace<T>(_ body: (TestNamespace) throws -> T) throws -> T {
    let namespace = try TestNamespace()
    defer { namespace.remove() }
    return try body(namespace)
}

/// The flags `ip -o link show` prints between < and >.
public func linkFlags(_ ipLinkLine: String) -> Set<Substring> {
    guard let open = ipLinkLine.firstIndex(of: "<"), let close = ipLinkLine.firstIndex(of: ">"), open < close else {
        return []
    }
    return Set(ipLinkLine[ipLinkLine.index(after: open)..<close].split(separator: ","))
}
