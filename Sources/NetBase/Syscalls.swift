#if canImport(Glibc)
import Glibc
#endif

// The system calls more than one module makes, each retrying on EINTR and
// returning its result or the errno. Module-specific calls (netlink
// sockets, TUN ioctls) stay in their module and go through
// `retryingInterrupts` too.

/// Runs a libc call that returns -1 and sets errno, retrying on EINTR.
@inline(__always)
public func retryingInterrupts<T: BinaryInteger>(_ call: () -> T) -> Result<T, Errno> {
    while true {
        let r = call()
        if r >= 0 { return .success(r) }
        let e = Errno.current
        if e != .interrupted { return .failure(e) }
    }
}

/// open(2): the new descriptor, or why there is none.
public func openDescriptor(_ path: String, _ flags: Int32) -> Result<Int32, Errno> {
    retryingInterrupts { Glibc.open(path, flags) }
}

/// Writes all of `bytes` to `fd`, however many writes that takes. A write
/// that makes no progress ends it with EIO rather than spinning.
@discardableResult
public func writeAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) -> Result<Void, Errno> {
    var offset = 0
    while offset < bytes.count {
        switch retryingInterrupts({ Glibc.write(fd, bytes.baseAddress! + offset, bytes.count - offset) }) {
        case .success(0): return .failure(Errno(EIO))
        case .success(let n): offset += n
        case .failure(let e): return .failure(e)
        }
    }
    return .success(())
}

@discardableResult
public func writeAll(_ fd: Int32, _ bytes: [UInt8]) -> Result<Void, Errno> {
    bytes.withUnsafeBytes { writeAll(fd, $0) }
}

/// Reads from `fd` until end of file, or until `limit` bytes have arrived.
/// An error ends the read; what came before it is lost with it.
public func readToEnd(_ fd: Int32, limit: Int = .max) -> Result<[UInt8], Errno> {
    var data: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 64 << 10)
    while data.count < limit {
        let read = retryingInterrupts {
            chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
        }
        switch read {
        case .success(0): return .success(data)
        case .success(let n): data += chunk[..<n]
        case .failure(let e): return .failure(e)
        }
    }
    return .success(data)
}
