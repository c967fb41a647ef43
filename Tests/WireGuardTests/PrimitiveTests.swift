import Testing

@testable import WireGuard

func hex(_ s: String) -> [UInt8] {
    let chars = Array(s.filter { !$0.isWhitespace }.utf8)
    return stride(from: 0, to: chars.count, by: 2).map {
        UInt8(String(decoding: chars[$0..<$0 + 2], as: UTF8.self), radix: 16)!
    }
}

func key(_ s: String) -> Bytes32 { Bytes32(hex(s))! }

let sunscreen = Array(
    "Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it."
        .utf8
)
let vectorKey = key("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f")

@Suite struct PrimitiveTests {
    @Test func x25519MatchesRFC7748Section5_2() {
        let out = Primitives.x25519(
            privateKey: key("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4"),
            publicKey: key("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c")
        )
        #expect(out?.bytes == hex("c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"))
    }

    @Test func x25519MatchesRFC7748Section6_1() {
        let alice = key("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
        let bob = key("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
        #expect(
            Primitives.x25519PublicKey(privateKey: alice).bytes
                == hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
        )
        #expect(
            Primitives.x25519PublicKey(privateKey: bob).bytes
                == hex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
        )
        let shared = hex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
        #expect(
            Primitives.x25519(privateKey: alice, publicKey: Primitives.x25519PublicKey(privateKey: bob))?.bytes
                == shared
        )
        #expect(
            Primitives.x25519(privateKey: bob, publicKey: Primitives.x25519PublicKey(privateKey: alice))?.bytes
                == shared
        )
    }

    @Test func x25519RefusesALowOrderPoint() {
        #expect(Primitives.x25519(privateKey: vectorKey, publicKey: .zero) == nil)
    }

    @Test func chacha20Poly1305MatchesRFC8439Section2_8_2() {
        let cipher = CipherContext()
        let nonce = hex("070000004041424344454647")
        let aad = hex("50515253c0c1c2c3c4c5c6c7")
        let expected = hex(
            """
            d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d63dbea45e8ca9671282fafb69da92728b
            1a71de0a9e060b2905d6a5b67ecd3b3692ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc
            3ff4def08e4b7a9de576d26586cec64b6116 1ae10b594f09e26a7e902ecbd0600691
            """
        )
        // Twice with the same context: the reused context gives the same answer.
        #expect(cipher.seal(key: vectorKey, nonce: nonce, aad: aad, plain: sunscreen) == expected)
        #expect(cipher.seal(key: vectorKey, nonce: nonce, aad: aad, plain: sunscreen) == expected)
        #expect(cipher.open(key: vectorKey, nonce: nonce, aad: aad, sealed: expected) == sunscreen)
        var tampered = expected
        tampered[5] ^= 1
        #expect(cipher.open(key: vectorKey, nonce: nonce, aad: aad, sealed: tampered) == nil)
        #expect(cipher.open(key: vectorKey, nonce: nonce, aad: [], sealed: expected) == nil)
    }

    @Test func xchacha20Poly1305MatchesTheDraftVectorA3_1() {
        let nonce = hex("404142434445464748494a4b4c4d4e4f5051525354555657")
        let aad = hex("50515253c0c1c2c3c4c5c6c7")
        let expected = hex(
            """
            bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb731c7f1b0b4aa6440bf3a82f4eda7e39
            ae64c6708c54c216cb96b72e1213b4522f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9
            21f9664c97637da9768812f615c68b13b52e c0875924c1c7987947deafd8780acf49
            """
        )
        #expect(Primitives.xchachaSeal(key: vectorKey, nonce: nonce, aad: aad, plain: sunscreen) == expected)
        #expect(Primitives.xchachaOpen(key: vectorKey, nonce: nonce, aad: aad, sealed: expected) == sunscreen)
        var tampered = expected
        tampered[tampered.count - 1] ^= 1
        #expect(Primitives.xchachaOpen(key: vectorKey, nonce: nonce, aad: aad, sealed: tampered) == nil)
    }

    @Test func blake2sMatchesTheReferenceVectors() {
        // RFC 7693 Appendix B.
        #expect(
            Primitives.blake2s256(Array("abc".utf8)).bytes
                == hex("508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982")
        )
        // Keyed BLAKE2s with a 16-byte output (mac1/mac2): Python's independent
        // hashlib.blake2s(bytes(range(64)), key=bytes(range(32)), digest_size=16).
        let k = (0..<32).map { UInt8($0) }
        #expect(Primitives.mac(key: k, Array(0..<64)).bytes == hex("f1efa90d2547036841ecd3627fafbc36"))
    }

    @Test func hmacBlake2sMatchesAnIndependentImplementation() {
        // Python's hmac.new(bytes(range(32)), b"WireGuard", hashlib.blake2s).
        let k = Bytes32((0..<32).map { UInt8($0) })!
        #expect(
            Primitives.hmacBlake2s(key: k, Array("WireGuard".utf8)).bytes
                == hex("5415924543576b3f5ee867c94e1aab70586d33b32fae3fccd2c635b3e1d7198d")
        )
    }

    @Test func keysRoundTripThroughBase64LikeWg() throws {
        let alice = try PrivateKey(base64: "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=")
        #expect(alice.raw.bytes == hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"))
        #expect(alice.publicKey.base64 == "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=")
        #expect(try PublicKey(base64: alice.publicKey.base64 + "\n") == alice.publicKey)
        let generated = PrivateKey.generate()
        #expect(generated.raw.bytes[0] & 7 == 0 && generated.raw.bytes[31] & 0xC0 == 0x40)
        #expect(throws: KeyError.self) { try PublicKey(base64: "not a key") }
        #expect(throws: KeyError.self) { try PublicKey(base64: "AAAA") }
        #expect(String(describing: generated) == "PrivateKey(hidden)")
    }
}

