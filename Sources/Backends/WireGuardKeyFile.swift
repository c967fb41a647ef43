import NetBase
import WireGuard

#if canImport(Glibc)
import Glibc
#endif

/// This host's WireGuard private key, where flanneld keeps it: the file
/// `WIREGUARD_KEY_FILE` names, else /run/flannel/wgkey. An absent file is
/// created (mode 0400, its directory 0755) holding a new key in `wg genkey`'s
/// base64 without a newline, as flanneld writes it, so that either daemon
/// reads the other's file.
public enum WireGuardKeyFile {
    public static let defaultPath = "/run/flannel/wgkey"
    public static let environmentVariable = "WIREGUARD_KEY_FILE"

    /// The key file's path for this environment.
    public static func path(environment: [String: String]) -> String {
        environment[environmentVariable] ?? defaultPath
    }

    /// The process environment's path.
    public static var path: String {
        guard let value = getenv(environmentVariable) else { return defaultPath }
        return String(cString: value)
    }

    /// Reads the key at `path`, or makes one there when there is no file.
    public static func loadOrCreate(at path: String) throws -> (key: PrivateKey, created: Bool) {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        if fd < 0 {
            let e = Errno.current
            guard e == Errno(ENOENT) else {
                throw BackendError(
                    "cannot read the WireGuard key file \(path): \(e) (run as root, fix its permissions, "
                        + "or point \(environmentVariable) at a readable file)"
                )
            }
            return (try create(at: path), true)
        }
        defer { close(fd) }
        let bytes: [UInt8]
        switch readToEnd(fd, limit: 4096) {
        case .success(let b): bytes = b
        case .failure(let e):
            throw BackendError("cannot read the WireGuard key file \(path): \(e)")
        }
        do {
            return (try PrivateKey(base64: String(decoding: bytes, as: UTF8.self)), false)
        } catch {
            throw BackendError(
                "the WireGuard key file \(path) does not hold a private key: \(error). Put one there "
                    + "(wg genkey > \(path); chmod 400 \(path)), or delete the file to have tunneld make a new one "
                    + "(the other hosts then learn the new public key from this host's lease)"
            )
        }
    }

    private static func create(at path: String) throws -> PrivateKey {
        try makeDirectories(for: path)
        let key = PrivateKey.generate()
        // O_EXCL: two starting daemons do not both write a key.
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o400)
        guard fd >= 0 else {
            throw BackendError("cannot create the WireGuard key file \(path): \(Errno.current)")
        }
        defer { close(fd) }
        let written = writeAll(fd, Array(key.base64.utf8))
        if case .failure(let e) = written {
            unlink(path)
            throw BackendError("cannot write the WireGuard key file \(path): \(e)")
        }
        _ = fsync(fd)
        return key
    }

    private static func makeDirectories(for path: String) throws {
        var prefix = ""
        let parts = path.split(separator: "/", omittingEmptySubsequences: true).dropLast()
        for part in parts {
            prefix += "/" + part
            if mkdir(prefix, 0o755) != 0, Errno.current != Errno(EEXIST) {
                throw BackendError("cannot create \(prefix) for the WireGuard key file \(path): \(Errno.current)")
            }
        }
    }
}
