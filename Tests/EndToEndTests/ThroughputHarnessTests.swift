import Foundation
import Testing

/// The throughput harness still works end to end, in CI: a smoke run (one
/// round, short tests) of every mode and every test. Nothing about speed is
/// asserted — that is the harness's job, by hand, on a quiet machine — only
/// that each mode produced every figure (`--smoke --strict`: a skipped mode
/// or a missing figure fails the run) and that the daemons of the tier modes
/// ran the tier their mode names.
@Suite(.serialized, .enabled(if: canRunNamespaceTests, namespaceSkipReason))
struct ThroughputHarnessTests {
    @Test func everyModeOfTheHarnessProducesEveryFigureAndTheTierModesRunTheirTier() throws {
        let results = FileManager.default.temporaryDirectory.appendingPathComponent("tunneld-harness-\(getpid())")
        defer { try? FileManager.default.removeItem(at: results) }
        let harness = repositoryRoot.appendingPathComponent("Benchmarks/throughput/run").path
        // No --modes or --tests: the harness's defaults are all of them.
        let run = try run(
            [
                "bash", harness, "--smoke", "--strict", "--tunneld", tunneldBinary,
                "--results", results.path,
            ],
            timeout: .seconds(600),
            check: false
        )
        #expect(run.succeeded, "\(run.output)")
        func hostLog(_ mode: String) -> String {
            (try? String(contentsOf: results.appendingPathComponent("logs/r1-\(mode)-host1.log"), encoding: .utf8))
                ?? ""
        }
        let syscall = hostLog("tunneld-udp-syscall")
        #expect(syscall.contains(TierLaunch.syscallRefused.logLine), "\(syscall)")
        #expect(
            syscall.contains("io_uring unusable (io_uring_queue_init failed: Operation not permitted"),
            "the syscall mode runs under the seccomp filter: \(syscall)"
        )
        let single = hostLog("tunneld-udp-uring-single")
        #expect(single.contains(TierLaunch.uringSingleRead.logLine), "\(single)")
    }
}
