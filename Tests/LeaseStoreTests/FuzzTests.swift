import FlannelFiles
import FuzzSupport
import NetBase
import Testing

@testable import LeaseStore

/// Random and mutated text against every parser of the control plane: JSON, the network
/// config, lease values and keys, the local store's files and subnet.env. Whatever parses
/// must re-encode to text that parses to the same value; whatever does not gets an error
/// that says what is wrong.
@Suite struct LeaseStoreFuzzTests {
    // MARK: Generators

    static let scalarPools: [[Unicode.Scalar]] = [
        Array("abcXYZ019 _-./:".unicodeScalars), ["\"", "\\", "/", "<", ">", "&", "\u{7f}"],
        (0..<0x20).map { Unicode.Scalar(UInt8($0)) }, ["é", "ß", "中", "\u{2028}", "\u{2029}", "\u{FFFD}", "\u{FEFF}"],
        ["😀", "\u{10FFFF}", "\u{1F1E9}"], ["e", "\u{301}"],
    ]

    static func string(_ c: FuzzCase, maxLength: Int = 12) -> String {
        var s = String.UnicodeScalarView()
        for _ in 0..<c.int(0...maxLength) { s.append(c.pick(c.pick(scalarPools))) }
        return String(s)
    }

    static func number(_ c: FuzzCase) -> Double {
        switch c.int(0..<6) {
        case 0: return Double(c.int(-1000...1000))
        case 1: return Double(c.int(Int(-1e15)...Int(1e15)))
        case 2: return Double(c.int(-100_000...100_000)) / 64
        case 3: return c.pick([0, -0.0, 1e15, -1e15, 1e21, 5e-324, 1.7976931348623157e308, 0.1, 9007199254740993])
        default:
            let d = Double(bitPattern: c.u64())
            return d.isFinite ? d : 1.5
        }
    }

    static func value(_ c: FuzzCase, depth: Int = 0) -> JSONValue {
        switch c.int(0..<(depth >= 4 ? 4 : 7)) {
        case 0: return .null
        case 1: return .bool(c.bool())
        case 2: return .number(number(c))
        case 3: return .string(string(c))
        case 4, 5:
            var fields: [String: JSONValue] = [:]
            for _ in 0..<c.int(0...4) { fields[string(c, maxLength: 6)] = value(c, depth: depth + 1) }
            return .object(fields)
        default: return .array((0..<c.int(0...4)).map { _ in value(c, depth: depth + 1) })
        }
    }

    /// `v` as JSON text in one of the many spellings RFC 8259 allows.
    static func render(_ v: JSONValue, _ c: FuzzCase) -> String {
        let space = { c.oneIn(3) ? c.pick([" ", "\n", "\t", "\r\n", "  "]) : "" }
        switch v {
        case .null: return "null"
        case .bool(let b): return b ? "true" : "false"
        case .number(let n):
            if n == n.rounded(), abs(n) < 1e15, !(n == 0 && n.sign == .minus) {
                let i = Int64(n)
                return c.pick(["\(i)", "\(i).0", "\(i)e0", "\(i)E+0", i == 0 ? "0.00" : "\(i)0e-1"])
            }
            return c.bool() ? "\(n)" : "\(n)".replacingOccurrences(of: "e", with: "E")
        case .string(let s):
            var out = "\""
            for scalar in s.unicodeScalars {
                let v = scalar.value
                switch scalar {
                case "\"": out += "\\\""
                case "\\": out += "\\\\"
                case "/" where c.bool(): out += "\\/"
                case "\n" where c.bool(): out += "\\n"
                case "\u{08}" where c.bool(): out += "\\b"
                default:
                    if v < 0x20 || c.oneIn(5) {
                        if v > 0xffff {
                            let u = v - 0x10000
                            out += hex(0xd800 + (u >> 10), c) + hex(0xdc00 + (u & 0x3ff), c)
                        } else {
                            out += hex(v, c)
                        }
                    } else {
                        out.unicodeScalars.append(scalar)
                    }
                }
            }
            return out + "\""
        case .array(let items):
            return "[" + space() + items.map { render($0, c) + space() }.joined(separator: "," + space()) + "]"
        case .object(let fields):
            let keys = fields.keys.shuffled(using: &c.rng)
            return "{" + space()
                + keys.map { render(.string($0), c) + space() + ":" + space() + render(fields[$0]!, c) + space() }
                .joined(separator: "," + space()) + "}"
        }
    }

    static func hex(_ v: UInt32, _ c: FuzzCase) -> String {
        let digits = String(v, radix: 16, uppercase: c.bool())
        return "\\u" + String(repeating: "0", count: 4 - digits.count) + digits
    }

