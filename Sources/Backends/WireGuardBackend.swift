import Foundation
import LeaseStore
import Logging
import NetBase
import Netlink
import PeerControl
import Synchronization
import TunDevice
import UDPEncap
import WireGuard

/// flannel's wireguard backend, in tunneld's userspace data path: a TUN
/// device named flannel-wg with the lease subnet's address /32 and a route
/// for the whole network, WireGuard on `ListenPort`, one peer per lease
/// (its `BackendData.PublicKey`, endpoint PublicIP:ListenPort, allowed
/// source its subnet). A flanneld wireguard host (kernel WireGuard or
/// wireguard-go) and this one are peers of each other.
public final class WireGuardBackend: Backend, HostBackend {
    public static let deviceName = "flannel-wg"

    public let type = BackendType.wireguard
    public let mtu: Int
    let host: HostContext
    let settings: WireGuardConfig
    let keyFile: String
    /// `off`: a TUN without a virtio header, one packet per read and write.
    let offload: OffloadMode
    /// Threads that seal a batch together, and threads that open one (`--workers`).
    let workers: Int
    /// How long the data path keeps looking for packets after moving some (`--busy-poll`).
    let busyPollMicroseconds: Int
    private let engine: WireGuardEngine
    private let dataPath = Mutex<WireGuardDataPath?>(nil)

    /// Reads (or makes) the private key now, so that a bad key file stops
    /// the daemon before it takes a lease.
    public init(
        host: HostContext,
        keyFile: String = WireGuardKeyFile.path,
        offload: OffloadMode = .auto,
        workers: Int = 1,
        busyPollMicroseconds: Int = 0
    ) throws {
        self.host = host
        self.offload = offload
        self.workers = max(1, workers)
        self.busyPollMicroseconds = max(0, busyPollMicroseconds)
        settings = host.config.backend.wireguard ?? WireGuardConfig()
        self.keyFile = keyFile
        mtu = settings.deviceMTU(interfaceMTU: host.underlay.mtu)
        guard mtu >= 68 else {
            throw BackendError(
                "the wireguard device's MTU would be \(mtu) (interface \(host.underlay.name) MTU \(host.underlay.mtu) "
                    + "less \(WireGuardConfig.overhead)): set Backend.MTU to the path MTU between hosts"
            )
        }
        let (key, created) = try WireGuardKeyFile.loadOrCreate(at: keyFile)
        var psk = PresharedKey.none
        if let text = settings.psk {
            do { psk = try PresharedKey(base64: text) } catch {
                throw BackendError("Backend.PSK: \(error)")
            }
        }
        engine = WireGuardEngine(
            privateKey: key,
            presharedKey: psk,
            persistentKeepalive: settings.persistentKeepaliveInterval,
            subnetLength: host.config.subnetLen
        )
        host.logger.info(
            "WireGuard key \(created ? "created in" : "read from") \(keyFile); public key \(engine.publicKey)"
        )
        if WireGuardClock.rate != 1 {
            host.logger.warning(
                "TUNNELD_TEST_WIREGUARD_CLOCK_RATE=\(WireGuardClock.rate): WireGuard's timers run \(WireGuardClock.rate) times as fast (a test hook; unset it)"
            )
        }
    }

    public func leaseAttributes() throws -> LeaseAttributes {
        LeaseAttributes(
            publicIP: publicIP,
            backendType: type.rawValue,
            backendData: .object(["PublicKey": .string(engine.publicKey.base64)])
        )
    }

    public func activate(lease: Lease) throws {
        let device = Self.deviceName
        // A TUN of this name belongs to a live process (flanneld with
        // wireguard-go, or another tunneld): joining it would steal its packets.
        if (try? routeSocket.linkIndex(named: device)) != nil {
            throw BackendError(
                "a device named \(device) already exists: is flanneld (wireguard) or another tunneld running? "
                    + "Stop it or delete the device (ip link del \(device))"
            )
        }
        // With a virtio header and TSO the kernel hands over super-packets
        // of up to 64 KiB (split here before sealing) and takes coalesced
        // ones on the way back, as on the udp backend's path.
        var tun: TunDevice
        var tunOffloads: TunOffloads = []
        if offload == .auto, let withHeader = try? TunDevice.create(name: device, vnetHeader: true) {
            tun = withHeader
            tunOffloads = tun.enableOffloads()
        } else {
            tun = try TunDevice.create(name: device)
        }
        let socket: UDPSocket
        do { socket = try UDPSocket(port: settings.listenPort) } catch {
            tun.close()
            throw error
        }
        do {
            try tun.configure(
                address: lease.subnet.address,
                prefixLength: 32,
                mtu: mtu,
                routes: [config.network],
                using: routeSocket
            )
        } catch {
            tun.close()
            socket.close()
            throw error
        }
        dataPath.withLock {
            $0 = WireGuardDataPath(
                tun: tun,
                socket: socket,
                engine: engine,
                mtu: mtu,
                tunOffloads: tunOffloads,
                workers: workers,
                busyPollMicroseconds: busyPollMicroseconds
            )
        }
        logger.info(
            "device \(device) up: \(lease.subnet.address)/32 MTU \(mtu), route \(config.network) dev \(device), WireGuard on udp port \(settings.listenPort)"
        )
    }

