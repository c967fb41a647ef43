import Glibc
import NetBase
import Testing

@Suite struct IPv6Tests {
    @Test(arguments: [
        ("2001:db8::1", "2001:db8::1"),
        ("2001:0DB8:0000:0000:0000:0000:0000:0001", "2001:db8::1"),
        ("::", "::"),
        ("::1", "::1"),
        ("1::", "1::"),
        ("fd00:10:244:1::", "fd00:10:244:1::"),
        // A single zero group is never "::" (RFC 5952 4.2.2).
        ("2001:db8:0:1:1:1:1:1", "2001:db8:0:1:1:1:1:1"),
        // The longest run wins; of equal runs, the first (4.2.3).
        ("2001:0:0:1:0:0:0:1", "2001:0:0:1::1"),
        ("2001:db8:0:0:1:0:0:1", "2001:db8::1:0:0:1"),
        ("fe80::0:0:1", "fe80::1"),
        ("::ffff:192.0.2.1", "::ffff:192.0.2.1"),
        ("::ffff:c000:201", "::ffff:192.0.2.1"),
        ("64:ff9b::192.0.2.1", "64:ff9b::c000:201"),
        ("1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7:8"),
        ("1:2:3:4:5:6::", "1:2:3:4:5:6::"),
        ("1:0:0:0:0:0:0:0", "1::"),
    ])
    func textFormsParseAndPrintCanonically(_ text: String, _ canonical: String) throws {
        let address = try #require(IPv6Address(text), "\(text)")
        #expect(address.description == canonical)
        #expect(IPv6Address(canonical) == address)
    }

    @Test(arguments: [
        "", ":", ":::", "1:::2", "1::2::3", "1:2:3:4:5:6:7", "1:2:3:4:5:6:7:8:9", "1:2:3:4:5:6:7::8",
        "12345::", "g::", ":1::", "1::2:", "1:2:3:4:5:6:7:8::", "::1.2.3", "::1.2.3.256", "::01.2.3.4",
        "1.2.3.4::", "1.2.3.4", "fe80::1%eth0", "::/64", " ::1", "::1 ",
    ])
    func malformedAddressesAreRejected(_ text: String) {
        #expect(IPv6Address(text) == nil)
    }

    @Test func bytesAreInNetworkOrder() throws {
        let address = try #require(IPv6Address("2001:db8::102:304"))
        #expect(address.bytes == [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4])
        #expect(IPv6Address(bytes: address.bytes) == address)
        #expect(address.group(0) == 0x2001 && address.group(7) == 0x304)
    }

    /// The parser and the printer against glibc's inet_pton and inet_ntop
    /// over random addresses and near-miss texts.
    @Test func parserAndPrinterAgreeWithGlibc() {
        var generator = SeededGenerator(seed: 0x6_0006)
        func pton(_ text: String) -> UInt128? {
            var raw = in6_addr()
            guard inet_pton(AF_INET6, text, &raw) == 1 else { return nil }
            return withUnsafeBytes(of: raw) { IPv6Address(bytes: Array($0))?.value }
        }
        func ntop(_ address: IPv6Address) -> String {
            var raw = in6_addr()
            withUnsafeMutableBytes(of: &raw) { $0.copyBytes(from: address.bytes) }
            var buffer = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
            _ = inet_ntop(AF_INET6, &raw, &buffer, socklen_t(buffer.count))
            return String(cString: buffer)
        }
        let groups = ["0", "00", "0000", "1", "ffff", "FFFF", "abcd", "12345", "g", "", "db8", "1.2.3.4", "01.2.3.4"]
        var parsed = 0
        for _ in 0..<20_000 {
            // Random addresses with runs of zero groups: print as glibc does
            // (except ::a.b.c.d, which glibc prints for ::/96 and Go does not).
            var value: UInt128 = 0
            for _ in 0..<8 {
                let g: UInt16 = Bool.random(using: &generator) ? 0 : UInt16.random(in: 0...0xffff, using: &generator)
                value = value << 16 | UInt128(g)
            }
            let address = IPv6Address(value)
            if value >> 32 != 0 || value <= 0xffff {
                #expect(address.description == ntop(address), "\(address.bytes)")
            }
            #expect(IPv6Address(address.description) == address)
            #expect(pton(address.description) == value)

            // Near-miss texts: our parser accepts exactly what glibc accepts.
            let count = Int.random(in: 1...9, using: &generator)
            var text = (0..<count).map { _ in groups.randomElement(using: &generator)! }.joined(separator: ":")
            if Bool.random(using: &generator) {
                let cut = Int.random(in: 0...text.count, using: &generator)
                text.insert(contentsOf: "::", at: text.index(text.startIndex, offsetBy: cut))
            }
            let ours = IPv6Address(text)?.value
            #expect(ours == pton(text), "\(text)")
            parsed += ours == nil ? 0 : 1
        }
        #expect(parsed > 1000)
    }

