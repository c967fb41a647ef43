#if canImport(Glibc)
import Glibc
#endif
import CTunnel
import LeaseStore
import NetBase

/// Runs a delegate plugin: found by its `type` in `CNI_PATH`, given the
/// caller's environment with `CNI_COMMAND` set to `command` and `config` on
/// standard input. Returns its standard output; a failure is the delegate's
/// own CNI error when it printed one, else a `CNIError` saying what happened.
public protocol DelegateRunner: Sendable {
    func run(type: String, command: CNICommand, config: [UInt8], request: CNIRequest) throws(CNIError) -> [UInt8]
}

/// The delegate as a child process, the way libcni's `invoke` runs it.
public struct ExecDelegateRunner: DelegateRunner {
    /// Where a delegate's standard error goes (the plugin's own stderr, which
    /// the runtime logs).
    public var diagnostics: @Sendable ([UInt8]) -> Void

    public init(diagnostics: @escaping @Sendable ([UInt8]) -> Void = ExecDelegateRunner.writeToStandardError) {
        self.diagnostics = diagnostics
    }

    public static let writeToStandardError: @Sendable ([UInt8]) -> Void = { bytes in
        bytes.withUnsafeBytes { buffer in
            var offset = 0
            while offset < buffer.count {
                let n = write(2, buffer.baseAddress! + offset, buffer.count - offset)
                if n <= 0 { if n < 0 && errno == EINTR { continue }; return }
                offset += n
            }
        }
    }

    /// The delegate's executable: the first `CNI_PATH` directory holding a
    /// file named `type`.
    public static func find(_ type: String, in searchPath: [String]) throws(CNIError) -> String {
        guard !type.isEmpty, !type.contains("/"), type != ".", type != ".." else {
            throw CNIError(code: CNIError.invalidNetworkConfig, "delegate type \"\(type)\" is not a plugin name")
        }
        for directory in searchPath where !directory.isEmpty {
            let candidate = "\(directory)/\(type)"
            var info = stat()
            if stat(candidate, &info) == 0 && info.st_mode & S_IFMT == S_IFREG { return candidate }
        }
        throw CNIError(code: CNIError.delegateFailed,
                       "failed to find plugin \"\(type)\" in CNI_PATH \(searchPath.joined(separator: ":"))",
                       details: "install the standard plugins (Debian: containernetworking-plugins, in /usr/lib/cni) and include their directory in the runtime's CNI bin path")
    }

    public func run(type: String, command: CNICommand, config: [UInt8], request: CNIRequest) throws(CNIError) -> [UInt8] {
        let executable = try Self.find(type, in: request.searchPath)
        var environment = request.environment
        environment["CNI_COMMAND"] = command.rawValue
        let output: ChildOutput
        do {
            output = try ChildProcess.run(executable, environment: environment, input: config)
        } catch {
            throw CNIError(code: CNIError.delegateFailed, "cannot run delegate \(executable): \(error)")
        }
        if output.status == 0 {
            if !output.stderr.isEmpty { diagnostics(output.stderr) }
            return output.stdout
        }
        throw Self.failure(of: type, output: output)
    }

    /// A failed delegate's error: its own CNI error JSON when it printed one
    /// (so the runtime sees bridge's code and message unchanged, as with
    /// flannel's plugin), else its standard error or exit status.
    static func failure(of type: String, output: ChildOutput) -> CNIError {
        let exit = output.status > 128 ? "killed by signal \(output.status - 128)" : "exit status \(output.status)"
        if !output.stdout.isEmpty {
            if let parsed = try? JSONValue(parsing: output.stdout),
               case .number(let code)? = parsed.field("code"), case .string(let msg)? = parsed.field("msg") {
                var details = ""
                if case .string(let d)? = parsed.field("details") { details = d }
                return CNIError(code: Int(code), msg, details: details)
            }
            return CNIError(code: CNIError.delegateFailed,
                            "delegate \(type) failed (\(exit)) and its output is no CNI error: \(String(decoding: output.stdout.prefix(2048), as: UTF8.self))")
        }
        if !output.stderr.isEmpty {
            return CNIError(code: CNIError.delegateFailed,
                            "delegate \(type) failed (\(exit)): \(String(decoding: output.stderr.prefix(2048), as: UTF8.self))")
        }
        return CNIError(code: CNIError.delegateFailed, "delegate \(type) failed with no error message (\(exit))")
    }
}

/// What a finished child printed, and how it ended (exit status, or 128 +
/// signal).
struct ChildOutput {
    var status: Int32
    var stdout: [UInt8]
    var stderr: [UInt8]
}

