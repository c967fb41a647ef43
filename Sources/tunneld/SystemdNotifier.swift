import CTunnel
import Foundation

/// systemd's notify protocol (sd_notify(3)) without libsystemd: newline-
/// separated `KEY=VALUE` fields in one datagram to the unix socket named by
/// `NOTIFY_SOCKET`. A unit with `Type=notify` learns READY, STATUS, STOPPING
/// and, with `WatchdogSec=`, gets WATCHDOG pings at half the interval.
/// Without `NOTIFY_SOCKET` (not started by systemd) every call does nothing.
struct SystemdNotifier: Sendable {
    /// The socket path; a leading `@` names an abstract socket.
    let socketPath: String?
    /// How often to ping, when systemd asked for a watchdog for this process.
    let watchdogInterval: Duration?

    init(environment: [String: String] = ProcessInfo.processInfo.environment, pid: pid_t = getpid()) {
        let path = environment["NOTIFY_SOCKET"].flatMap { $0.isEmpty ? nil : $0 }
        socketPath = path
        // WATCHDOG_PID, when set, names the process the watchdog is for
        // (a child started by us must not ping for us).
        let forUs = environment["WATCHDOG_PID"].map { Int32($0) == pid } ?? true
        if path != nil, forUs, let text = environment["WATCHDOG_USEC"], let usec = UInt64(text), usec > 0 {
            // sd_watchdog_enabled's advice: ping at half the timeout.
            watchdogInterval = .microseconds(Int64(clamping: usec / 2))
        } else {
            watchdogInterval = nil
        }
    }

    var isActive: Bool { socketPath != nil }

    func ready(status: String) { send(["READY=1", "STATUS=" + status]) }
    func status(_ text: String) { send(["STATUS=" + text]) }
    func stopping(status: String) { send(["STOPPING=1", "STATUS=" + status]) }
    func watchdog() { send(["WATCHDOG=1"]) }

    /// Pings the watchdog until cancelled; `status`, when given, is sent
    /// whenever its text changes (checked at each ping, and at least every
    /// 10 s when there is no watchdog).
    func keepAlive(status: (@Sendable () -> String)? = nil) async {
        guard isActive, watchdogInterval != nil || status != nil else { return }
        let interval = min(watchdogInterval ?? .seconds(10), .seconds(10))
        var lastStatus: String?
        while !Task.isCancelled {
            if watchdogInterval != nil { watchdog() }
            if let text = status?(), text != lastStatus {
                self.status(text)
                lastStatus = text
            }
            try? await Task.sleep(for: interval)
        }
    }

    func send(_ fields: [String]) {
        guard let socketPath else { return }
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return }
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        var bytes = Array(socketPath.utf8)
        if bytes.first == UInt8(ascii: "@") { bytes[0] = 0 }  // abstract namespace
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { return }
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: bytes) }
        let length = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count)
        let message = fields.joined(separator: "\n")
        _ = message.withCString { text in
            withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    sendto(fd, text, strlen(text), Int32(MSG_NOSIGNAL), $0, length)
                }
            }
        }
    }
}
