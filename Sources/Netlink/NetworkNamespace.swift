import CTunnel
import NetBase

#if canImport(Glibc)
import Glibc
#endif

/// Running code inside another network namespace.
///
/// The network namespace belongs to a thread, not to the process, and
/// sockets and TUN devices stay in the namespace they were created in. So
/// the clean way to act in a namespace is: start a fresh thread, join the
/// namespace there, open what is needed, and end the thread — the opened
/// file descriptors keep working from any thread afterwards. Threads of a
/// pool (Swift concurrency, Dispatch) are never moved.
public enum NetworkNamespace {
    /// Runs `body` on a new thread that has joined the network namespace at
    /// `path` (`/var/run/netns/<name>`, `/proc/<pid>/ns/net`), waits for it
    /// and returns its result or rethrows its error.
    public static func run<T>(inNamespaceAt path: String, _ body: () throws -> T) throws -> T {
        let namespace: FileDescriptor
        switch openDescriptor(path, O_RDONLY | O_CLOEXEC) {
        case .success(let fd): namespace = FileDescriptor(taking: fd)
        case .failure(let e):
            throw SystemError(
                "open network namespace",
                on: path,
                errno: e,
                hint: e == .noSuchFile ? "no such namespace; create it (ip netns add NAME)" : nil
            )
        }
        var outcome: Result<T, any Error>?
        try withoutActuallyEscaping(body) { body in
            let work = ThreadWork {
                if case .failure(let e) = Syscall.joinNetworkNamespace(namespace.rawValue) {
                    outcome = .failure(
                        SystemError(
                            "setns(CLONE_NEWNET)",
                            on: path,
                            errno: e,
                            hint: e == .invalid ? "\(path) is not a network namespace" : nil
                        )
                    )
                    return
                }
                outcome = Result { try body() }
            }
            try work.runOnNewThread(name: path)
        }
        guard let outcome else {
            throw SystemError(
                "run in network namespace",
                on: path,
                errno: Errno(EPROTO),
                hint: "the thread returned no result"
            )
        }
        return try outcome.get()
    }
}

/// A closure run on a thread of its own and joined before `runOnNewThread`
/// returns, so the closure may capture the caller's state.
private final class ThreadWork {
    let body: () -> Void
    init(_ body: @escaping () -> Void) { self.body = body }

    func runOnNewThread(name: String) throws {
        let context = Unmanaged.passRetained(self).toOpaque()
        var thread = pthread_t()
        let created = pthread_create(
            &thread,
            nil,
            { context in
                let work = Unmanaged<ThreadWork>.fromOpaque(context!).takeRetainedValue()
                work.body()
                return nil
            },
            context
        )
        guard created == 0 else {
            Unmanaged<ThreadWork>.fromOpaque(context).release()
            throw SystemError("pthread_create", on: name, errno: Errno(created))
        }
        let joined = pthread_join(thread, nil)
        guard joined == 0 else { throw SystemError("pthread_join", on: name, errno: Errno(joined)) }
    }
}
