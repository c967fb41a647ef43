/// A JSON value, as found in flannel's network config (`Backend`) and lease
/// values (`BackendData`).
///
/// Numbers are held as `Double`, as JavaScript and Go's `interface{}` do;
/// every integer a config or lease can hold (ports, VNIs, prefix lengths) is
/// exact in a `Double`.
public enum JSONValue: Sendable, Equatable, Codable, CustomStringConvertible {
    case null
    case bool(Bool)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    /// Parses JSON text strictly (RFC 8259: no trailing commas, no comments).
    /// Errors say what was wrong and where ("expected ',' or '}' at line 1, column 12").
    public init(parsing text: String) throws(JSONParseError) {
        var parser = JSONParser(Array(text.utf8))
        self = try parser.parseDocument()
    }

    /// Parses JSON text as Go's encoding/json reads it into a struct (how
    /// flannel decodes its network config and the Backend inside it): keys
    /// that differ only in case name the same field, so of several such keys
    /// in one object only the last in the document is kept, as Go assigns
    /// each in turn (`{"Network": …, "network": …}` means the second).
    public init(parsingAsGoStruct text: String) throws(JSONParseError) {
        var parser = JSONParser(Array(text.utf8), foldingKeys: true)
        self = try parser.parseDocument()
    }

    /// Parses JSON bytes strictly; see `init(parsing:)`.
    public init(parsing bytes: [UInt8]) throws(JSONParseError) {
        var parser = JSONParser(bytes)
        self = try parser.parseDocument()
    }

    /// Compact JSON text. Object keys come out sorted (as Go's encoder does for
    /// maps, which makes `{"VNI":1,"VtepMAC":"…"}` byte-identical to flannel's)
    /// and strings are escaped the way Go escapes them.
    public var compactText: String {
        var out = ""
        write(to: &out)
        return out
    }

    public var description: String { compactText }

    /// A short name of the value's kind, for error messages.
    public var kindName: String {
        switch self {
        case .null: "null"
        case .bool: "a boolean"
        case .number: "a number"
        case .string: "a string"
        case .array: "an array"
        case .object: "an object"
        }
    }

    package func write(to out: inout String) {
        switch self {
        case .null: out += "null"
        case .bool(let b): out += b ? "true" : "false"
        case .number(let n): out += JSONValue.format(n)
        case .string(let s): JSONValue.writeString(s, to: &out)
        case .array(let items):
            out += "["
            for (i, item) in items.enumerated() {
                if i > 0 { out += "," }
                item.write(to: &out)
            }
            out += "]"
        case .object(let fields):
            out += "{"
            for (i, key) in fields.keys.sorted().enumerated() {
                if i > 0 { out += "," }
                JSONValue.writeString(key, to: &out)
                out += ":"
                fields[key]!.write(to: &out)
            }
            out += "}"
        }
    }

    /// Integers print without a fraction ("1", not "1.0"), as Go prints them.
    static func format(_ n: Double) -> String {
        if n.isFinite, n == n.rounded(), abs(n) < 1e15 {
            return String(Int64(n))
        }
        return n.description
    }