/// The data path calls libcrypto's ChaCha20-Poly1305 through the provider's
/// dispatch table; EVP is the reference it must agree with, byte for byte.
@Suite struct CipherPathTests {
    @Test func theFastestPathHereIsTheDirectOne() throws {
        // OpenSSL 3's default provider offers the dispatch table; if a build of
        // libcrypto ever does not, the data path falls back to EVP and this says so.
        #expect(CipherContext().isDirect)
        let evp = try #require(CipherContext(path: .evp))
        #expect(!evp.isDirect)
    }

    @Test func directAndEVPAgreeOnEverySizeWithAndWithoutAdditionalData() throws {
        let direct = try #require(CipherContext(path: .direct))
        let evp = try #require(CipherContext(path: .evp))
        var generator = SystemRandomNumberGenerator()
        for length in Array(0...300) + Array(stride(from: 301, through: 2100, by: 7)) + [1408, 1420, 1424, 65000] {
            let k = Bytes32((0..<32).map { _ in UInt8.random(in: 0...255, using: &generator) })!
            let nonce = (0..<12).map { _ in UInt8.random(in: 0...255, using: &generator) }
            let plain = (0..<length).map { _ in UInt8.random(in: 0...255, using: &generator) }
            let aad = length % 3 == 0 ? [] : (0..<(length % 40)).map { UInt8($0) }
            let sealed = direct.seal(key: k, nonce: nonce, aad: aad, plain: plain)
            try #require(sealed == evp.seal(key: k, nonce: nonce, aad: aad, plain: plain), "length \(length)")
            #expect(direct.open(key: k, nonce: nonce, aad: aad, sealed: sealed) == plain)
            #expect(evp.open(key: k, nonce: nonce, aad: aad, sealed: sealed) == plain)
            var tampered = sealed
            tampered[length / 2] ^= 0x40
            #expect(direct.open(key: k, nonce: nonce, aad: aad, sealed: tampered) == nil, "length \(length)")
            #expect(evp.open(key: k, nonce: nonce, aad: aad, sealed: tampered) == nil)
        }
    }

    @Test func aWipedDirectContextSealsAsBefore() throws {
        let direct = try #require(CipherContext(path: .direct))
        let nonce = hex("070000004041424344454647")
        let aad = hex("50515253c0c1c2c3c4c5c6c7")
        let reference = try #require(CipherContext(path: .evp)).seal(
            key: vectorKey,
            nonce: nonce,
            aad: aad,
            plain: sunscreen
        )
        #expect(direct.seal(key: vectorKey, nonce: nonce, aad: aad, plain: sunscreen) == reference)
        direct.wipe()
        #expect(direct.seal(key: vectorKey, nonce: nonce, aad: aad, plain: sunscreen) == reference)
        #expect(direct.open(key: vectorKey, nonce: nonce, aad: aad, sealed: reference) == sunscreen)
    }
}
