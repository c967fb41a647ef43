import Foundation
import NetBase

@testable import LeaseStore

/// A temporary directory removed when the test body returns or throws.
func withTemporaryDirectory<T>(_ body: (String) async throws -> T) async throws -> T {
    var template = Array((NSTemporaryDirectory() + "/leasestore-test-XXXXXX").utf8CString)
    guard let raw = mkdtemp(&template) else {
        throw SystemError("mkdtemp", on: NSTemporaryDirectory(), errno: .current)
    }
    let path = String(cString: raw)
    defer { try? FileManager.default.removeItem(atPath: path) }
    return try await body(path)
}

/// A small deterministic generator (SplitMix64) so random tests can be replayed.
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

func net(_ text: String) -> IPv4Network {
    guard let n = IPv4Network(text, strict: true) else { fatalError("bad network literal \(text)") }
    return n
}

func ip(_ text: String) -> IPv4Address {
    guard let a = IPv4Address(text) else { fatalError("bad address literal \(text)") }
    return a
}

func config(_ json: String) throws -> NetworkConfig { try NetworkConfig(json: json) }

func readText(_ path: String) -> String? {
    FileManager.default.contents(atPath: path).map { String(decoding: $0, as: UTF8.self) }
}

func writeText(_ path: String, _ text: String) throws {
    try Data(text.utf8).write(to: URL(fileURLWithPath: path))
}
