import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Owns a file descriptor and closes it exactly once: on `close()` or when the
/// last reference goes away.
public final class FileDescriptor: Sendable, CustomStringConvertible {
    private let fd: Mutex<Int32>
    /// The descriptor as it was when opened; valid until `close()`.
    public let rawValue: Int32

    public init(taking rawValue: Int32) {
        precondition(rawValue >= 0, "FileDescriptor needs an open descriptor")
        self.rawValue = rawValue
        self.fd = Mutex(rawValue)
    }

    public var isOpen: Bool { fd.withLock { $0 >= 0 } }

    public func close() {
        let toClose: Int32 = fd.withLock { value in
            defer { value = -1 }
            return value
        }
        if toClose >= 0 { _ = Glibc.close(toClose) }
    }

    deinit { close() }

    public var description: String { "fd \(rawValue)" }
}
