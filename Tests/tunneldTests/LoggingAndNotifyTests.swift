import Foundation
import Logging
import NetBase
import Testing

@testable import tunneld

@Suite struct LoggingAndNotifyTests {
    @Test func watchdogIntervalIsHalfOfWatchdogUSecAndOnlyForTheNamedProcess() {
        let ours = SystemdNotifier(
            environment: ["NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000"],
            pid: 42
        )
        #expect(ours.watchdogInterval == .seconds(15))
        let named = SystemdNotifier(
            environment: ["NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "42"],
            pid: 42
        )
        #expect(named.watchdogInterval == .seconds(1))
        let someoneElse = SystemdNotifier(
            environment: ["NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "7"],
            pid: 42
        )
        #expect(someoneElse.watchdogInterval == nil)
        let garbage = SystemdNotifier(environment: ["NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "soon"], pid: 42)
        #expect(garbage.watchdogInterval == nil)
        let huge = SystemdNotifier(environment: ["NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "\(UInt64.max)"], pid: 42)
        #expect(huge.watchdogInterval != nil)  // no trap
        let noSystemd = SystemdNotifier(environment: ["WATCHDOG_USEC": "2000000"], pid: 42)
        #expect(!noSystemd.isActive && noSystemd.watchdogInterval == nil)
        noSystemd.ready(status: "nothing happens")
    }

    @Test func notifyMessagesArriveAsNewlineSeparatedFields() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent(
            "notify-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
        ).path
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
        #expect(fd >= 0)
        defer { close(fd); unlink(path) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: Array(path.utf8)) }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        #expect(bound == 0)
        var timeout = timeval(tv_sec: 2, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        let notifier = SystemdNotifier(environment: ["NOTIFY_SOCKET": path], pid: getpid())
        notifier.ready(status: "Running: subnet 10.2.3.0/24")
        notifier.stopping(status: "Stopping")
        var buffer = [UInt8](repeating: 0, count: 512)
        var texts: [String] = []
        for _ in 0..<2 {
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            #expect(n > 0)
            if n > 0 { texts.append(String(decoding: buffer[..<n], as: UTF8.self)) }
        }
        #expect(texts == ["READY=1\nSTATUS=Running: subnet 10.2.3.0/24", "STOPPING=1\nSTATUS=Stopping"])
    }

    @Test func jsonLogLinesAreOneParsableObjectEach() throws {
        let lines = Locked<[String]>([])
        var handler = JSONLogHandler(label: "tunneld") { line in lines.withLock { $0.append(line) } }
        handler.logLevel = .debug
        handler[metadataKey: "subnet"] = "10.2.3.0/24"
        let logger = Logger(label: "tunneld") { _ in handler }
        logger.info(
            "peer \"a\"\nleft\t\u{1}",
            metadata: ["peers": .array(["1", "2"]), "message": "clash", "n": .stringConvertible(3)]
        )
        logger.trace("not logged at debug")
        let all = lines.get()
        #expect(all.count == 1)
        let line = try #require(all.first)
        #expect(!line.contains("\n"))
        let object = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
        #expect(object["message"] as? String == "peer \"a\"\nleft\t\u{1}")
        #expect(object["level"] as? String == "info")
        #expect(object["logger"] as? String == "tunneld")
        #expect(object["subnet"] as? String == "10.2.3.0/24")
        #expect(object["peers"] as? [String] == ["1", "2"])
        #expect(object["meta.message"] as? String == "clash")
        #expect(object["n"] as? String == "3")
        let time = try #require(object["time"] as? String)
        #expect(time.hasSuffix("Z") && time.contains("T") && time.contains("."), "\(time)")
    }

    @Test func flanneldVerbosityMapsToLevelsAndLogLevelWins() throws {
        #expect(logLevel(verbosity: 0) == .info)
        #expect(logLevel(verbosity: 2) == .debug)
        #expect(logLevel(verbosity: 10) == .trace)
        func parse(_ arguments: [String]) throws -> Run {
            let normalized = FlannelArguments.normalize(["run"] + arguments, environment: [:])
            guard case let run as Run = try Tunneld.parseAsRoot(normalized) else {
                throw DaemonError("not a run command: \(normalized)")
            }
            return run
        }
        #expect(try parse(["-v=2"]).effectiveLogLevel == .debug)
        #expect(try parse(["-v", "10"]).effectiveLogLevel == .trace)
        #expect(try parse(["-v=10", "--log-level", "warning"]).effectiveLogLevel == .warning)
        #expect(try parse([]).effectiveLogLevel == .info)
        #expect(try parse(["--log-format", "json"]).logFormat == .json)
        #expect(throws: (any Error).self) { try parse(["--log-format", "xml"]) }
        #expect(throws: (any Error).self) { try parse(["-v=-1"]) }
        let fromEnvironment = FlannelArguments.normalize(["run"], environment: ["FLANNELD_V": "3"])
        #expect(fromEnvironment == ["run", "--v", "3"])
    }
}
