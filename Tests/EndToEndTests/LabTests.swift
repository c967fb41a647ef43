import Foundation
import NetTestSupport
import Testing

/// The lab's own helpers: a command that outlives its timeout has failed,
/// even when it exits 0 once stopped (as a daemon does on SIGTERM).
@Suite struct LabRunTests {
    /// Sleeps 30 s, and exits 0 on SIGTERM.
    static let exitsZeroWhenStopped = [
        "python3", "-c",
        "import signal,sys,time\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\nprint('started', flush=True)\ntime.sleep(30)",
    ]

    @Test func aCommandStoppedAtItsTimeoutHasFailedThoughItExitedZero() throws {
        let start = ContinuousClock.now
        let result = try run(Self.exitsZeroWhenStopped, timeout: .seconds(1), check: false)
        #expect(ContinuousClock.now - start < .seconds(10))
        #expect(result.status == 0, "the command's own exit status is kept: \(result.status)")
        #expect(result.timedOut == .seconds(1))
        #expect(!result.succeeded)
        #expect(result.output.contains("started"), "the output so far is returned: \(result.output)")
    }

    @Test func aCheckedCommandStoppedAtItsTimeoutThrowsNamingItAndTheTimeout() throws {
        do {
            try run(Self.exitsZeroWhenStopped, timeout: .seconds(1))
            Issue.record("a command stopped at its timeout was taken as a success")
        } catch let error as CommandTimedOut {
            #expect(error.timeout == .seconds(1))
            #expect(error.description.contains("`python3 -c import signal"), "\(error)")
            #expect(error.description.contains("still running after its timeout of 1.0 seconds"), "\(error)")
            #expect(error.description.contains("started"), "\(error)")
        }
    }

    @Test func aCommandThatEndsInTimeIsJudgedByItsExitStatus() throws {
        let ok = try run(["sh", "-c", "echo fine"], timeout: .seconds(20))
        #expect(ok.succeeded && ok.timedOut == nil && ok.output == "fine\n")
        let failed = try run(["sh", "-c", "exit 3"], timeout: .seconds(20), check: false)
        #expect(!failed.succeeded && failed.status == 3 && failed.timedOut == nil)
        #expect(throws: CommandFailed.self) { try run(["sh", "-c", "exit 3"], timeout: .seconds(20)) }
    }
}
