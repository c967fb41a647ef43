#if canImport(Glibc)
import Glibc
#endif

/// An errno value with a readable description.
public struct Errno: Error, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: Int32
    public init(_ rawValue: Int32) { self.rawValue = rawValue }

    /// The calling thread's current errno.
    public static var current: Errno { Errno(errno) }

    public static let again = Errno(EAGAIN)
    public static let interrupted = Errno(EINTR)
    public static let notPermitted = Errno(EPERM)
    public static let accessDenied = Errno(EACCES)
    public static let noSuchDevice = Errno(ENODEV)
    public static let noSuchFile = Errno(ENOENT)
    public static let exists = Errno(EEXIST)
    public static let busy = Errno(EBUSY)
    public static let invalid = Errno(EINVAL)
    public static let noBuffers = Errno(ENOBUFS)

    public var description: String { String(cString: strerror(rawValue)) }
}

/// A failed system operation, saying what was attempted, on what, why it
/// failed and — where there is one — what to do about it.
public struct SystemError: Error, Sendable, CustomStringConvertible {
    public let operation: String
    public let object: String
    public let errno: Errno
    public let hint: String?

    public init(_ operation: String, on object: String, errno: Errno, hint: String? = nil) {
        self.operation = operation
        self.object = object
        self.errno = errno
        self.hint = hint ?? SystemError.defaultHint(for: errno)
    }

    public var description: String {
        var text = "\(operation) on \(object) failed: \(errno)"
        if let hint { text += " (\(hint))" }
        return text
    }

    static func defaultHint(for errno: Errno) -> String? {
        switch errno {
        case .notPermitted, .accessDenied: return "run as root or grant CAP_NET_ADMIN"
        default: return nil
        }
    }
}
