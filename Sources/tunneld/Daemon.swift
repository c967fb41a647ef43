import EtcdClient
import Foundation
import LeaseStore
import Logging
import NetBase
import Netlink
import PacketRing
import ServiceLifecycle
import Synchronization
import TunDevice
import UDPEncap

/// The running node: holds the lease, the TUN device and the data path, and
/// keeps the subnet table in step with the store.
final class Daemon: Service, Sendable {
    let options: Run
    let store: any LeaseStore
    let logger: Logger

    init(options: Run, store: any LeaseStore, logger: Logger) {
        self.options = options
        self.store = store
        self.logger = logger
    }

    func run() async throws {
        guard let config = try await waitForConfig() else { return }
        try checkBackend(config)

        let routeSocket = try RouteSocket()
        let (interface, interfaceAddress) = try selectInterface(routeSocket)
        let publicIP = options.publicIP.flatMap(IPv4Address.init) ?? interfaceAddress
        let mtu = interface.mtu - DataPath.udpEncapsulationOverhead
        logger.info("using interface \(interface.name) (\(interfaceAddress), MTU \(interface.mtu)); public IP \(publicIP)")

        let attributes = LeaseAttributes(publicIP: publicIP)
        let preferred: IPv4Network?
        switch SubnetEnv.previousSubnet(at: options.subnetFile) {
        case .success(let subnet): preferred = subnet
        case .failure(let error):
            logger.warning("ignoring the previous subnet file: \(error)")
            preferred = nil
        }
        let lease = try await store.acquireLease(config: config, attributes: attributes, preferred: preferred)
        logger.info("leased \(lease.subnet) for \(publicIP) in \(store.location)")
        let holder = LeaseHolder(lease)

        let table = try SubnetTable(network: config.network, subnetLength: config.subnetLen)
        try table.set(lease.subnet, to: .local)
        let forwarder = Forwarder(table: table, tunAddress: lease.subnet.address,
                                  acceptUnknownPeers: options.acceptUnknownPeers)
        let dataPath = try UDPDataPath(
            settings: .init(device: options.device, port: config.backend.port, mtu: mtu, datapath: options.datapath,
                            offload: options.offload, workers: options.effectiveWorkers, queueDepth: options.queueDepth,
                            busyPollMicroseconds: options.busyPoll),
            forwarder: forwarder, routeSocket: routeSocket)
        let tun = dataPath.tun
        do {
            try tun.configure(address: lease.subnet.address, prefixLength: 32, mtu: mtu,
                              routes: [config.network], using: routeSocket)
        } catch {
            tun.close()
            dataPath.closeSockets()
            throw error
        }
        logger.info("device \(options.device) up: \(lease.subnet.address)/32 MTU \(mtu), route \(config.network) dev \(options.device)")
        logger.info("\(dataPath.summary)")

        let peers = PeerSync(store: store, table: table, holder: holder, port: config.backend.port,
                             config: config, attributes: attributes, logger: logger,
                             onSubnetChange: { [options, logger] newLease in
            do {
                try tun.configure(address: newLease.subnet.address, prefixLength: 32, mtu: mtu,
                                  routes: [config.network], using: routeSocket)
                try SubnetEnv(network: config.network, subnet: newLease.subnet, mtu: mtu, ipMasq: options.ipMasq)
                    .write(to: options.subnetFile)
                if options.ipMasq { try IPMasquerade().install(network: config.network, subnet: newLease.subnet) }
            } catch {
                logger.error("could not move to the new subnet \(newLease.subnet): \(error)")
            }
        })
        let masquerade = options.ipMasq ? try IPMasquerade() : nil
        if let masquerade {
            try masquerade.install(network: config.network, subnet: lease.subnet)
            logger.info("ip masquerade on for traffic from \(config.network) leaving it (iptables chains \(IPMasquerade.natChain), \(IPMasquerade.filterChain))")
        }
        let revision = try await peers.loadInitialPeers()
        try SubnetEnv(network: config.network, subnet: lease.subnet, mtu: mtu, ipMasq: options.ipMasq)
            .write(to: options.subnetFile)

        let health = try options.healthzPort == 0 ? nil
            : HealthServer(address: IPv4Address(options.healthzIP)!, port: UInt16(options.healthzPort))
        defer { health?.stop() }
        if let health { logger.info("health endpoint: http://\(health.endpoint)/healthz") }

        let workers = dataPath.start()
        logger.info("tunneld ready: \(dataPath.loops.count) data-path worker(s) on udp port \(config.backend.port), \(table.allRoutes.count - 1) peer(s); wrote \(options.subnetFile)")
        notifySystemd("READY=1")

        let margin = Duration.seconds(options.subnetLeaseRenewMargin * 60)
        do {
            try await withTaskCancellationOrGracefulShutdownHandler {
                try await withThrowingTaskGroup(of: Void.self) { group in
                    for worker in workers { group.addTask { try await worker.wait() } }
                    group.addTask { await peers.watch(from: revision) }
                    group.addTask { await peers.renew(margin: margin) }
                    group.addTask { [logger] in
                        // A periodic look at the data path's counters.
                        while !Task.isCancelled {
                            try? await Task.sleep(for: .seconds(60))
                            logger.debug("data path: \(Statistics.summary(of: dataPath.statistics))")
                        }
                    }
                    // The data path ends only on shutdown or a fatal error;
                    // either way the rest stops with it.
                    defer { group.cancelAll() }
                    try await group.next()
                }
            } onCancelOrGracefulShutdown: {
                for worker in workers { worker.stop() }
            }
        } catch {
            logger.error("data path stopped: \(error)")
            cleanUp(tun: tun, routeSocket: routeSocket, network: config.network, masquerade: masquerade)
            throw error
        }
        logger.info("stopping; data path counters: \(Statistics.summary(of: dataPath.statistics))")
        cleanUp(tun: tun, routeSocket: routeSocket, network: config.network, masquerade: masquerade)
        dataPath.closeSockets()
        if options.releaseOnExit {
            do {
                try await store.releaseLease(holder.lease)
                logger.info("released lease \(holder.lease.subnet)")
            } catch {
                logger.error("could not release lease \(holder.lease.subnet): \(error)")
            }
        } else {
            logger.info("lease \(holder.lease.subnet) kept for a restart")
        }
    }

