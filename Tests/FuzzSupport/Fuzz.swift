import Testing

#if canImport(Glibc)
import Glibc
#endif

// Bounded, reproducible random-input runs for `swift test`.
//
// Every fuzz test runs a number of cases; case i is generated from its own seed,
// `base + i·φ` (φ = 0x9E3779B97F4A7C15), so case 0 of a run whose base seed is S is S
// itself. A failure names the case's seed and the command that replays exactly that case.
//
// The budget (per fuzz test) is a number of cases from a seed, never a time: a slow
// machine runs the same cases as a fast one, only slower, so what a run covered does not
// depend on the machine, and a test can fail when its cases did not reach a path.
//   TUNNELD_FUZZ_ITERATIONS=N   cases to run (default: the test's own, small for CI)
//   TUNNELD_FUZZ_SEED=0x…       base seed instead of the test's fixed one; "random" picks one
//                               from the clock and prints it

/// SplitMix64: small, fast, seeded.
public struct FuzzRandom: RandomNumberGenerator, Sendable {
    public var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9e37_79b9_7f4a_7c15
        var z = state
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }
}

/// What the environment asks of every fuzz test.
public enum FuzzBudget {
    static func environment(_ name: String) -> String? {
        guard let raw = getenv(name) else { return nil }
        let value = String(cString: raw).trimmingCharacters(in: " \t")
        return value.isEmpty ? nil : value
    }

    /// Cases to run: TUNNELD_FUZZ_ITERATIONS, else `ci`.
    public static func iterations(default ci: Int) -> Int {
        guard let text = environment("TUNNELD_FUZZ_ITERATIONS") else { return ci }
        guard let n = Int(text), n >= 1 else {
            fatalError("TUNNELD_FUZZ_ITERATIONS=\(text) is not a whole number ≥ 1")
        }
        return n
    }

    /// TUNNELD_FUZZ_SECONDS was a time limit, which made coverage assertions vacuous on a
    /// slow run; a run that still sets it is told what to use instead.
    static func refuseTimeBudget() {
        if let text = environment("TUNNELD_FUZZ_SECONDS") {
            fatalError(
                "TUNNELD_FUZZ_SECONDS=\(text): fuzz runs are bounded by cases, not time; "
                    + "set TUNNELD_FUZZ_ITERATIONS instead and unset TUNNELD_FUZZ_SECONDS"
            )
        }
    }

    /// The base seed: TUNNELD_FUZZ_SEED (decimal, 0x-hex or "random"), else `fixed`.
    public static func seed(default fixed: UInt64) -> UInt64 {
        guard let text = environment("TUNNELD_FUZZ_SEED") else { return fixed }
        if text == "random" {
            var ts = timespec()
            clock_gettime(CLOCK_REALTIME, &ts)
            return UInt64(truncatingIfNeeded: ts.tv_nsec) &* 0x2545_f491_4f6c_dd1d
                ^ UInt64(truncatingIfNeeded: ts.tv_sec)
        }
        let parsed = text.lowercased().hasPrefix("0x") ? UInt64(text.dropFirst(2), radix: 16) : UInt64(text)
        guard let seed = parsed else {
            fatalError("TUNNELD_FUZZ_SEED=\(text) is not a number (decimal or 0x…) or \"random\"")
        }
        return seed
    }

    static func caseSeed(base: UInt64, iteration: Int) -> UInt64 {
        base &+ UInt64(iteration) &* 0x9e37_79b9_7f4a_7c15
    }

    static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}

extension String {
    fileprivate func trimmingCharacters(in set: String) -> String {
        var s = Substring(self)
        while let c = s.first, set.contains(c) { s.removeFirst() }
        while let c = s.last, set.contains(c) { s.removeLast() }
        return String(s)
    }
}

/// One generated case: its random source and the checks made on it.
public final class FuzzCase {
    public var rng: FuzzRandom
    public let seed: UInt64
    public let iteration: Int
    let target: String
    public private(set) var failed = false
    /// Extra context for a failure message (the input, shortened).
    public var note = ""

    init(target: String, seed: UInt64, iteration: Int) {
        self.target = target
        self.seed = seed
        self.iteration = iteration
        // Hashed: case seeds are base + i·φ, and SplitMix64 advances its state by φ per
        // draw, so unhashed, case i + 1 would replay case i shifted by one number.
        var z = seed ^ 0x5851_f42d_4c95_7f2d
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        rng = FuzzRandom(seed: z ^ (z >> 31))
    }

    /// Records a failure naming this case's seed and how to replay it, unless `condition`.
    public func expect(
        _ condition: Bool,
        _ message: @autoclosure () -> String = "property violated",
        sourceLocation: SourceLocation = #_sourceLocation
    ) {
        guard !condition else { return }
        fail(message(), sourceLocation: sourceLocation)
    }

