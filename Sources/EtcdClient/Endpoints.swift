import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2

#if canImport(Glibc)
import Glibc
#endif

/// One `--etcd-endpoints` entry: `http://host:port`, `https://host:port`, or
/// `host:port` (scheme from whether TLS is configured). IPv6 literals in brackets.
struct EtcdEndpoint: Sendable, Hashable, CustomStringConvertible {
    var secure: Bool
    var host: String
    var port: Int
    /// The text as given, for messages.
    var original: String

    var description: String { original }

    enum HostKind { case ipv4, ipv6, name }

    var hostKind: HostKind {
        var v4 = in_addr()
        if inet_pton(AF_INET, host, &v4) == 1 { return .ipv4 }
        var v6 = in6_addr()
        if inet_pton(AF_INET6, host, &v6) == 1 { return .ipv6 }
        return .name
    }

    /// Parses one endpoint; `defaultSecure` applies when the text has no scheme.
    static func parse(_ text: String, defaultSecure: Bool) throws(EtcdError) -> EtcdEndpoint {
        func bad(_ why: String) -> EtcdError {
            EtcdError(
                .configuration,
                operation: "connect",
                endpoints: [],
                reason: "endpoint \"\(text)\" \(why)",
                hint: "write endpoints as http://HOST:PORT or https://HOST:PORT, separated by commas"
            )
        }
        var rest = Substring(text.trimmingCharacters(in: .whitespaces))
        var secure = defaultSecure
        if let range = rest.range(of: "://") {
            switch rest[..<range.lowerBound].lowercased() {
            case "http": secure = false
            case "https": secure = true
            default: throw bad("has an unsupported scheme (only http and https)")
            }
            rest = rest[range.upperBound...]
        }
        // A trailing slash (or path) is tolerated, as etcd's own clients do.
        if let slash = rest.firstIndex(of: "/") {
            guard rest[slash...].allSatisfy({ $0 == "/" }) else { throw bad("has a path; give only host and port") }
            rest = rest[..<slash]
        }
        guard !rest.isEmpty else { throw bad("has no host") }
        var host: Substring
        var portText: Substring?
        if rest.hasPrefix("[") {
            guard let close = rest.firstIndex(of: "]") else { throw bad("has an unclosed '['") }
            host = rest[rest.index(after: rest.startIndex)..<close]
            let after = rest[rest.index(after: close)...]
            if !after.isEmpty {
                guard after.hasPrefix(":") else { throw bad("has text after ']' that is not :PORT") }
                portText = after.dropFirst()
            }
        } else if let colon = rest.lastIndex(of: ":") {
            host = rest[..<colon]
            portText = rest[rest.index(after: colon)...]
            guard !host.contains(":") else { throw bad("has an IPv6 address without brackets ([ADDR]:PORT)") }
        } else {
            host = rest
        }
        guard !host.isEmpty else { throw bad("has no host") }
        var port = 2379
        if let portText {
            guard let p = Int(portText), (1...65535).contains(p) else {
                throw bad("has an invalid port \"\(portText)\"")
            }
            port = p
        }
        return EtcdEndpoint(secure: secure, host: String(host), port: port, original: text)
    }
}

/// A resolvable target holding every endpoint, so that one gRPC channel
/// balances (round robin) and fails over across all of them.
struct EtcdEndpointsTarget: ResolvableTarget, Sendable {
    var endpoints: [EtcdEndpoint]
}

/// Resolves every endpoint on each pull: IP literals as they are, names with
/// getaddrinfo (on a thread of its own, so a slow DNS server does not block
/// the concurrency pool). One gRPC endpoint per etcd endpoint.
struct EtcdEndpointsResolverFactory: NameResolverFactory, Sendable {
    typealias Target = EtcdEndpointsTarget

