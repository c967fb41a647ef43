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

    /// The IPv6 modes (not run by default): each produces its TCP and ping
    /// figures between the containers' IPv6 addresses.
    @Test func everyIPv6ModeOfTheHarnessProducesItsFigures() throws {
        let results = FileManager.default.temporaryDirectory.appendingPathComponent("tunneld-harness6-\(getpid())")
        defer { try? FileManager.default.removeItem(at: results) }
        let harness = repositoryRoot.appendingPathComponent("Benchmarks/throughput/run").path
        let run = try run(
            [
                "bash", harness, "--smoke", "--strict", "--tunneld", tunneldBinary, "--results", results.path,
                "--modes",
                "host-gw-v6,kernel-vxlan-v6,tunneld-udp-v6,tunneld-vxlan-v6,tunneld-host-gw-v6,tunneld-wireguard-v6",
                "--tests", "tcp1,ping",
            ],
            timeout: .seconds(300),
            check: false
        )
        #expect(run.succeeded, "\(run.output)")
        let summary = (try? String(contentsOf: results.appendingPathComponent("summary.md"), encoding: .utf8)) ?? ""
        #expect(summary.contains("| TCP 1 stream |"), "\(summary)")
        // Measured over IPv6: the udp host's containers talk from their IPv6 subnet.
        let env =
            (try? String(
                contentsOf: results.appendingPathComponent("logs/r1-tunneld-udp-v6-host1.env"),
                encoding: .utf8
            )) ?? ""
        #expect(env.contains("FLANNEL_IPV6_SUBNET=fd00:10:2:"), "\(env)")
        #expect(run.output.contains("fd00:10:2:"), "\(run.output)")
    }
}
