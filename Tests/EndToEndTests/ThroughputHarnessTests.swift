import Foundation
import Testing

/// The throughput harness's udp tier modes still work end to end (a smoke
/// run: one round, short tests; nothing about speed is asserted — that is
/// the harness's job, by hand, on a quiet machine): each mode produces every
/// figure (`--strict`), and each daemon ran the tier its mode names.
@Suite(.serialized, .enabled(if: canRunNamespaceTests, namespaceSkipReason))
struct ThroughputHarnessTests {
    @Test func theTierModesOfTheHarnessProduceEveryFigureOnTheirTier() throws {
        let results = FileManager.default.temporaryDirectory.appendingPathComponent("tunneld-harness-\(getpid())")
        defer { try? FileManager.default.removeItem(at: results) }
        let harness = repositoryRoot.appendingPathComponent("Benchmarks/throughput/run").path
        let run = try run(["bash", harness, "--smoke", "--strict", "--tunneld", tunneldBinary,
                           "--modes", "tunneld-udp-syscall,tunneld-udp-uring-single", "--tests", "tcp1,udp64,ping",
                           "--results", results.path], timeout: .seconds(240), check: false)
        #expect(run.succeeded, "\(run.output)")
        func hostLog(_ mode: String) -> String {
            (try? String(contentsOf: results.appendingPathComponent("logs/r1-\(mode)-host1.log"), encoding: .utf8)) ?? ""
        }
        let syscall = hostLog("tunneld-udp-syscall")
        #expect(syscall.contains(TierLaunch.syscallRefused.logLine), "\(syscall)")
        #expect(syscall.contains("io_uring unusable (io_uring_queue_init failed: Operation not permitted"),
                "the syscall mode runs under the seccomp filter: \(syscall)")
        let single = hostLog("tunneld-udp-uring-single")
        #expect(single.contains(TierLaunch.uringSingleRead.logLine), "\(single)")
    }
}