    /// Escapes like Go's encoding/json: `"` `\` and control characters, plus
    /// `<`, `>`, `&`, U+2028 and U+2029 (Go's HTML-safe default).
    public static func writeString(_ s: String, to out: inout String) {
        out += "\""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case "\u{08}": out += "\\b"
            case "\u{0C}": out += "\\f"
            case "<", ">", "&", "\u{2028}", "\u{2029}":
                out += unicodeEscape(scalar.value)
            default:
                if scalar.value < 0x20 {
                    out += unicodeEscape(scalar.value)
                } else {
                    out.unicodeScalars.append(scalar)
                }
            }
        }
        out += "\""
    }

    private static func unicodeEscape(_ v: UInt32) -> String {
        let hex = String(v, radix: 16)
        return "\\u" + String(repeating: "0", count: max(0, 4 - hex.count)) + hex
    }

    /// Looks a field up the way Go's encoding/json matches struct fields:
    /// the exact name first, else a case-insensitive match. flannel reads its
    /// config and lease values that way, so `"network"` works as `"Network"`.
    /// (An object from `init(parsingAsGoStruct:)` holds at most one key per
    /// spelling, the one Go would use.)
    public func field(_ name: String) -> JSONValue? {
        guard case .object(let fields) = self else { return nil }
        if let exact = fields[name] { return exact }
        // Of several case variants, the smallest key, so that the choice is
        // deterministic; ASCII keys are compared without building strings.
        var folded: String?
        var best: String?
        for key in fields.keys where best.map({ key < $0 }) ?? true {
            let same: Bool
            if let ascii = Self.asciiCaseInsensitiveEqual(key, name) {
                same = ascii
            } else {
                if folded == nil { folded = Self.foldedKey(name) }
                same = Self.foldedKey(key) == folded
            }
            if same { best = key }
        }
        return best.flatMap { fields[$0] }
    }

    /// Whether two ASCII strings are equal ignoring case; nil when either
    /// holds a byte above 0x7F (then Go's Unicode folding decides).
    static func asciiCaseInsensitiveEqual(_ a: String, _ b: String) -> Bool? {
        var ai = a.utf8.makeIterator()
        var bi = b.utf8.makeIterator()
        var equal = true
        while true {
            switch (ai.next(), bi.next()) {
            case (nil, nil): return equal
            case (let x?, nil), (nil, let x?): return x < 0x80 ? false : nil
            case (let x?, let y?):
                guard x < 0x80, y < 0x80 else { return nil }
                func lower(_ c: UInt8) -> UInt8 { c >= 0x41 && c <= 0x5A ? c | 0x20 : c }
                if lower(x) != lower(y) { equal = false }
            }
        }
    }

    /// A key with case folded as Go's encoding/json folds it to match a
    /// struct field: each character upper-cased then lower-cased (simple
    /// mappings), so the Kelvin sign matches "k" and "ſ" matches "s".
    public static func foldedKey(_ key: String) -> String {
        var out = String.UnicodeScalarView()
        for scalar in key.unicodeScalars {
            if scalar.isASCII {
                let v = scalar.value
                out.append((0x41...0x5A).contains(v) ? Unicode.Scalar(v + 0x20)! : scalar)
                continue
            }
            let upper = Self.simpleMapping(scalar, scalar.properties.uppercaseMapping)
            out.append(Self.simpleMapping(upper, upper.properties.lowercaseMapping))
        }
        return String(out)
    }

    /// A full case mapping when it is one character, else the character
    /// itself (Go maps case one rune at a time).
    private static func simpleMapping(_ scalar: Unicode.Scalar, _ mapped: String) -> Unicode.Scalar {
        let scalars = mapped.unicodeScalars
        guard scalars.count == 1, let only = scalars.first else { return scalar }
        return only
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        if container.decodeNil() {
            self = .null
        } else if let b = try? container.decode(Bool.self) {
            self = .bool(b)
        } else if let n = try? container.decode(Double.self) {
            self = .number(n)
        } else if let s = try? container.decode(String.self) {
            self = .string(s)
        } else if let a = try? container.decode([JSONValue].self) {
            self = .array(a)
        } else if let o = try? container.decode([String: JSONValue].self) {
            self = .object(o)
        } else {
            throw DecodingError.dataCorruptedError(
                in: container,
                debugDescription: "not a JSON value"
            )
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        switch self {
        case .null: try container.encodeNil()
        case .bool(let b): try container.encode(b)
        case .number(let n): try container.encode(n)
        case .string(let s): try container.encode(s)
        case .array(let a): try container.encode(a)
        case .object(let o): try container.encode(o)
        }
    }
}

/// Why a text is not JSON, and where.
public struct JSONParseError: Error, Sendable, Equatable, CustomStringConvertible {
    public var reason: String
    public var line: Int
    public var column: Int

    public var description: String { "\(reason) at line \(line), column \(column)" }
}

/// A strict recursive-descent JSON parser over UTF-8 bytes. Nesting is
/// bounded so that a hostile value cannot exhaust the stack.
struct JSONParser {
    static let maxDepth = 128

    private let bytes: [UInt8]
    private var index = 0
    private var depth = 0
    /// Keys that differ only in case are one key; the last one stays.
    private let foldingKeys: Bool

    init(_ bytes: [UInt8], foldingKeys: Bool = false) {
        self.bytes = bytes
        self.foldingKeys = foldingKeys
    }

    mutating func parseDocument() throws(JSONParseError) -> JSONValue {
        // A UTF-8 byte order mark is tolerated; Go rejects it, but it is
        // what a Windows editor leaves in front of a hand-written config.
        if bytes.starts(with: [0xEF, 0xBB, 0xBF]) { index = 3 }
        skipWhitespace()
        if index == bytes.count { throw error("empty input: expected a JSON value") }
        let value = try parseValue()
        skipWhitespace()
        if index < bytes.count {
            throw error("unexpected \(describeCurrent()) after the end of the JSON value")
        }
        return value
    }

