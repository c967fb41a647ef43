import CTunnel
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// What a finished child printed, and how it ended (exit status, or 128 +
/// signal).
public struct ChildOutput: Sendable {
    public var status: Int32
    public var stdout: [UInt8]
    public var stderr: [UInt8]
    /// Whether it was still running at the timeout and was ended then;
    /// `status` is how it ended once signalled (a child that catches
    /// SIGTERM may exit 0), so a caller must not take it for success.
    public var timedOut: Bool

    public init(status: Int32, stdout: [UInt8], stderr: [UInt8], timedOut: Bool = false) {
        self.status = status
        self.stdout = stdout
        self.stderr = stderr
        self.timedOut = timedOut
    }
}

/// A child process: the one way this project starts one (the daemon's iptables, the CNI
/// plugin's delegates, and every helper the tests start: etcd, daemons, ip, openssl).
///
/// Foundation's `Process` is not used: it gives every thread that starts a child a run
/// loop (an epoll, an eventfd and a timerfd that live as long as the thread), and it can
/// keep reporting a finished child as running while a grandchild (a daemon started in the
/// background) holds the descriptors it watches.
///
/// The child starts with every signal at its default and none blocked, whatever this
/// process has set (a daemon blocks signals for its signalfd and ignores SIGPIPE; a test
/// runner's threads block SIGALRM, which a blocked mask would pass down through every
/// exec). With `parentDeathSignal` it also gets that signal when this process ends, however
/// it ends, so a killed test run leaves no etcd or daemon behind.
public final class ChildProcess: Sendable {
    /// Where one of the child's standard streams goes.
    public enum Stream: Sendable {
        /// /dev/null.
        case null
        /// This process's own descriptor of the same number.
        case inherit
        /// A file: read as standard input; as an output created if missing (0644), and
        /// appended to or truncated first.
        case file(String, append: Bool = true)
        /// A descriptor of the caller's (which stays the caller's to close).
        case descriptor(Int32)
        /// For standard error: wherever standard output goes.
        case standardOutput
    }

    public let pid: pid_t
    /// The program as started (after the PATH search).
    public let executable: String
    private let exit = Mutex<Int32?>(nil)

    private init(pid: pid_t, executable: String) {
        self.pid = pid
        self.executable = executable
    }

    /// Starts `executable` (searched in PATH when it names no directory) with `arguments`.
    /// `environment` nil passes on this process's environment.
    public static func start(
        _ executable: String,
        arguments: [String] = [],
        environment: [String: String]? = nil,
        standardInput: Stream = .null,
        standardOutput: Stream = .inherit,
        standardError: Stream = .inherit,
        parentDeathSignal: Int32? = nil
    ) throws(SystemError) -> ChildProcess {
        let path = try resolve(executable, environment: environment)
        var opened: [Int32] = []
        defer { opened.forEach { close($0) } }
        func descriptor(_ stream: Stream, number: Int32, output: Int32?) throws(SystemError) -> Int32 {
            switch stream {
            case .inherit: return number
            case .descriptor(let fd): return fd
            case .standardOutput: return output ?? 1
            case .null, .file:
                let (file, flags): (String, Int32) =
                    switch stream {
                    case .file(let file, _) where number == 0: (file, O_RDONLY)
                    case .file(let file, let append): (file, O_WRONLY | O_CREAT | (append ? O_APPEND : O_TRUNC))
                    default: ("/dev/null", number == 0 ? O_RDONLY : O_WRONLY)
                    }
                switch retryingInterrupts({ open(file, flags | O_CLOEXEC, 0o644) }) {
                case .success(let fd):
                    opened.append(fd)
                    return fd
                case .failure(let e):
                    throw SystemError(
                        "open",
                        on: "\(file) (standard \(["input", "output", "error"][Int(number)]) of \(executable))",
                        errno: e
                    )
                }
            }
        }
        let input = try descriptor(standardInput, number: 0, output: nil)
        let output = try descriptor(standardOutput, number: 1, output: nil)
        let error = try descriptor(standardError, number: 2, output: output)
        let fds: [Int32] = [input, output, error]

        let argv: [UnsafeMutablePointer<CChar>?] = ([executable] + arguments).map { strdup($0) } + [nil]
        var envp: [UnsafeMutablePointer<CChar>?] = []
        if let environment {
            envp = environment.sorted { $0.key < $1.key }.map { strdup("\($0.key)=\($0.value)") }
        } else {
            var entry = environ
            while let string = entry.pointee { envp.append(strdup(string)); entry += 1 }
        }
        envp.append(nil)
        defer { (argv + envp).forEach { free($0) } }

        var pid = pid_t()
        var rc: Int32 = 0
        // A program being replaced reports "text file busy" for a moment; libcni retries
        // for up to five seconds, so do we.
        for attempt in 0..<6 {
            if let parentDeathSignal {
                rc = fds.withUnsafeBufferPointer { fds in
                    ctunnel_spawn_with_parent_death_signal(path, argv, envp, fds.baseAddress, parentDeathSignal, &pid)
                }
            } else {
                rc = posixSpawn(path, argv, envp, fds, &pid)
            }
            if rc != ETXTBSY || attempt == 5 { break }
            sleep(1)
        }
        guard rc == 0 else { throw SystemError("starting", on: path, errno: Errno(rc)) }
        return ChildProcess(pid: pid, executable: path)
    }