    public func move(from old: Lease, to new: Lease) throws {
        guard let tun = dataPath.withLock({ $0?.tun }) else { return }
        try tun.configure(
            address: new.subnet.address,
            prefixLength: 32,
            mtu: mtu,
            routes: [config.network],
            using: routeSocket
        )
        try routeSocket.deleteAddress(
            index: routeSocket.linkIndex(named: tun.name),
            address: old.subnet.address,
            prefixLength: 32
        )
    }

    public func unusableReason(_ lease: Lease) -> String? {
        guard case .string(let text)? = lease.attributes.backendData?.field("PublicKey") else {
            return "its lease has no BackendData.PublicKey (a wireguard lease carries {\"PublicKey\":\"…\"}); "
                + "rewrite it or restart that host"
        }
        if (try? PublicKey(base64: text)) == nil {
            return "its BackendData.PublicKey is not a WireGuard public key (base64 of 32 bytes)"
        }
        return nil
    }

    private static func publicKey(of lease: Lease) -> PublicKey? {
        guard case .string(let text)? = lease.attributes.backendData?.field("PublicKey") else { return nil }
        return try? PublicKey(base64: text)
    }

    public func apply(_ changes: [PeerChange]) {
        var log = PeerLog(for: logger)
        defer { log.flush(to: logger) }
        for change in changes {
            switch change {
            case .added(let lease), .updated(_, let lease):
                if case .updated(let old, _) = change, old.subnet != lease.subnet {
                    engine.removePeer(subnet: old.subnet)
                }
                guard let key = Self.publicKey(of: lease) else {
                    logger.warning("peer \(lease.subnet): \(unusableReason(lease) ?? "no public key")")
                    continue
                }
                let endpoint = UDPEndpoint(address: lease.attributes.publicIP, port: settings.listenPort)
                do {
                    try engine.setPeer(subnet: lease.subnet, publicKey: key, endpoint: endpoint)
                    log.note("peer \(lease.subnet) → \(endpoint), key \(key)")
                } catch {
                    logger.warning("peer \(lease.subnet): \(error)")
                }
            case .removed(let lease):
                engine.removePeer(subnet: lease.subnet)
                log.note("peer \(lease.subnet) removed; its sessions ended")
            }
        }
    }

    public func run() async throws {
        guard let path = dataPath.withLock({ $0 }) else {
            throw BackendError("the wireguard backend was not activated before run()")
        }
        let threads = path.start()
        logger.info(
            "WireGuard data path running on udp port \(settings.listenPort), \(engine.peerCount) peer(s), \(workers) crypto worker(s) each way, UDP_SEGMENT sends \(path.usesSegmentation ? "on" : "off (the kernel has none)"), UDP_GRO receives \(path.receiveCoalescing ? "on" : "off (the kernel has none)")"
        )
        try await withTaskCancellationHandler {
            try await withThrowingTaskGroup(of: Void.self) { group in
                for thread in threads { group.addTask { for try await _ in thread {} } }
                defer {
                    path.stop()
                    group.cancelAll()
                }
                try await group.next()
            }
        } onCancel: {
            path.stop()
        }
        logger.info("WireGuard data path stopped; \(counterSummary())")
    }

    private func counterSummary() -> String {
        engine.counterValues().filter { $0.value > 0 }.map { "\($0.counter)=\($0.value)" }.joined(separator: " ")
    }

    public func report() -> BackendReport {
        let counters = engine.counterValues().map { (name: $0.counter.description, value: $0.value) }
        let path = dataPath.withLock { $0 }
        var report = BackendReport(
            type,
            device: Self.deviceName,
            summary: "userspace WireGuard on udp port \(settings.listenPort), public key \(engine.publicKey)",
            workers: workers,
            offloads: (path?.tun.vnetHeader == true ? ["tun-vnet-hdr"] : [])
                + (path?.usesSegmentation == true ? ["udp-gso"] : [])
                + (path?.receiveCoalescing == true ? ["udp-gro"] : [])
                + (path.map {
                    $0.tunOffloads.isEmpty ? [] : $0.tunOffloads.description.split(separator: "+").map { "tun-\($0)" }
                } ?? []),
            tableEntries: engine.peerCount,
            counters: counters
        )
        report.status.tunnels = engine.tunnels(now: WireGuardClock.now(), wallNow: Date())
        return report
    }

    /// The device goes with the process (flanneld removes its device on
    /// exit too); the key file stays, so the host keeps its public key.
    public func cleanUp(releasing: Bool) {
        guard
            let path = dataPath.withLock({ current -> WireGuardDataPath? in
                defer { current = nil }
                return current
            })
        else { return }
        path.stop()
        do { try path.tun.removeRoutes(using: routeSocket) } catch {
            logger.warning("could not remove route \(config.network) dev \(path.tun.name): \(error)")
        }
        path.tun.close()
        path.socket.close()
        logger.info("removed device \(path.tun.name) and route \(config.network)")
    }

    /// Counters by name, for tests.
    func counter(_ counter: WireGuardCounter) -> UInt64 {
        engine.counterValues().first { $0.counter == counter }?.value ?? 0
    }
}