    public func fail(_ message: String, sourceLocation: SourceLocation = #_sourceLocation) {
        failed = true
        let seedText = "0x" + String(seed, radix: 16)
        var text = "\(target): \(message)"
        if !note.isEmpty { text += " [\(note)]" }
        text +=
            " — case \(iteration), seed \(seedText); replay with "
            + "TUNNELD_FUZZ_SEED=\(seedText) TUNNELD_FUZZ_ITERATIONS=1 swift test --filter \(target)"
        Issue.record(Comment(rawValue: text), sourceLocation: sourceLocation)
    }

    // MARK: Random values

    public func int(_ range: ClosedRange<Int>) -> Int { Int.random(in: range, using: &rng) }
    public func int(_ range: Range<Int>) -> Int { Int.random(in: range, using: &rng) }
    public func bool() -> Bool { Bool.random(using: &rng) }
    /// True once in `n` times on average.
    public func oneIn(_ n: Int) -> Bool { Int.random(in: 0..<n, using: &rng) == 0 }
    public func byte() -> UInt8 { UInt8.random(in: 0...255, using: &rng) }
    public func u16() -> UInt16 { UInt16.random(in: 0...UInt16.max, using: &rng) }
    public func u32() -> UInt32 { UInt32.random(in: 0...UInt32.max, using: &rng) }
    public func u64() -> UInt64 { rng.next() }
    public func bytes(_ count: Int) -> [UInt8] { (0..<count).map { _ in byte() } }
    public func pick<T>(_ items: [T]) -> T { items[int(0..<items.count)] }

    /// Byte-level mutations of the kind libFuzzer makes: flips, interesting values,
    /// insertions, deletions, duplicated and swapped chunks, tokens from `dictionary`,
    /// truncation. `focus` (if given) is where most single-byte changes land (headers).
    public func mutate(_ bytes: inout [UInt8], dictionary: [[UInt8]] = [], focus: Int? = nil) {
        for _ in 0..<int(1...4) {
            let limit = focus.map { min($0, bytes.count) } ?? bytes.count
            let at = { (n: Int) in n > 0 ? self.int(0..<n) : 0 }
            switch int(0..<10) {
            case 0 where !bytes.isEmpty: bytes[at(limit)] ^= 1 << UInt8(int(0..<8))
            case 1 where !bytes.isEmpty: bytes[at(limit)] = pick([0, 1, 0x7f, 0x80, 0xff, 0x20, 0x30, 0x45])
            case 2 where !bytes.isEmpty: bytes[at(limit)] = byte()
            case 3: bytes.insert(contentsOf: self.bytes(int(1...8)), at: at(bytes.count + 1))
            case 4 where !bytes.isEmpty:
                let start = at(bytes.count)
                bytes.removeSubrange(start..<min(bytes.count, start + int(1...16)))
            case 5 where !bytes.isEmpty:
                let start = at(bytes.count)
                let chunk = bytes[start..<min(bytes.count, start + int(1...32))]
                bytes.insert(contentsOf: chunk, at: at(bytes.count + 1))
            case 6 where !dictionary.isEmpty:
                let token = pick(dictionary)
                if bool() || bytes.count < token.count {
                    bytes.insert(contentsOf: token, at: at(bytes.count + 1))
                } else {
                    let start = at(bytes.count - token.count + 1)
                    bytes.replaceSubrange(start..<start + token.count, with: token)
                }
            case 7 where !bytes.isEmpty: bytes.removeLast(at(bytes.count + 1))
            case 8 where bytes.count >= 2:
                // A 16- or 32-bit field set to an edge value (both byte orders).
                let width = bool() ? 2 : min(4, bytes.count)
                let start = at(min(limit, bytes.count - width + 1))
                let value: [UInt8] = pick([
                    [0, 0, 0, 0], [0xff, 0xff, 0xff, 0xff], [0x7f, 0xff, 0xff, 0xff],
                    [0x80, 0, 0, 0], [0, 0, 0, 0x80], [0xff, 0xff, 0xff, 0x7f],
                ])
                bytes.replaceSubrange(start..<start + width, with: value.prefix(width))
            case 9 where bytes.count >= 2:
                let i = at(bytes.count), j = at(bytes.count)
                bytes.swapAt(i, j)
            default:
                bytes.append(byte())
            }
        }
    }
}

/// How a fuzz run went.
public struct FuzzReport: Sendable {
    public var cases = 0
    public var failures = 0
    public var seconds = 0.0
    /// The cases the test asks for (its `iterations`), whatever the environment set.
    public var requested = 0
    /// The run stopped after three failing cases (already recorded as failures).
    public var stoppedOnFailures = false
    /// Counters the test keeps (cases accepted, rejected, …), for the summary line and for
    /// asserting that the run reached the interesting paths.
    public var counts: [String: Int] = [:]
    public subscript(_ name: String) -> Int { counts[name, default: 0] }
}

