import NetBase
import Testing

@testable import LeaseStore

@Suite struct NetworkConfigTests {
    struct Defaults: Sendable, CustomTestStringConvertible {
        var network: String
        var subnetLen: Int
        var min: String
        var max: String
        var count: Int
        var testDescription: String { network }
    }

    @Test(arguments: [
        Defaults(network: "10.2.0.0/16", subnetLen: 24, min: "10.2.1.0", max: "10.2.255.0", count: 255),
        Defaults(network: "10.0.0.0/8", subnetLen: 24, min: "10.0.1.0", max: "10.255.255.0", count: 65535),
        Defaults(network: "10.2.0.0/22", subnetLen: 24, min: "10.2.1.0", max: "10.2.3.0", count: 3),
        Defaults(network: "10.2.0.0/23", subnetLen: 25, min: "10.2.0.128", max: "10.2.1.128", count: 3),
        Defaults(network: "10.2.0.0/28", subnetLen: 30, min: "10.2.0.4", max: "10.2.0.12", count: 3),
    ])
    func defaultsFollowFlannel(_ d: Defaults) throws {
        let c = try config(#"{"Network": "\#(d.network)"}"#)
        #expect(c.network == net(d.network))
        #expect(c.subnetLen == d.subnetLen)
        #expect(c.subnetMin == IPv4Network(address: ip(d.min), prefixLength: d.subnetLen))
        #expect(c.subnetMax == IPv4Network(address: ip(d.max), prefixLength: d.subnetLen))
        #expect(c.subnets.count == d.count)
        #expect(c.subnets.first == c.subnetMin)
        #expect(c.subnets.last == c.subnetMax)
        #expect(c.enableIPv4 && !c.enableIPv6)
        #expect(c.backend == BackendConfig(type: "udp", port: 8285))
    }

    struct Bad: Sendable, CustomTestStringConvertible {
        var json: String
        var error: NetworkConfigError
        var message: String
        var testDescription: String { json }
    }

    @Test(arguments: [
        Bad(
            json: #"{"Network": "10.2.0.0/29"}"#,
            error: .networkTooSmall(network: net("10.2.0.0/29")),
            message: "Network is too small. Minimum useful network prefix is /28"
        ),
        Bad(
            json: #"{"Network": "10.2.0.0/16", "SubnetLen": 31}"#,
            error: .subnetLenTooLong(subnetLen: 31),
            message: "SubnetLen must be less than /31"
        ),
        Bad(
            json: #"{"Network": "10.2.0.0/16", "SubnetLen": 17}"#,
            error: .tooFewSubnets(network: net("10.2.0.0/16"), subnetLen: 17),
            message: "Network must be able to accommodate at least four subnets"
        ),
        Bad(
            json: #"{"Network": "10.2.0.0/29", "SubnetLen": 30}"#,
            error: .tooFewSubnets(network: net("10.2.0.0/29"), subnetLen: 30),
            message: "use a Network of /28 or larger"
        ),
        Bad(
            json: #"{"Network": "10.2.0.0/16", "SubnetMin": "10.3.0.0"}"#,
            error: .outsideNetwork(field: "SubnetMin", address: ip("10.3.0.0"), network: net("10.2.0.0/16")),
            message: "SubnetMin 10.3.0.0 is not in the range of the Network 10.2.0.0/16"
        ),
        Bad(
            json: #"{"Network": "10.2.0.0/16", "SubnetMax": "10.1.255.0"}"#,
            error: .outsideNetwork(field: "SubnetMax", address: ip("10.1.255.0"), network: net("10.2.0.0/16")),
            message: "SubnetMax 10.1.255.0 is not in the range of the Network 10.2.0.0/16"
        ),
        Bad(
            json: #"{"Network": "10.2.0.0/16", "SubnetMin": "10.2.1.5"}"#,
            error: .notOnBoundary(
                field: "SubnetMin",
                address: ip("10.2.1.5"),
                subnetLen: 24,
                suggestion: ip("10.2.1.0")
            ),
            message: "SubnetMin 10.2.1.5 is not on a SubnetLen (/24) boundary: use 10.2.1.0"
        ),
        Bad(
            json: #"{"Network": "10.2.0.0/16", "SubnetLen": 26, "SubnetMax": "10.2.9.100"}"#,
            error: .notOnBoundary(
                field: "SubnetMax",
                address: ip("10.2.9.100"),
                subnetLen: 26,
                suggestion: ip("10.2.9.64")
            ),
            message: "SubnetMax 10.2.9.100 is not on a SubnetLen (/26) boundary: use 10.2.9.64"
        ),
        Bad(
            json: #"{"Network": "10.2.0.0/16", "SubnetMin": "10.2.9.0", "SubnetMax": "10.2.5.0"}"#,
            error: .minAboveMax(min: ip("10.2.9.0"), max: ip("10.2.5.0")),
            message: "SubnetMin 10.2.9.0 is above SubnetMax 10.2.5.0"
        ),
        Bad(
            json: #"{"Network": "10.2.0.0/16", "EnableIPv6": true}"#,
            error: .missingIPv6Network,
            message: "please define a correct IPv6Network parameter"
        ),
        Bad(
            json: #"{"Network": "10.2.0.0/16", "EnableIPv6": true, "IPv6Network": "::/0"}"#,
            error: .missingIPv6Network,
            message: "please define a correct IPv6Network parameter"
        ),
        Bad(
            json: #"{"Network": "10.2.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00::"}"#,
            error: .invalidValue(
                field: "IPv6Network",
                value: #""fd00::""#,
                expected: #"an IPv6 network in CIDR form such as "fd00:10:244::/48""#
            ),
            message: #"IPv6Network "fd00::" is not valid"#
        ),
        // Malformed even when IPv6 is off: flanneld's JSON decoder refuses it too.
        Bad(
            json: #"{"Network": "10.2.0.0/16", "IPv6Network": "10.3.0.0/16"}"#,
            error: .invalidValue(
                field: "IPv6Network",
                value: #""10.3.0.0/16""#,
                expected: #"an IPv6 network in CIDR form such as "fd00:10:244::/48""#
            ),
            message: "IPv6Network"
        ),
        Bad(
            json: #"{"Network": "10.2.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00::/125"}"#,
            error: .ipv6NetworkTooSmall(network: IPv6Network("fd00::/125")!),
            message: "IPv6Network is too small. Minimum useful network prefix is /124"
        ),
        Bad(
            json: #"{"Network": "10.2.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00::/48", "IPv6SubnetLen": 127}"#,
            error: .ipv6SubnetLenTooLong(subnetLen: 127),
            message: "IPv6SubnetLen must be less than /127"
        ),
        Bad(
            json: #"{"Network": "10.2.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00::/48", "IPv6SubnetLen": 49}"#,
            error: .ipv6TooFewSubnets(network: IPv6Network("fd00::/48")!, subnetLen: 49),
            message: "use IPv6SubnetLen 50 or more, or a larger IPv6Network"
        ),
        Bad(
            json:
                #"{"Network": "10.2.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:10:244::/48", "IPv6SubnetMin": "fd00:10:245::"}"#,
            error: .ipv6OutsideNetwork(
                field: "IPv6SubnetMin",
                address: IPv6Address("fd00:10:245::")!,
                network: IPv6Network("fd00:10:244::/48")!
            ),
            message:
                "IPv6SubnetMin fd00:10:245:: is not in the range of the IPv6Network fd00:10:244::/48: use an address from fd00:10:244:: to fd00:10:244:ffff:ffff:ffff:ffff:ffff"
        ),
        Bad(
            json:
                #"{"Network": "10.2.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:10:244::/48", "IPv6SubnetMax": "fd00:10:244:5::1"}"#,
            error: .ipv6NotOnBoundary(
                field: "IPv6SubnetMax",
                address: IPv6Address("fd00:10:244:5::1")!,
                subnetLen: 64,
                suggestion: IPv6Address("fd00:10:244:5::")!
            ),
            message: "IPv6SubnetMax fd00:10:244:5::1 is not on an IPv6SubnetLen (/64) boundary: use fd00:10:244:5::"
        ),
        Bad(
            json:
                #"{"Network": "10.2.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:10:244::/48", "IPv6SubnetMin": "fd00:10:244:9::", "IPv6SubnetMax": "fd00:10:244:5::"}"#,
            error: .ipv6MinAboveMax(min: IPv6Address("fd00:10:244:9::")!, max: IPv6Address("fd00:10:244:5::")!),
            message: "IPv6SubnetMin fd00:10:244:9:: is above IPv6SubnetMax fd00:10:244:5::"
        ),
        Bad(
            json:
                #"{"Network": "10.2.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00::/48", "IPv6SubnetMin": "fd00:0:0:1::/64"}"#,
            error: .invalidValue(
                field: "IPv6SubnetMin",
                value: #""fd00:0:0:1::/64""#,
                expected: #"an IPv6 address such as "fd00:10:244:1::" (without /len)"#
            ),
            message: "without /len"
        ),
        Bad(
            json: #"{"Network": "10.2.0.0/16", "EnableIPv6": true, "IPv6Network": "::ffff:10.0.0.0/104"}"#,
            error: .invalidValue(
                field: "IPv6Network",
                value: #""::ffff:10.0.0.0/104""#,
                expected: #"a network outside ::ffff:0:0/96 (IPv4-mapped addresses), such as "fd00:10:244::/48""#
            ),
            message: "outside ::ffff:0:0/96"
        ),
        Bad(
            json: #"{"Network": "10.2.0.0/16", "EnableIPv4": false}"#,
            error: .noAddressFamily,
            message: "EnableIPv4 and EnableIPv6 are both false"
        ),
        Bad(
            json: #"{"EnableIPv4": false, "EnableIPv6": true}"#,
            error: .missingIPv6Network,
            message: "please define a correct IPv6Network parameter"
        ),
        Bad(
            json: #"{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00::/48", "Network": "10.2.0/16"}"#,
            error: .invalidValue(
                field: "Network",
                value: #""10.2.0/16""#,
                expected:
                    #"a network in CIDR form such as "10.2.0.0/16", or leave it out (EnableIPv4 is false, so it is not used)"#
            ),
            message: "leave it out"
        ),
        Bad(
            json: #"{"SubnetLen": 24}"#,
            error: .missingNetwork,
            message: "please define a correct Network parameter"
        ),
        Bad(
            json: #"{"Network": "0.0.0.0/0"}"#,
            error: .missingNetwork,
            message: "please define a correct Network parameter"
        ),
        Bad(
            json: #"{"Network": "10.2.0.0"}"#,
            error: .invalidValue(
                field: "Network",
                value: #""10.2.0.0""#,
                expected: #"a network in CIDR form such as "10.2.0.0/16""#
            ),
            message: #"Network "10.2.0.0" is not valid"#
        ),
        Bad(
            json: #"{"Network": "10.2.0.0/16", "SubnetLen": "24"}"#,
            error: .invalidValue(field: "SubnetLen", value: #""24""#, expected: "a whole number of bits such as 24"),
            message: #"SubnetLen "24" is not valid"#
        ),
        Bad(
            json: #"{"Network": "10.2.0.0/16", "SubnetMin": "10.2.1.0/24"}"#,
            error: .invalidValue(
                field: "SubnetMin",
                value: #""10.2.1.0/24""#,
                expected: #"an address such as "10.2.1.0" (without /len)"#
            ),
            message: "without /len"
        ),
        Bad(
            json: #"{"Network": "10.2.0.0/16", "Backend": {"Port": 8285}}"#,
            error: .missingBackendType,
            message: "Backend.Type is missing"
        ),
        Bad(
            json: #"{"Network": "10.2.0.0/16", "Backend": {"Type": "udp", "Port": 0}}"#,
            error: .invalidPort(backend: "udp", value: "0", defaultPort: 8285, lowest: 1),
            message: "Backend.Port 0 is not valid for the udp backend: use a whole number 1…65535 (default 8285)"
        ),
        Bad(
            json: #"{"Network": "10.2.0.0/16", "Backend": {"Type": "udp", "Port": 65536}}"#,
            error: .invalidPort(backend: "udp", value: "65536", defaultPort: 8285, lowest: 1),
            message: "Backend.Port 65536"
        ),
        Bad(
            json: #"{"Network": "10.2.0.0/16", "Backend": {"Type": "vxlan", "VNI": 16777216}}"#,
            error: .invalidValue(
                field: "Backend.VNI",
                value: "16777216",
                expected: "a whole number 0…16777215 (default 1)"
            ),
            message: "Backend.VNI 16777216 is not valid"
        ),
        Bad(json: #"["Network"]"#, error: .notAnObject(found: "an array"), message: "must be a JSON object"),
    ])
    func invalidConfigsAreRefusedWithFlannelsMessage(_ bad: Bad) {
        #expect(throws: bad.error) { try NetworkConfig(json: bad.json) }
        #expect(bad.error.description.contains(bad.message), "\(bad.error.description)")
    }

    @Test func invalidJSONCarriesTheParsersReason() {
        let e = #expect(throws: NetworkConfigError.self) {
            try NetworkConfig(json: "{\"Network\": \"10.2.0.0/16\",\n}")
        }
        #expect(e?.description == "network config is not valid JSON: trailing comma before '}' at line 2, column 1")
    }

    @Test func explicitSubnetRangeIsKept() throws {
        let c = try config(
            #"{"Network": "10.2.0.0/16", "SubnetLen": 26, "SubnetMin": "10.2.4.64", "SubnetMax": "10.2.5.0"}"#
        )
        #expect(c.subnetLen == 26)
        #expect(c.subnets.map(\.description) == ["10.2.4.64/26", "10.2.4.128/26", "10.2.4.192/26", "10.2.5.0/26"])
        #expect(c.fits(net("10.2.4.128/26")))
        #expect(!c.fits(net("10.2.4.0/26")))  // below SubnetMin
        #expect(!c.fits(net("10.2.5.64/26")))  // above SubnetMax
        #expect(!c.fits(net("10.2.4.0/24")))  // wrong length
        #expect(c.subnets.index(of: net("10.2.5.0/26")) == 3)
    }

    @Test func zeroMeansDefaultAsInFlannel() throws {
        let c = try config(#"{"Network": "10.2.0.0/16", "SubnetLen": 0, "SubnetMin": "0.0.0.0", "SubnetMax": null}"#)
        #expect(c.subnetLen == 24)
        #expect(c.subnetMin == net("10.2.1.0/24"))
        #expect(c.subnetMax == net("10.2.255.0/24"))
    }

    @Test func unknownFieldsAreIgnoredAndNamesMatchCaseInsensitively() throws {
        let json =
            #"{"network": "10.2.5.0/16", "subnetlen": 26, "IPv6Network": "fd00::/48", "Extra": [1, {"x": null}]}"#
        let c = try config(json)
        #expect(c.network == net("10.2.0.0/16"))  // host bits cleared, as flannel does
        #expect(c.subnetLen == 26)
        #expect(c.json == json)
    }

    @Test func lowerAndMixedCaseKeysMeanWhatFlannelsSpellingsMean() throws {
        let canonical = try config(
            #"{"Network": "10.2.0.0/16", "SubnetLen": 25, "SubnetMin": "10.2.1.0", "SubnetMax": "10.2.200.0", "Backend": {"Type": "vxlan", "VNI": 42, "DirectRouting": true, "Port": 4789, "GBP": true}}"#
        )
        let folded = try config(
            #"{"network": "10.2.0.0/16", "SUBNETLEN": 25, "subnetmin": "10.2.1.0", "subnetMAX": "10.2.200.0", "backend": {"type": "vxlan", "vni": 42, "directrouting": true, "PORT": 4789, "gbp": true}}"#
        )
        #expect(folded.network == canonical.network)
        #expect(
            folded.subnetLen == 25 && folded.subnetMin == canonical.subnetMin && folded.subnetMax == canonical.subnetMax
        )
        #expect(folded.backend.type == "vxlan" && folded.backend.vni == 42 && folded.backend.port == 4789)
        #expect(folded.backend.directRouting)
        #expect(folded.backend.option("GBP") == .bool(true) && canonical.backend.option("gbp") == .bool(true))
        // The checks read the same fields whatever their spelling.
        #expect(throws: NetworkConfigError.missingIPv6Network) {
            try config(#"{"network": "10.2.0.0/16", "enableipv6": true}"#)
        }
        let folded6 = try config(
            #"{"network": "10.2.0.0/16", "enableipv6": true, "ipv6network": "fd00::/56", "IPV6SUBNETLEN": 60}"#
        )
        #expect(folded6.ipv6?.network == IPv6Network("fd00::/56") && folded6.ipv6?.subnetLen == 60)
        #expect(throws: NetworkConfigError.self) {
            try config(#"{"network": "10.2.0.0/16", "backend": {"type": "vxlan", "vni": -1}}"#)
        }
    }

    @Test func keysFoldAsGoFoldsThemKelvinSignAndLongS() throws {
        // Go folds each character's case (upper then lower): K (U+212A) is k, ſ (U+017F) is s.
        let c = try config(#"{"Network": "10.2.0.0/16", "\u017fubnetLen": 26, "BAC\u212aEND": {"Type": "host-gw"}}"#)
        #expect(c.subnetLen == 26)
        #expect(c.backend.type == "host-gw")
    }

    @Test func ofTwoSpellingsOfOneKeyTheLaterCountsAsInGoWhicheverIsExact() throws {
        // Go's decoder assigns each key to its field in document order, so the
        // last spelling wins even over the exact one (flanneld reads it so).
        let exactFirst = try config(#"{"Network": "10.2.0.0/16", "network": "10.3.0.0/16"}"#)
        #expect(exactFirst.network == net("10.3.0.0/16"))
        let exactLast = try config(#"{"network": "10.3.0.0/16", "Network": "10.2.0.0/16"}"#)
        #expect(exactLast.network == net("10.2.0.0/16"))
        let backend = try config(
            #"{"Network": "10.2.0.0/16", "Backend": {"type": "udp", "Type": "vxlan", "VNI": 7, "vni": 9}}"#
        )
        #expect(backend.backend.type == "vxlan" && backend.backend.vni == 9)
        #expect(backend.backend.options.keys.sorted() == ["Type", "vni"], "one key per field, the one Go uses")
        // A stray earlier spelling with a bad value does not count.
        #expect(try config(#"{"SUBNETLEN": "x", "Network": "10.2.0.0/16", "SubnetLen": 26}"#).subnetLen == 26)
    }

    @Test func vxlanBackendDefaultsAndOptions() throws {
        let plain = try config(#"{"Network": "10.2.0.0/16", "Backend": {"Type": "VXLAN"}}"#)
        #expect(plain.backend.type == "vxlan")
        #expect(plain.backend.vni == 1)
        #expect(plain.backend.port == 8472)
        #expect(!plain.backend.directRouting)

        let tuned = try config(
            #"{"Network": "10.2.0.0/16", "Backend": {"Type": "vxlan", "VNI": 4096, "Port": 4789, "DirectRouting": true, "GBP": false}}"#
        )
        #expect(tuned.backend.vni == 4096)
        #expect(tuned.backend.port == 4789)
        #expect(tuned.backend.directRouting)
        #expect(tuned.backend.options["GBP"] == .bool(false))
    }

    @Test func vxlanMTUAndLearningAreFlannelsKeys() throws {
        let plain = try config(#"{"Network": "10.2.0.0/16", "Backend": {"Type": "vxlan"}}"#)
        #expect(plain.backend.mtu == nil && !plain.backend.learning && !plain.backend.gbp)
        let tuned = try config(
            #"{"Network": "10.2.0.0/16", "Backend": {"Type": "vxlan", "MTU": 1400, "Learning": true, "GBP": true}}"#
        )
        #expect(tuned.backend.mtu == 1400 && tuned.backend.learning && tuned.backend.gbp)
        // Go's spellings: flannel's struct tags are mtu, learning, gbp.
        let folded = try config(
            #"{"Network": "10.2.0.0/16", "backend": {"type": "vxlan", "mtu": 9000, "learning": true}}"#
        )
        #expect(folded.backend.mtu == 9000 && folded.backend.learning)
        // The device gets MTU − 50, which must carry a 68-byte packet.
        #expect(try config(#"{"Network": "10.2.0.0/16", "Backend": {"Type": "vxlan", "MTU": 118}}"#).backend.mtu == 118)
        for bad in [#"117"#, #"1400.5"#, #""1400""#, #"70000"#] {
            #expect {
                try config(#"{"Network": "10.2.0.0/16", "Backend": {"Type": "vxlan", "MTU": "# + bad + "}}")
            } throws: { error in
                let text = "\(error)"
                return text.contains("Backend.MTU") && text.contains("118") && text.contains("50 less")
            }
        }
        #expect {
            try config(#"{"Network": "10.2.0.0/16", "Backend": {"Type": "vxlan", "Learning": "yes"}}"#)
        } throws: { "\($0)".contains("Backend.Learning") && "\($0)".contains("true or false") }
        // Other backends do not read them.
        #expect(try config(#"{"Network": "10.2.0.0/16", "Backend": {"Type": "udp", "MTU": 5}}"#).backend.mtu == nil)
    }

    @Test func udpBackendPort() throws {
        #expect(try config(#"{"Network": "10.2.0.0/16", "Backend": {"Type": "udp"}}"#).backend.port == 8285)
        #expect(
            try config(#"{"Network": "10.2.0.0/16", "Backend": {"Type": "UDP", "Port": 9000}}"#).backend
                == BackendConfig(type: "udp", port: 9000, options: ["Type": .string("UDP"), "Port": .number(9000)])
        )
        #expect(try config(#"{"Network": "10.2.0.0/16", "Backend": null}"#).backend.type == "udp")
    }

    @Test func otherBackendsKeepTheirOptions() throws {
        let c = try config(#"{"Network": "10.2.0.0/16", "Backend": {"Type": "host-gw"}}"#)
        #expect(c.backend.type == "host-gw")
        #expect(c.backend.port == 0)
    }

    @Test func enableNFTablesIsFlannelsKeyOffByDefault() throws {
        #expect(try !config(#"{"Network": "10.2.0.0/16"}"#).enableNFTables)
        #expect(try config(#"{"Network": "10.2.0.0/16", "EnableNFTables": true}"#).enableNFTables)
        #expect(try config(#"{"Network": "10.2.0.0/16", "enablenftables": true}"#).enableNFTables)
        #expect(
            throws: NetworkConfigError.invalidValue(
                field: "EnableNFTables",
                value: #""yes""#,
                expected: "true or false"
            )
        ) {
            try NetworkConfig(json: #"{"Network": "10.2.0.0/16", "EnableNFTables": "yes"}"#)
        }
    }

    struct DualStackDefaults: Sendable, CustomTestStringConvertible {
        var network: String
        var subnetLen: Int
        var min: String
        var max: String
        var testDescription: String { network }
    }

    /// flannel's IPv6 defaults: a /64 per host from networks of /62 and
    /// larger, prefix+2 for /63…/124; the first subnet skipped.
    @Test(arguments: [
        DualStackDefaults(
            network: "fd00:10:244::/48",
            subnetLen: 64,
            min: "fd00:10:244:1::",
            max: "fd00:10:244:ffff::"
        ),
        DualStackDefaults(network: "2001:db8::/32", subnetLen: 64, min: "2001:db8:0:1::", max: "2001:db8:ffff:ffff::"),
        DualStackDefaults(network: "fd00::/62", subnetLen: 64, min: "fd00:0:0:1::", max: "fd00:0:0:3::"),
        DualStackDefaults(network: "fd00::/63", subnetLen: 65, min: "fd00::8000:0:0:0", max: "fd00:0:0:1:8000::"),
        DualStackDefaults(network: "fd00::/124", subnetLen: 126, min: "fd00::4", max: "fd00::c"),
        DualStackDefaults(network: "::/0", subnetLen: 64, min: "0:0:0:1::", max: "ffff:ffff:ffff:ffff::"),
    ])
    func ipv6DefaultsFollowFlannel(_ d: DualStackDefaults) throws {
        if d.network == "::/0" {
            // flannel takes ::/0 for "no IPv6Network".
            #expect(throws: NetworkConfigError.missingIPv6Network) {
                try config(#"{"Network": "10.2.0.0/16", "EnableIPv6": true, "IPv6Network": "::/0"}"#)
            }
            return
        }
        let c = try config(#"{"Network": "10.2.0.0/16", "EnableIPv6": true, "IPv6Network": "\#(d.network)"}"#)
        let v6 = try #require(c.ipv6)
        #expect(c.enableIPv4 && c.enableIPv6)
        #expect(v6.network == IPv6Network(d.network))
        #expect(v6.subnetLen == d.subnetLen)
        #expect(v6.subnetMin == IPv6Network(address: IPv6Address(d.min)!, prefixLength: d.subnetLen))
        #expect(v6.subnetMax == IPv6Network(address: IPv6Address(d.max)!, prefixLength: d.subnetLen))
        #expect(v6.fits(v6.subnetMin) && v6.fits(v6.subnetMax))
        #expect(!v6.fits(IPv6Network(address: v6.network.address, prefixLength: d.subnetLen)))
        // The IPv4 side is what it would be without IPv6.
        #expect(c.network == net("10.2.0.0/16") && c.subnetLen == 24)
    }

    @Test func ipv6FieldsAreIgnoredWhileEnableIPv6IsOff() throws {
        let c = try config(#"{"Network": "10.2.0.0/16", "IPv6Network": "fd00::/125", "IPv6SubnetLen": 200}"#)
        #expect(c.ipv6 == nil && !c.enableIPv6)
    }

    @Test func explicitIPv6RangeAndLengthAreKept() throws {
        let c = try config(
            #"{"Network": "10.2.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:10:244::/48", "IPv6SubnetLen": 56, "IPv6SubnetMin": "fd00:10:244:200::", "IPv6SubnetMax": "fd00:10:244:400::", "IPv6SubnetMax": "fd00:10:244:500::"}"#
        )
        let v6 = try #require(c.ipv6)
        #expect(v6.subnetLen == 56)
        #expect(v6.subnetMin.description == "fd00:10:244:200::/56")
        // Of two spellings of one field, the later counts, as in flanneld.
        #expect(v6.subnetMax.description == "fd00:10:244:500::/56")
        #expect(v6.fits(IPv6Network("fd00:10:244:300::/56")!))
        #expect(!v6.fits(IPv6Network("fd00:10:244:100::/56")!))
        #expect(!v6.fits(IPv6Network("fd00:10:244:300::/64")!))
    }
}
