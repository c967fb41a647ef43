// A real WireGuard peer: Debian's wireguard-go in a namespace of the test's
// own, talking to the Swift protocol core over a UDP socket the test drives.
import Foundation
import NetBase
import NetTestSupport
import Netlink
import Testing

@testable import WireGuard

let hasWireGuardGo =
    FileManager.default.isExecutableFile(atPath: "/usr/bin/wireguard-go")
    && FileManager.default.isExecutableFile(atPath: "/usr/bin/wg")
let needsWireGuardGoMessage: Comment = "needs Debian's wireguard-go and wireguard-tools (Scripts/install-deps)"

func monotonicNow() -> Instant {
    var t = timespec()
    clock_gettime(CLOCK_MONOTONIC, &t)
    return Instant(nanoseconds: Int64(t.tv_sec) * 1_000_000_000 + Int64(t.tv_nsec))
}

func wallClockStamp() -> TAI64N {
    var t = timespec()
    clock_gettime(CLOCK_REALTIME, &t)
    return TAI64N(unixSeconds: Int64(t.tv_sec), nanoseconds: Int64(t.tv_nsec))
}

/// A UDP socket on 127.0.0.1 inside a namespace; closed on deinit.
final class LoopbackSocket {
    let fd: Int32

    init(namespace: TestNamespace, port: UInt16) throws {
        fd = try NetworkNamespace.run(inNamespaceAt: namespace.path) { () -> Int32 in
            let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_port = port.bigEndian
            address.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
            let bound = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
            precondition(
                fd >= 0 && bound == 0,
                "cannot bind UDP 127.0.0.1:\(port) in the test namespace: errno \(errno)"
            )
            return fd
        }
        var timeout = timeval(tv_sec: 1, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    }

    deinit { close(fd) }

    func send(_ bytes: [UInt8], to endpoint: Endpoint) {
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = endpoint.port.bigEndian
        address.sin_addr.s_addr = endpoint.ipv4.bigEndian
        let sent = bytes.withUnsafeBytes { b in
            withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    sendto(fd, b.baseAddress, b.count, 0, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
        }
        #expect(sent == bytes.count)
    }

    /// One datagram and its source, or nil after the 1 s timeout.
    func receive() -> ([UInt8], Endpoint)? {
        var buffer = [UInt8](repeating: 0, count: 2048)
        var address = sockaddr_in()
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let n = buffer.withUnsafeMutableBytes { b in
            withUnsafeMutablePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    recvfrom(fd, b.baseAddress, b.count, 0, $0, &length)
                }
            }
        }
        guard n > 0 else { return nil }
        return (
            Array(buffer[0..<n]),
            Endpoint(ipv4: UInt32(bigEndian: address.sin_addr.s_addr), port: UInt16(bigEndian: address.sin_port))
        )
    }
}

/// An IPv4 ICMP echo (type 8 request, 0 reply) of 84 bytes with valid checksums.
func icmpEcho(
    type: UInt8,
    source: UInt32,
    destination: UInt32,
    identifier: UInt16,
    sequence: UInt16,
    payload: [UInt8]
) -> [UInt8] {
    func checksum(_ bytes: ArraySlice<UInt8>) -> UInt16 {
        var sum: UInt32 = 0
        var i = bytes.startIndex
        while i < bytes.endIndex {
            sum += UInt32(bytes[i]) << 8 + (i + 1 < bytes.endIndex ? UInt32(bytes[i + 1]) : 0)
            i += 2
        }
        while sum > 0xFFFF { sum = (sum & 0xFFFF) + (sum >> 16) }
        return ~UInt16(sum)
    }
    let total = 20 + 8 + payload.count
    var p: [UInt8] = [0x45, 0, UInt8(total >> 8), UInt8(total & 255), 0, 1, 0x40, 0, 64, 1, 0, 0]
    for a in [source, destination] { p += [UInt8(a >> 24), UInt8(a >> 16 & 255), UInt8(a >> 8 & 255), UInt8(a & 255)] }
    let ipSum = checksum(p[0..<20])
    p[10] = UInt8(ipSum >> 8)
    p[11] = UInt8(ipSum & 255)
    p +=
        [type, 0, 0, 0, UInt8(identifier >> 8), UInt8(identifier & 255), UInt8(sequence >> 8), UInt8(sequence & 255)]
        + payload
    let icmpSum = checksum(p[20...])
    p[22] = UInt8(icmpSum >> 8)
    p[23] = UInt8(icmpSum & 255)
    return p
}

func ipv4(_ p: [UInt8], at offset: Int) -> UInt32 {
    p[offset..<offset + 4].reduce(0) { $0 << 8 | UInt32($1) }
}

let goAddress: UInt32 = 0x0A63_0001  // 10.99.0.1, wireguard-go's device
let swiftAddress: UInt32 = 0x0A63_0002  // 10.99.0.2, the Swift peer
let goEndpoint = Endpoint(ipv4: 0x7F00_0001, port: 51820)
let swiftPort: UInt16 = 51821