    @Test func networksParseStrictlyAndPrint() throws {
        let network = try #require(IPv6Network("fd00:10:244::/48"))
        #expect(network.description == "fd00:10:244::/48")
        #expect(network.leaseKey == "fd00:10:244::-48")
        #expect(IPv6Network("fd00:10:244::1/48")?.address == network.address)
        #expect(IPv6Network("fd00:10:244::1/48", strict: true) == nil)
        #expect(IPv6Network("::/0")?.prefixLength == 0)
        #expect(IPv6Network("::/129") == nil)
        #expect(IPv6Network("::/1280") == nil)
        #expect(IPv6Network("::/") == nil)
        #expect(IPv6Network("fd00::") == nil)
        #expect(network.lastAddress.description == "fd00:10:244:ffff:ffff:ffff:ffff:ffff")
        #expect(network.firstHost.description == "fd00:10:244::1")
    }

    @Test func leaseKeysHaveOneSpelling() {
        #expect(IPv6Network(leaseKey: "fd00:10:244:1::-64")?.description == "fd00:10:244:1::/64")
        // Other spellings of the same subnet would be second keys for it.
        #expect(IPv6Network(leaseKey: "fd00:10:244:1:0:0:0:0-64") == nil)
        #expect(IPv6Network(leaseKey: "FD00:10:244:1::-64") == nil)
        #expect(IPv6Network(leaseKey: "fd00:10:244:1::-064") == nil)
        #expect(IPv6Network(leaseKey: "fd00:10:244:1::1-64") == nil)
        #expect(IPv6Network(leaseKey: "fd00:10:244:1::/64") == nil)
    }

    @Test func containmentAndOverlap() throws {
        let net48 = try #require(IPv6Network("fd00:10:244::/48"))
        let sub = try #require(IPv6Network("fd00:10:244:7::/64"))
        let outside = try #require(IPv6Network("fd00:10:245::/64"))
        #expect(net48.contains(sub) && !sub.contains(net48))
        #expect(net48.overlaps(sub) && sub.overlaps(net48))
        #expect(!net48.contains(outside) && !net48.overlaps(outside))
        #expect(net48.contains(try #require(IPv6Address("fd00:10:244:ffff::1"))))
        #expect(!net48.contains(try #require(IPv6Address("fd00:10:243:ffff::1"))))
        #expect(try #require(IPv6Network("::/0")).contains(net48))
    }

    @Test func subnetArithmeticChoosesSixtyFoursOutOfAFortyEight() throws {
        let network = try #require(IPv6Network("fd00:10:244::/48"))
        #expect(network.subnetCount(prefixLength: 64) == 65536)
        #expect(network.subnet(prefixLength: 64, index: 0).description == "fd00:10:244::/64")
        #expect(network.subnet(prefixLength: 64, index: 1).description == "fd00:10:244:1::/64")
        #expect(network.subnet(prefixLength: 64, index: 0xffff).description == "fd00:10:244:ffff::/64")
        #expect(network.subnet(prefixLength: 64, index: 1).next.description == "fd00:10:244:2::/64")
        #expect(try #require(IPv6Network("::/0")).subnetCount(prefixLength: 64) == UInt64.max)
        let small = try #require(IPv6Network("fd00::/124"))
        #expect(small.subnetCount(prefixLength: 126) == 4)
        #expect(small.subnet(prefixLength: 126, index: 3).description == "fd00::c/126")
        // The last network wraps to the first.
        #expect(try #require(IPv6Network("ffff:ffff:ffff:ffff::/64")).next.description == "::/64")
    }

    @Test func linkLocalAndGlobalAreTold() throws {
        #expect(try #require(IPv6Address("fe80::1")).isLinkLocalUnicast)
        #expect(try #require(IPv6Address("febf::1")).isLinkLocalUnicast)
        #expect(!(try #require(IPv6Address("fec0::1")).isLinkLocalUnicast))
        #expect(try #require(IPv6Address("fd00::1")).isGlobalUnicast)
        #expect(try #require(IPv6Address("2001:db8::1")).isGlobalUnicast)
        #expect(!(try #require(IPv6Address("::1")).isGlobalUnicast))
        #expect(!(try #require(IPv6Address("ff02::1")).isGlobalUnicast))
    }
}