    static let jsonTokens: [[UInt8]] = [
        "{", "}", "[", "]", ",", ":", "\"", "\\", "\\u", "\\ud800", "\\udc00", "null", "true",
        "1e400", "-", "0", ".", "e", "\"Network\"", "\"PublicIP\"", "\u{FEFF}", "\n",
        String(repeating: "[", count: 200), "\"10.2.0.0/16\"", "\"198.18.0.1\"",
    ].map { Array($0.utf8) }

    /// Corpus files and generated texts, often mutated.
    static func text(_ c: FuzzCase, corpus: [[UInt8]], generated: () -> String) -> [UInt8] {
        var bytes = !corpus.isEmpty && c.bool() ? c.pick(corpus) : Array(generated().utf8)
        if c.oneIn(4) == false { c.mutate(&bytes, dictionary: jsonTokens) }
        return bytes
    }

    // MARK: JSON

    @Test func jsonParsesEverySpellingOfAValue() {
        let report = fuzz("jsonParsesEverySpellingOfAValue", seed: 0x3F_0001, iterations: 1500) { c, count in
            let v = Self.value(c)
            let text = Self.render(v, c)
            c.note = String(text.prefix(200))
            do {
                let parsed = try JSONValue(parsing: text)
                c.expect(parsed == v, "parsed \(parsed.compactText), generated \(v.compactText)")
                let again = try JSONValue(parsing: parsed.compactText)
                c.expect(again == v && again.compactText == v.compactText, "compactText does not round-trip")
            } catch {
                c.fail("valid JSON refused: \(error)")
            }
            count("values")
        }
        report.expectReached("values", atLeast: 1500)
    }

    @Test func mutatedJSONIsRefusedWithAPositionOrReencodesToItself() {
        let corpus = FuzzCorpus.load("json")
        #expect(!corpus.isEmpty, "Fuzz/corpus/json is missing")
        let report = fuzz("mutatedJSONIsRefusedWithAPositionOrReencodesToItself", seed: 0x3F_0002, iterations: 3000) {
            c,
            count in
            let bytes = Self.text(c, corpus: corpus) { Self.render(Self.value(c), c) }
            c.note = String(decoding: bytes.prefix(200), as: UTF8.self)
            do throws(JSONParseError) {
                let v = try JSONValue(parsing: bytes)
                let compact = v.compactText
                let again = try JSONValue(parsing: compact)
                c.expect(again == v && again.compactText == compact, "re-encoding \(compact) does not parse to itself")
                count("parsed")
            } catch {
                let lines = bytes.filter { $0 == 0x0a }.count + 1
                c.expect(
                    error.line >= 1 && error.line <= lines && error.column >= 1 && error.column <= bytes.count + 1
                        && !error.reason.isEmpty,
                    "error position \(error.line):\(error.column) outside the text"
                )
                count("refused")
            }
        }
        report.expectReached("parsed", atLeast: 500)
        report.expectReached("refused", atLeast: 1000)
    }

    // MARK: Network config

    /// A config object: each field absent, valid, edge or wrong-typed; names in any case.
    static func configValue(_ c: FuzzCase) -> [String: JSONValue] {
        var o: [String: JSONValue] = [:]
        func name(_ n: String) -> String { c.oneIn(5) ? c.pick([n.lowercased(), n.uppercased()]) : n }
        let prefix = c.oneIn(6) ? c.int(0...32) : c.int(8...28)
        let network = IPv4Network(address: IPv4Address(c.u32()), prefixLength: prefix)
        let subnetLen = prefix + c.int(0...8)
        func subnetAddress() -> JSONValue {
            switch c.int(0..<8) {
            case 0: return .string("0.0.0.0")
            case 1: return .string(IPv4Address(c.u32()).description)
            case 2: return .number(1)
            case 3: return .string("\(network.address)/\(subnetLen)")
            default:
                let length = min(32, max(subnetLen, 1))
                let count = UInt32(truncatingIfNeeded: network.size >> UInt64(32 - length)) &- 1
                let index = count == 0 ? 0 : UInt32.random(in: 0...count, using: &c.rng)
                return .string(IPv4Address(network.address.value &+ index << UInt32(32 - length)).description)
            }
        }
        if !c.oneIn(10) {
            o[name("Network")] =
                c.oneIn(12)
                ? c.pick([.number(10), .string("10.2.0.0"), .null, .string("0.0.0.0/0")])
                : .string("\(c.oneIn(4) ? IPv4Address(c.u32()) : network.address)/\(prefix)")
        }
        if c.bool() {
            o[name("SubnetLen")] =
                c.oneIn(6)
                ? c.pick([.number(24.5), .string("24"), .number(-1), .number(31), .number(0), .null])
                : .number(Double(subnetLen))
        }
        if c.oneIn(3) { o[name("SubnetMin")] = subnetAddress() }
        if c.oneIn(3) { o[name("SubnetMax")] = subnetAddress() }
        if c.oneIn(8) { o[name("EnableIPv4")] = c.pick([.bool(true), .bool(false), .string("true")]) }
        if c.oneIn(8) { o[name("EnableIPv6")] = c.pick([.bool(true), .bool(false), .number(0)]) }
        if c.oneIn(10) { o["Comment"] = value(c) }
        if !c.oneIn(4) {
            var b: [String: JSONValue] = [:]
            if !c.oneIn(10) {
                b[name("Type")] =
                    c.oneIn(10)
                    ? c.pick([.string(""), .number(1), .null])
                    : .string(c.pick(["udp", "vxlan", "host-gw", "UDP", "VxLan", "ipip", string(c, maxLength: 4)]))
            }
            if c.bool() {
                b[name("Port")] =
                    c.oneIn(4)
                    ? c.pick([.number(0), .number(65536), .number(-1), .number(80.5), .string("8285")])
                    : .number(Double(c.int(1...65535)))
            }
            if c.bool() {
                b[name("VNI")] =
                    c.oneIn(4)
                    ? c.pick([.number(16777216), .number(-1), .string("1")]) : .number(Double(c.int(0...0xff_ffff)))
            }
            if c.bool() { b[name("DirectRouting")] = c.oneIn(4) ? .string("yes") : .bool(c.bool()) }
            o[name("Backend")] = c.oneIn(12) ? .string("udp") : .object(b)
        }
        return o
    }