    private func cleanUp(tun: TunDevice, routeSocket: RouteSocket, network: IPv4Network, masquerade: IPMasquerade?) {
        do { try tun.removeRoutes(using: routeSocket) } catch {
            logger.warning("could not remove route \(network) dev \(tun.name): \(error)")
        }
        tun.close()
        logger.info("removed device \(tun.name) and route \(network)")
        guard let masquerade else { return }
        do {
            try masquerade.remove()
            logger.info("removed ip masquerade rules")
        } catch {
            logger.warning("could not remove ip masquerade rules: \(error)")
        }
    }

    /// Reads the network config, waiting (with backoff) while there is none.
    /// Returns nil if asked to shut down meanwhile.
    private func waitForConfig() async throws -> NetworkConfig? {
        var delay = Duration.seconds(1)
        while true {
            do {
                return try await store.networkConfig()
            } catch let error as LeaseStoreError {
                guard case .configNotFound = error else { throw error }
                logger.warning("\(configNotFoundMessage(error)); retrying in \(delay)")
            } catch let error as NetworkConfigError {
                // A broken config is an operator error: say what, and keep
                // waiting for a fixed one rather than exiting in a loop.
                logger.error("the network config in \(store.location) is invalid: \(error); fix it with `tunneld config set`; retrying in \(delay)")
            } catch {
                logger.warning("cannot read the network config from \(store.location): \(error); retrying in \(delay)")
            }
            let deadline = ContinuousClock.now + delay
            while ContinuousClock.now < deadline {
                if Task.isCancelled || Task.isShuttingDownGracefully { return nil }
                try? await Task.sleep(for: .milliseconds(200))
            }
            delay = min(delay * 2, .seconds(30))
        }
    }

    /// For etcd, names the key to write and the command that writes it, as
    /// an operator coming from flanneld expects.
    private func configNotFoundMessage(_ error: LeaseStoreError) -> String {
        guard let etcd = store as? EtcdLeaseStore else { return "\(error)" }
        let key = etcd.prefix + "/config"
        let endpoints = etcd.client.endpoints.joined(separator: ",")
        return "no network config at \(key) in etcd \(endpoints): write it with "
            + "`etcdctl put \(key) < flannel-config.json` or "
            + "`tunneld config set -etcd-endpoints=\(endpoints) -etcd-prefix=\(etcd.prefix) flannel-config.json`"
    }

    private func checkBackend(_ config: NetworkConfig) throws {
        if let wanted = options.backend, wanted.rawValue != config.backend.type {
            throw DaemonError("--backend \(wanted.rawValue) disagrees with the network config's Backend.Type \"\(config.backend.type)\"; every host of a network must use the same backend: drop --backend or change the config")
        }
        guard config.backend.type == "udp" else {
            throw DaemonError("backend \"\(config.backend.type)\" is not supported by this version of tunneld (udp is); set Backend.Type to udp")
        }
    }

    /// flanneld's order: each `--iface` (name or IP) that exists, then each
    /// `--iface-regex` against names and addresses, then the default route's.
    private func selectInterface(_ socket: RouteSocket) throws -> (Interface, IPv4Address) {
        if options.iface.isEmpty && options.ifaceRegex.isEmpty {
            return try InterfaceLookup.defaultInterface(using: socket)
        }
        var errors: [String] = []
        for candidate in options.iface {
            do {
                return try InterfaceLookup.find(nameOrAddress: candidate, using: socket)
            } catch {
                errors.append("\(error)")
            }
        }
        for pattern in options.ifaceRegex {
            let regex = try Regex(pattern)
            if let found = try InterfaceLookup.first(matching: { (try? regex.wholeMatch(in: $0)) != nil }, using: socket) {
                return found
            }
            errors.append("no interface name or IPv4 address matches --iface-regex \(pattern)")
        }
        throw DaemonError("no usable interface: " + errors.joined(separator: "; "))
    }
}

struct DaemonError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// The lease this node holds; changed by renewal and re-acquisition.
final class LeaseHolder: Sendable {
    private let state: Mutex<Lease>
    init(_ lease: Lease) { state = Mutex(lease) }
    var lease: Lease {
        get { state.withLock { $0 } }
    }
    func replace(_ lease: Lease) { state.withLock { $0 = lease } }
}

/// Tells systemd (Type=notify) about our state, as flanneld does.
func notifySystemd(_ state: String) {
    guard let path = ProcessInfo.processInfo.environment["NOTIFY_SOCKET"], !path.isEmpty else { return }
    let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { return }
    defer { close(fd) }
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    var bytes = Array(path.utf8)
    if bytes.first == UInt8(ascii: "@") { bytes[0] = 0 }  // abstract namespace
    guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { return }
    withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: bytes) }
    let length = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count)
    _ = state.withCString { text in
        withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                sendto(fd, text, strlen(text), 0, $0, length)
            }
        }
    }
}
