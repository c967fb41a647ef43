import Backends
import EtcdClient
import Foundation
import LeaseStore
import Logging
import NetBase
import Netlink
import Observability
import PeerControl
import ServiceLifecycle

/// The running node: composes the backend the config names (Backends) with
/// the lease and peer bookkeeping (PeerControl); the steps live there.
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
        let startedAt = Date()
        guard let config = try await waitForConfig() else { return }
        try checkBackend(config)

        let routeSocket = try RouteSocket()
        let (interface, interfaceAddress) = try selectInterface(routeSocket)
        let publicIP = options.publicIP.flatMap(IPv4Address.init) ?? interfaceAddress
        logger.info("using interface \(interface.name) (\(interfaceAddress), MTU \(interface.mtu)); public IP \(publicIP); backend \(config.backend.type)")

        let backend = try makeBackend(config, interface: interface, interfaceAddress: interfaceAddress,
                                      publicIP: publicIP, routeSocket: routeSocket)
        // The device comes before the lease: a vxlan lease carries its MAC.
        let attributes = try backend.leaseAttributes()
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
        try backend.activate(lease: lease)
        let mtu = backend.mtu

        let peers = PeerSync(store: store, backend: backend, holder: holder, config: config,
                             attributes: attributes, logger: logger,
                             onSubnetChange: { [options, logger] newLease in
            do {
                try SubnetEnv(network: config.network, subnet: newLease.subnet, mtu: mtu, ipMasq: options.ipMasq)
                    .write(to: options.subnetFile)
                if options.ipMasq { try IPMasquerade().install(network: config.network, subnet: newLease.subnet) }
            } catch {
                logger.error("could not move to the new subnet \(newLease.subnet): \(error)")
            }
        })
        let masquerade: IPMasquerade?
        do {
            masquerade = options.ipMasq ? try IPMasquerade() : nil
            if let masquerade {
                try masquerade.install(network: config.network, subnet: lease.subnet)
                logger.info("ip masquerade on for traffic from \(config.network) leaving it (iptables chains \(IPMasquerade.natChain), \(IPMasquerade.filterChain))")
            }
        } catch {
            backend.cleanUp(releasing: false)
            throw error
        }
        let revision: Int64
        do {
            revision = try await peers.loadInitialPeers()
            try SubnetEnv(network: config.network, subnet: lease.subnet, mtu: mtu, ipMasq: options.ipMasq)
                .write(to: options.subnetFile)
        } catch {
            cleanUp(backend, masquerade: masquerade, releasing: false)
            throw error
        }

        let endpoint: HTTPEndpoint?
        do {
            endpoint = try startEndpoint(Observed(
                config: config, location: store.location, interface: interface.name,
                interfaceAddress: interfaceAddress, publicIP: publicIP, mtu: mtu, startedAt: startedAt,
                backend: backend, peers: peers))
        } catch {
            cleanUp(backend, masquerade: masquerade, releasing: false)
            throw error
        }
        defer { endpoint?.stop() }

        logger.info("tunneld ready: \(backend.type) backend, MTU \(mtu), \(peers.currentPeers.count) peer(s); wrote \(options.subnetFile)")
        notifySystemd("READY=1")

        let margin = Duration.seconds(options.subnetLeaseRenewMargin * 60)
        do {
            try await cancelWhenGracefulShutdown {
                try await withThrowingTaskGroup(of: Void.self) { group in
                    group.addTask { try await backend.run() }
                    group.addTask { await peers.run(from: revision, renewMargin: margin) }
                    // The backend ends only on shutdown or a fatal error
                    // (the data path lost its device); either way the rest
                    // stops with it.
                    defer { group.cancelAll() }
                    try await group.next()
                }
            }
        } catch {
            logger.error("\(backend.type) backend stopped: \(error)")
            cleanUp(backend, masquerade: masquerade, releasing: false)
            throw error
        }
        logger.info("stopping")
        cleanUp(backend, masquerade: masquerade, releasing: options.releaseOnExit)
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

    /// The backend the config names, after removing what other modes left
    /// on this host (a restart with a new Backend.Type switches modes).
    private func makeBackend(_ config: NetworkConfig, interface: Interface, interfaceAddress: IPv4Address,
                             publicIP: IPv4Address, routeSocket: RouteSocket) throws -> any Backend {
        let link = try routeSocket.link(index: interface.index)
        let address = try routeSocket.addresses().first { $0.index == interface.index && $0.address == interfaceAddress }
            ?? InterfaceAddress(index: interface.index, address: interfaceAddress, prefixLength: 32)
        func removeLeftovers(keeping device: String?, peerRoutesToo: Bool) {
            Leftovers.remove(keepingDevice: device, peerRoutesToo: peerRoutesToo, network: config.network,
                             subnetLen: config.subnetLen, underlay: link, routeSocket: routeSocket, logger: logger)
        }
        switch config.backend.type {
        case "udp":
            removeLeftovers(keeping: nil, peerRoutesToo: true)
            let loop: UDPBackend.Options.Loop = options.datapath == .uring ? .uring : .simple
            return try UDPBackend(config: config, underlay: link, publicIP: publicIP,
                                  options: .init(device: options.device, loop: loop, queueDepth: options.queueDepth,
                                                 acceptUnknownPeers: options.acceptUnknownPeers,
                                                 offload: options.offload, workers: options.effectiveWorkers,
                                                 busyPollMicroseconds: options.busyPoll),
                                  routeSocket: routeSocket, logger: logger)
        case "vxlan":
            let backend = try VXLANBackend(config: config, underlay: link, underlayAddress: address, publicIP: publicIP,
                                           routeSocket: routeSocket, logger: logger)
            removeLeftovers(keeping: backend.deviceName, peerRoutesToo: false)
            return backend
        case "host-gw":
            let backend = try HostGatewayBackend(config: config, underlay: link, underlayAddress: address,
                                                 publicIP: publicIP, routeSocket: routeSocket, logger: logger)
            removeLeftovers(keeping: nil, peerRoutesToo: false)
            return backend
        default:
            throw DaemonError("backend \"\(config.backend.type)\" is not supported by tunneld (udp, vxlan and host-gw are); set Backend.Type to one of them")
        }
    }

    private func cleanUp(_ backend: any Backend, masquerade: IPMasquerade?, releasing: Bool) {
        backend.cleanUp(releasing: releasing)
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
        guard ["udp", "vxlan", "host-gw"].contains(config.backend.type) else {
            throw DaemonError("backend \"\(config.backend.type)\" is not supported by tunneld (udp, vxlan and host-gw are); set Backend.Type to one of them")
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
