import LeaseStore
import Logging
import NetBase
import Netlink
import PacketRing
import PeerControl
import Synchronization
import TunDevice
import UDPEncap

/// flannel's udp backend, with tunneld's own data path: a TUN device, a UDP
/// socket and a packet loop on a thread of its own, steered by the subnet
/// table.
///
/// The whole data path is built here and only here (`activate` and `run`),
/// so that swapping in another data path touches this one type.
public final class UDPBackend: Backend, HostBackend {
    public struct Options: Sendable {
        /// TUN device name (flannel's is flannel0).
        public var device: String
        /// Which data path (`--datapath`); `auto` takes the best this host offers.
        public var datapath: DataPathChoice
        public var queueDepth: Int
        public var acceptUnknownPeers: Bool
        public var offload: OffloadMode
        /// Data-path threads, each with its own TUN queue, socket and ring.
        public var workers: Int
        /// How long a loop looks for more work before sleeping (0: never).
        public var busyPollMicroseconds: Int

        public init(
            device: String = "flannel0",
            datapath: DataPathChoice = .auto,
            queueDepth: Int = 64,
            acceptUnknownPeers: Bool = false,
            offload: OffloadMode = .auto,
            workers: Int = 1,
            busyPollMicroseconds: Int = 0
        ) {
            self.busyPollMicroseconds = busyPollMicroseconds
            self.device = device
            self.datapath = datapath
            self.queueDepth = queueDepth
            self.acceptUnknownPeers = acceptUnknownPeers
            self.offload = offload
            self.workers = workers
        }
    }

    public let type = BackendType.udp
    public let mtu: Int
    let host: HostContext
    let options: Options
    let table: SubnetTable
    /// The IPv6 side of the table, in a dual-stack network.
    let table6: SubnetTable6?

    private let dataPath = Mutex<UDPDataPath?>(nil)

    public init(host: HostContext, options: Options) throws {
        let config = host.config
        self.host = host
        self.options = options
        // With a PublicIPv6 some peers may be reached over the IPv6 underlay,
        // whose header is 20 bytes longer; the TUN has one MTU for all.
        mtu =
            host.underlay.mtu
            - (host.publicIPv6 == nil ? DataPath.udpEncapsulationOverhead : DataPath.udp6EncapsulationOverhead)
        let table = try SubnetTable(network: config.network, subnetLength: config.subnetLen)
        self.table = table
        table6 = try config.ipv6.map {
            try SubnetTable6(network: $0.network, subnetLength: $0.subnetLen, addresses6: table.addresses6)
        }
    }

    /// flannel's udp backend writes no BackendType and no BackendData.
    public func leaseAttributes() throws -> LeaseAttributes {
        LeaseAttributes(publicIP: publicIP)
    }

    public func activate(lease: Lease) throws {
        // IPv6-only: the IPv4 table stays empty (lease.subnet is 0.0.0.0/0).
        if let subnet = lease.ipv4Subnet { try table.set(subnet, to: .local) }
        if let table6, let subnet6 = lease.ipv6Subnet { try table6.set(subnet6, to: .local) }
        let forwarder = Forwarder(
            table: table,
            table6: table6,
            tunAddress: lease.subnet.address,
            acceptUnknownPeers: options.acceptUnknownPeers,
            mtu: mtu
        )
        let path = try UDPDataPath(
            settings: .init(
                device: options.device,
                port: config.backend.port,
                mtu: mtu,
                datapath: options.datapath,
                offload: options.offload,
                workers: options.workers,
                queueDepth: options.queueDepth,
                busyPollMicroseconds: options.busyPollMicroseconds,
                carriesIPv6: table6 != nil,
                needsIPv6Underlay: publicIPv6 != nil
            ),
            forwarder: forwarder,
            routeSocket: routeSocket
        )
        do {
            if let subnet = lease.ipv4Subnet, let network = config.ipv4Network {
                try path.tun.configure(
                    address: subnet.address,
                    prefixLength: 32,
                    mtu: mtu,
                    routes: [network],
                    using: routeSocket
                )
            } else {
                try path.tun.bringUp(mtu: mtu, using: routeSocket)
            }
            if let v6 = config.ipv6, let subnet6 = lease.ipv6Subnet {
                try path.tun.configureIPv6(address: subnet6.address, routes: [v6.network], using: routeSocket)
            }
        } catch {
            path.tun.close()
            path.closeSockets()
            throw error
        }
        if let subnet = lease.ipv4Subnet {
            logger.info(
                "device \(options.device) up: \(subnet.address)/32 MTU \(mtu), route \(config.network) dev \(options.device)"
            )
        } else {
            logger.info("device \(options.device) up: MTU \(mtu), IPv6 only (no IPv4 address or route)")
        }
        if let v6 = config.ipv6, let subnet6 = lease.ipv6Subnet {
            logger.info(
                "IPv6 on \(options.device): \(subnet6.address)/128, route \(v6.network) dev \(options.device); IPv6 packets go to peers whose lease has an IPv6 subnet"
            )
        }
        logger.info("\(path.summary)")
        dataPath.withLock { $0 = path }
    }