    /// flannel's rules for the config (docs/FLANNEL-COMPAT.md), written out again on plain
    /// dictionaries: the expected config, or the name of the error.
    static func model(
        _ o: [String: JSONValue]
    ) -> Result<(IPv4Network, Int, UInt32, UInt32, String, UInt16, Int, Bool), ModelError> {
        func field(_ object: [String: JSONValue], _ n: String) -> JSONValue? {
            let v = object[n] ?? object.keys.sorted().first { $0.lowercased() == n.lowercased() }.flatMap { object[$0] }
            if case .null? = v { return nil }
            return v
        }
        func whole(_ v: JSONValue?, _ range: ClosedRange<Double>) -> Double?? {
            guard let v else { return .some(nil) }
            guard case .number(let n) = v, n == n.rounded(), range.contains(n) else { return nil }
            return .some(n)
        }
        func bool(_ v: JSONValue?, _ d: Bool) -> Bool? {
            guard let v else { return d }
            if case .bool(let b) = v { return b }
            return nil
        }
        guard let ipv4 = bool(field(o, "EnableIPv4"), true) else { return .failure(.init("invalidValue")) }
        guard let ipv6 = bool(field(o, "EnableIPv6"), false) else { return .failure(.init("invalidValue")) }
        if !ipv4 && !ipv6 { return .failure(.init("noAddressFamily")) }
        if ipv6 { return .failure(.init("missingIPv6Network")) }  // the generator writes no IPv6Network
        guard let nv = field(o, "Network") else { return .failure(.init("missingNetwork")) }
        guard case .string(let nt) = nv, let network = IPv4Network(nt) else { return .failure(.init("invalidValue")) }
        if network.prefixLength == 0 && network.address.value == 0 { return .failure(.init("missingNetwork")) }
        let prefix = network.prefixLength
        guard let given = whole(field(o, "SubnetLen"), 0...2_147_483_647) else {
            return .failure(.init("invalidValue"))
        }
        var length = Int(given ?? 0)
        if length > 0 {
            if length > 30 { return .failure(.init("subnetLenTooLong")) }
            if length < prefix + 2 { return .failure(.init("tooFewSubnets")) }
        } else if prefix > 28 {
            return .failure(.init("networkTooSmall"))
        } else {
            length = prefix <= 22 ? 24 : prefix + 2
        }
        let size = UInt64(1) << UInt64(32 - length)
        let first = UInt64(network.address.value), last = first + network.size - 1
        var bounds: [UInt64] = [first + size, last - size + 1]
        for (i, n) in ["SubnetMin", "SubnetMax"].enumerated() {
            guard let v = field(o, n) else { continue }
            guard case .string(let t) = v, let a = IPv4Address(t) else { return .failure(.init("invalidValue")) }
            if a.value != 0 { bounds[i] = UInt64(a.value) }
        }
        if bounds.contains(where: { $0 < first || $0 > last }) { return .failure(.init("outsideNetwork")) }
        if bounds.contains(where: { $0 % size != 0 }) { return .failure(.init("notOnBoundary")) }
        if bounds[0] > bounds[1] { return .failure(.init("minAboveMax")) }
        guard let bv = field(o, "Backend") else {
            return .success((network, length, UInt32(bounds[0]), UInt32(bounds[1]), "udp", 8285, 0, false))
        }
        guard case .object(let b) = bv else { return .failure(.init("invalidValue")) }
        guard let tv = field(b, "Type") else { return .failure(.init("missingBackendType")) }
        guard case .string(let tt) = tv else { return .failure(.init("invalidValue")) }
        if tt.isEmpty { return .failure(.init("missingBackendType")) }
        let type = tt.lowercased()
        let lowest: Double = type == "udp" ? 1 : 0
        guard let port = whole(field(b, "Port"), lowest...65535) else { return .failure(.init("invalidPort")) }
        var vni = 0, direct = false
        var p = port.map { UInt16($0) } ?? (type == "udp" ? 8285 : type == "vxlan" ? 8472 : 0)
        if type == "vxlan" {
            if p == 0 { p = 8472 }
            guard let v = whole(field(b, "VNI"), 0...16_777_215) else { return .failure(.init("invalidValue")) }
            vni = Int(v ?? 1)
            guard let d = bool(field(b, "DirectRouting"), false) else { return .failure(.init("invalidValue")) }
            direct = d
        }
        return .success((network, length, UInt32(bounds[0]), UInt32(bounds[1]), type, p, vni, direct))
    }

