import CWireGuardCrypto

/// A primitive failed inside libcrypto or libsodium: a tag that does not
/// verify, a low-order public key, or the library could not load the
/// algorithm.
struct PrimitiveFailure: Error {}

/// WireGuard's primitives (whitepaper §5.4) over CWireGuardCrypto. Each is one
/// library call; the protocol code above never sees a C pointer.
enum Primitive {
    static func random<T>(_ value: inout T) {
        let ok = Swift.withUnsafeMutableBytes(of: &value) { cwg_random($0.baseAddress, $0.count) }
        // RAND_bytes fails only when the system's entropy source is broken;
        // nothing the protocol can do without randomness is safe.
        precondition(ok == 1, "libcrypto's RAND_bytes failed: the system's random source is unavailable")
    }

    static func randomUInt32() -> UInt32 {
        var value: UInt32 = 0
        random(&value)
        return value
    }

    /// HASH(a || b), BLAKE2s-256.
    static func hash(_ a: UnsafeRawBufferPointer, _ b: UnsafeRawBufferPointer = .init(start: nil, count: 0)) -> Bytes32
    {
        var out = Bytes32()
        let ok = out.withUnsafeMutableBytes { o in
            cwg_blake2s256(
                o.baseAddress!.assumingMemoryBound(to: UInt8.self),
                a.baseAddress?.assumingMemoryBound(to: UInt8.self),
                a.count,
                b.baseAddress?.assumingMemoryBound(to: UInt8.self),
                b.count
            )
        }
        precondition(ok == 1, "libcrypto's BLAKE2s-256 failed")
        return out
    }

    static func hash(_ a: Bytes32, _ b: UnsafeRawBufferPointer) -> Bytes32 {
        a.withUnsafeBytes { hash($0, b) }
    }

    static func hash(_ a: Bytes32, _ b: Bytes32) -> Bytes32 {
        a.withUnsafeBytes { x in b.withUnsafeBytes { y in hash(x, y) } }
    }

    static func hash(_ label: String, _ b: Bytes32) -> Bytes32 {
        var label = label
        return label.withUTF8 { l in b.withUnsafeBytes { hash(UnsafeRawBufferPointer(l), $0) } }
    }

    /// HMAC(key, a || b), HMAC-BLAKE2s-256.
    static func hmac(
        _ key: Bytes32,
        _ a: UnsafeRawBufferPointer,
        _ b: UnsafeRawBufferPointer = .init(start: nil, count: 0)
    ) -> Bytes32 {
        var out = Bytes32()
        let ok = key.withUnsafeBytes { k in
            out.withUnsafeMutableBytes { o in
                cwg_hmac_blake2s(
                    o.baseAddress!.assumingMemoryBound(to: UInt8.self),
                    k.baseAddress!.assumingMemoryBound(to: UInt8.self),
                    a.baseAddress?.assumingMemoryBound(to: UInt8.self),
                    a.count,
                    b.baseAddress?.assumingMemoryBound(to: UInt8.self),
                    b.count
                )
            }
        }
        precondition(ok == 1, "libcrypto's HMAC-BLAKE2s failed")
        return out
    }

    /// KDF_n(key, input) of the whitepaper (HKDF over HMAC-BLAKE2s): n = 1...3 outputs.
    static func kdf(_ key: Bytes32, _ input: UnsafeRawBufferPointer, outputs: Int) -> (Bytes32, Bytes32, Bytes32) {
        var t0 = hmac(key, input)
        defer { t0.wipe() }
        var one: UInt8 = 1
        let t1 = Swift.withUnsafeBytes(of: &one) { hmac(t0, $0) }
        guard outputs > 1 else { return (t1, .zero, .zero) }
        var two: UInt8 = 2
        let t2 = t1.withUnsafeBytes { a in Swift.withUnsafeBytes(of: &two) { hmac(t0, a, $0) } }
        guard outputs > 2 else { return (t1, t2, .zero) }
        var three: UInt8 = 3
        let t3 = t2.withUnsafeBytes { a in Swift.withUnsafeBytes(of: &three) { hmac(t0, a, $0) } }
        return (t1, t2, t3)
    }

