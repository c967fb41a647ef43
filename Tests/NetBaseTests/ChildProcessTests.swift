import NetBase
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite struct ChildProcessTests {
    @Test func runCollectsBothOutputsAndTheExitStatus() throws {
        let output = try ChildProcess.run(
            "sh",
            arguments: ["-c", "cat; echo err >&2; exit 3"],
            input: Array("in".utf8)
        )
        #expect(output.status == 3)
        #expect(String(decoding: output.stdout, as: UTF8.self) == "in")
        #expect(String(decoding: output.stderr, as: UTF8.self) == "err\n")
    }

    @Test func runWithATimeoutEndsAChildThatDoesNotEnd() throws {
        let start = ContinuousClock.now
        let output = try ChildProcess.run(
            "sh",
            arguments: ["-c", "echo started; exec sleep 30"],
            timeout: .milliseconds(300)
        )
        #expect(output.status == 128 + SIGTERM)
        #expect(output.timedOut)
        #expect(String(decoding: output.stdout, as: UTF8.self) == "started\n")
        #expect(ContinuousClock.now - start < .seconds(5))
    }

    /// A child that exits 0 on SIGTERM still ran past its timeout: the
    /// status alone would read as success.
    @Test func aChildEndedAtItsTimeoutIsMarkedSoThoughItExitsZero() throws {
        let output = try ChildProcess.run(
            "python3",
            arguments: [
                "-c",
                "import signal,sys,time\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\nprint('started', flush=True)\ntime.sleep(30)",
            ],
            timeout: .seconds(1)
        )
        #expect(output.status == 0 && output.timedOut)
        #expect(String(decoding: output.stdout, as: UTF8.self) == "started\n")
        let quick = try ChildProcess.run("sh", arguments: ["-c", "exit 0"], timeout: .seconds(20))
        #expect(quick.status == 0 && !quick.timedOut)
    }

    @Test func aProgramThatCannotBeRunIsAnErrorNamingIt() {
        #expect(throws: SystemError.self) { try ChildProcess.start("/nonexistent/program") }
        #expect(throws: SystemError.self) { try ChildProcess.start("no-such-program-anywhere") }
        // The same through the forking path, which reports the exec's errno back.
        #expect(throws: SystemError.self) { try ChildProcess.start("/nonexistent/program", parentDeathSignal: SIGKILL) }
    }

    @Test func outputToAFileWithStandardErrorBesideIt() throws {
        let path = "/tmp/tunneld-child-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { unlink(path) }
        for signal in [nil, SIGKILL] as [Int32?] {
            let child = try ChildProcess.start(
                "sh",
                arguments: ["-c", "echo out; echo err >&2"],
                standardOutput: .file(path),
                standardError: .standardOutput,
                parentDeathSignal: signal
            )
            #expect(child.wait(timeout: .seconds(10)) == 0)
        }
        let text = try #require(readText(path))
        #expect(text == "out\nerr\nout\nerr\n")
    }

    @Test func terminateSendsTermThenKillsAfterTheGrace() throws {
        let polite = try ChildProcess.start("sleep", arguments: ["30"])
        #expect(polite.wait(timeout: .milliseconds(100)) == nil)
        #expect(polite.terminate() == 128 + SIGTERM)
        #expect(polite.status == 128 + SIGTERM)
        let stubborn = try ChildProcess.start(
            "sh",
            arguments: ["-c", "trap '' TERM; echo ready; while :; do sleep 1; done"],
            standardOutput: .null
        )
        usleep(200_000)
        #expect(stubborn.terminate(grace: .milliseconds(300)) == 128 + SIGKILL)
    }

    /// The child gets the parent-death signal (PR_GET_PDEATHSIG in the program it runs), and
    /// only a child that asked for it.
    @Test func theParentDeathSignalReachesTheProgram() throws {
        let script = "import ctypes; v = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(v)); print(v.value)"
        let asked = try ChildProcess.run("python3", arguments: ["-c", script], parentDeathSignal: SIGKILL)
        #expect(
            String(decoding: asked.stdout, as: UTF8.self) == "\(SIGKILL)\n",
            "\(String(decoding: asked.stderr, as: UTF8.self))"
        )
        let plain = try ChildProcess.run("python3", arguments: ["-c", script])
        #expect(String(decoding: plain.stdout, as: UTF8.self) == "0\n")
    }

    /// The kernel sends the parent-death signal when the *thread* that forked ends; a child
    /// started from a thread that then ends must live on.
    @Test func aChildOutlivesTheThreadThatStartedIt() throws {
        final class Box: @unchecked Sendable { var child: ChildProcess?; var error: (any Error)? }
        let box = Box()
        var thread = pthread_t()
        let rc = pthread_create(
            &thread,
            nil,
            { raw in
                let box = Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue()
                do { box.child = try ChildProcess.start("sleep", arguments: ["30"], parentDeathSignal: SIGKILL) } catch
                { box.error = error }
                return nil
            },
            Unmanaged.passRetained(box).toOpaque()
        )
        try #require(rc == 0)
        pthread_join(thread, nil)
        let child = try #require(box.child, "\(String(describing: box.error))")
        #expect(child.wait(timeout: .milliseconds(500)) == nil, "the child died with the thread that started it")
        child.terminate()
    }

    /// Nothing but the three standard streams is inherited on the forking path.
    @Test func theChildInheritsNoOtherDescriptor() throws {
        let fd = open("/dev/null", O_RDONLY)  // not close-on-exec
        defer { close(fd) }
        let output = try ChildProcess.run("sh", arguments: ["-c", "ls /proc/$$/fd"], parentDeathSignal: SIGKILL)
        let fds = String(decoding: output.stdout, as: UTF8.self).split(separator: "\n").compactMap { Int($0) }.sorted()
        // sh's own listing may hold one more descriptor for the directory it reads.
        #expect(Array(fds.prefix(3)) == [0, 1, 2] && !fds.contains(Int(fd)), "\(fds)")
    }

    func readText(_ path: String) -> String? {
        guard let file = fopen(path, "r") else { return nil }
        defer { fclose(file) }
        var bytes: [UInt8] = []
        while case let c = fgetc(file), c != EOF { bytes.append(UInt8(c)) }
        return String(decoding: bytes, as: UTF8.self)
    }
}