    struct ModelError: Error, Equatable {
        var name: String
        init(_ name: String) { self.name = name }
    }

    static func caseName(_ e: NetworkConfigError) -> String {
        switch e {
        case .invalidJSON: "invalidJSON"
        case .notAnObject: "notAnObject"
        case .missingNetwork: "missingNetwork"
        case .invalidValue: "invalidValue"
        case .networkTooSmall: "networkTooSmall"
        case .subnetLenTooLong: "subnetLenTooLong"
        case .tooFewSubnets: "tooFewSubnets"
        case .outsideNetwork: "outsideNetwork"
        case .notOnBoundary: "notOnBoundary"
        case .minAboveMax: "minAboveMax"
        case .noAddressFamily: "noAddressFamily"
        case .missingIPv6Network: "missingIPv6Network"
        case .ipv6NetworkTooSmall: "ipv6NetworkTooSmall"
        case .ipv6SubnetLenTooLong: "ipv6SubnetLenTooLong"
        case .ipv6TooFewSubnets: "ipv6TooFewSubnets"
        case .ipv6OutsideNetwork: "ipv6OutsideNetwork"
        case .ipv6NotOnBoundary: "ipv6NotOnBoundary"
        case .ipv6MinAboveMax: "ipv6MinAboveMax"
        case .missingBackendType: "missingBackendType"
        case .invalidPort: "invalidPort"
        }
    }

    /// The config written back as explicit JSON.
    static func reencoded(_ config: NetworkConfig) -> String {
        var fields: [String: JSONValue] = [
            "Network": .string(config.network.description), "SubnetLen": .number(Double(config.subnetLen)),
            "SubnetMin": .string(config.subnetMin.address.description),
            "SubnetMax": .string(config.subnetMax.address.description),
        ]
        // No Backend object (options empty) means udp with its defaults.
        if !config.backend.options.isEmpty { fields["Backend"] = .object(config.backend.options) }
        return JSONValue.object(fields).compactText
    }

    @Test func networkConfigsAreDecidedAsTheModelDecides() {
        let report = fuzz("networkConfigsAreDecidedAsTheModelDecides", seed: 0x3F_0003, iterations: 3000) { c, count in
            let object = Self.configValue(c)
            let text = Self.render(.object(object), c)
            c.note = String(text.prefix(300))
            let expected = Self.model(object)
            c.note += " object: \(JSONValue.object(object).compactText)"
            do throws(NetworkConfigError) {
                let config = try NetworkConfig(json: text)
                guard case .success(let m) = expected else {
                    c.fail("accepted, the model says \(expected)")
                    return
                }
                c.expect(
                    config.network == m.0 && config.subnetLen == m.1 && config.subnetMin.address.value == m.2
                        && config.subnetMax.address.value == m.3,
                    "geometry \(config.network) /\(config.subnetLen) \(config.subnetMin)…\(config.subnetMax), model \(m)"
                )
                c.expect(
                    config.backend.type == m.4 && config.backend.port == m.5 && config.backend.vni == m.6
                        && config.backend.directRouting == m.7,
                    "backend \(config.backend), model \(m)"
                )
                c.expect(
                    config.subnets.count >= 1 && config.fits(config.subnetMin) && config.fits(config.subnetMax)
                        && !config.fits(IPv4Network(address: config.network.address, prefixLength: config.subnetLen))
                            == (config.subnetMin.address != config.network.address),
                    "the subnet range is inconsistent"
                )
                let again = try NetworkConfig(json: Self.reencoded(config))
                c.expect(
                    again.network == config.network && again.subnetLen == config.subnetLen
                        && again.subnetMin == config.subnetMin
                        && again.subnetMax == config.subnetMax && again.backend == config.backend,
                    "re-encoded config differs"
                )
                count("accepted")
            } catch {
                guard case .failure(let m) = expected else {
                    c.fail("refused (\(error)), the model accepts")
                    return
                }
                c.expect(
                    Self.caseName(error) == m.name,
                    "error \(Self.caseName(error)) (\(error)), the model says \(m.name)"
                )
                count("refused \(m.name)")
            }
        }
        report.expectReached("accepted", atLeast: 300)
    }