    static func kdf(_ key: Bytes32, _ input: Bytes32, outputs: Int) -> (Bytes32, Bytes32, Bytes32) {
        input.withUnsafeBytes { kdf(key, $0, outputs: outputs) }
    }

    /// MAC(key, data): keyed BLAKE2s with a 16-byte output.
    static func mac(_ key: UnsafeRawBufferPointer, _ data: UnsafeRawBufferPointer) -> Bytes16 {
        var out = Bytes16()
        let ok = out.withUnsafeMutableBytes { o in
            cwg_blake2s_mac(
                o.baseAddress!.assumingMemoryBound(to: UInt8.self),
                16,
                key.baseAddress!.assumingMemoryBound(to: UInt8.self),
                key.count,
                data.baseAddress?.assumingMemoryBound(to: UInt8.self),
                data.count
            )
        }
        precondition(ok == 1, "libcrypto's keyed BLAKE2s (BLAKE2SMAC) failed")
        return out
    }

    static func mac(_ key: Bytes32, _ data: UnsafeRawBufferPointer) -> Bytes16 {
        key.withUnsafeBytes { mac($0, data) }
    }

    static func mac(_ key: Bytes16, _ data: UnsafeRawBufferPointer) -> Bytes16 {
        key.withUnsafeBytes { mac($0, data) }
    }

    /// DH(private, public), X25519. Fails on a low-order public key (all-zero result).
    static func dh(_ privateKey: Bytes32, _ publicKey: Bytes32) throws(PrimitiveFailure) -> Bytes32 {
        var out = Bytes32()
        let ok = privateKey.withUnsafeBytes { s in
            publicKey.withUnsafeBytes { p in
                out.withUnsafeMutableBytes { o in
                    cwg_x25519(
                        o.baseAddress!.assumingMemoryBound(to: UInt8.self),
                        s.baseAddress!.assumingMemoryBound(to: UInt8.self),
                        p.baseAddress!.assumingMemoryBound(to: UInt8.self)
                    )
                }
            }
        }
        guard ok == 1, !out.isZero else { throw PrimitiveFailure() }
        return out
    }

    static func publicKey(of privateKey: Bytes32) -> Bytes32 {
        var out = Bytes32()
        let ok = privateKey.withUnsafeBytes { s in
            out.withUnsafeMutableBytes { o in
                cwg_x25519_public(
                    o.baseAddress!.assumingMemoryBound(to: UInt8.self),
                    s.baseAddress!.assumingMemoryBound(to: UInt8.self)
                )
            }
        }
        precondition(ok == 1, "libcrypto's X25519 failed to derive a public key")
        return out
    }

    /// A new X25519 private key, clamped as `wg genkey` prints it.
    static func generatePrivateKey() -> Bytes32 {
        var key = Bytes32()
        key.withUnsafeMutableBytes { raw in
            let ok = cwg_random(raw.baseAddress!.assumingMemoryBound(to: UInt8.self), 32)
            precondition(ok == 1, "libcrypto's RAND_bytes failed: the system's random source is unavailable")
            raw[0] &= 248
            raw[31] = (raw[31] & 127) | 64
        }
        return key
    }

