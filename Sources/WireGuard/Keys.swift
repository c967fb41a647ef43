/// A key that is not what WireGuard expects: says which and how to make a good one.
public struct KeyError: Error, CustomStringConvertible, Equatable {
    public let description: String
}

extension Bytes32 {
    /// The standard base64 of 32 bytes (44 characters), as `wg genkey` prints keys.
    init(base64 text: String, what: String) throws(KeyError) {
        let trimmed = text.trimmingWhitespace
        guard let decoded = Base64.decode(trimmed), let key = Bytes32(decoded) else {
            throw KeyError(
                description: "\(what) is not base64 of 32 bytes (\(trimmed.count) characters read); "
                    + "make one with `wg genkey` (a private key) or `wg pubkey` (its public key)"
            )
        }
        self = key
    }

    var base64: String { Base64.encode(bytes) }
}

/// An X25519 private key. Printed only by `base64`, never by description.
public struct PrivateKey: Sendable, CustomStringConvertible {
    var raw: Bytes32

    /// A new random key, clamped the way `wg genkey` prints it.
    public static func generate() -> PrivateKey { PrivateKey(raw: Primitive.generatePrivateKey()) }

    public init(raw: Bytes32) { self.raw = raw }

    public init(base64 text: String) throws(KeyError) {
        raw = try Bytes32(base64: text, what: "the WireGuard private key")
    }

    /// `wg genkey`'s form: what a key file holds.
    public var base64: String { raw.base64 }
    public var publicKey: PublicKey { PublicKey(raw: Primitive.publicKey(of: raw)) }
    public var description: String { "PrivateKey(hidden)" }

    public mutating func wipe() { raw.wipe() }
}

/// An X25519 public key: a peer's identity (flannel's `BackendData.PublicKey`).
public struct PublicKey: Sendable, Hashable, CustomStringConvertible {
    public var raw: Bytes32

    public init(raw: Bytes32) { self.raw = raw }

    public init(base64 text: String) throws(KeyError) {
        raw = try Bytes32(base64: text, what: "the WireGuard public key")
    }

    public var base64: String { raw.base64 }
    public var description: String { base64 }
}

/// The optional pre-shared key mixed into the handshake (flannel's `PSK`);
/// all zeros when none is configured, as in the whitepaper.
public struct PresharedKey: Sendable, CustomStringConvertible {
    var raw: Bytes32

    public static let none = PresharedKey(raw: .zero)

    public init(raw: Bytes32) { self.raw = raw }

    public init(base64 text: String) throws(KeyError) {
        raw = try Bytes32(base64: text, what: "the WireGuard pre-shared key")
    }

    public static func generate() -> PresharedKey {
        var raw = Bytes32()
        Primitive.random(&raw.storage)
        return PresharedKey(raw: raw)
    }

    public var base64: String { raw.base64 }
    public var description: String { "PresharedKey(hidden)" }
}

extension String {
    var trimmingWhitespace: Substring {
        let isSpace: (Character) -> Bool = { $0 == " " || $0 == "\n" || $0 == "\r" || $0 == "\t" }
        guard let first = firstIndex(where: { !isSpace($0) }), let last = lastIndex(where: { !isSpace($0) }) else {
            return ""
        }
        return self[first...last]
    }
}

/// Standard base64 with padding (RFC 4648 §4), the alphabet `wg` uses. Keys
/// only: encoding is not cryptography, and Foundation stays out of the module.
enum Base64 {
    private static let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)

    static func encode(_ bytes: [UInt8]) -> String {
        var out = [UInt8]()
        out.reserveCapacity((bytes.count + 2) / 3 * 4)
        var i = 0
        while i < bytes.count {
            let b0 = UInt32(bytes[i])
            let b1 = i + 1 < bytes.count ? UInt32(bytes[i + 1]) : 0
            let b2 = i + 2 < bytes.count ? UInt32(bytes[i + 2]) : 0
            let triple = b0 << 16 | b1 << 8 | b2
            out.append(alphabet[Int(triple >> 18 & 63)])
            out.append(alphabet[Int(triple >> 12 & 63)])
            out.append(i + 1 < bytes.count ? alphabet[Int(triple >> 6 & 63)] : UInt8(ascii: "="))
            out.append(i + 2 < bytes.count ? alphabet[Int(triple & 63)] : UInt8(ascii: "="))
            i += 3
        }
        return String(decoding: out, as: UTF8.self)
    }

    static func decode(_ text: Substring) -> [UInt8]? {
        let chars = Array(text.utf8)
        guard chars.count % 4 == 0 else { return nil }
        var out = [UInt8]()
        var i = 0
        while i < chars.count {
            var values = [UInt32](repeating: 0, count: 4)
            var padding = 0
            for j in 0..<4 {
                let c = chars[i + j]
                if c == UInt8(ascii: "=") {
                    // Padding only at the end, and at most two.
                    guard i + 4 == chars.count, j >= 2 else { return nil }
                    padding += 1
                    continue
                }
                guard padding == 0, let v = alphabet.firstIndex(of: c) else { return nil }
                values[j] = UInt32(v)
            }
            let triple = values[0] << 18 | values[1] << 12 | values[2] << 6 | values[3]
            out.append(UInt8(triple >> 16 & 0xFF))
            if padding < 2 { out.append(UInt8(triple >> 8 & 0xFF)) }
            if padding < 1 { out.append(UInt8(triple & 0xFF)) }
            i += 4
        }
        return out
    }
}