    @Test func mutatedConfigsAreRefusedOrConsistent() {
        let corpus = FuzzCorpus.load("network-config")
        #expect(!corpus.isEmpty, "Fuzz/corpus/network-config is missing")
        let report = fuzz("mutatedConfigsAreRefusedOrConsistent", seed: 0x3F_0004, iterations: 2500) { c, count in
            let bytes = Self.text(c, corpus: corpus) { Self.render(.object(Self.configValue(c)), c) }
            let text = String(decoding: bytes, as: UTF8.self)
            c.note = String(text.prefix(300))
            do throws(NetworkConfigError) {
                let config = try NetworkConfig(json: text)
                let range = config.subnets
                c.expect(
                    config.subnetLen >= config.network.prefixLength + 2 && config.subnetLen <= 30,
                    "SubnetLen \(config.subnetLen)"
                )
                c.expect(
                    config.network.contains(config.subnetMin) && config.network.contains(config.subnetMax)
                        && config.subnetMin.address <= config.subnetMax.address && range.count >= 1,
                    "range"
                )
                c.expect(
                    range[range.count - 1] == config.subnetMax && range.index(of: config.subnetMax) == range.count - 1,
                    "last subnet"
                )
                let again = try NetworkConfig(json: Self.reencoded(config))
                c.expect(again.subnets == range && again.backend == config.backend, "re-encoded config differs")
                count("accepted")
            } catch {
                c.expect(!error.description.isEmpty, "empty error")
                count("refused")
            }
        }
        report.expectReached("accepted", atLeast: 200)
        report.expectReached("refused", atLeast: 1000)
    }

    // MARK: Lease values and keys

    static func attributes(_ c: FuzzCase) -> LeaseAttributes {
        var data: JSONValue? = nil
        if c.bool() {
            data =
                c.oneIn(3)
                ? value(c)
                : .object(["VNI": .number(Double(c.int(0...0xffffff))), "VtepMAC": .string("0e:3f:1a:22:9b:c4")])
            if data == .null { data = .bool(true) }
        }
        return LeaseAttributes(
            publicIP: IPv4Address(c.u32()),
            publicIPv6: c.oneIn(3) ? IPv6Address(c.pick(["fd00::1", "2001:db8::42"])) : nil,
            backendType: c.bool() ? c.pick(["vxlan", "host-gw", "udp", "x" + string(c)]) : nil,
            backendData: data
        )
    }

    @Test func leaseValuesRoundTripAndMutationsAreRefusedOrStable() {
        let corpus = FuzzCorpus.load("lease")
        let report = fuzz("leaseValuesRoundTripAndMutationsAreRefusedOrStable", seed: 0x3F_0005, iterations: 3000) {
            c,
            count in
            let a = Self.attributes(c)
            let json = a.flannelJSON
            c.expect(json.hasPrefix("{\"PublicIP\":\"\(a.publicIP)\",\"PublicIPv6\":"), "not flannel's field order")
            do {
                let back = try LeaseAttributes(flannelJSON: json, key: "k")
                c.expect(back == a, "\(json) reads back as \(back)")
            } catch {
                c.fail("our own lease value \(json) is refused: \(error)")
            }
            var bytes = !corpus.isEmpty && c.bool() ? c.pick(corpus) : Array(json.utf8)
            c.mutate(&bytes, dictionary: Self.jsonTokens)
            let text = String(decoding: bytes, as: UTF8.self)
            c.note = String(text.prefix(200))
            do throws(LeaseStoreError) {
                let b = try LeaseAttributes(flannelJSON: text, key: "10.2.72.0-24")
                let again = try? LeaseAttributes(flannelJSON: b.flannelJSON, key: "k")
                c.expect(again == b, "re-encoding does not read back")
                count("mutant accepted")
            } catch {
                guard case .corrupt(let key, let reason) = error else { c.fail("unexpected error \(error)"); return }
                c.expect(key == "10.2.72.0-24" && !reason.isEmpty, "the error does not name the key")
                count("mutant refused")
            }
        }
        report.expectReached("mutant accepted", atLeast: 80)
        report.expectReached("mutant refused", atLeast: 1000)
    }

