import Backends
import EtcdClient
import FlannelFiles
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
    let systemd: SystemdNotifier

    init(options: Run, store: any LeaseStore, logger: Logger, systemd: SystemdNotifier = SystemdNotifier()) {
        self.options = options
        self.store = store
        self.logger = logger
        self.systemd = systemd
    }

    func run() async throws {
        let startedAt = Date()
        // A host among 60,000 leases lists them at start: let the heap give
        // that memory back afterwards rather than keep its high-water mark.
        useReturningHeap()
        systemd.status("Reading the network config from \(store.location)")
        guard let config = try await waitForConfig() else { return }
        try checkBackend(config)
        // Before anything is set up: a missing iptables (or nft) fails here.
        let firewall = try makeFirewall(config)

        let routeSocket = try RouteSocket()
        let (interface, interfaceAddress) = try selectInterface(routeSocket, config: config)
        let publicIP = options.publicIP.flatMap(IPv4Address.init) ?? interfaceAddress
        let publicIPv6 = try selectPublicIPv6(config, interface: interface, routeSocket)
        if publicIP.value == 0 && publicIPv6 == nil {
            throw DaemonError(
                "\(interface.name) has neither an IPv4 address nor a global IPv6 address, so other hosts cannot reach this one: add an address, choose another interface with -iface, or give -public-ipv6"
            )
        }
        logger.info(
            "using interface \(interface.name) (\(interfaceAddress.value == 0 ? "no IPv4 address" : "\(interfaceAddress)"), MTU \(interface.mtu)); public IP \(publicIP.value == 0 ? "none (IPv6 underlay only)" : "\(publicIP)")\(publicIPv6.map { ", public IPv6 \($0)" } ?? ""); backend \(config.backend.type)"
        )

        systemd.status("Setting up the \(config.backend.type) backend on \(interface.name)")
        let backend = try makeBackend(
            config,
            interface: interface,
            interfaceAddress: interfaceAddress,
            publicIP: publicIP,
            publicIPv6: publicIPv6,
            routeSocket: routeSocket
        )
        // From here on, a failure removes what this start installed (device,
        // routes, iptables chains, the health listener, a lease it took
        // fresh) before the error is reported: no half-configured host.
        var freshLease: Lease?
        var endpoint: HTTPEndpoint?
        let blackhole = options.ipBlackholeRoute ? BlackholeRoute(routeSocket: routeSocket, logger: logger) : nil
        func rollBack(_ error: any Error) async {
            logger.error("start-up failed: \(error); removing what was set up")
            endpoint?.stop()
            blackhole?.remove()
            cleanUp(backend, firewall: firewall, releasing: false)
            if let freshLease {
                do {
                    try await store.releaseLease(freshLease)
                    logger.info("released the lease \(freshLease.primarySubnet) taken by this start")
                } catch {
                    logger.warning(
                        "could not release the lease \(freshLease.primarySubnet) taken by this start: \(error); it expires on its own"
                    )
                }
            }
        }
        let lease: Lease, holder: LeaseHolder, peers: PeerSync, revision: Int64, mtu: Int
        do {
            // Before anything is leased: a subnet file that cannot be written
            // is the operator's to fix, and found now costs nothing.
            try SubnetEnv.checkWritable(options.subnetFile)
            // The device comes before the lease: a vxlan lease carries its MAC.
            var backendAttributes = try backend.leaseAttributes()
            if let publicIPv6 { backendAttributes.publicIPv6 = publicIPv6 }
            let attributes = backendAttributes
            let preferred: IPv4Network?
            // IPv6-only: the file has no FLANNEL_SUBNET, and leases no IPv4 subnet.
            switch config.isIPv6Only ? .success(nil) : SubnetEnv.previousSubnet(at: options.subnetFile) {
            case .success(let subnet): preferred = subnet
            case .failure(let error):
                logger.warning("ignoring the previous subnet file: \(error)")
                preferred = nil
            }
            let preferredIPv6: IPv6Network?
            switch config.ipv6 == nil ? .success(nil) : SubnetEnv.previousIPv6Subnet(at: options.subnetFile) {
            case .success(let subnet): preferredIPv6 = subnet
            case .failure(let error):
                logger.warning("ignoring the previous IPv6 subnet in the subnet file: \(error)")
                preferredIPv6 = nil
            }
            systemd.status("Acquiring a lease in \(store.location)")
            // One read of the leases chooses the subnet and is the list of
            // peers; their watch starts from its revision.
            guard
                let joined = try await retrying(
                    "acquire a lease in \(store.location)",
                    {
                        try await self.store.join(
                            config: config,
                            attributes: attributes,
                            preferred: preferred,
                            preferredIPv6: preferredIPv6
                        )
                    }
                )
            else {
                backend.cleanUp(releasing: false)
                return
            }
            let acquired = joined.lease
            lease = acquired
            // A subnet other than the one this host had (per its subnet file)
            // was taken by this start; a failure gives it back.
            if config.isIPv6Only ? acquired.ipv6Subnet != preferredIPv6 : acquired.subnet != preferred {
                freshLease = acquired
            }
            logger.info("leased \(Daemon.subnets(of: lease)) for \(publicIP) in \(store.location)")
            holder = LeaseHolder(lease)
            try backend.activate(lease: lease)
            mtu = backend.mtu

            peers = PeerSync(
                store: store,
                backend: backend,
                holder: holder,
                config: config,
                attributes: attributes,
                logger: logger,
                onSubnetChange: { [options, logger, firewall, blackhole] newLease in
                    do {
                        try SubnetEnv(
                            network: config.ipv4Network,
                            subnet: newLease.ipv4Subnet,
                            mtu: mtu,
                            ipMasq: options.ipMasq,
                            ipv6Network: config.ipv6?.network,
                            ipv6Subnet: newLease.ipv6Subnet
                        )
                        .write(to: options.subnetFile)
                        try firewall?.install(Daemon.firewallNetworks(config, newLease))
                        try blackhole?.set(ipv4: newLease.ipv4Subnet, ipv6: newLease.ipv6Subnet)
                    } catch {
                        logger.error("could not move to the new subnet \(Daemon.subnets(of: newLease)): \(error)")
                    }
                }
            )
            // Health and metrics from here on; /readyz says 503, naming
            // the step under way, until the rules are in and subnet.env is
            // written (as flanneld's does).
            let readiness = Readiness(
                waitingFor: firewall.map { "installing the \($0.mechanism) rules" }
                    ?? "loading the leases listed in \(store.location)"
            )
            endpoint = try startEndpoint(
                Observed(
                    config: config,
                    location: store.location,
                    interface: interface.name,
                    interfaceAddress: interfaceAddress,
                    publicIP: publicIP,
                    mtu: mtu,
                    startedAt: startedAt,
                    backend: backend,
                    peers: peers
                ),
                readiness: readiness
            )
            try firewall?.install(Daemon.firewallNetworks(config, lease))
            if let firewall, options.ipMasq {
                logger.info(
                    "ip masquerade on for traffic from \(config.networksDescription) leaving it (\(firewall.masqueradeLocation))"
                )
            }
            if let firewall, options.iptablesForwardRules {
                logger.info(
                    "forwarding traffic from and to \(config.networksDescription) (\(firewall.forwardLocation)); put back within \(options.iptablesResync) s if removed"
                )
            }
            if let blackhole {
                try blackhole.set(ipv4: lease.ipv4Subnet, ipv6: lease.ipv6Subnet)
                logger.info(
                    "blackhole route for \(blackhole.subnets) (metric \(BlackholeRoute.metric): any real route to it wins); put back within \(options.iptablesResync) s if removed"
                )
            }
            readiness.waiting(for: "loading the \(joined.peers.leases.count) leases listed in \(store.location)")
            revision = peers.load(joined.peers)
            // The list's pages and the parsed leases are gone now; give
            // their memory back rather than keep the high-water mark.
            releaseFreeHeapMemory()
            readiness.waiting(for: "writing \(options.subnetFile)")
            try SubnetEnv(
                network: config.ipv4Network,
                subnet: lease.ipv4Subnet,
                mtu: mtu,
                ipMasq: options.ipMasq,
                ipv6Network: config.ipv6?.network,
                ipv6Subnet: lease.ipv6Subnet
            )
            .write(to: options.subnetFile)
            readiness.ready()
        } catch {
            await rollBack(error)
            throw error
        }
        let serving = endpoint
        defer { serving?.stop() }

        logger.info(
            "tunneld ready: \(backend.type) backend, MTU \(mtu), \(peers.peerCount) peer(s); wrote \(options.subnetFile)"
        )
        let subnet = lease.primarySubnet
        systemd.ready(status: runningStatus(backend: backend.type, subnet: subnet, peers: peers.peerCount))

        let margin = Duration.seconds(options.subnetLeaseRenewMargin * 60)
        let resync = Duration.seconds(options.iptablesResync)
        let systemd = self.systemd
        do {
            try await cancelWhenGracefulShutdown {
                try await withThrowingTaskGroup(of: Void.self) { group in
                    group.addTask { try await backend.run() }
                    group.addTask { await peers.run(from: revision, renewMargin: margin) }
                    if let firewall {
                        group.addTask { await firewall.keep(every: resync) }
                    }
                    if let blackhole {
                        group.addTask { await blackhole.keep(every: resync) }
                    }
                    if systemd.isActive {
                        // Runs until cancelled: watchdog pings and STATUS= updates.
                        group.addTask {
                            await systemd.keepAlive {
                                runningStatus(
                                    backend: backend.type,
                                    subnet: holder.lease.primarySubnet,
                                    peers: peers.peerCount
                                )
                            }
                        }
                    }
                    // The backend ends only on shutdown or a fatal error
                    // (the data path lost its device); either way the rest
                    // stops with it.
                    defer { group.cancelAll() }
                    try await group.next()
                }
            }
        } catch {
            logger.error("\(backend.type) backend stopped: \(error)")
            systemd.stopping(status: "Failed: \(backend.type) backend stopped: \(error)")
            cleanUp(backend, firewall: firewall, releasing: false)
            throw error
        }
        logger.info("stopping")
        systemd.stopping(
            status: options.releaseOnExit
                ? "Stopping: removing devices and routes, releasing the lease"
                : "Stopping: keeping the lease for a restart"
        )
        cleanUp(backend, firewall: firewall, releasing: options.releaseOnExit)
        // Like the lease, the blackhole route stays for a restart unless the
        // host leaves the network.
        if options.releaseOnExit { blackhole?.remove() }
        if options.releaseOnExit {
            do {
                try await store.releaseLease(holder.lease)
                logger.info("released lease \(holder.lease.primarySubnet)")
            } catch {
                logger.error("could not release lease \(holder.lease.primarySubnet): \(error)")
            }
        } else {
            logger.info("lease \(holder.lease.primarySubnet) kept for a restart")
        }
    }

    /// The backend the config names, built by its type's constructor (which
    /// also removes what other modes left on this host).
    private func makeBackend(
        _ config: NetworkConfig,
        interface: Interface,
        interfaceAddress: IPv4Address,
        publicIP: IPv4Address,
        publicIPv6: IPv6Address?,
        routeSocket: RouteSocket
    ) throws -> any Backend {
        guard let type = config.backend.knownType else {
            throw DaemonError(BackendType.unsupported(config.backend.type))
        }
        let link = try routeSocket.link(index: interface.index)
        let address =
            try routeSocket.addresses().first { $0.index == interface.index && $0.address == interfaceAddress }
            ?? InterfaceAddress(index: interface.index, address: interfaceAddress, prefixLength: 32)
        let host = HostContext(
            config: config,
            underlay: link,
            underlayAddress: address,
            publicIP: publicIP,
            publicIPv6: publicIPv6,
            underlayIPv6: publicIPv6 == nil
                ? []
                : try routeSocket.ipv6Addresses().filter {
                    $0.index == interface.index && !$0.address.isLinkLocalUnicast
                },
            routeSocket: routeSocket,
            logger: logger
        )
        let udp = UDPBackend.Options(
            device: options.device,
            datapath: options.datapath,
            queueDepth: options.queueDepth,
            acceptUnknownPeers: options.acceptUnknownPeers,
            offload: options.offload,
            workers: options.effectiveWorkers,
            busyPollMicroseconds: options.busyPoll
        )
        return try type.makeBackend(
            host,
            options: BackendOptions(udp: udp, wireguardWorkers: options.effectiveWireGuardWorkers)
        )
    }

    private func cleanUp(_ backend: any Backend, firewall: (any FirewallKeeper)?, releasing: Bool) {
        backend.cleanUp(releasing: releasing)
        guard let firewall else { return }
        firewall.remove()
        logger.info("removed tunneld's \(firewall.mechanism) rules")
    }

    /// The keeper of the masquerade and forward rules: an nftables table with
    /// the config's `EnableNFTables` (nft only: iptables is not looked for),
    /// else iptables chains. nil when neither kind of rule is asked for.
    private func makeFirewall(_ config: NetworkConfig) throws -> (any FirewallKeeper)? {
        if config.enableNFTables {
            let keeper = try NFTablesKeeper(
                masquerade: options.ipMasq,
                forward: options.iptablesForwardRules,
                fullyRandomDisabled: options.ipMasqFullyRandomDisable,
                logger: logger
            )
            if keeper != nil { warnAboutIPTablesLeftovers() }
            return keeper
        }
        let keeper = try IPTablesKeeper(
            masquerade: options.ipMasq,
            forward: options.iptablesForwardRules,
            fullyRandomDisabled: options.ipMasqFullyRandomDisable,
            ipv6: config.ipv6 != nil,
            logger: logger
        )
        // A run with EnableNFTables that was killed, or a config changed
        // since: its table would masquerade alongside the chains.
        if NFTablesKeeper.removeLeftover() {
            logger.notice(
                "removed nftables table \(NFTRuleset.qualifiedName), left by an earlier run with EnableNFTables"
            )
        }
        return keeper
    }

    /// Chains an earlier run without EnableNFTables left, as nft sees them
    /// (iptables-nft keeps them in nftables tables): named, not touched, since
    /// this mode does not run iptables and nft must not edit iptables' tables.
    private func warnAboutIPTablesLeftovers() {
        guard let nft = try? NFT(for: ""), let chains = try? nft(["list", "chains"]) else { return }
        let ours = [IPTablesChain.natChain, IPTablesChain.forwardChain].filter { chains.contains("chain \($0) {") }
        guard !ours.isEmpty else { return }
        logger.warning(
            "iptables chains \(ours.joined(separator: ", ")) of an earlier run without EnableNFTables are still there; remove them (iptables -t nat -D POSTROUTING …; iptables -D FORWARD …; -F and -X the chains) or start once without EnableNFTables"
        )
    }

    /// What the rules cover: the network and this host's lease, in each
    /// family the config and the lease have.
    private static func firewallNetworks(_ config: NetworkConfig, _ lease: Lease) -> FirewallNetworks {
        var ipv6: FamilyNetworks?
        if let network = config.ipv6?.network, let subnet = lease.ipv6Subnet {
            ipv6 = .ipv6(network: network, subnet: subnet)
        }
        // IPv6-only: rules for IPv6 only (ip6tables, or the ip6 family of nftables).
        let ipv4 = lease.ipv4Subnet.flatMap { subnet in
            config.ipv4Network.map { FamilyNetworks.ipv4(network: $0, subnet: subnet) }
        }
        return FirewallNetworks(ipv4: ipv4, ipv6: ipv6)
    }

    /// "10.5.52.0/24", "10.5.52.0/24 and fd00:10:244:1::/64" or
    /// "fd00:10:244:1::/64", for log lines.
    static func subnets(of lease: Lease) -> String {
        let v6 = lease.ipv6Subnet.map(\.description)
        guard let v4 = lease.ipv4Subnet else { return v6 ?? "\(lease.subnet)" }
        return "\(v4)" + (v6.map { " and \($0)" } ?? "")
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
                logger.error(
                    "the network config in \(store.location) is invalid: \(error); fix it with `tunneld config set`; retrying in \(delay)"
                )
            } catch {
                logger.warning("cannot read the network config from \(store.location): \(error); retrying in \(delay)")
            }
            systemd.status("Waiting for a valid network config in \(store.location); retrying in \(delay)")
            guard await sleepUnlessStopping(delay) else { return nil }
            delay = min(delay * 2, .seconds(30))
        }
    }

    /// Runs a store operation at start, retrying with backoff (1 s doubling
    /// to 30 s) on any error, as flanneld keeps trying: a store that is down
    /// or briefly failing at boot must not make the daemon exit. Returns nil
    /// if asked to shut down meanwhile.
    private func retrying<T: Sendable>(_ what: String, _ operation: @Sendable () async throws -> T) async throws -> T? {
        var delay = Duration.seconds(1)
        var attempt = 1
        while true {
            do {
                let value = try await operation()
                if attempt > 1 { logger.info("could \(what) after \(attempt) attempts") }
                return value
            } catch is CancellationError {
                return nil
            } catch {
                logger.error("could not \(what) (attempt \(attempt)): \(error); retrying in \(delay)")
                systemd.status("Retrying in \(delay): could not \(what): \(error)")
            }
            guard await sleepUnlessStopping(delay) else { return nil }
            delay = min(delay * 2, .seconds(30))
            attempt += 1
        }
    }

    /// Sleeps for `delay` in short steps; false if a shutdown came meanwhile.
    private func sleepUnlessStopping(_ delay: Duration) async -> Bool {
        let deadline = ContinuousClock.now + delay
        while ContinuousClock.now < deadline {
            if Task.isCancelled || Task.isShuttingDownGracefully { return false }
            try? await Task.sleep(for: min(.milliseconds(200), deadline - ContinuousClock.now))
        }
        return !(Task.isCancelled || Task.isShuttingDownGracefully)
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
            throw DaemonError(
                "--backend \(wanted.rawValue) disagrees with the network config's Backend.Type \"\(config.backend.type)\"; every host of a network must use the same backend: drop --backend or change the config"
            )
        }
        guard let type = config.backend.knownType else {
            throw DaemonError(BackendType.unsupported(config.backend.type))
        }
        // IPv6-only networks: udp, host-gw and wireguard. vxlan's IPv4 device
        // would have no address; refuse rather than lease subnets nothing routes.
        if let v6 = config.ipv6, config.isIPv6Only, type == .vxlan {
            throw DaemonError(
                "the network config is IPv6-only (EnableIPv4 false, IPv6Network \(v6.network)), but the "
                    + "\(type.rawValue) backend runs IPv6-only networks not yet in tunneld: use the udp, host-gw or "
                    + "wireguard backend, or enable IPv4 too (remove EnableIPv4 and give a Network) for dual stack"
            )
        }
    }

    /// The IPv6 address other hosts reach this one at, in a dual-stack
    /// network: `-public-ipv6`, else the interface's (as flanneld picks it).
    private func selectPublicIPv6(
        _ config: NetworkConfig,
        interface: Interface,
        _ socket: RouteSocket
    ) throws -> IPv6Address? {
        guard config.ipv6 != nil else { return nil }
        if let given = options.publicIPv6.flatMap(IPv6Address.init) { return given }
        guard let found = try InterfaceLookup.ipv6Address(of: interface, using: socket) else {
            // udp carries IPv6 packets over the IPv4 underlay: a host
            // without an IPv6 address of its own is fine there.
            if config.backend.knownType == .udp { return nil }
            throw DaemonError(
                "the network is \(config.isIPv6Only ? "IPv6-only" : "dual-stack") (EnableIPv6) and the "
                    + "\(config.backend.type) backend routes IPv6 to each host's own IPv6 address, but "
                    + "\(interface.name) has no global IPv6 address: add one, choose another interface with "
                    + "-iface, or give -public-ipv6"
            )
        }
        return found
    }

    /// The underlay interface and its IPv4 address (0.0.0.0 for a host
    /// without one, in an IPv6-only udp network).
    private func selectInterface(_ socket: RouteSocket, config: NetworkConfig) throws -> (Interface, IPv4Address) {
        do {
            return try selectIPv4Interface(socket)
        } catch {
            // Beyond flanneld: an IPv6-only network over udp needs no IPv4
            // underlay at all. Its PublicIP is then 0.0.0.0, as flanneld
            // writes it, and peers are reached at their PublicIPv6.
            guard config.isIPv6Only, config.backend.knownType == .udp, options.publicIP == nil,
                let interface = try selectIPv6OnlyInterface(socket)
            else { throw error }
            return (interface, IPv4Address(0))
        }
    }

    /// For a host whose underlay has no IPv4 address: the first `--iface`
    /// (a name, or one of its global IPv6 addresses) that has a global IPv6
    /// address, or without `--iface` the interface of the IPv6 default
    /// route (flanneld has no such case).
    private func selectIPv6OnlyInterface(_ socket: RouteSocket) throws -> Interface? {
        let all = try InterfaceLookup.interfaces(using: socket)
        let global = try socket.ipv6Addresses().filter { $0.address.isGlobalUnicast }
        let withIPv6 = Set(global.map(\.index))
        if !options.iface.isEmpty {
            return options.iface.lazy.compactMap { candidate in
                let wanted = candidate.trimmingCharacters(in: .whitespaces)
                let index =
                    IPv6Address(wanted).flatMap { address in global.first { $0.address == address }?.index }
                    ?? all.first { $0.name == wanted }?.index
                return all.first { $0.index == index && withIPv6.contains($0.index) }
            }.first
        }
        guard options.ifaceRegex.isEmpty, options.ifaceCanReach == nil else { return nil }
        let route = try socket.ipv6Routes().filter { $0.destination.prefixLength == 0 && $0.outputIndex > 0 }
            .min { ($0.metric ?? 0) < ($1.metric ?? 0) }
        return all.first { $0.index == route?.outputIndex && withIPv6.contains($0.index) }
    }

    /// flanneld's order: each `--iface` (name or IP) that exists, then each
    /// `--iface-regex` against names and addresses, then the interface of
    /// the route to `--iface-can-reach`; the default route's when none of
    /// them is given.
    private func selectIPv4Interface(_ socket: RouteSocket) throws -> (Interface, IPv4Address) {
        if options.iface.isEmpty && options.ifaceRegex.isEmpty && options.ifaceCanReach == nil {
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
            if let found = try InterfaceLookup.first(
                matching: { (try? regex.wholeMatch(in: $0)) != nil },
                using: socket
            ) {
                return found
            }
            errors.append("no interface name or IPv4 address matches --iface-regex \(pattern)")
        }
        if let target = options.ifaceCanReach.flatMap(IPv4Address.init) {
            do {
                return try InterfaceLookup.reaching(target, using: socket)
            } catch {
                errors.append("--iface-can-reach \(target): \(error)")
            }
        }
        throw DaemonError("no usable interface: " + errors.joined(separator: "; "))
    }
}

struct DaemonError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// The STATUS= line systemd shows while we run.
func runningStatus(backend: BackendType, subnet: LeaseSubnet, peers: Int) -> String {
    "Running: subnet \(subnet), \(backend) backend, \(peers) peer\(peers == 1 ? "" : "s")"
}
