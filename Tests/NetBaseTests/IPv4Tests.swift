import NetBase
import Testing

@Suite struct IPv4Tests {
    @Test func dottedQuadRoundTrips() {
        #expect(IPv4Address("10.2.72.1")?.description == "10.2.72.1")
        #expect(IPv4Address("10.2.72.1")?.value == 0x0A02_4801)
    }

    @Test(arguments: ["", "1.2.3", "1.2.3.4.5", "256.1.1.1", "a.b.c.d", "1..2.3", " 1.2.3.4", "01234.1.1.1"])
    func malformedAddressesAreRejected(_ text: String) {
        #expect(IPv4Address(text) == nil)
    }

    /// The one-pass byte parsers against a slow model written with
    /// splitting and integer parsing, over a seeded set of near-misses.
    @Test func byteParsersAgreeWithASlowModel() {
        func model(_ text: String, canonical: Bool) -> UInt32? {
            let parts = text.split(separator: ".", omittingEmptySubsequences: false)
            guard parts.count == 4 else { return nil }
            var value: UInt32 = 0
            for part in parts {
                guard (1...3).contains(part.count), part.allSatisfy({ ("0"..."9").contains($0) }),
                    let n = UInt32(part), n <= 255
                else { return nil }
                if canonical && part.count > 1 && part.first == "0" { return nil }
                value = value << 8 | n
            }
            return value
        }
        let pieces = [
            "0", "00", "010", "1", "9", "10", "99", "199", "255", "256", "300", "1000", "", "a", " ", "-1", "+1",
        ]
        var generator = SeededGenerator(seed: 0x1_0004)
        var checked = 0
        for _ in 0..<20_000 {
            let count = Int.random(in: 2...5, using: &generator)
            let text = (0..<count).map { _ in pieces.randomElement(using: &generator)! }.joined(separator: ".")
            for canonical in [false, true] {
                #expect(
                    IPv4Address.parse(Array(text.utf8), canonical: canonical) == model(text, canonical: canonical),
                    "\(text) canonical: \(canonical)"
                )
                checked += model(text, canonical: canonical) == nil ? 0 : 1
            }
        }
        #expect(checked > 200, "the generator must also produce valid addresses")
    }

    @Test(arguments: [
        ("10.2.72.0-24", true), ("10.2.72.0-024", false), ("10.2.72.0-04", false), ("10.2.072.0-24", false),
        ("0.0.0.0-0", true), ("10.2.72.0-33", false), ("10.2.72.0-", false), ("10.2.72.1-24", false),
        ("10.2.72.0-2a", false), ("10.2.72.0/24", false),
    ])
    func canonicalLeaseKeysAreTheOnlySpellingAccepted(_ key: String, _ accepted: Bool) {
        let parsed = IPv4Network.parse(Array(key.utf8), separator: UInt8(ascii: "-"), canonical: true, strict: true)
        #expect((parsed != nil) == accepted)
        if let parsed { #expect(parsed.leaseKey == key) }
    }

    @Test func aNetworkIsEightBytes() {
        #expect(MemoryLayout<IPv4Network>.stride == 8)
    }

    @Test func networkClearsHostBitsUnlessStrict() {
        #expect(IPv4Network("10.2.72.9/24")?.description == "10.2.72.0/24")
        #expect(IPv4Network("10.2.72.9/24", strict: true) == nil)
        #expect(IPv4Network("10.2.0.0/33") == nil)
    }

    @Test func leaseKeyFormMatchesFlannel() {
        let n = IPv4Network("10.2.72.0/24")!
        #expect(n.leaseKey == "10.2.72.0-24")
        #expect(IPv4Network(leaseKey: "10.2.72.0-24") == n)
        #expect(IPv4Network(leaseKey: "10.2.72.0_24") == nil)
        #expect(n.firstHost.description == "10.2.72.1")
    }

    @Test func containment() {
        let net = IPv4Network("10.2.0.0/16")!
        #expect(net.contains(IPv4Address("10.2.255.255")!))
        #expect(!net.contains(IPv4Address("10.3.0.0")!))
        #expect(net.contains(IPv4Network("10.2.5.0/24")!))
        #expect(!IPv4Network("10.2.5.0/24")!.contains(net))
        #expect(IPv4Network("0.0.0.0/0")!.contains(IPv4Address("255.255.255.255")!))
    }
}

/// SplitMix64: a seeded generator, so a failing case can be replayed.
struct SeededGenerator: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