    private mutating func parseValue() throws(JSONParseError) -> JSONValue {
        guard index < bytes.count else { throw error("unexpected end of input: expected a value") }
        switch bytes[index] {
        case UInt8(ascii: "{"): return try parseObject()
        case UInt8(ascii: "["): return try parseArray()
        case UInt8(ascii: "\""): return .string(try parseString())
        case UInt8(ascii: "t"): try expectLiteral("true"); return .bool(true)
        case UInt8(ascii: "f"): try expectLiteral("false"); return .bool(false)
        case UInt8(ascii: "n"): try expectLiteral("null"); return .null
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return .number(try parseNumber())
        default: throw error("unexpected \(describeCurrent()): expected a value")
        }
    }

    private mutating func parseObject() throws(JSONParseError) -> JSONValue {
        try enter()
        index += 1  // {
        var fields: [String: JSONValue] = [:]
        // Go struct decoding: folded key → the spelling seen last.
        var spellings: [String: String] = [:]
        skipWhitespace()
        if peek() == UInt8(ascii: "}") {
            index += 1
            depth -= 1
            return .object(fields)
        }
        while true {
            skipWhitespace()
            guard peek() == UInt8(ascii: "\"") else {
                if peek() == UInt8(ascii: "}") { throw error("trailing comma before '}'") }
                throw error("unexpected \(describeCurrent()): expected a field name in double quotes")
            }
            let key = try parseString()
            skipWhitespace()
            guard peek() == UInt8(ascii: ":") else {
                throw error("unexpected \(describeCurrent()): expected ':' after field name \"\(key)\"")
            }
            index += 1
            skipWhitespace()
            // A repeated key: the last one wins, as in Go.
            let value = try parseValue()
            if foldingKeys {
                let folded = JSONValue.foldedKey(key)
                if let earlier = spellings[folded], earlier != key { fields[earlier] = nil }
                spellings[folded] = key
            }
            fields[key] = value
            skipWhitespace()
            switch peek() {
            case UInt8(ascii: ","): index += 1
            case UInt8(ascii: "}"):
                index += 1
                depth -= 1
                return .object(fields)
            default: throw error("unexpected \(describeCurrent()): expected ',' or '}'")
            }
        }
    }

    private mutating func parseArray() throws(JSONParseError) -> JSONValue {
        try enter()
        index += 1  // [
        var items: [JSONValue] = []
        skipWhitespace()
        if peek() == UInt8(ascii: "]") {
            index += 1
            depth -= 1
            return .array(items)
        }
        while true {
            skipWhitespace()
            if peek() == UInt8(ascii: "]") { throw error("trailing comma before ']'") }
            items.append(try parseValue())
            skipWhitespace()
            switch peek() {
            case UInt8(ascii: ","): index += 1
            case UInt8(ascii: "]"):
                index += 1
                depth -= 1
                return .array(items)
            default: throw error("unexpected \(describeCurrent()): expected ',' or ']'")
            }
        }
    }

    private mutating func parseString() throws(JSONParseError) -> String {
        index += 1  // opening quote
        // Most strings hold no escape: one scan and one copy.
        var end = index
        while end < bytes.count {
            let b = bytes[end]
            if b == UInt8(ascii: "\"") {
                let text = String(decoding: bytes[index..<end], as: UTF8.self)
                index = end + 1
                return text
            }
            if b == UInt8(ascii: "\\") || b < 0x20 { break }
            end += 1
        }
        var scalars = String.UnicodeScalarView()
        var run: [UInt8] = []
        while true {
            guard index < bytes.count else { throw error("unterminated string") }
            let b = bytes[index]
            if b == UInt8(ascii: "\"") {
                index += 1
                scalars.append(contentsOf: String(decoding: run, as: UTF8.self).unicodeScalars)
                return String(scalars)
            }
            if b < 0x20 {
                throw error("control character 0x\(String(b, radix: 16)) inside a string (escape it)")
            }
            if b != UInt8(ascii: "\\") {
                run.append(b)
                index += 1
                continue
            }
            scalars.append(contentsOf: String(decoding: run, as: UTF8.self).unicodeScalars)
            run.removeAll(keepingCapacity: true)
            index += 1
            guard index < bytes.count else { throw error("unterminated escape in string") }
            let e = bytes[index]
            index += 1
            switch e {
            case UInt8(ascii: "\""): scalars.append("\"")
            case UInt8(ascii: "\\"): scalars.append("\\")
            case UInt8(ascii: "/"): scalars.append("/")
            case UInt8(ascii: "b"): scalars.append("\u{08}")
            case UInt8(ascii: "f"): scalars.append("\u{0C}")
            case UInt8(ascii: "n"): scalars.append("\n")
            case UInt8(ascii: "r"): scalars.append("\r")
            case UInt8(ascii: "t"): scalars.append("\t")
            case UInt8(ascii: "u"):
                var code = try parseHex4()
                if (0xD800...0xDBFF).contains(code) {
                    // A surrogate pair encodes one scalar above U+FFFF.
                    if index + 1 < bytes.count, bytes[index] == UInt8(ascii: "\\"),
                        bytes[index + 1] == UInt8(ascii: "u")
                    {
                        let save = index
                        index += 2
                        let low = try parseHex4()
                        if (0xDC00...0xDFFF).contains(low) {
                            code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                        } else {
                            index = save
                            code = 0xFFFD
                        }
                    } else {
                        code = 0xFFFD
                    }
                } else if (0xDC00...0xDFFF).contains(code) {
                    code = 0xFFFD
                }
                scalars.append(Unicode.Scalar(code) ?? "\u{FFFD}")
            default:
                index -= 1
                throw error("invalid escape '\\\(Character(Unicode.Scalar(e)))' in string")
            }
        }
    }