/// Runs `body` on `iterations` cases (TUNNELD_FUZZ_ITERATIONS overrides) from base seed
/// `seed` (TUNNELD_FUZZ_SEED overrides); stops early only after three failing cases.
/// `count` in the body tallies named outcomes. Prints one summary line.
@discardableResult
public func fuzz(
    _ target: String,
    seed: UInt64,
    iterations: Int,
    sourceLocation: SourceLocation = #_sourceLocation,
    _ body: (FuzzCase, _ count: (String) -> Void) throws -> Void
) -> FuzzReport {
    let base = FuzzBudget.seed(default: seed)
    let limit = FuzzBudget.iterations(default: iterations)
    FuzzBudget.refuseTimeBudget()
    let start = FuzzBudget.now()
    var report = FuzzReport()
    report.requested = iterations
    var counts: [String: Int] = [:]
    for i in 0..<limit {
        let c = FuzzCase(target: target, seed: FuzzBudget.caseSeed(base: base, iteration: i), iteration: i)
        let seedText = "0x" + String(c.seed, radix: 16)
        CrashNote.set(
            "fuzz \(target): case \(i) (seed \(seedText)) crashed; replay with "
                + "TUNNELD_FUZZ_SEED=\(seedText) TUNNELD_FUZZ_ITERATIONS=1 swift test --filter \(target)"
        )
        defer { CrashNote.clear() }
        do {
            try body(c) { counts[$0, default: 0] += 1 }
        } catch {
            c.fail("threw \(error)", sourceLocation: sourceLocation)
        }
        report.cases += 1
        if c.failed {
            report.failures += 1
            if report.failures >= 3 {
                report.stoppedOnFailures = true
                break
            }
        }
    }
    report.seconds = FuzzBudget.now() - start
    report.counts = counts
    let tallies = counts.keys.sorted().map { "\($0) \(counts[$0]!)" }.joined(separator: ", ")
    print(
        "fuzz \(target): \(report.cases) cases from seed 0x\(String(base, radix: 16)) in "
            + "\(Int(report.seconds * 1000)) ms" + (tallies.isEmpty ? "" : "; \(tallies)")
            + (report.failures > 0 ? "; \(report.failures) FAILED" : "")
    )
    return report
}

extension FuzzReport {
    /// How many `name` outcomes a run of this many cases must reach: `n` for the test's own
    /// case count or more; in proportion (rounded down) when TUNNELD_FUZZ_ITERATIONS asked for
    /// fewer, e.g. none for a one-case replay.
    public func required(_ name: String, atLeast n: Int) -> Int {
        cases >= requested ? n : n * cases / max(requested, 1)
    }

    /// Whether the run reached the path `name` at least `n` times (see `required`). A run cut
    /// short by three failing cases has already failed and is not judged again.
    public func reached(_ name: String, atLeast n: Int) -> Bool {
        stoppedOnFailures || self[name] >= required(name, atLeast: n)
    }

    /// Records an issue unless the run reached `name` at least `n` times: a generator that
    /// stops producing valid input fails its test instead of passing without checking.
    public func expectReached(_ name: String, atLeast n: Int, sourceLocation: SourceLocation = #_sourceLocation) {
        guard !reached(name, atLeast: n) else { return }
        Issue.record(
            Comment(
                rawValue: "the run reached \"\(name)\" \(self[name]) times in \(cases) cases, "
                    + "fewer than the \(required(name, atLeast: n)) it must: the generator no longer "
                    + "produces the inputs this test is about"
            ),
            sourceLocation: sourceLocation
        )
    }
}

/// The seed corpus under Fuzz/corpus/<name>/ (shared with the libFuzzer targets).
public enum FuzzCorpus {
    public static func load(_ name: String, filePath: String = #filePath) -> [[UInt8]] {
        // Tests/FuzzSupport/Fuzz.swift → the repository root.
        var root = filePath
        for _ in 0..<3 { root = String(root[..<(root.lastIndex(of: "/") ?? root.startIndex)]) }
        let directory = root + "/Fuzz/corpus/" + name
        guard let dir = opendir(directory) else { return [] }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let entryName = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
            }
            if !entryName.hasPrefix(".") { names.append(entryName) }
        }
        return names.sorted().compactMap { readFile(directory + "/" + $0) }
    }

    static func readFile(_ path: String) -> [UInt8]? {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var out: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            out += buffer[0..<n]
        }
        return out
    }
}

extension FuzzRandom {
    public mutating func bytes(_ count: Int) -> [UInt8] {
        (0..<count).map { _ in UInt8.random(in: 0...255, using: &self) }
    }
}