/// A namespace with wireguard-go configured as flanneld configures a
/// wireguard host (key, listen port, one peer with allowed IPs and endpoint,
/// the address and route), and a Swift interface with a socket beside it.
/// The process, its control socket and the namespace go away however `body` ends.
func withWireGuardGo(_ body: (TestNamespace, String, WireGuardInterface, Peer, LoopbackSocket) throws -> Void) throws {
    try withNamespace { namespace in
        try namespace.ip("link", "set", "lo", "up")
        let device = "wgt\(String(UInt32.random(in: 0...0xFF_FFFF), radix: 16))"
        let goKey = PrivateKey.generate()
        let swiftKey = PrivateKey.generate()
        let keyFile = FileManager.default.temporaryDirectory.appendingPathComponent("\(device).key").path
        _ = FileManager.default.createFile(
            atPath: keyFile,
            contents: Data((goKey.base64 + "\n").utf8),
            attributes: [.posixPermissions: 0o600]
        )
        defer { try? FileManager.default.removeItem(atPath: keyFile) }

        let process = try ChildProcess.start(
            "ip",
            arguments: ["netns", "exec", namespace.name, "env", "WG_PROCESS_FOREGROUND=1", "wireguard-go", device],
            standardOutput: .null,
            standardError: .null,
            parentDeathSignal: SIGTERM
        )
        let controlSocket = "/var/run/wireguard/\(device).sock"
        defer {
            _ = process.terminate()
            try? FileManager.default.removeItem(atPath: controlSocket)
        }
        for _ in 0..<100 where !FileManager.default.fileExists(atPath: controlSocket) { usleep(50_000) }
        try command([
            "ip", "netns", "exec", namespace.name, "wg", "set", device, "private-key", keyFile,
            "listen-port", "51820", "peer", swiftKey.publicKey.base64,
            "endpoint", "127.0.0.1:\(swiftPort)", "allowed-ips", "10.99.0.2/32",
        ])
        try namespace.ip("address", "add", "10.99.0.1/24", "dev", device)
        try namespace.ip("link", "set", device, "up")

        let interface = WireGuardInterface(privateKey: swiftKey)
        let peer = try interface.addPeer(goKey.publicKey, endpoint: goEndpoint)
        let socket = try LoopbackSocket(namespace: namespace, port: swiftPort)
        try body(namespace, device, interface, peer, socket)
    }
}

/// Seals one payload to `peer` and returns the message.
func sealOne(_ payload: [UInt8], interface: WireGuardInterface, peer: Peer, cipher: CipherContext) -> [UInt8]? {
    var slot = [UInt8](repeating: 0, count: 16 + payload.count + 32)
    slot.replaceSubrange(16..<16 + payload.count, with: payload)
    let length = slot.withUnsafeMutableBytes { raw -> Int in
        var packet = PacketBuffer(memory: raw, length: payload.count)
        let outcome = withUnsafeMutablePointer(to: &packet) {
            interface.seal(
                UnsafeMutableBufferPointer(start: $0, count: 1),
                to: peer,
                cipher: cipher,
                now: monotonicNow()
            )
        }
        return outcome.sealed == 1 ? packet.length : 0
    }
    return length > 0 ? Array(slot[0..<length]) : nil
}

/// Opens one transport message; the payload, or nil with the reason recorded.
func openOne(
    _ message: [UInt8],
    from source: Endpoint,
    interface: WireGuardInterface,
    cipher: CipherContext
) -> [UInt8]? {
    var slot = message
    let result = slot.withUnsafeMutableBytes { raw in
        var packet = PacketBuffer(memory: raw, length: message.count)
        return interface.open(&packet, from: source, cipher: cipher, now: monotonicNow()).map {
            Array(raw[16..<16 + $0.payloadLength])
        }
    }
    switch result {
    case .success(let payload): return payload
    case .failure(let rejection):
        Issue.record("wireguard-go's transport message rejected: \(rejection)")
        return nil
    }
}

