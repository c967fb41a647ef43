import FlannelFiles
import Foundation
import NetBase
import Testing

@testable import LeaseStore

@Suite struct LeaseCodecTests {
    @Test func udpLeaseValueIsByteIdenticalToFlannels() {
        let attrs = LeaseAttributes(publicIP: ip("198.18.0.1"))
        #expect(attrs.flannelJSON == #"{"PublicIP":"198.18.0.1","PublicIPv6":null}"#)
    }

    @Test func vxlanLeaseValueIsByteIdenticalToFlannels() {
        let attrs = LeaseAttributes(
            publicIP: ip("198.18.0.2"),
            backendType: "vxlan",
            backendData: .object(["VtepMAC": .string("2a:c9:1d:0b:72:8e"), "VNI": .number(1)])
        )
        #expect(
            attrs.flannelJSON
                == #"{"PublicIP":"198.18.0.2","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"2a:c9:1d:0b:72:8e"}}"#
        )
    }

    @Test func ipv6AddressAndEscapesAreWrittenLikeGo() {
        let attrs = LeaseAttributes(
            publicIP: ip("198.18.0.3"),
            publicIPv6: IPv6Address("fd00::3"),
            backendType: "",
            backendData: .object(["Note": .string("a<b>&\"\n")])
        )
        #expect(
            attrs.flannelJSON
                == #"{"PublicIP":"198.18.0.3","PublicIPv6":"fd00::3","BackendData":{"Note":"a\u003cb\u003e\u0026\"\n"}}"#
        )
    }

    @Test(arguments: [
        // flannel v0.18 udp, v0.28 udp
        #"{"PublicIP":"198.18.0.1"}"#,
        #"{"PublicIP":"198.18.0.1","PublicIPv6":null}"#,
        // vxlan, with dual-stack extras and an unknown field
        #"{"PublicIP":"198.18.0.2","PublicIPv6":"fd00::2","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"},"BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:00"},"Future":true}"#,
        // whitespace, as etcdctl users write by hand
        "{ \"PublicIP\" : \"198.18.0.4\" , \"BackendType\" : \"host-gw\" }\n",
    ])
    func flannelWrittenValuesDecode(_ text: String) throws {
        let attrs = try LeaseAttributes(flannelJSON: text, key: "10.2.1.0-24")
        #expect(attrs.publicIP.description.hasPrefix("198.18.0."))
        // What we decode re-encodes to something that decodes the same.
        #expect(try LeaseAttributes(flannelJSON: attrs.flannelJSON, key: "k") == attrs)
    }

    @Test func vxlanValueDecodesItsParts() throws {
        let attrs = try LeaseAttributes(
            flannelJSON:
                #"{"PublicIP":"198.18.0.2","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}"#,
            key: "10.2.1.0-24"
        )
        #expect(attrs.publicIPv6 == nil)
        #expect(attrs.backendType == "vxlan")
        #expect(attrs.backendData?.field("VtepMAC") == .string("aa:bb:cc:dd:ee:ff"))
        #expect(attrs.backendData?.field("VNI") == .number(1))
    }

    @Test(arguments: [
        ("not json", "not JSON"),
        ("[]", "not an object"),
        (#"{"PublicIPv6":null}"#, "no PublicIP"),
        (#"{"PublicIP":"198.18.0.300"}"#, "is not an IPv4 address"),
        (#"{"PublicIP":42}"#, "is not an IPv4 address"),
        (#"{"PublicIP":"198.18.0.1","BackendType":7}"#, "BackendType 7 is not a string"),
    ])
    func invalidValuesAreCorrupt(_ text: String, _ reason: String) {
        let e = #expect(throws: LeaseStoreError.self) {
            try LeaseAttributes(flannelJSON: text, key: "/coreos.com/network/subnets/10.2.1.0-24")
        }
        guard case .corrupt(let key, let why)? = e else {
            Issue.record("expected .corrupt, got \(String(describing: e))")
            return
        }
        #expect(key == "/coreos.com/network/subnets/10.2.1.0-24")
        #expect(why.contains(reason), "\(why)")
    }

    @Test func leaseKeysParseLikeFlannels() {
        #expect(LeaseKey.subnet(fromKey: "10.2.72.0-24") == net("10.2.72.0/24"))
        #expect(LeaseKey.subnet(fromKey: "/coreos.com/network/subnets/10.2.72.0-24") == net("10.2.72.0/24"))
        #expect(LeaseKey.subnet(fromKey: "10.2.72.0-24&fd00:10:244:1::-64") == net("10.2.72.0/24"))
        #expect(LeaseKey.subnet(fromKey: "10.2.72.0-24&nonsense") == nil)
        #expect(LeaseKey.subnet(fromKey: "10.2.72.5-24") == nil)
        #expect(LeaseKey.subnet(fromKey: "config") == nil)
        #expect(LeaseKey.key(for: net("10.2.72.0/24")) == "10.2.72.0-24")
    }
}

@Suite struct JSONTests {
    @Test(arguments: [
        ("{\"a\":1,}", "trailing comma before '}' at line 1, column 8"),
        ("[1,]", "trailing comma before ']' at line 1, column 4"),
        ("{\"a\":01}", "invalid number: leading zeros are not allowed at line 1, column 7"),
        ("{\"a\":\"x}", "unterminated string at line 1, column 9"),
        ("{\"a\" 1}", "unexpected '1': expected ':' after field name \"a\" at line 1, column 6"),
        ("tru", "unexpected 't': expected a value (did you mean true?) at line 1, column 1"),
        ("", "empty input: expected a JSON value at line 1, column 1"),
        ("{} x", "unexpected 'x' after the end of the JSON value at line 1, column 4"),
        ("\"a\tb\"", "control character 0x9 inside a string (escape it) at line 1, column 3"),
        ("{a:1}", "unexpected 'a': expected a field name in double quotes at line 1, column 2"),
    ])
    func malformedJSONIsRefusedWithAReason(_ text: String, _ message: String) {
        let e = #expect(throws: JSONParseError.self) { try JSONValue(parsing: text) }
        #expect(e?.description == message)
    }

    @Test func valuesParseAndPrintCompactly() throws {
        let v = try JSONValue(parsing: #" {"b": [1, 2.5, -3e2, true, null], "a": "\u00e9\ud83d\ude00\/"} "#)
        #expect(
            v
                == .object([
                    "a": .string("é😀/"), "b": .array([.number(1), .number(2.5), .number(-300), .bool(true), .null]),
                ])
        )
        #expect(v.compactText == #"{"a":"é😀/","b":[1,2.5,-300,true,null]}"#)
        #expect(try JSONValue(parsing: v.compactText) == v)
    }

    @Test func deepNestingIsRefusedNotACrash() {
        let text = String(repeating: "[", count: 10_000) + String(repeating: "]", count: 10_000)
        #expect(throws: JSONParseError.self) { try JSONValue(parsing: text) }
    }

    @Test func codableRoundTrip() throws {
        let v = JSONValue.object(["k": .array([.number(1), .string("s"), .bool(false), .null])])
        let data = try JSONEncoder().encode(v)
        #expect(try JSONDecoder().decode(JSONValue.self, from: data) == v)
    }

    @Test func timestampsRoundTripThroughRFC3339() {
        #expect(Timestamp(milliseconds: 0).description == "1970-01-01T00:00:00.000Z")
        #expect(Timestamp(milliseconds: 1_772_366_400_250).description == "2026-03-01T12:00:00.250Z")
        #expect(Timestamp(milliseconds: 951_782_400_000).description == "2000-02-29T00:00:00.000Z")
        var g = SeededGenerator(seed: 7)
        for _ in 0..<1000 {
            let t = Timestamp(milliseconds: Int64.random(in: 0...4_102_444_800_000, using: &g))
            #expect(Timestamp(rfc3339: t.description) == t)
            #expect(Timestamp(t.date) == t)
        }
        #expect(Timestamp(rfc3339: "2026-03-01T12:00:00Z")?.milliseconds == 1_772_366_400_000)
        #expect(Timestamp(rfc3339: "2026-03-01 12:00:00Z") == nil)
    }
}
