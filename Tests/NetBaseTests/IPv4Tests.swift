import Testing
import NetBase

@Suite struct IPv4Tests {
    @Test func dottedQuadRoundTrips() {
        #expect(IPv4Address("10.2.72.1")?.description == "10.2.72.1")
        #expect(IPv4Address("10.2.72.1")?.value == 0x0A02_4801)
    }

    @Test(arguments: ["", "1.2.3", "1.2.3.4.5", "256.1.1.1", "a.b.c.d", "1..2.3", " 1.2.3.4", "01234.1.1.1"])
    func malformedAddressesAreRejected(_ text: String) {
        #expect(IPv4Address(text) == nil)
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