    public func move(from old: Lease, to new: Lease) throws {
        if let subnet = old.ipv4Subnet { table.remove(subnet) }
        if let subnet = new.ipv4Subnet { try table.set(subnet, to: .local) }
        if let table6 {
            if let subnet6 = old.ipv6Subnet { table6.remove(subnet6) }
            if let subnet6 = new.ipv6Subnet { try table6.set(subnet6, to: .local) }
        }
        guard let tun = dataPath.withLock({ $0?.tun }) else { return }
        if let v6 = config.ipv6, old.ipv6Subnet != new.ipv6Subnet {
            if let subnet6 = new.ipv6Subnet {
                try tun.configureIPv6(address: subnet6.address, routes: [v6.network], using: routeSocket)
            }
            if let subnet6 = old.ipv6Subnet { try tun.removeIPv6(address: subnet6.address, using: routeSocket) }
        }
        guard let newSubnet = new.ipv4Subnet, let oldSubnet = old.ipv4Subnet else { return }
        try tun.configure(
            address: newSubnet.address,
            prefixLength: 32,
            mtu: mtu,
            routes: [config.network],
            using: routeSocket
        )
        // The old subnet's address must not stay: it would answer for a
        // subnet that is now another host's.
        try routeSocket.deleteAddress(
            index: routeSocket.linkIndex(named: tun.name),
            address: oldSubnet.address,
            prefixLength: 32
        )
    }

    public func unusableReason(_ lease: Lease) -> String? { nil }

    public func apply(_ changes: [PeerChange]) {
        var log = PeerLog(for: logger)
        defer { log.flush(to: logger) }
        for change in changes {
            switch change {
            case .added(let lease), .updated(_, let lease):
                if case .updated(let old, _) = change, let gone = old.ipv6Subnet, gone != lease.ipv6Subnet {
                    table6?.remove(gone)
                }
                let theirs = UnderlayAddresses(lease.attributes)
                let port = config.backend.port
                do {
                    var routes: [(subnet: String, route: NextHop)] = []
                    if let subnet = lease.ipv4Subnet {
                        if let route = underlays.route(ipv6Inner: false, to: theirs, port: port) {
                            try table.set(subnet, to: route)
                            routes.append(("\(subnet)", route))
                        } else {
                            table.remove(subnet)
                            logger.warning("\(underlays.unreachable(subnet, of: theirs))")
                        }
                    }
                    // Only a peer whose lease has an IPv6 subnet gets IPv6
                    // packets: a flannel udp host (IPv4 only) never does.
                    if let table6, let subnet6 = lease.ipv6Subnet {
                        if let route = underlays.route(ipv6Inner: true, to: theirs, port: port) {
                            try table6.set(subnet6, to: route)
                            routes.append(("\(subnet6)", route))
                        } else {
                            table6.remove(subnet6)
                            logger.warning("\(underlays.unreachable(subnet6, of: theirs))")
                        }
                    }
                    // "peer A and B → peer X" when both take one underlay.
                    if routes.count == 2 && routes[0].route == routes[1].route {
                        log.note("peer \(routes[0].subnet) and \(routes[1].subnet) → \(routes[0].route)")
                    } else if !routes.isEmpty {
                        log.note("peer " + routes.map { "\($0.subnet) → \($0.route)" }.joined(separator: ", "))
                    }
                } catch {
                    logger.warning("\(error)")
                }
            case .removed(let lease):
                if let subnet = lease.ipv4Subnet { table.remove(subnet) }
                if let subnet6 = lease.ipv6Subnet { table6?.remove(subnet6) }
            }
        }
    }

    /// Peers in the table (the local subnet is no peer); an IPv6-only
    /// network has its peers in the IPv6 side only.
    var peerCount: Int {
        config.isIPv6Only
            ? (table6?.allNextHops.values.count { $0 != .local } ?? 0)
            : table.allNextHops.values.count { $0 != .local }
    }

    /// Runs the packet loops, one thread each, until cancelled (or until one
    /// fails: a vanished TUN device ends it with an error).
    public func run() async throws {
        guard let path = dataPath.withLock({ $0 }) else {
            throw BackendError("the udp backend was not activated before run()")
        }
        let workers = path.start()
        logger.info(
            "\(path.loops.count) data-path worker(s) on udp port \(config.backend.port), \(peerCount) peer(s)"
        )
        try await withTaskCancellationHandler {
            try await withThrowingTaskGroup(of: Void.self) { group in
                for worker in workers { group.addTask { try await worker.wait() } }
                group.addTask { [logger] in
                    // A periodic look at the data path's counters.
                    while !Task.isCancelled {
                        try? await Task.sleep(for: .seconds(60))
                        logger.debug("data path: \(Statistics.summary(of: path.statistics))")
                    }
                }
                defer { group.cancelAll() }
                try await group.next()
            }
        } onCancel: {
            for worker in workers { worker.stop() }
        }
        logger.info("data path stopped; counters: \(Statistics.summary(of: path.statistics))")
    }

