import NetBase

#if canImport(Glibc)
import Glibc
#endif

/// A failed file operation: which call, on which path, and the errno.
/// `package`: the stores and the CNI plugin share these file operations.
package struct FileError: Error, Sendable, CustomStringConvertible {
    package let operation: String
    package let path: String
    package let errno: Errno

    package var reason: String {
        var text = "\(operation) failed: \(errno)"
        switch errno {
        case .accessDenied, .notPermitted:
            text += " (run tunneld as root, or fix the owner and mode of \(path))"
        case Errno(ENOSPC):
            text += " (the file system is full)"
        case Errno(EROFS):
            text += " (the file system is read-only: choose a writable directory)"
        default: break
        }
        return text
    }

    package var description: String { "\(path): \(reason)" }
}

/// The few file operations the stores need, straight on the syscalls so that
/// every failure carries its errno. Writes that replace a file are atomic:
/// a temporary file in the same directory, fsync, rename, fsync of the directory.
package enum FileIO {
    /// Reads a whole file; nil if it does not exist.
    package static func read(_ path: String, limit: Int = 64 << 20) throws(FileError) -> [UInt8]? {
        let raw: Int32
        switch retryingInterrupts({ open(path, O_RDONLY | O_CLOEXEC) }) {
        case .success(let fd): raw = fd
        case .failure(let e):
            if e == .noSuchFile { return nil }
            throw FileError(operation: "open", path: path, errno: e)
        }
        let fd = FileDescriptor(taking: raw)
        defer { fd.close() }
        var data: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 16 << 10)
        while true {
            let n = chunk.withUnsafeMutableBytes { buffer in
                retryingInterrupts { Glibc.read(fd.rawValue, buffer.baseAddress, buffer.count) }
            }
            switch n {
            case .failure(let e): throw FileError(operation: "read", path: path, errno: e)
            case .success(0): return data
            case .success(let count):
                data.append(contentsOf: chunk[..<count])
                if data.count > limit { throw FileError(operation: "read", path: path, errno: Errno(EFBIG)) }
            }
        }
    }

    /// Replaces `path` with `bytes` atomically: readers see the old or the new
    /// content, never a mix, even if the writer dies half-way.
    package static func writeAtomically(_ path: String, _ bytes: [UInt8], mode: mode_t = 0o600) throws(FileError) {
        let (directory, name) = split(path)
        let temporary = "\(directory)/.\(name).tmp-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let raw: Int32
        switch retryingInterrupts({ open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode) }) {
        case .success(let fd): raw = fd
        case .failure(let e): throw FileError(operation: "create", path: temporary, errno: e)
        }
        let fd = FileDescriptor(taking: raw)
        do throws(FileError) {
            try writeAll(fd, bytes, path: temporary)
            if case .failure(let e) = retryingInterrupts({ fsync(fd.rawValue) }) {
                throw FileError(operation: "fsync", path: temporary, errno: e)
            }
            fd.close()
            if case .failure(let e) = retryingInterrupts({ rename(temporary, path) }) {
                throw FileError(operation: "rename to \(name)", path: temporary, errno: e)
            }
        } catch {
            fd.close()
            _ = unlink(temporary)
            throw error
        }
        syncDirectory(directory)
    }

    /// Appends `bytes` with one write(2) on an O_APPEND descriptor, then fsyncs.
    package static func append(_ path: String, _ bytes: [UInt8], mode: mode_t = 0o600) throws(FileError) {
        let raw: Int32
        switch retryingInterrupts({ open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, mode) }) {
        case .success(let fd): raw = fd
        case .failure(let e): throw FileError(operation: "open for append", path: path, errno: e)
        }
        let fd = FileDescriptor(taking: raw)
        defer { fd.close() }
        try writeAll(fd, bytes, path: path)
        if case .failure(let e) = retryingInterrupts({ fsync(fd.rawValue) }) {
            throw FileError(operation: "fsync", path: path, errno: e)
        }
    }

    /// Removes a file; false if it was not there.
    @discardableResult
    package static func remove(_ path: String) throws(FileError) -> Bool {
        if case .failure(let e) = retryingInterrupts({ unlink(path) }) {
            if e == .noSuchFile { return false }
            throw FileError(operation: "unlink", path: path, errno: e)
        }
        return true
    }

    /// Renames `path` to `newPath` (in the same file system), replacing what is there.
    package static func move(_ path: String, to newPath: String) throws(FileError) {
        if case .failure(let e) = retryingInterrupts({ Glibc.rename(path, newPath) }) {
            throw FileError(operation: "rename to \(newPath)", path: path, errno: e)
        }
        syncDirectory(split(newPath).directory)
    }

    /// `mkdir -p`; directories it creates get `mode`.
    package static func makeDirectories(_ path: String, mode: mode_t) throws(FileError) {
        var prefix = path.hasPrefix("/") ? "" : "."
        for component in path.split(separator: "/") {
            prefix += "/" + component
            if case .failure(let e) = retryingInterrupts({ mkdir(prefix, mode) }), e != .exists {
                throw FileError(operation: "mkdir", path: prefix, errno: e)
            }
        }
        var info = stat()
        if case .failure(let e) = retryingInterrupts({ stat(path, &info) }) {
            throw FileError(operation: "stat", path: path, errno: e)
        }
        if info.st_mode & S_IFMT != S_IFDIR {
            throw FileError(operation: "use as a directory", path: path, errno: Errno(ENOTDIR))
        }
    }

    /// The names in a directory, without "." and "..".
    package static func list(_ directory: String) throws(FileError) -> [String] {
        guard let dir = opendir(directory) else {
            throw FileError(operation: "opendir", path: directory, errno: .current)
        }
        defer { closedir(dir) }
        var names: [String] = []
        while true {
            errno = 0
            guard let entry = readdir(dir) else {
                if errno != 0 { throw FileError(operation: "readdir", path: directory, errno: .current) }
                return names
            }
            let name = withUnsafePointer(to: &entry.pointee.d_name) { pointer in
                pointer.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
            }
            if name != "." && name != ".." { names.append(name) }
        }
    }

    package static func exists(_ path: String) -> Bool {
        var info = stat()
        return stat(path, &info) == 0
    }

    /// Makes a rename durable. Errors are ignored: some file systems refuse
    /// fsync on a directory, and the rename itself has already happened.
    package static func syncDirectory(_ directory: String) {
        let fd = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if fd >= 0 {
            _ = fsync(fd)
            _ = close(fd)
        }
    }

    package static func split(_ path: String) -> (directory: String, name: String) {
        guard let slash = path.lastIndex(of: "/") else { return (".", path) }
        let directory = String(path[..<slash])
        return (directory.isEmpty ? "/" : directory, String(path[path.index(after: slash)...]))
    }

    private static func writeAll(_ fd: FileDescriptor, _ bytes: [UInt8], path: String) throws(FileError) {
        var offset = 0
        while offset < bytes.count {
            let result = bytes.withUnsafeBytes { buffer in
                retryingInterrupts {
                    Glibc.write(fd.rawValue, buffer.baseAddress! + offset, buffer.count - offset)
                }
            }
            switch result {
            case .success(let n): offset += n
            case .failure(let e): throw FileError(operation: "write", path: path, errno: e)
            }
        }
    }
}

/// An exclusive or shared `flock` on a lock file, held until `unlock()` or
/// deinit. Each holder opens the file itself: flock locks belong to the open
/// file description, so two opens exclude each other even inside one process.
package final class FileLock {
    private let fd: FileDescriptor
    package let path: String

    package init(path: String, exclusive: Bool) throws(FileError) {
        self.path = path
        switch retryingInterrupts({ open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600) }) {
        case .success(let raw): fd = FileDescriptor(taking: raw)
        case .failure(let e): throw FileError(operation: "open lock file", path: path, errno: e)
        }
        let operation = exclusive ? LOCK_EX : LOCK_SH
        if case .failure(let e) = retryingInterrupts({ flock(fd.rawValue, operation) }) {
            fd.close()
            throw FileError(operation: "flock", path: path, errno: e)
        }
    }

    package func unlock() {
        if fd.isOpen {
            _ = flock(fd.rawValue, LOCK_UN)
            fd.close()
        }
    }

    deinit { unlock() }
}