    func resolver(for target: EtcdEndpointsTarget) -> NameResolver {
        // One authority for all connections: only meaningful when every
        // endpoint names the same host. Otherwise (several hosts, or IPs)
        // each connection uses its address: no SNI, and NIOSSL checks the
        // certificate against the peer's IP address.
        let names = Set(target.endpoints.filter { $0.hostKind == .name }.map(\.host))
        let authority =
            names.count == 1 && target.endpoints.allSatisfy({ $0.hostKind == .name })
            ? names.first : nil
        return NameResolver(
            names: RPCAsyncSequence(wrapping: Resolution(endpoints: target.endpoints)),
            updateMode: .pull,
            authority: authority
        )
    }

    struct Resolution: AsyncSequence, Sendable {
        typealias Element = NameResolutionResult
        var endpoints: [EtcdEndpoint]

        func makeAsyncIterator() -> Iterator { Iterator(endpoints: endpoints) }

        struct Iterator: AsyncIteratorProtocol {
            var endpoints: [EtcdEndpoint]

            mutating func next() async throws -> NameResolutionResult? {
                var resolved: [Endpoint] = []
                var failures: [String] = []
                for endpoint in endpoints {
                    switch endpoint.hostKind {
                    case .ipv4:
                        resolved.append(Endpoint(addresses: [.ipv4(host: endpoint.host, port: endpoint.port)]))
                    case .ipv6:
                        resolved.append(Endpoint(addresses: [.ipv6(host: endpoint.host, port: endpoint.port)]))
                    case .name:
                        do {
                            let addresses = try await lookUp(host: endpoint.host, port: endpoint.port)
                            resolved.append(Endpoint(addresses: addresses))
                        } catch {
                            failures.append("\(endpoint): \(error)")
                        }
                    }
                }
                guard !resolved.isEmpty else {
                    throw RPCError(
                        code: .unavailable,
                        message: "no endpoint could be resolved (\(failures.joined(separator: "; ")))"
                    )
                }
                return NameResolutionResult(endpoints: resolved, serviceConfig: nil)
            }
        }
    }
}

struct LookupError: Error, CustomStringConvertible {
    var host: String
    var message: String
    var description: String { "cannot resolve \(host): \(message)" }
}

/// getaddrinfo on a dedicated thread.
func lookUp(host: String, port: Int) async throws -> [GRPCNIOTransportCore.SocketAddress] {
    try await withCheckedThrowingContinuation { continuation in
        let thread = Thread {
            continuation.resume(with: Result { try lookUpBlocking(host: host, port: port) })
        }
        thread.start()
    }
}

private func lookUpBlocking(host: String, port: Int) throws -> [GRPCNIOTransportCore.SocketAddress] {
    var hints = addrinfo()
    hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
    hints.ai_family = AF_UNSPEC
    var result: UnsafeMutablePointer<addrinfo>?
    let status = getaddrinfo(host, String(port), &hints, &result)
    guard status == 0 else {
        throw LookupError(host: host, message: String(cString: gai_strerror(status)))
    }
    defer { freeaddrinfo(result) }
    var addresses: [GRPCNIOTransportCore.SocketAddress] = []
    var cursor = result
    while let info = cursor {
        cursor = info.pointee.ai_next
        guard let sockaddr = info.pointee.ai_addr else { continue }
        var buffer = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN) + 1)
        switch info.pointee.ai_family {
        case AF_INET:
            var address = sockaddr.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { $0.pointee.sin_addr }
            guard inet_ntop(AF_INET, &address, &buffer, socklen_t(buffer.count)) != nil else { continue }
            addresses.append(.ipv4(host: text(buffer), port: port))
        case AF_INET6:
            var address = sockaddr.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { $0.pointee.sin6_addr }
            guard inet_ntop(AF_INET6, &address, &buffer, socklen_t(buffer.count)) != nil else { continue }
            addresses.append(.ipv6(host: text(buffer), port: port))
        default:
            continue
        }
    }
    // getaddrinfo lists one address per protocol/socktype combination.
    var seen = Set<GRPCNIOTransportCore.SocketAddress>()
    let unique = addresses.filter { seen.insert($0).inserted }
    guard !unique.isEmpty else { throw LookupError(host: host, message: "no IPv4 or IPv6 address") }
    return unique
}

/// A NUL-terminated C string in a buffer, as text.
private func text(_ buffer: [CChar]) -> String {
    String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}
