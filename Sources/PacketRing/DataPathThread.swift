#if canImport(Glibc)
import Glibc
#endif
import CTunnel
import NetBase

/// Runs a loop on a thread of its own and reports its end to async code.
public final class DataPathThread: Sendable {
    public let loop: any DataPathLoop
    private let finished: AsyncThrowingStream<Void, any Error>
    private let continuation: AsyncThrowingStream<Void, any Error>.Continuation

    public init(loop: any DataPathLoop, name: String) {
        self.loop = loop
        (finished, continuation) = AsyncThrowingStream.makeStream()
        let continuation = self.continuation
        let thread = ThreadStart { [loop] in
            do {
                try loop.run()
                continuation.finish()
            } catch {
                continuation.finish(throwing: error)
            }
        }
        thread.start(name: name)
    }

    /// Waits until the loop returns; rethrows its error.
    public func wait() async throws {
        for try await _ in finished {}
    }

    public func stop() { loop.stop() }
}

/// A detached pthread running one closure.
final class ThreadStart: @unchecked Sendable {
    let body: @Sendable () -> Void
    var name = ""
    init(_ body: @escaping @Sendable () -> Void) { self.body = body }

    func start(name: String) {
        // Named (at most 15 bytes) so that ps and traces show it.
        self.name = String(name.utf8.prefix(15)) ?? "tunneld-dp"
        let box = Unmanaged.passRetained(self).toOpaque()
        var thread = pthread_t()
        let rc = pthread_create(&thread, nil, { arg in
            let me = Unmanaged<ThreadStart>.fromOpaque(arg!).takeRetainedValue()
            _ = ctunnel_set_thread_name(me.name)
            me.body()
            return nil
        }, box)
        precondition(rc == 0, "pthread_create failed: \(Errno(rc))")
        pthread_detach(thread)
    }
}