/// posix_spawn with standard input fed from memory and both outputs
/// collected, all three pipes served by one poll loop so that neither side
/// can block the other whatever the sizes.
enum ChildProcess {
    static func run(_ executable: String, environment: [String: String], input: [UInt8]) throws(SystemError) -> ChildOutput {
        // Writing to a delegate that closed its stdin must be an EPIPE, not a
        // signal that kills the plugin; the child gets the default back below.
        signal(SIGPIPE, SIG_IGN)
        var stdinPipe = try makePipe()
        defer { for fd in stdinPipe where fd >= 0 { close(fd) } }
        var stdoutPipe = try makePipe()
        defer { for fd in stdoutPipe where fd >= 0 { close(fd) } }
        var stderrPipe = try makePipe()
        defer { for fd in stderrPipe where fd >= 0 { close(fd) } }

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, stdinPipe[0], 0)
        posix_spawn_file_actions_adddup2(&actions, stdoutPipe[1], 1)
        posix_spawn_file_actions_adddup2(&actions, stderrPipe[1], 2)
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var defaults = sigset_t()
        sigemptyset(&defaults)
        sigaddset(&defaults, SIGPIPE)
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGDEF))

        let argv: [UnsafeMutablePointer<CChar>?] = [strdup(executable), nil]
        let envp: [UnsafeMutablePointer<CChar>?] = environment.sorted { $0.key < $1.key }.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { (argv + envp).forEach { free($0) } }
        var pid = pid_t()
        var rc: Int32 = 0
        // A plugin binary being replaced reports "text file busy" for a
        // moment; libcni retries for up to five seconds, so do we.
        for attempt in 0..<6 {
            rc = posix_spawn(&pid, executable, &actions, &attributes, argv, envp)
            if rc != ETXTBSY || attempt == 5 { break }
            sleep(1)
        }
        guard rc == 0 else { throw SystemError("posix_spawn", on: executable, errno: Errno(rc)) }
        // The parent's copies of the child's ends, so EOF arrives when it exits.
        close(stdinPipe[0]); stdinPipe[0] = -1
        close(stdoutPipe[1]); stdoutPipe[1] = -1
        close(stderrPipe[1]); stderrPipe[1] = -1
        _ = fcntl(stdinPipe[1], F_SETFL, fcntl(stdinPipe[1], F_GETFL) | O_NONBLOCK)

        var stdout: [UInt8] = [], stderr: [UInt8] = []
        var written = 0
        if input.isEmpty { close(stdinPipe[1]); stdinPipe[1] = -1 }
        var chunk = [UInt8](repeating: 0, count: 64 << 10)
        while stdoutPipe[0] >= 0 || stderrPipe[0] >= 0 {
            var fds = [pollfd(fd: stdinPipe[1], events: Int16(POLLOUT), revents: 0),
                       pollfd(fd: stdoutPipe[0], events: Int16(POLLIN), revents: 0),
                       pollfd(fd: stderrPipe[0], events: Int16(POLLIN), revents: 0)]
            // poll ignores negative descriptors, so finished pipes drop out.
            if poll(&fds, 3, -1) < 0 {
                if errno == EINTR { continue }
                break
            }
            if stdinPipe[1] >= 0 && fds[0].revents != 0 {
                let n = input.withUnsafeBytes { write(stdinPipe[1], $0.baseAddress! + written, $0.count - written) }
                if n > 0 { written += n }
                if written == input.count || (n < 0 && errno != EAGAIN && errno != EINTR) {
                    close(stdinPipe[1]); stdinPipe[1] = -1
                }
            }
            for (index, pipe) in [(1, 0), (2, 1)] where fds[index].revents != 0 {
                let fd = pipe == 0 ? stdoutPipe[0] : stderrPipe[0]
                let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                if n > 0 {
                    if pipe == 0 { stdout += chunk[..<n] } else { stderr += chunk[..<n] }
                } else if n == 0 || (errno != EINTR && errno != EAGAIN) {
                    close(fd)
                    if pipe == 0 { stdoutPipe[0] = -1 } else { stderrPipe[0] = -1 }
                }
            }
        }
        var raw: Int32 = 0
        while waitpid(pid, &raw, 0) < 0 && errno == EINTR {}
        let status = raw & 0x7f == 0 ? (raw >> 8) & 0xff : 128 + (raw & 0x7f)
        return ChildOutput(status: status, stdout: stdout, stderr: stderr)
    }

    private static func makePipe() throws(SystemError) -> [Int32] {
        var fds: [Int32] = [-1, -1]
        guard ctunnel_pipe_cloexec(&fds) == 0 else { throw SystemError("pipe2", on: "delegate's standard streams", errno: .current) }
        return fds
    }
}
