/// WireGuard's four message types (whitepaper §5.4), the first byte of a datagram.
public enum MessageType: UInt8, Sendable {
    case initiation = 1
    case response = 2
    case cookieReply = 3
    case transport = 4
}

/// Message sizes and offsets (little-endian fields, three reserved zero bytes after the type).
public enum MessageLayout {
    public static let initiationLength = 148
    public static let responseLength = 92
    public static let cookieReplyLength = 64
    /// type, reserved, receiver index, counter: the room a caller leaves before a payload.
    public static let transportHeaderLength = 16
    public static let tagLength = 16
    /// A keepalive: header and tag, no payload.
    public static let transportMinimumLength = 32
    /// Transport payloads are zero-padded to a multiple of this.
    public static let paddingMultiple = 16

    /// The room after a payload of `length` bytes that sealing needs (padding and tag).
    public static func trailerRoom(forPayload length: Int) -> Int {
        paddedLength(length) - length + tagLength
    }

    /// `length` rounded up to a multiple of 16, but not past `mtu` (the
    /// inner device's MTU) when it fits in it, as the kernel's WireGuard and
    /// wireguard-go pad: a packet of exactly the MTU is not padded, so that
    /// its message fits the 80 bytes of overhead the device's MTU leaves,
    /// over an IPv6 underlay too (1420 + 16 of padding + 32 + 48 would be
    /// 1504 on a 1500-byte path: fragmented, and UDP_SEGMENT refused).
    public static func paddedLength(_ length: Int, mtu: Int? = nil) -> Int {
        let rounded = (length + paddingMultiple - 1) / paddingMultiple * paddingMultiple
        guard let mtu, length <= mtu else { return rounded }
        return min(rounded, mtu)
    }
}

/// Why a datagram was dropped. Counted by reason by the data path; never a crash.
public enum Rejection: Error, Sendable, Hashable, CustomStringConvertible {
    case empty
    case unknownType(UInt8)
    case wrongLength(MessageType, Int)
    case badMAC1
    /// Under load, a handshake message without a valid mac2: answered with a cookie reply.
    case needsCookie
    /// Under load, more handshake messages from one address than it is allowed.
    case rateLimited
    case unknownReceiver(UInt32)
    case unknownPeer
    case decryptionFailed(MessageType)
    case replayedTimestamp
    case initiationTooSoon
    case unexpectedResponse
    case replayedCounter(UInt64)
    case expiredKeypair
    case invalidEphemeral

    public var description: String {
        switch self {
        case .empty: "empty datagram"
        case .unknownType(let t): "unknown message type \(t) (WireGuard has 1–4)"
        case .wrongLength(let t, let n): "\(t) message of \(n) bytes has the wrong length"
        case .badMAC1: "mac1 does not verify (not for this interface's public key)"
        case .needsCookie: "under load and mac2 is missing or stale: cookie reply sent"
        case .rateLimited: "under load and this address sent more than 20 handshake messages a second"
        case .unknownReceiver(let i): "receiver index \(i) names no session or handshake"
        case .unknownPeer: "initiation from a static key that is not a configured peer"
        case .decryptionFailed(let t): "\(t) message fails authentication"
        case .replayedTimestamp: "initiation timestamp not newer than the last accepted (replay)"
        case .initiationTooSoon: "initiation less than 20 ms after the last from this peer"
        case .unexpectedResponse: "response or cookie reply for a handshake not in progress"
        case .replayedCounter(let c): "transport counter \(c) already received or behind the window"
        case .expiredKeypair: "transport message for a session past REJECT_AFTER_TIME/MESSAGES"
        case .invalidEphemeral: "ephemeral key gives an all-zero X25519 result"
        }
    }
}

/// The message type of a datagram with its length checked: the first test
/// every received datagram passes.
public func classify(_ datagram: UnsafeRawBufferPointer) -> Result<MessageType, Rejection> {
    guard let first = datagram.first else { return .failure(.empty) }
    // The type is a little-endian 32-bit field: the three bytes after the first must be zero.
    guard let type = MessageType(rawValue: first), datagram.count >= 4,
        datagram[1] | datagram[2] | datagram[3] == 0
    else { return .failure(.unknownType(first)) }
    let n = datagram.count
    let ok: Bool
    switch type {
    case .initiation: ok = n == MessageLayout.initiationLength
    case .response: ok = n == MessageLayout.responseLength
    case .cookieReply: ok = n == MessageLayout.cookieReplyLength
    case .transport: ok = n >= MessageLayout.transportMinimumLength
    }
    return ok ? .success(type) : .failure(.wrongLength(type, n))
}

/// A UDP endpoint (IPv4 or IPv6 address and port): where a peer was last
/// heard from. The address bytes and port feed the cookie MAC.
public struct Endpoint: Sendable, Hashable, CustomStringConvertible {
    public var address: Bytes16
    public var isIPv6: Bool
    public var port: UInt16

    /// An IPv4 endpoint; `address` in host order (0x7F00_0001 is 127.0.0.1).
    public init(ipv4 address: UInt32, port: UInt16) {
        var a = Bytes16()
        a.withUnsafeMutableBytes { $0.storeBytes(of: address.bigEndian, toByteOffset: 0, as: UInt32.self) }
        self.address = a
        isIPv6 = false
        self.port = port
    }

    public init(ipv6 address: Bytes16, port: UInt16) {
        self.address = address
        isIPv6 = true
        self.port = port
    }

    public var ipv4: UInt32 { address.withUnsafeBytes { UInt32(bigEndian: $0.loadUnaligned(as: UInt32.self)) } }

    /// Address bytes then the port big-endian: what the cookie is a MAC of.
    func withCookieInput<R>(_ body: (UnsafeRawBufferPointer) -> R) -> R {
        var buffer = (Bytes16(), UInt16(0))
        let length = isIPv6 ? 16 : 4
        return withUnsafeMutableBytes(of: &buffer) { raw in
            address.withUnsafeBytes { raw.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[0..<length])) }
            raw.storeBytes(of: port.bigEndian, toByteOffset: length, as: UInt16.self)
            return body(UnsafeRawBufferPointer(rebasing: raw[0..<(length + 2)]))
        }
    }

    public var description: String {
        if isIPv6 { return "[\(Self.ipv6Text(address.bytes))]:\(port)" }
        let a = ipv4
        return "\(a >> 24).\(a >> 16 & 255).\(a >> 8 & 255).\(a & 255):\(port)"
    }

    /// RFC 5952 text: groups in lowercase hex, the longest run of two or
    /// more zero groups (the first of equal runs) as `::`.
    static func ipv6Text(_ bytes: [UInt8]) -> String {
        let groups = (0..<8).map { UInt16(bytes[2 * $0]) << 8 | UInt16(bytes[2 * $0 + 1]) }
        var best = (start: -1, length: 0)
        var i = 0
        while i < 8 {
            guard groups[i] == 0 else {
                i += 1
                continue
            }
            var end = i
            while end < 8, groups[end] == 0 { end += 1 }
            if end - i > best.length { best = (i, end - i) }
            i = end
        }
        func text(_ range: Range<Int>) -> String {
            groups[range].map { String($0, radix: 16) }.joined(separator: ":")
        }
        guard best.length >= 2 else { return text(0..<8) }
        return text(0..<best.start) + "::" + text((best.start + best.length)..<8)
    }
}
