import Foundation
import Testing

@testable import EtcdClient

/// An endpoint where something else answers (an HTTP/1 server, etcd's peer
/// port) is named as such, not as "is etcd running?".
@Suite(.timeLimit(.minutes(1)))
struct NotEtcdTests {
    /// A TCP server on 127.0.0.1 that answers every connection with an
    /// HTTP/1.1 error and closes it; stops after `connections`.
    final class HTTP1Server: @unchecked Sendable {
        let port: UInt16

        init(connections: Int) throws {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_addr.s_addr = inet_addr("127.0.0.1")
            var length = socklen_t(MemoryLayout<sockaddr_in>.size)
            let bound = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) }
            }
            guard bound == 0, listen(fd, 8) == 0 else { throw POSIXError(.EADDRINUSE) }
            _ = withUnsafeMutablePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
            }
            port = UInt16(bigEndian: address.sin_port)
            var timeout = timeval(tv_sec: 20, tv_usec: 0)
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            Thread.detachNewThread {
                for _ in 0..<connections {
                    let client = accept(fd, nil, nil)
                    guard client >= 0 else { break }
                    var buffer = [UInt8](repeating: 0, count: 512)
                    _ = recv(client, &buffer, buffer.count, 0)
                    let reply = "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    _ = reply.withCString { send(client, $0, strlen($0), Int32(MSG_NOSIGNAL)) }
                    close(client)
                }
                close(fd)
            }
        }
    }

    @Test func anEndpointThatIsNotEtcdIsNamedAsSuch() async throws {
        let server = try HTTP1Server(connections: 50)
        let client = try EtcdClient(endpoints: ["http://127.0.0.1:\(server.port)"])
        do {
            _ = try await client.get("/coreos.com/network/config")
            Issue.record("a non-etcd server answered a Range")
        } catch {
            #expect(error.description.contains("not etcd's client API"), "\(error)")
            #expect(error.description.contains("127.0.0.1:\(server.port)"), "\(error)")
        }
    }

    @Test func theHintIsGivenOnlyForProtocolMismatches() {
        #expect(EtcdError.notEtcdHint(.unavailable, "connection refused") == nil)
        #expect(
            EtcdError.notEtcdHint(.unavailable, "closed the connection before completing the HTTP/2 connection preface")
                != nil
        )
        #expect(EtcdError.notEtcdHint(.permissionDenied, "connection preface") == nil)
    }
}
