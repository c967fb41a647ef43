import CTunnel
import NetBase

#if canImport(Glibc)
import Glibc
#endif

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
        let rc = pthread_create(
            &thread,
            nil,
            { arg in
                let me = Unmanaged<ThreadStart>.fromOpaque(arg!).takeRetainedValue()
                _ = ctunnel_set_thread_name(me.name)
                me.body()
                return nil
            },
            box
        )
        precondition(rc == 0, "pthread_create failed: \(Errno(rc))")
        pthread_detach(thread)
    }
}