    /// Read at scrape time from what the workers published (at most one
    /// batch old); the workers never wait for it.
    public func report() -> BackendReport {
        let path = dataPath.withLock { $0 }
        let counters = Statistics.totals(of: path?.statistics ?? []).map {
            (name: $0.counter.description, value: $0.value)
        }
        return BackendReport(
            type,
            device: options.device,
            summary: path?.summary ?? "udp data path not started",
            workers: path?.loops.count ?? 0,
            offloads: path?.offloadNames ?? [],
            datapathTier: path?.tier.rawValue,
            datapathNote: path?.tierNote,
            // An IPv6-only network's entries are all on the IPv6 side.
            tableEntries: config.isIPv6Only ? (table6?.allNextHops.count ?? 0) : table.count,
            tableGeneration: table.generation,
            counters: counters
        )
    }

    /// The TUN device (and its route) goes with the process in any case:
    /// packets cannot flow without the daemon.
    public func cleanUp(releasing: Bool) {
        guard
            let path = dataPath.withLock({ current -> UDPDataPath? in
                defer { current = nil }
                return current
            })
        else { return }
        for loop in path.loops { loop.stop() }
        do { try path.tun.removeRoutes(using: routeSocket) } catch {
            logger.warning("could not remove route \(config.networksDescription) dev \(path.tun.name): \(error)")
        }
        path.tun.close()
        path.closeSockets()
        logger.info("removed device \(path.tun.name) and route \(config.networksDescription)")
    }
}

extension UDPBackend {
    /// This host's underlay addresses, against which each peer's are held.
    var underlays: UnderlayAddresses { UnderlayAddresses(ipv4: publicIP, ipv6: publicIPv6) }
}

/// A host's underlay addresses as its lease states them: PublicIP (0.0.0.0,
/// as flanneld writes it for a host without one: none) and PublicIPv6.
///
/// Which underlay the udp backend uses towards a peer follows from both
/// hosts' leases alone, so both ends choose the same (a datagram is
/// accepted only from the address the receiver would send to):
/// - IPv4 packets over the IPv4 underlay, as flannel does, when both hosts
///   have a PublicIP; else over the IPv6 underlay when both have a
///   PublicIPv6;
/// - IPv6 packets over the IPv6 underlay when both hosts have a PublicIPv6;
///   else over the IPv4 underlay when both have a PublicIP;
/// - neither: the subnet is unreachable, said in one line.
/// A flannel udp peer (no PublicIPv6, IPv4 only) is always reached over IPv4
/// with flannel's format.
public struct UnderlayAddresses: Sendable, Equatable {
    public var ipv4: IPv4Address?
    public var ipv6: IPv6Address?

    public init(ipv4: IPv4Address?, ipv6: IPv6Address?) {
        self.ipv4 = ipv4?.value == 0 ? nil : ipv4
        self.ipv6 = ipv6?.isUnspecified == true ? nil : ipv6
    }

    public init(_ attributes: LeaseAttributes) {
        self.init(ipv4: attributes.publicIP, ipv6: attributes.publicIPv6)
    }

    /// Where packets of one inner family go to reach `peer` from this host;
    /// nil when the two share no underlay.
    public func route(ipv6Inner: Bool, to peer: UnderlayAddresses, port: UInt16) -> NextHop? {
        let over4 = ipv4 != nil ? peer.ipv4.map { NextHop.peer(UDPEndpoint(address: $0, port: port)) } : nil
        let over6 = ipv6 != nil ? peer.ipv6.map { NextHop.peer6(UDPEndpoint6(address: $0, port: port)) } : nil
        return ipv6Inner ? over6 ?? over4 : over4 ?? over6
    }

    /// Why `subnet` of `peer` cannot be reached, and what to do.
    public func unreachable(_ subnet: some CustomStringConvertible, of peer: UnderlayAddresses) -> String {
        func text(_ a: UnderlayAddresses) -> String {
            [a.ipv4.map { "PublicIP \($0)" }, a.ipv6.map { "PublicIPv6 \($0)" }].compactMap { $0 }
                .joined(separator: ", ")
        }
        let theirs = text(peer).isEmpty ? "no underlay address" : text(peer)
        let ours = text(self).isEmpty ? "no underlay address" : text(self)
        return "peer subnet \(subnet) is unreachable over udp: the peer has \(theirs) and this host \(ours), "
            + "no underlay in common; give this host "
            + (peer.ipv6 != nil && ipv6 == nil ? "an IPv6 address (-public-ipv6)" : "an IPv4 address (-public-ip)")
            + " the peer can reach, or that host an address of this host's family"
    }
}

public struct BackendError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}