    @Test func leaseKeysNameExactlyOneSubnet() {
        let report = fuzz("leaseKeysNameExactlyOneSubnet", seed: 0x3F_0006, iterations: 4000) { c, count in
            let subnet = IPv4Network(address: IPv4Address(c.u32()), prefixLength: c.int(0...32))
            let prefix = c.pick(["", "/coreos.com/network/subnets/", "/x/subnets/"])
            let v6 = c.oneIn(4) ? "&fd00:10:244:\(c.int(0...99))::-64" : ""
            let key = prefix + LeaseKey.key(for: subnet) + v6
            c.expect(LeaseKey.subnet(fromKey: key) == subnet, "\(key) does not name \(subnet)")
            var bytes = Array(key.utf8)
            c.mutate(
                &bytes,
                dictionary: ["-", ".", "/", "&", "0", "00", "1", "32", "33", "::", "-64", "255", "256", " ", "+"].map {
                    Array($0.utf8)
                },
                focus: nil
            )
            let mutated = String(decoding: bytes, as: UTF8.self)
            c.note = mutated
            guard let parsed = LeaseKey.subnet(fromKey: mutated) else { count("refused"); return }
            // A key names a subnet only in its one canonical spelling: two keys for one
            // subnet would let a stray key shadow (or outlive) the real lease.
            var name = Substring(mutated)
            if let slash = name.lastIndex(of: "/") { name = name[name.index(after: slash)...] }
            let v4 = name.split(separator: "&", omittingEmptySubsequences: false).first.map(String.init) ?? ""
            c.expect(
                v4 == LeaseKey.key(for: parsed),
                "key \(mutated) names \(parsed), whose key is \(LeaseKey.key(for: parsed))"
            )
            count("accepted")
        }
        report.expectReached("accepted", atLeast: 100)
    }

    // MARK: Local store files

    static func timestamp(_ c: FuzzCase) -> Timestamp {
        Timestamp(
            milliseconds: c.oneIn(4)
                ? Int64(c.int(0...4_102_444_800_000)) : Int64(c.int(-62_167_219_200_000...253_402_300_799_999))
        )
    }

    static func storedLease(_ c: FuzzCase) -> StoredLease {
        let subnet = IPv4Network(address: IPv4Address(c.u32()), prefixLength: c.int(8...30))
        return StoredLease(
            key: subnet.leaseKey,
            subnet: subnet,
            attributes: attributes(c),
            expiration: c.oneIn(4) ? nil : timestamp(c),
            revision: Int64(c.int(0...9_000_000_000_000_000))
        )
    }

    @Test func timestampsRoundTripAndOddTextIsRefusedOrStable() {
        let report = fuzz("timestampsRoundTripAndOddTextIsRefusedOrStable", seed: 0x3F_0007, iterations: 4000) {
            c,
            count in
            let t = Self.timestamp(c)
            c.expect(
                Timestamp(rfc3339: t.description) == t,
                "\(t.milliseconds) ms written as \(t) reads back differently"
            )
            var bytes = Array(t.description.utf8)
            c.mutate(
                &bytes,
                dictionary: ["9", "0", ".", "Z", "z", "t", "T", "-", ":", "60", "99", ".123456789", "+"].map {
                    Array($0.utf8)
                }
            )
            let text = String(decoding: bytes, as: UTF8.self)
            if let parsed = Timestamp(rfc3339: text) {
                c.expect(Timestamp(rfc3339: parsed.description) == parsed, "\(text) → \(parsed) does not read back")
                count("accepted")
            } else {
                count("refused")
            }
        }
        report.expectReached("accepted", atLeast: 40)
        report.expectReached("refused", atLeast: 1500)
    }