    /// XAEAD(key, nonce, plain, aad): XChaCha20-Poly1305 from libsodium; `out`
    /// receives plain.count + 16 bytes.
    static func xseal(
        key: Bytes32,
        nonce: UnsafeRawBufferPointer,
        plain: UnsafeRawBufferPointer,
        aad: UnsafeRawBufferPointer,
        into out: UnsafeMutableRawBufferPointer
    ) {
        precondition(nonce.count == 24 && out.count >= plain.count + 16)
        let ok = key.withUnsafeBytes { k in
            cwg_xaead_seal(
                out.baseAddress!.assumingMemoryBound(to: UInt8.self),
                plain.baseAddress?.assumingMemoryBound(to: UInt8.self),
                plain.count,
                aad.baseAddress?.assumingMemoryBound(to: UInt8.self),
                aad.count,
                nonce.baseAddress!.assumingMemoryBound(to: UInt8.self),
                k.baseAddress!.assumingMemoryBound(to: UInt8.self)
            )
        }
        precondition(ok == 1, "libsodium's XChaCha20-Poly1305 failed to seal")
    }

    /// Opens `sealed` (ciphertext then tag) into `out` (sealed.count - 16 bytes).
    static func xopen(
        key: Bytes32,
        nonce: UnsafeRawBufferPointer,
        sealed: UnsafeRawBufferPointer,
        aad: UnsafeRawBufferPointer,
        into out: UnsafeMutableRawBufferPointer
    ) throws(PrimitiveFailure) {
        precondition(nonce.count == 24 && sealed.count >= 16 && out.count >= sealed.count - 16)
        let ok = key.withUnsafeBytes { k in
            cwg_xaead_open(
                out.baseAddress!.assumingMemoryBound(to: UInt8.self),
                sealed.baseAddress!.assumingMemoryBound(to: UInt8.self),
                sealed.count - 16,
                aad.baseAddress?.assumingMemoryBound(to: UInt8.self),
                aad.count,
                nonce.baseAddress!.assumingMemoryBound(to: UInt8.self),
                k.baseAddress!.assumingMemoryBound(to: UInt8.self)
            )
        }
        guard ok == 1 else { throw PrimitiveFailure() }
    }
}

/// ChaCha20-Poly1305 with one reusable libcrypto context: created once, then
/// each message only loads key and nonce — no allocation per message. One
/// context serves one thread at a time: the data path keeps one per worker.
public final class CipherContext {
    private let context: OpaquePointer

    /// How libcrypto's implementation is called.
    public enum Path: Sendable {
        /// The provider's implementation called directly where libcrypto
        /// offers it, else through EVP.
        case fastest
        /// Through the provider's dispatch table (no EVP layer).
        case direct
        /// Through EVP_EncryptInit/Update/Final.
        case evp
    }

    /// Fails only when libcrypto cannot give the path asked for.
    public init?(path: Path) {
        let raw: Int32 =
            switch path {
            case .fastest: Int32(CWG_AEAD_FASTEST)
            case .direct: Int32(CWG_AEAD_DIRECT)
            case .evp: Int32(CWG_AEAD_EVP)
            }
        guard let context = cwg_aead_new_using(raw) else { return nil }
        self.context = context
    }

    /// The fastest path; stops the process when libcrypto has none (no usable provider).
    public init() {
        guard let context = cwg_aead_new() else {
            fatalError(
                "libcrypto could not create a ChaCha20-Poly1305 context (is OpenSSL 3's default provider available?)"
            )
        }
        self.context = context
    }

    /// Whether this context calls the provider's implementation directly.
    public var isDirect: Bool { cwg_aead_is_direct(context) == 1 }

    /// How the data path's contexts reach libcrypto, for the start-up log.
    public static var fastestPathDescription: String {
        CipherContext(path: .fastest)?.isDirect == true
            ? "ChaCha20-Poly1305 from libcrypto's provider, called directly"
            : "ChaCha20-Poly1305 through libcrypto's EVP (no provider dispatch table found)"
    }

    deinit { cwg_aead_free(context) }

    /// Clears the key material libcrypto keeps from the last message.
    public func wipe() { _ = cwg_aead_wipe(context) }