    private mutating func parseHex4() throws(JSONParseError) -> UInt32 {
        guard index + 4 <= bytes.count else { throw error("incomplete \\u escape in string") }
        var v: UInt32 = 0
        for _ in 0..<4 {
            let b = bytes[index]
            let digit: UInt32
            switch b {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = UInt32(b - UInt8(ascii: "0"))
            case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = UInt32(b - UInt8(ascii: "a") + 10)
            case UInt8(ascii: "A")...UInt8(ascii: "F"): digit = UInt32(b - UInt8(ascii: "A") + 10)
            default: throw error("invalid hex digit \(describeCurrent()) in \\u escape")
            }
            v = v << 4 | digit
            index += 1
        }
        return v
    }

    private mutating func parseNumber() throws(JSONParseError) -> Double {
        let start = index
        if peek() == UInt8(ascii: "-") { index += 1 }
        guard let first = peek(), isDigit(first) else {
            throw error("invalid number: expected a digit after '-'")
        }
        if first == UInt8(ascii: "0") {
            index += 1
            if let next = peek(), isDigit(next) {
                throw error("invalid number: leading zeros are not allowed")
            }
        } else {
            while let d = peek(), isDigit(d) { index += 1 }
        }
        if peek() == UInt8(ascii: ".") {
            index += 1
            guard let d = peek(), isDigit(d) else {
                throw error("invalid number: expected a digit after '.'")
            }
            while let d = peek(), isDigit(d) { index += 1 }
        }
        if peek() == UInt8(ascii: "e") || peek() == UInt8(ascii: "E") {
            index += 1
            if peek() == UInt8(ascii: "+") || peek() == UInt8(ascii: "-") { index += 1 }
            guard let d = peek(), isDigit(d) else {
                throw error("invalid number: expected a digit in the exponent")
            }
            while let d = peek(), isDigit(d) { index += 1 }
        }
        let text = String(decoding: bytes[start..<index], as: UTF8.self)
        guard let value = Double(text), value.isFinite else {
            index = start
            throw error("number \(text) is out of range")
        }
        return value
    }

    private mutating func expectLiteral(_ literal: StaticString) throws(JSONParseError) {
        let expected = literal.withUTF8Buffer { Array($0) }
        guard index + expected.count <= bytes.count,
            Array(bytes[index..<index + expected.count]) == expected
        else {
            throw error("unexpected \(describeCurrent()): expected a value (did you mean \(literal)?)")
        }
        index += expected.count
    }

    private mutating func enter() throws(JSONParseError) {
        depth += 1
        if depth > JSONParser.maxDepth {
            throw error("nesting deeper than \(JSONParser.maxDepth) levels")
        }
    }

    private mutating func skipWhitespace() {
        while index < bytes.count {
            switch bytes[index] {
            case 0x20, 0x09, 0x0A, 0x0D: index += 1
            default: return
            }
        }
    }

    private func peek() -> UInt8? { index < bytes.count ? bytes[index] : nil }

    private func isDigit(_ b: UInt8) -> Bool { b >= UInt8(ascii: "0") && b <= UInt8(ascii: "9") }

    private func describeCurrent() -> String {
        guard index < bytes.count else { return "end of input" }
        let b = bytes[index]
        if b >= 0x21 && b < 0x7F { return "'\(Character(Unicode.Scalar(b)))'" }
        return "byte 0x\(String(b, radix: 16))"
    }

    private func error(_ reason: String) -> JSONParseError {
        var line = 1
        var column = 1
        for b in bytes[..<min(index, bytes.count)] {
            if b == 0x0A {
                line += 1
                column = 1
            } else if b & 0xC0 != 0x80 {
                // Count characters, not UTF-8 continuation bytes.
                column += 1
            }
        }
        return JSONParseError(reason: reason, line: line, column: column)
    }
}
