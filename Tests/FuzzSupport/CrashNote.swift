#if canImport(Glibc)
import Glibc
#endif

/// A case that traps or faults (a guard page hit) kills the test process before Swift
/// Testing can report it; this prints the case's seed and replay command first. The note
/// lives in a preallocated buffer and the handler only calls write(2), then restores the
/// previous handler (the Swift runtime's backtracer) and returns, so the fault repeats and
/// is reported as usual.
enum CrashNote {
    static let capacity = 512
    nonisolated(unsafe) static let buffer = UnsafeMutablePointer<CChar>.allocate(capacity: capacity)
    nonisolated(unsafe) static var length = 0
    nonisolated(unsafe) static var previousActions = UnsafeMutablePointer<sigaction>.allocate(capacity: 32)
    nonisolated(unsafe) static var installed = false
    static let signals: [Int32] = [SIGSEGV, SIGBUS, SIGILL, SIGTRAP, SIGFPE, SIGABRT]

    static func set(_ text: String) {
        length = 0
        // Not while a handler could read it half-written: the note is written by the one
        // test thread that runs cases and read only by a fault on that same thread.
        for byte in text.utf8.prefix(capacity - 1) {
            buffer[length] = CChar(bitPattern: byte)
            length += 1
        }
        if !installed { install() }
    }

    static func clear() { length = 0 }

    static func install() {
        installed = true
        for signal in signals {
            var action = sigaction()
            action.__sigaction_handler.sa_sigaction = { signal, _, _ in
                if CrashNote.length > 0 {
                    _ = write(2, "\n", 1)
                    _ = write(2, CrashNote.buffer, CrashNote.length)
                    _ = write(2, "\n", 1)
                }
                var old = CrashNote.previousActions[Int(signal)]
                sigaction(signal, &old, nil)
            }
            action.sa_flags = SA_SIGINFO | SA_ONSTACK
            sigemptyset(&action.sa_mask)
            sigaction(signal, &action, previousActions + Int(signal))
        }
    }
}