    @Test func storeRecordsAndEventLinesRoundTrip() throws {
        let report = fuzz("storeRecordsAndEventLinesRoundTrip", seed: 0x3F_0008, iterations: 1500) { c, count in
            let stored = Self.storedLease(c)
            let back = try StoredLease(
                record: Array(stored.recordJSON.utf8),
                key: stored.key,
                subnet: stored.subnet,
                path: "p"
            )
            c.expect(back == stored, "record \(stored.recordJSON) reads back as \(back)")
            let change: StoreChange =
                c.bool() ? .put(stored) : .delete(key: stored.key, subnet: stored.subnet, revision: stored.revision)
            let line = change.line
            c.expect(line.hasSuffix("\n") && line.dropLast().allSatisfy { $0 != "\n" }, "an event is not one line")
            let parsed = try StoreChange(line: Array(line.utf8.dropLast()), path: "p")
            c.expect(parsed == change, "event line \(line) reads back as \(parsed)")
            var bytes = Array(stored.recordJSON.utf8)
            c.mutate(&bytes, dictionary: Self.jsonTokens)
            if let mutant = try? StoredLease(record: bytes, key: stored.key, subnet: stored.subnet, path: "p") {
                let again = try StoredLease(
                    record: Array(mutant.recordJSON.utf8),
                    key: stored.key,
                    subnet: stored.subnet,
                    path: "p"
                )
                c.expect(again == mutant, "a mutated record's re-encoding reads back differently")
                count("mutant accepted")
            }
        }
        report.expectReached("mutant accepted", atLeast: 40)
    }

    /// A torn append or an edited line loses that line only: the slow model is the list of
    /// lines that were left whole.
    @Test func eventLogsKeepEveryIntactLine() {
        let report = fuzz("eventLogsKeepEveryIntactLine", seed: 0x3F_0009, iterations: 400) { c, count in
            var log: [UInt8] = []
            var intact: [StoreChange] = []
            for i in 0..<c.int(0...12) {
                var stored = Self.storedLease(c)
                stored.revision = Int64(i + 1)
                let change: StoreChange =
                    c.oneIn(3)
                    ? .delete(key: stored.key, subnet: stored.subnet, revision: stored.revision) : .put(stored)
                var line = Array(change.line.utf8)
                switch c.int(0..<8) {
                case 0: line = Array(line.prefix(c.int(0..<(line.count - 1)))) + [0x0a]  // torn, then the next append
                case 1: line = c.bytes(c.int(0...40)).filter { $0 != 0x0a } + [0x0a]  // garbage
                default: intact.append(change)
                }
                log += line
            }
            if c.bool() { log += Array(Self.storedLease(c).recordJSON.utf8.prefix(c.int(0...30))) }  // torn last append
            let parsed = StoreChange.parseLog(log, path: "events.log")
            c.expect(parsed == intact, "kept \(parsed.map(\.revision)), intact \(intact.map(\.revision))")
            count("logs")
        }
        report.expectReached("logs", atLeast: 400)
    }

    @Test func storeStateFilesAreRefusedOrStable() {
        let report = fuzz("storeStateFilesAreRefusedOrStable", seed: 0x3F_000A, iterations: 2000) { c, count in
            let state = StoreState(
                revision: Int64(c.int(0...Int(Int32.max))),
                oldest: Int64(c.int(1...1000)),
                nextExpiry: c.bool() ? Self.timestamp(c) : nil
            )
            c.expect(
                (try? StoreState(parsing: Array(state.text.utf8), path: "r")) == state,
                "\(state.text) reads back differently"
            )
            var bytes = Array(state.text.utf8)
            c.mutate(
                &bytes,
                dictionary: ["revision ", "oldest ", "next-expiry ", "\n", "-1", "0", " ", "99999999999999999999"].map {
                    Array($0.utf8)
                }
            )
            if let s = try? StoreState(parsing: bytes, path: "r") {
                c.expect(s.revision >= 0 && s.oldest >= 1, "negative revision or oldest")
                c.expect(
                    (try? StoreState(parsing: Array(s.text.utf8), path: "r")) == s,
                    "re-encoding reads back differently"
                )
                count("accepted")
            } else {
                count("refused")
            }
        }
        report.expectReached("accepted", atLeast: 300)
        report.expectReached("refused", atLeast: 600)
    }

    // MARK: subnet.env

    static func subnetEnv(_ c: FuzzCase) -> SubnetEnv {
        var env = SubnetEnv(
            network: IPv4Network(address: IPv4Address(c.u32()), prefixLength: c.int(0...32)),
            subnet: IPv4Network(address: IPv4Address(c.u32()), prefixLength: c.int(0...30)),
            mtu: c.int(68...65535),
            ipMasq: c.bool()
        )
        // flanneld's IPv6 pair, in a third of the files.
        if c.oneIn(3) {
            env.ipv6Network = IPv6Network(address: IPv6Address(UInt128(c.u32()) << 96), prefixLength: c.int(0...64))
            env.ipv6Subnet = IPv6Network(
                address: IPv6Address(UInt128(c.u32()) << 96 | UInt128(c.u32()) << 64),
                prefixLength: c.int(0...126)
            )
        }
        return env
    }