    /// The whitepaper's nonce: 32 zero bits, then the 64-bit counter, little-endian.
    @inline(__always)
    static func nonce(_ counter: UInt64) -> (UInt32, UInt32, UInt32) {
        // Three UInt32s: a (UInt32, UInt64) tuple would put 4 bytes of padding inside the nonce.
        (0, UInt32(truncatingIfNeeded: counter).littleEndian, UInt32(truncatingIfNeeded: counter >> 32).littleEndian)
    }

    /// Seals `length` bytes at `text` in place and writes the tag at `tag`.
    @inline(__always)
    public func seal(
        key: Bytes32,
        counter: UInt64,
        aad: Bytes32?,
        text: UnsafeMutableRawPointer?,
        length: Int,
        tag: UnsafeMutableRawPointer
    ) -> Bool {
        var nonce = Self.nonce(counter)
        var aadBytes = aad ?? .zero
        let aadLength = aad == nil ? 0 : 32
        return Swift.withUnsafeBytes(of: &aadBytes.storage) { aad in
            key.withUnsafeBytes { k in
                Swift.withUnsafeBytes(of: &nonce) { n in
                    let t = text?.assumingMemoryBound(to: UInt8.self)
                    return cwg_aead_seal(
                        context,
                        k.baseAddress!.assumingMemoryBound(to: UInt8.self),
                        n.baseAddress!.assumingMemoryBound(to: UInt8.self),
                        aad.baseAddress?.assumingMemoryBound(to: UInt8.self),
                        aadLength,
                        t,
                        t,
                        length,
                        tag.assumingMemoryBound(to: UInt8.self)
                    ) == 1
                }
            }
        }
    }

    /// Seals a payload given as `parts` (head, then body) and `padding` zero
    /// bytes into `out`, the tag right after: copy and encryption in one pass.
    @inline(__always)
    func seal(
        key: Bytes32,
        counter: UInt64,
        parts: PayloadParts,
        padding: Int,
        out: UnsafeMutableRawPointer
    ) -> Bool {
        var nonce = Self.nonce(counter)
        let total = parts.head.count + parts.body.count + padding
        return key.withUnsafeBytes { k in
            Swift.withUnsafeBytes(of: &nonce) { n in
                cwg_aead_seal_parts(
                    context,
                    k.baseAddress!.assumingMemoryBound(to: UInt8.self),
                    n.baseAddress!.assumingMemoryBound(to: UInt8.self),
                    parts.head.baseAddress?.assumingMemoryBound(to: UInt8.self),
                    parts.head.count,
                    parts.body.baseAddress?.assumingMemoryBound(to: UInt8.self),
                    parts.body.count,
                    padding,
                    out.assumingMemoryBound(to: UInt8.self),
                    (out + total).assumingMemoryBound(to: UInt8.self)
                ) == 1
            }
        }
    }

    /// Opens `length` bytes at `text` in place, checking the tag at `tag`.
    @inline(__always)
    public func open(
        key: Bytes32,
        counter: UInt64,
        aad: Bytes32?,
        text: UnsafeMutableRawPointer?,
        length: Int,
        tag: UnsafeRawPointer
    ) -> Bool {
        var nonce = Self.nonce(counter)
        var aadBytes = aad ?? .zero
        let aadLength = aad == nil ? 0 : 32
        return Swift.withUnsafeBytes(of: &aadBytes.storage) { aad in
            key.withUnsafeBytes { k in
                Swift.withUnsafeBytes(of: &nonce) { n in
                    let t = text?.assumingMemoryBound(to: UInt8.self)
                    return cwg_aead_open(
                        context,
                        k.baseAddress!.assumingMemoryBound(to: UInt8.self),
                        n.baseAddress!.assumingMemoryBound(to: UInt8.self),
                        aad.baseAddress?.assumingMemoryBound(to: UInt8.self),
                        aadLength,
                        t,
                        t,
                        length,
                        tag.assumingMemoryBound(to: UInt8.self)
                    ) == 1
                }
            }
        }
    }