    /// posix_spawn (a vfork, cheap for a daemon with a large address space) with the
    /// standard streams from `fds` and signals reset.
    private static func posixSpawn(
        _ path: String,
        _ argv: [UnsafeMutablePointer<CChar>?],
        _ envp: [UnsafeMutablePointer<CChar>?],
        _ fds: [Int32],
        _ pid: inout pid_t
    ) -> Int32 {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        for (target, fd) in fds.enumerated() where fd != Int32(target) {
            posix_spawn_file_actions_adddup2(&actions, fd, Int32(target))
        }
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var defaults = sigset_t()
        sigfillset(&defaults)
        sigdelset(&defaults, SIGKILL)
        sigdelset(&defaults, SIGSTOP)
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        var mask = sigset_t()
        sigemptyset(&mask)
        posix_spawnattr_setsigmask(&attributes, &mask)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK))
        return posix_spawn(&pid, path, &actions, &attributes, argv, envp)
    }

    /// `executable` itself if it names a directory, else the first PATH entry holding an
    /// executable file of that name (PATH from `environment` if given, else this process's).
    static func resolve(_ executable: String, environment: [String: String]?) throws(SystemError) -> String {
        if executable.contains("/") { return executable }
        let searchPath = environment?["PATH"] ?? getenv("PATH").map { String(cString: $0) } ?? "/usr/bin:/bin"
        for directory in searchPath.split(separator: ":", omittingEmptySubsequences: true) {
            let candidate = "\(directory)/\(executable)"
            if access(candidate, X_OK) == 0 { return candidate }
        }
        throw SystemError(
            "finding",
            on: "\(executable) in PATH \(searchPath)",
            errno: .noSuchFile,
            hint: "install it or give its full path"
        )
    }

    /// The exit status (or 128 + signal) once the child has ended and been reaped.
    public var status: Int32? { exit.withLock { $0 } }

    /// Waits until the child ends (at most `timeout`; nil: as long as it takes) and reaps
    /// it; returns its exit status or 128 + signal, or nil if it is still running.
    @discardableResult
    public func wait(timeout: Duration? = nil) -> Int32? {
        let deadline = timeout.map { ContinuousClock.now + $0 }
        while true {
            if let status { return status }
            // Not under the lock: one thread may wait for good while another terminates.
            var raw: Int32 = 0
            let got = waitpid(pid, &raw, deadline == nil ? 0 : WNOHANG)
            if got == pid {
                let ended = raw & 0x7f == 0 ? (raw >> 8) & 0xff : 128 + (raw & 0x7f)
                exit.withLock { $0 = ended }
                return ended
            }
            if got < 0 && errno != EINTR { return status }  // reaped by another waiter
            if let deadline {
                if ContinuousClock.now >= deadline { return nil }
                usleep(10_000)
            }
        }
    }

    /// Ends the child: `signal` (default SIGTERM), then SIGKILL if it has not ended after
    /// `grace`; reaps it and returns how it ended.
    @discardableResult
    public func terminate(signal: Int32 = SIGTERM, grace: Duration = .seconds(3)) -> Int32 {
        if let status { return status }
        kill(pid, signal)
        if let status = wait(timeout: grace) { return status }
        kill(pid, SIGKILL)
        return wait() ?? 128 + SIGKILL
    }

    /// Runs `executable` to its end with standard input fed from memory and both outputs
    /// collected, all three pipes served by one poll loop so that neither side can block
    /// the other whatever the sizes. With `timeout`, a child still running then is
    /// terminated (SIGTERM, SIGKILL a second later) and its output so far returned,
    /// with `timedOut` set.
    public static func run(
        _ executable: String,
        arguments: [String] = [],
        environment: [String: String]? = nil,
        input: [UInt8] = [],
        timeout: Duration? = nil,
        parentDeathSignal: Int32? = nil
    ) throws(SystemError) -> ChildOutput {
        // Writing to a child that closed its stdin must be an EPIPE, not a signal that
        // kills this process; the child gets the default back.
        signal(SIGPIPE, SIG_IGN)
        var stdinPipe = try makePipe()
        defer { for fd in stdinPipe where fd >= 0 { close(fd) } }
        var stdoutPipe = try makePipe()
        defer { for fd in stdoutPipe where fd >= 0 { close(fd) } }
        var stderrPipe = try makePipe()
        defer { for fd in stderrPipe where fd >= 0 { close(fd) } }
        let child = try start(
            executable,
            arguments: arguments,
            environment: environment,
            standardInput: .descriptor(stdinPipe[0]),
            standardOutput: .descriptor(stdoutPipe[1]),
            standardError: .descriptor(stderrPipe[1]),
            parentDeathSignal: parentDeathSignal
        )
        // The parent's copies of the child's ends, so EOF arrives when it exits.
        close(stdinPipe[0]); stdinPipe[0] = -1
        close(stdoutPipe[1]); stdoutPipe[1] = -1
        close(stderrPipe[1]); stderrPipe[1] = -1
        _ = fcntl(stdinPipe[1], F_SETFL, fcntl(stdinPipe[1], F_GETFL) | O_NONBLOCK)

        let deadline = timeout.map { ContinuousClock.now + $0 }
        var stdout: [UInt8] = [], stderr: [UInt8] = []
        var timedOut = false
        var written = 0
        if input.isEmpty { close(stdinPipe[1]); stdinPipe[1] = -1 }
        var chunk = [UInt8](repeating: 0, count: 64 << 10)
        while stdoutPipe[0] >= 0 || stderrPipe[0] >= 0 {
            var fds = [
                pollfd(fd: stdinPipe[1], events: Int16(POLLOUT), revents: 0),
                pollfd(fd: stdoutPipe[0], events: Int16(POLLIN), revents: 0),
                pollfd(fd: stderrPipe[0], events: Int16(POLLIN), revents: 0),
            ]
            var wait: Int32 = -1
            if let deadline {
                let left = deadline - ContinuousClock.now
                if left <= .zero {
                    // Ended already (a grandchild may hold the pipes): not a timeout.
                    timedOut = child.wait(timeout: .zero) == nil
                    child.terminate(grace: .seconds(1))
                    break
                }
                wait = Int32(
                    clamping: left.components.seconds * 1000 + left.components.attoseconds / 1_000_000_000_000_000 + 1
                )
            }
            // poll ignores negative descriptors, so finished pipes drop out.
            if poll(&fds, 3, wait) < 0 {
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
        let status = child.wait() ?? -1
        return ChildOutput(status: status, stdout: stdout, stderr: stderr, timedOut: timedOut)
    }

    private static func makePipe() throws(SystemError) -> [Int32] {
        var fds: [Int32] = [-1, -1]
        guard ctunnel_pipe_cloexec(&fds) == 0 else {
            throw SystemError("pipe2", on: "a child's standard streams", errno: .current)
        }
        return fds
    }
}
