import CTunnel
import Foundation
import NetBase
import UDPEncap

/// flanneld's health endpoint: `GET /healthz` answers 200 while the daemon
/// runs (`--healthz-ip`, `--healthz-port`). Plain HTTP/1.1 on a thread of its
/// own; one short request per connection, answered and closed.
final class HealthServer: Sendable {
    private let listener: FileDescriptor
    private let wake: FileDescriptor
    let endpoint: UDPEndpoint

    init(address: IPv4Address, port: UInt16) throws {
        let raw = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard raw >= 0 else { throw SystemError("socket(AF_INET, SOCK_STREAM)", on: "healthz", errno: .current) }
        listener = FileDescriptor(taking: raw)
        var one: Int32 = 1
        setsockopt(raw, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var sa = sockaddr_in()
        UDPEndpoint(address: address, port: port).write(to: &sa)
        let bound = withUnsafePointer(to: &sa) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(raw, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0 else {
            throw SystemError("bind", on: "healthz \(address):\(port)", errno: .current,
                              hint: "choose another --healthz-port, or --healthz-port 0 to turn it off")
        }
        guard listen(raw, 16) == 0 else { throw SystemError("listen", on: "healthz \(address):\(port)", errno: .current) }
        let w = eventfd(0, Int32(EFD_CLOEXEC))
        guard w >= 0 else { throw SystemError("eventfd", on: "healthz", errno: .current) }
        wake = FileDescriptor(taking: w)
        endpoint = UDPEndpoint(address: address, port: port)
        Thread.detachNewThread { [self] in serve() }
    }

    func stop() {
        var one: UInt64 = 1
        _ = write(wake.rawValue, &one, 8)
    }

    private func serve() {
        var fds = [pollfd(fd: listener.rawValue, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: wake.rawValue, events: Int16(POLLIN), revents: 0)]
        while true {
            if poll(&fds, 2, -1) < 0 {
                if errno == EINTR { continue }
                return
            }
            if fds[1].revents != 0 {
                listener.close()
                return
            }
            guard fds[0].revents & Int16(POLLIN) != 0 else { continue }
            let client = accept(listener.rawValue, nil, nil)
            guard client >= 0 else { continue }
            answer(client)
            close(client)
        }
    }

    private func answer(_ client: Int32) {
        // A slow or silent client must not hold the endpoint.
        var timeout = timeval(tv_sec: 2, tv_usec: 0)
        setsockopt(client, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var request = [UInt8](repeating: 0, count: 1024)
        let n = request.withUnsafeMutableBytes { recv(client, $0.baseAddress, $0.count, 0) }
        guard n > 0 else { return }
        let line = String(decoding: request[..<n].prefix { $0 != 13 && $0 != 10 }, as: UTF8.self)
        let parts = line.split(separator: " ")
        let (status, body): (String, String)
        if parts.count >= 2 && parts[0] == "GET" && (parts[1] == "/healthz" || parts[1].hasPrefix("/healthz?")) {
            (status, body) = ("200 OK", "tunneld is running\n")
        } else {
            (status, body) = ("404 Not Found", "not found: try GET /healthz\n")
        }
        let response = "HTTP/1.1 \(status)\r\nContent-Type: text/plain\r\nContent-Length: \(body.utf8.count)\r\nConnection: close\r\n\r\n\(body)"
        _ = response.withCString { send(client, $0, strlen($0), Int32(MSG_NOSIGNAL)) }
    }
}