    /// The general form, for the known-answer tests: a 12-byte nonce of the
    /// caller's, `plain` sealed into `out` (plain.count + 16 bytes).
    public func seal(key: Bytes32, nonce: [UInt8], aad: [UInt8], plain: [UInt8]) -> [UInt8] {
        precondition(nonce.count == 12)
        var out = plain + [UInt8](repeating: 0, count: 16)
        let ok = key.withUnsafeBytes { k in
            out.withUnsafeMutableBufferPointer { o in
                cwg_aead_seal(
                    context,
                    k.baseAddress!.assumingMemoryBound(to: UInt8.self),
                    nonce,
                    aad,
                    aad.count,
                    o.baseAddress,
                    o.baseAddress,
                    plain.count,
                    o.baseAddress! + plain.count
                )
            }
        }
        precondition(ok == 1, "libcrypto's ChaCha20-Poly1305 failed to seal")
        return out
    }

    /// Opens ciphertext-then-tag; nil when the tag does not verify.
    public func open(key: Bytes32, nonce: [UInt8], aad: [UInt8], sealed: [UInt8]) -> [UInt8]? {
        precondition(nonce.count == 12)
        guard sealed.count >= 16 else { return nil }
        var out = sealed
        let length = sealed.count - 16
        let ok = key.withUnsafeBytes { k in
            out.withUnsafeMutableBufferPointer { o in
                cwg_aead_open(
                    context,
                    k.baseAddress!.assumingMemoryBound(to: UInt8.self),
                    nonce,
                    aad,
                    aad.count,
                    o.baseAddress,
                    o.baseAddress,
                    length,
                    o.baseAddress! + length
                )
            }
        }
        return ok == 1 ? Array(out[0..<length]) : nil
    }
}

/// The primitives as plain byte arrays, for known-answer tests and tools.
public enum Primitives {
    public static func x25519(privateKey: Bytes32, publicKey: Bytes32) -> Bytes32? {
        try? Primitive.dh(privateKey, publicKey)
    }

    public static func x25519PublicKey(privateKey: Bytes32) -> Bytes32 { Primitive.publicKey(of: privateKey) }

    public static func blake2s256(_ data: [UInt8]) -> Bytes32 { data.withUnsafeBytes { Primitive.hash($0) } }

    public static func hmacBlake2s(key: Bytes32, _ data: [UInt8]) -> Bytes32 {
        data.withUnsafeBytes { Primitive.hmac(key, $0) }
    }

    /// Keyed BLAKE2s with a 16-byte output (mac1, mac2, cookies).
    public static func mac(key: [UInt8], _ data: [UInt8]) -> Bytes16 {
        key.withUnsafeBytes { k in data.withUnsafeBytes { Primitive.mac(k, $0) } }
    }

    public static func xchachaSeal(key: Bytes32, nonce: [UInt8], aad: [UInt8], plain: [UInt8]) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: plain.count + 16)
        nonce.withUnsafeBytes { n in
            plain.withUnsafeBytes { p in
                aad.withUnsafeBytes { a in
                    out.withUnsafeMutableBytes { Primitive.xseal(key: key, nonce: n, plain: p, aad: a, into: $0) }
                }
            }
        }
        return out
    }

    public static func xchachaOpen(key: Bytes32, nonce: [UInt8], aad: [UInt8], sealed: [UInt8]) -> [UInt8]? {
        guard sealed.count >= 16 else { return nil }
        var out = [UInt8](repeating: 0, count: sealed.count - 16)
        let opened = nonce.withUnsafeBytes { n in
            sealed.withUnsafeBytes { s in
                aad.withUnsafeBytes { a in
                    out.withUnsafeMutableBytes { o in
                        (try? Primitive.xopen(key: key, nonce: n, sealed: s, aad: a, into: o)) != nil
                    }
                }
            }
        }
        guard opened else { return nil }
        return out
    }
}
