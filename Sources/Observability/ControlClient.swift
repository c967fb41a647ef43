import Foundation

/// `tunneld status`'s side of the control socket: one `GET` over a unix
/// socket, blocking, bounded by a timeout. Small enough not to need an
/// event loop.
public enum ControlClient {
    public enum Failure: Error, CustomStringConvertible {
        /// Nothing listens there: no daemon runs with this socket.
        case notRunning(socket: String, reason: String)
        /// A daemon answered, but not as expected.
        case failed(socket: String, reason: String)

        public var description: String {
            switch self {
            case .notRunning(let socket, let reason): "no tunneld answers on \(socket) (\(reason))"
            case .failed(let socket, let reason): "the tunneld on \(socket) did not answer properly: \(reason)"
            }
        }
    }

    /// The body of `GET path` over the unix socket `socket`; a status other
    /// than 200 is a failure naming the status and the body's first line.
    public static func get(_ path: String, socket: String, timeout: Duration = .seconds(5)) throws(Failure) -> [UInt8] {
        let fd: Int32
        switch connect(socket) {
        case .success(let opened): fd = opened
        case .failure(let errno):
            let reason = String(cString: strerror(errno.code))
            throw [ENOENT, ECONNREFUSED, ENOTDIR].contains(errno.code)
                ? .notRunning(socket: socket, reason: reason) : .failed(socket: socket, reason: "connect: \(reason)")
        }
        defer { close(fd) }
        var limit = timeval(tv_sec: Int(timeout.components.seconds), tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
        let request = Array("GET \(path) HTTP/1.1\r\nHost: tunneld\r\nConnection: close\r\n\r\n".utf8)
        let sent = request.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        guard sent == request.count else {
            throw .failed(socket: socket, reason: "send: \(String(cString: strerror(errno)))")
        }
        var response: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while response.count < 64 << 20 {
            let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n == 0 { break }
            if n < 0 {
                if errno == EINTR { continue }
                let reason = errno == EAGAIN ? "no answer within \(timeout)" : String(cString: strerror(errno))
                throw .failed(socket: socket, reason: reason)
            }
            response += chunk[..<n]
        }
        return try parse(response, socket: socket)
    }

    static func parse(_ response: [UInt8], socket: String) throws(Failure) -> [UInt8] {
        let separator: [UInt8] = [13, 10, 13, 10]
        guard let end = (0..<max(0, response.count - 3)).first(where: { Array(response[$0..<$0 + 4]) == separator })
        else {
            throw .failed(socket: socket, reason: "the response has no complete header")
        }
        let header = String(decoding: response[..<end], as: UTF8.self)
        let body = Array(response[(end + 4)...])
        let statusLine = header.split(separator: "\r\n").first ?? ""
        let parts = statusLine.split(separator: " ")
        guard parts.count >= 2, parts[0].hasPrefix("HTTP/"), let code = Int(parts[1]) else {
            throw .failed(socket: socket, reason: "unexpected status line \"\(statusLine)\"")
        }
        guard code == 200 else {
            let first = String(decoding: body.prefix { $0 != 10 }, as: UTF8.self)
            throw .failed(socket: socket, reason: "HTTP \(code): \(first)")
        }
        return body
    }

    /// Whether something accepts connections on the unix socket `path`.
    public static func isAnswering(_ path: String) -> Bool {
        guard case .success(let fd) = connect(path) else { return false }
        close(fd)
        return true
    }

    /// A connected stream socket, or the errno of socket/connect.
    static func connect(_ path: String) -> Result<Int32, POSIXErrorCodeBox> {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
            return .failure(POSIXErrorCodeBox(ENAMETOOLONG))
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return .failure(POSIXErrorCodeBox(errno)) }
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: bytes) }
        let length = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count)
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, length) }
        }
        guard result == 0 else {
            let code = errno
            close(fd)
            return .failure(POSIXErrorCodeBox(code))
        }
        return .success(fd)
    }

    public struct POSIXErrorCodeBox: Error {
        public let code: Int32
        init(_ code: Int32) { self.code = code }
    }
}