@Suite(.serialized) struct InteropTests {
    @Test(.enabled(if: isRoot, needsRootMessage), .enabled(if: hasWireGuardGo, needsWireGuardGoMessage))
    func swiftPeerInitiatesRekeysAndAPingGoesBothWays() throws {
        try withWireGuardGo { namespace, device, interface, peer, socket in
            let cipher = CipherContext()
            // Twice: the second handshake rotates the session (the first becomes `previous`)
            // and the ping crosses again on the new keys.
            for round in 1...2 {
                if round == 2 { usleep(100_000) }  // past both sides' 20 ms initiation limit
                let before = peer.current
                socket.send(
                    interface.makeInitiation(for: peer, now: monotonicNow(), timestamp: wallClockStamp()),
                    to: goEndpoint
                )
                var established = false
                for _ in 0..<5 where !established {
                    guard let (datagram, source) = socket.receive() else { continue }
                    switch interface.receiveHandshake(datagram, from: source, now: monotonicNow()) {
                    case .established: established = true
                    case let other: Issue.record("expected wireguard-go's response, got \(other)")
                    }
                }
                try #require(established, "wireguard-go did not answer the initiation")
                let request = icmpEcho(
                    type: 8,
                    source: swiftAddress,
                    destination: goAddress,
                    identifier: 0x5757,
                    sequence: 1,
                    payload: Array(repeating: 0xA5, count: 56)
                )
                socket.send(
                    try #require(sealOne(request, interface: interface, peer: peer, cipher: cipher)),
                    to: goEndpoint
                )
                var reply: [UInt8]?
                for _ in 0..<5 where reply == nil {
                    guard let (datagram, source) = socket.receive(), datagram.first == MessageType.transport.rawValue,
                        let payload = openOne(datagram, from: source, interface: interface, cipher: cipher),
                        !payload.isEmpty
                    else { continue }
                    reply = payload
                }
                let echo = try #require(reply, "no transport message came back from wireguard-go")
                #expect(echo.count >= 84 && echo[9] == 1 && echo[20] == 0, "an ICMP echo reply")
                #expect(ipv4(echo, at: 12) == goAddress && ipv4(echo, at: 16) == swiftAddress)
                #expect(
                    echo[24] == 0x57 && echo[25] == 0x57 && Array(echo[28..<84]) == Array(repeating: 0xA5, count: 56)
                )
                if round == 2 { #expect(peer.previous === before && peer.current !== before) }
            }
            let handshakes = try command([
                "ip", "netns", "exec", namespace.name, "wg", "show", device, "latest-handshakes",
            ])
            #expect(!handshakes.hasSuffix("\t0\n"), "wg show reports the handshake: \(handshakes)")
        }
    }

    @Test(.enabled(if: isRoot, needsRootMessage), .enabled(if: hasWireGuardGo, needsWireGuardGoMessage))
    func wireguardGoInitiatesAndItsPingIsAnswered() throws {
        try goInitiates(underLoad: false)
    }

    /// Under load the first initiation gets a cookie reply; wireguard-go's
    /// retry (after REKEY_TIMEOUT) carries mac2 made from it and is answered.
    @Test(.enabled(if: isRoot, needsRootMessage), .enabled(if: hasWireGuardGo, needsWireGuardGoMessage))
    func wireguardGoRetriesWithTheCookieUnderLoad() throws {
        try goInitiates(underLoad: true)
    }

    func goInitiates(underLoad: Bool) throws {
        try withWireGuardGo { namespace, _, interface, peer, socket in
            let cipher = CipherContext()
            let ping = try ChildProcess.start(
                "ip",
                arguments: ["netns", "exec", namespace.name, "ping", "-c", "1", "-W", "12", "10.99.0.2"],
                standardOutput: .null,
                standardError: .null,
                parentDeathSignal: SIGTERM
            )
            defer { _ = ping.terminate() }
            var answered = false
            var cookiesSent = 0
            for _ in 0..<16 where !answered {
                guard let (datagram, source) = socket.receive() else { continue }
                if datagram.first == MessageType.transport.rawValue {
                    guard let request = openOne(datagram, from: source, interface: interface, cipher: cipher),
                        !request.isEmpty
                    else { continue }
                    #expect(request[9] == 1 && request[20] == 8, "an ICMP echo request")
                    #expect(ipv4(request, at: 12) == goAddress && ipv4(request, at: 16) == swiftAddress)
                    let length = Int(request[2]) << 8 | Int(request[3])
                    let reply = icmpEcho(
                        type: 0,
                        source: swiftAddress,
                        destination: goAddress,
                        identifier: UInt16(request[24]) << 8 | UInt16(request[25]),
                        sequence: UInt16(request[26]) << 8 | UInt16(request[27]),
                        payload: Array(request[28..<length])
                    )
                    socket.send(
                        try #require(sealOne(reply, interface: interface, peer: peer, cipher: cipher)),
                        to: try #require(peer.endpoint)
                    )
                    answered = true
                    continue
                }
                switch interface.receiveHandshake(datagram, from: source, now: monotonicNow(), underLoad: underLoad) {
                case .respond(let p, let response):
                    #expect(p === peer)
                    #expect(!underLoad || cookiesSent == 1, "under load only the retry with mac2 is answered")
                    socket.send(response, to: source)
                case .cookieReply(let reply):
                    #expect(underLoad)
                    cookiesSent += 1
                    socket.send(reply, to: source)
                case let other: Issue.record("expected wireguard-go's initiation, got \(other)")
                }
            }
            try #require(answered, "no ping arrived from wireguard-go")
            #expect(ping.wait(timeout: .seconds(15)) == 0, "wireguard-go's side got the echo reply")
            #expect(peer.current != nil && peer.next == nil, "the responder's session was confirmed")
        }
    }
}