    /// The file as a person or another tool may write it: any order, comments, `export`,
    /// quotes, CRLF, spaces around `=`, flannel's IPv6 variables.
    static func variant(_ env: SubnetEnv, _ c: FuzzCase) -> String {
        var lines = env.text.split(separator: "\n").map(String.init)
        lines.append(contentsOf: ["# comment", ""].filter { _ in c.oneIn(3) })
        lines.shuffle(using: &c.rng)
        return lines.map { line -> String in
            guard let eq = line.firstIndex(of: "="), !line.hasPrefix("#") else { return line }
            var name = String(line[..<eq]), value = String(line[line.index(after: eq)...])
            if c.oneIn(4) { let q = c.pick(["\"", "'"]); value = q + value + q }
            if c.oneIn(4) { name = "export " + name }
            let sep = c.oneIn(5) ? " = " : "="
            return c.pick(["", " ", "\t"]) + name + sep + value + c.pick(["", " ", "\r"])
        }.joined(separator: c.oneIn(4) ? "\r\n" : "\n") + (c.bool() ? "\n" : "")
    }

    @Test func subnetFilesRoundTripInAnySpelling() {
        let corpus = FuzzCorpus.load("subnet-env")
        #expect(!corpus.isEmpty, "Fuzz/corpus/subnet-env is missing")
        let report = fuzz("subnetFilesRoundTripInAnySpelling", seed: 0x3F_000B, iterations: 3000) { c, count in
            let env = Self.subnetEnv(c)
            let text = Self.variant(env, c)
            c.note = text
            do {
                c.expect(try SubnetEnv(parsing: text) == env, "does not read back")
            } catch {
                c.fail("refused: \(error)")
            }
            var bytes = !corpus.isEmpty && c.oneIn(3) ? c.pick(corpus) : Array(text.utf8)
            c.mutate(
                &bytes,
                dictionary: [
                    "FLANNEL_", "=", "\n", "#", "export ", "\"", "/32", "/31", "/0", "65536", "67", "true", "TRUE",
                ].map { Array($0.utf8) }
            )
            let mutated = String(decoding: bytes, as: UTF8.self)
            c.note = mutated
            do throws(SubnetEnvError) {
                let parsed = try SubnetEnv(parsing: mutated)
                c.expect(
                    (try? SubnetEnv(parsing: parsed.text)) == parsed,
                    "\(parsed) is written as text that reads back differently"
                )
                c.expect((68...65535).contains(parsed.mtu), "MTU \(parsed.mtu)")
                count("mutant accepted")
            } catch {
                c.expect(!error.reason.isEmpty, "empty reason")
                count("mutant refused")
            }
        }
        report.expectReached("mutant accepted", atLeast: 60)
        report.expectReached("mutant refused", atLeast: 1000)
    }

    // MARK: Regressions found by the runs above

    /// leaseKeysNameExactlyOneSubnet: "102.141.04.0-24" and "218.0.0.00-7" were read as the
    /// subnets whose keys are "102.141.4.0-24" and "218.0.0.0-7".
    @Test func leaseKeysWithLeadingZerosNameNoSubnet() {
        #expect(LeaseKey.subnet(fromKey: "102.141.04.0-24") == nil)
        #expect(LeaseKey.subnet(fromKey: "/coreos.com/network/subnets/010.2.72.0-24") == nil)
        #expect(LeaseKey.subnet(fromKey: "10.0.0.0-08") == nil)
        #expect(LeaseKey.subnet(fromKey: "10.0.0.0-08&fd00::-64") == nil)
        #expect(LeaseKey.subnet(fromKey: "/coreos.com/network/subnets/10.2.72.0-24") == net("10.2.72.0/24"))
        #expect(LeaseKey.subnet(fromKey: "10.2.72.0-24&fd00:10:244:1::-64") == net("10.2.72.0/24"))
    }

    /// subnetFilesRoundTripInAnySpelling: FLANNEL_SUBNET=10.2.72.1/32 was read as the /32
    /// subnet 10.2.72.1, which this file type writes back as 10.2.72.2/32 — another subnet.
    @Test func subnetFilesWithASubnetLongerThanSlash30AreRefused() {
        for prefix in [31, 32] {
            let text =
                "FLANNEL_NETWORK=10.2.0.0/16\nFLANNEL_SUBNET=10.2.72.1/\(prefix)\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n"
            #expect(throws: SubnetEnvError.self) { try SubnetEnv(parsing: text) }
            do {
                _ = try SubnetEnv(parsing: text)
            } catch {
                #expect(error.reason.contains("longer than /30"))
            }
        }
        let ok = "FLANNEL_NETWORK=10.2.0.0/16\nFLANNEL_SUBNET=10.2.72.1/30\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n"
        #expect((try? SubnetEnv(parsing: ok))?.subnet == net("10.2.72.0/30"))
    }
}
