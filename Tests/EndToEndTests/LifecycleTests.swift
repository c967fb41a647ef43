import Foundation
import Testing

/// What a service manager and an operator see of the daemon's life: the
/// systemd notify sequence, and store errors at start retried, not fatal.
@Suite(.serialized, .enabled(if: canRunNamespaceTests, namespaceSkipReason))
struct LifecycleTests {
    static let config = #"{"Network":"10.2.0.0/16","SubnetLen":24,"Backend":{"Type":"udp"}}"#

    /// A systemd stand-in: a unix datagram socket collecting notify messages.
    final class NotifySocket: @unchecked Sendable {
        let path: String
        private let fd: Int32
        private let lock = NSLock()
        private var received: [(at: ContinuousClock.Instant, fields: [String])] = []
        /// Runs on the receiving thread when a message with READY=1 arrives.
        private let onReady: @Sendable () -> Void

        init(path: String, onReady: @escaping @Sendable () -> Void) throws {
            self.path = path
            self.onReady = onReady
            fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { throw LabError("socket(AF_UNIX) failed: errno \(errno)") }
            var address = sockaddr_un()
            address.sun_family = sa_family_t(AF_UNIX)
            let bytes = Array(path.utf8)
            guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
                throw LabError("socket path too long: \(path)")
            }
            withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: bytes) }
            let bound = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
                }
            }
            guard bound == 0 else { throw LabError("bind(\(path)) failed: errno \(errno)") }
            var timeout = timeval(tv_sec: 0, tv_usec: 200_000)
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            Thread.detachNewThread { [self] in receive() }
        }

        private var closed = false

        private func receive() {
            var buffer = [UInt8](repeating: 0, count: 4096)
            while !lock.withLock({ closed }) {
                let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
                guard n > 0 else { continue }
                let fields = String(decoding: buffer[..<n], as: UTF8.self).split(separator: "\n").map(String.init)
                if fields.contains("READY=1") { onReady() }
                lock.withLock { received.append((ContinuousClock.now, fields)) }
            }
            close(fd)
        }

        func stop() { lock.withLock { closed = true } }

        var messages: [[String]] { lock.withLock { received.map(\.fields) } }
        var fields: [String] { messages.flatMap { $0 } }

        func wait(for field: @escaping (String) -> Bool, timeout: Duration = .seconds(20)) -> Bool {
            let deadline = ContinuousClock.now + timeout
            while ContinuousClock.now < deadline {
                if fields.contains(where: field) { return true }
                usleep(50_000)
            }
            return false
        }
    }

    @Test func systemdHearsReadyOnceTheHostIsSetUpThenStatusWatchdogAndStopping() throws {
        try Lab.withLocalStore(config: Self.config) { lab in
            // What READY=1 finds in place, looked at the moment it arrives.
            final class AtReady: @unchecked Sendable {
                let lock = NSLock()
                var subnetFileWritten = false
                var routes = ""
            }
            let atReady = AtReady()
            let subnetFile = lab.subnetFile(1)
            let namespace = lab.namespace("h1")
            let notify = try NotifySocket(path: lab.directory.appendingPathComponent("notify.sock").path) {
                let written = FileManager.default.fileExists(atPath: subnetFile)
                let routes =
                    (try? run(["ip", "-n", namespace, "route", "show", "dev", "tun0"], check: false).output) ?? ""
                atReady.lock.withLock {
                    atReady.subnetFileWritten = written
                    atReady.routes = routes
                }
            }
            defer { notify.stop() }

            try lab.addHost(
                1,
                command: [
                    "env", "NOTIFY_SOCKET=\(notify.path)", "WATCHDOG_USEC=1000000",
                    tunneldBinary, "run", "--store-dir", lab.storeDirectory, "--iface", "eth0",
                    "--subnet-file", subnetFile, "--device", "tun0",
                ]
            )
            #expect(notify.wait(for: { $0 == "READY=1" }), "no READY=1; got \(notify.messages)")
            let subnet = try #require(try lab.subnetEnv(1)["FLANNEL_SUBNET"])
            atReady.lock.withLock {
                #expect(atReady.subnetFileWritten, "READY=1 came before subnet.env was written")
                #expect(
                    atReady.routes.contains("10.2.0.0/16"),
                    "READY=1 came before the network's route: \(atReady.routes)"
                )
            }
            // Status lines before READY say what the daemon was doing.
            let beforeReady = notify.fields.prefix { $0 != "READY=1" }
            #expect(beforeReady.contains { $0.hasPrefix("STATUS=Acquiring a lease") }, "\(beforeReady)")
            #expect(
                beforeReady.contains { $0.hasPrefix("STATUS=Setting up the udp backend on eth0") },
                "\(beforeReady)"
            )
            let network = subnet.replacingOccurrences(of: ".1/24", with: ".0/24")
            #expect(
                notify.fields.contains("STATUS=Running: subnet \(network), udp backend, 0 peers"),
                "\(notify.messages)"
            )

            // Watchdog pings at half of WATCHDOG_USEC: about 2 a second.
            Thread.sleep(forTimeInterval: 2.5)
            let pings = notify.fields.filter { $0 == "WATCHDOG=1" }.count
            #expect((3...12).contains(pings), "expected about 5 WATCHDOG=1 in 2.5 s, got \(pings)")

            // A new peer shows in the status line.
            try lab.addHost(2, extra: ["--store-dir", lab.storeDirectory])
            #expect(
                notify.wait(for: { $0 == "STATUS=Running: subnet \(network), udp backend, 1 peer" }),
                "status did not count the new peer: \(notify.messages.suffix(5))"
            )

            try lab.lab("stop", "h1")
            #expect(
                notify.wait(for: { $0 == "STOPPING=1" }, timeout: .seconds(5)),
                "no STOPPING=1: \(notify.messages.suffix(5))"
            )
            #expect(notify.fields.contains("STATUS=Stopping: keeping the lease for a restart"))
            // Nothing after STOPPING but its own status.
            let last = try #require(notify.messages.last)
            #expect(last.contains("STOPPING=1"), "\(notify.messages.suffix(3))")
        }
    }

    /// flanneld keeps trying when the store fails while it starts; so must
    /// tunneld. An etcd user that may read the config but not write leases
    /// makes every acquisition fail until it is allowed to.
    @Test(.enabled(if: etcdIsInstalled, etcdSkipReason))
    func aFailingLeaseAcquisitionAtStartIsRetriedUntilItWorks() throws {
        let lab = try Lab()
        defer { lab.destroy() }
        do {
            try lab.addEtcd()
            let prefix = "/coreos.com/network"
            let configFile = lab.directory.appendingPathComponent("flannel-config.json")
            try Self.config.write(to: configFile, atomically: true, encoding: .utf8)
            try lab.etcdctl(["put", "\(prefix)/config"], input: configFile.path)
            try lab.etcdctl(["role", "add", "reader"])
            try lab.etcdctl(["role", "grant-permission", "reader", "--prefix=true", "read", prefix + "/"])
            try lab.etcdctl(["user", "add", "node:pw"])
            try lab.etcdctl(["user", "grant-role", "node", "reader"])
            try lab.etcdctl(["user", "add", "root:rootpw"])
            try lab.etcdctl(["auth", "enable"])
            lab.etcd?.rootCredentials = "root:rootpw"

            // Allowed to write after a few failed attempts (1 s, 2 s backoff).
            let granted = DispatchSemaphore(value: 0)
            let grant = [
                "ip", "netns", "exec", lab.namespace("etcd"), "env", "ETCDCTL_API=3", "etcdctl",
                "--endpoints", labEtcdEndpoint, "--user", "root:rootpw",
                "role", "grant-permission", "reader", "--prefix=true", "readwrite", prefix + "/",
            ]
            Thread.detachNewThread {
                Thread.sleep(forTimeInterval: 4)
                _ = try? run(grant)
                granted.signal()
            }
            try lab.addHost(
                1,
                command: [
                    tunneldBinary, "run", "-etcd-endpoints=\(labEtcdEndpoint)",
                    "-etcd-username=node", "-etcd-password=pw", "-iface=eth0",
                    "--subnet-file", lab.subnetFile(1), "--device", "tun0",
                ]
            )
            _ = granted.wait(timeout: .now() + 30)
            let log = lab.log("h1")
            #expect(log.contains("could not acquire a lease in etcd"), "\(log)")
            #expect(log.contains("(attempt 1)") && log.contains("retrying in"), "\(log)")
            #expect(log.contains("permission denied"), "the reason is named: \(log)")
            #expect(log.contains("after") && log.contains("attempts"), "\(log)")
            // It runs and forwards like any host.
            try lab.addHost(
                2,
                command: [
                    tunneldBinary, "run", "-etcd-endpoints=\(labEtcdEndpoint)",
                    "-etcd-username=node", "-etcd-password=pw", "-iface=eth0",
                    "--subnet-file", lab.subnetFile(2), "--device", "tun0",
                ]
            )
            let ping = try lab.ping(from: 1, to: 2)
            #expect(ping.succeeded, "\(ping.output)")
        } catch {
            lab.printLogs()
            throw error
        }
    }
}
