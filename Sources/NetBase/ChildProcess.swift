#if canImport(Glibc)
import Glibc
#endif
import CTunnel

/// What a finished child printed, and how it ended (exit status, or 128 +
/// signal).
public struct ChildOutput: Sendable {
    public var status: Int32
    public var stdout: [UInt8]
    public var stderr: [UInt8]

    public init(status: Int32, stdout: [UInt8], stderr: [UInt8]) {
        self.status = status
        self.stdout = stdout
        self.stderr = stderr
    }
}

/// posix_spawn with standard input fed from memory and both outputs
/// collected, all three pipes served by one poll loop so that neither side
/// can block the other whatever the sizes.
///
/// Used instead of Foundation's `Process`, which gives every thread that
/// starts a child a run loop (an epoll, an eventfd and a timerfd that live as
/// long as the thread) — in a daemon that runs iptables from the concurrency
/// pool, open descriptors then rise and fall with the pool's threads.
public enum ChildProcess {
    /// Runs `executable` with `arguments`, waits for it and returns what it
    /// printed. `environment` nil passes on this process's environment.
    public static func run(_ executable: String, arguments: [String] = [], environment: [String: String]? = nil,
                           input: [UInt8] = []) throws(SystemError) -> ChildOutput {
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
        // The child starts with no signal blocked and every disposition at
        // its default, whatever this process (a daemon blocking signals for
        // its signalfd, ignoring SIGPIPE) has set.
        var defaults = sigset_t()
        sigfillset(&defaults)
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        var mask = sigset_t()
        sigemptyset(&mask)
        posix_spawnattr_setsigmask(&attributes, &mask)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK))

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
        guard ctunnel_pipe_cloexec(&fds) == 0 else { throw SystemError("pipe2", on: "a child's standard streams", errno: .current) }
        return fds
    }
}
