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
public final class UDPBackend: Backend {
    public struct Options: Sendable {
        public enum Loop: String, Sendable { case uring, simple }
        /// TUN device name (flannel's is flannel0).
        public var device: String
        public var loop: Loop
        public var queueDepth: Int
        public var acceptUnknownPeers: Bool

        public init(device: String = "flannel0", loop: Loop = .uring, queueDepth: Int = 64,
                    acceptUnknownPeers: Bool = false) {
            self.device = device
            self.loop = loop
            self.queueDepth = queueDepth
            self.acceptUnknownPeers = acceptUnknownPeers
        }
    }

    public let type = "udp"
    public let mtu: Int
    let config: NetworkConfig
    let publicIP: IPv4Address
    let options: Options
    let routeSocket: RouteSocket
    let logger: Logger
    let table: SubnetTable

    private struct DataPath {
        var socket: UDPSocket
        var tun: TunDevice
        var loop: any DataPathLoop
    }
    private let dataPath = Mutex<DataPath?>(nil)

    public init(config: NetworkConfig, underlay: Link, publicIP: IPv4Address, options: Options,
                routeSocket: RouteSocket, logger: Logger) throws {
        self.config = config
        self.publicIP = publicIP
        self.options = options
        self.routeSocket = routeSocket
        self.logger = logger
        mtu = underlay.mtu - NetBase.DataPath.udpEncapsulationOverhead
        table = try SubnetTable(network: config.network, subnetLength: config.subnetLen)
    }

    /// flannel's udp backend writes no BackendType and no BackendData.
    public func leaseAttributes() throws -> LeaseAttributes {
        LeaseAttributes(publicIP: publicIP)
    }

    public func activate(lease: Lease) throws {
        try table.set(lease.subnet, to: .local)
        let socket = try UDPSocket(port: config.backend.port)
        let tun = try TunDevice.create(name: options.device)
        try tun.configure(address: lease.subnet.address, prefixLength: 32, mtu: mtu,
                          routes: [config.network], using: routeSocket)
        logger.info("device \(options.device) up: \(lease.subnet.address)/32 MTU \(mtu), route \(config.network) dev \(options.device)")
        let forwarder = Forwarder(table: table, tunAddress: lease.subnet.address,
                                  acceptUnknownPeers: options.acceptUnknownPeers)
        let configuration = LoopConfiguration(depth: options.queueDepth, mtu: mtu)
        let loop: any DataPathLoop = switch options.loop {
        case .uring: try URingLoop(forwarder: forwarder, tunFD: tun.fd.rawValue,
                                   udpFD: socket.fd.rawValue, configuration: configuration)
        case .simple: try SyscallLoop(forwarder: forwarder, tunFD: tun.fd.rawValue,
                                      udpFD: socket.fd.rawValue, configuration: configuration)
        }
        dataPath.withLock { $0 = DataPath(socket: socket, tun: tun, loop: loop) }
    }

    public func move(from old: Lease, to new: Lease) throws {
        table.remove(old.subnet)
        try table.set(new.subnet, to: .local)
        guard let tun = dataPath.withLock({ $0?.tun }) else { return }
        try tun.configure(address: new.subnet.address, prefixLength: 32, mtu: mtu,
                          routes: [config.network], using: routeSocket)
        // The old subnet's address must not stay: it would answer for a
        // subnet that is now another host's.
        try routeSocket.deleteAddress(index: routeSocket.linkIndex(named: tun.name),
                                      address: old.subnet.address, prefixLength: 32)
    }

    public func unusableReason(_ lease: Lease) -> String? { nil }

    public func apply(_ changes: [PeerChange]) {
        for change in changes {
            switch change {
            case .added(let lease), .updated(_, let lease):
                let route = PacketRing.Route.peer(UDPEndpoint(address: lease.attributes.publicIP, port: config.backend.port))
                do {
                    try table.set(lease.subnet, to: route)
                    logger.info("peer \(lease.subnet) → \(route)")
                } catch {
                    logger.warning("\(error)")
                }
            case .removed(let lease):
                table.remove(lease.subnet)
            }
        }
    }

    /// Runs the packet loop on its own thread until cancelled (or until it
    /// fails: a vanished TUN device ends it with an error).
    public func run() async throws {
        guard let loop = dataPath.withLock({ $0?.loop }) else {
            throw BackendError("the udp backend was not activated before run()")
        }
        let worker = DataPathThread(loop: loop, name: "tunneld-dp")
        logger.info("\(options.loop.rawValue) data path on udp port \(config.backend.port), \(table.allRoutes.count - 1) peer(s)")
        try await withTaskCancellationHandler {
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await worker.wait() }
                group.addTask { [logger] in
                    // A periodic look at the data path's counters.
                    while !Task.isCancelled {
                        try? await Task.sleep(for: .seconds(60))
                        logger.debug("data path: \(loop.statistics.summary)")
                    }
                }
                defer { group.cancelAll() }
                try await group.next()
            }
        } onCancel: {
            worker.stop()
        }
        logger.info("data path stopped; counters: \(loop.statistics.summary)")
    }

    /// The TUN device (and its route) goes with the process in any case:
    /// packets cannot flow without the daemon.
    public func cleanUp(releasing: Bool) {
        guard let path = dataPath.withLock({ current -> DataPath? in
            defer { current = nil }
            return current
        }) else { return }
        path.loop.stop()
        do { try path.tun.removeRoutes(using: routeSocket) } catch {
            logger.warning("could not remove route \(config.network) dev \(path.tun.name): \(error)")
        }
        path.tun.close()
        path.socket.close()
        logger.info("removed device \(path.tun.name) and route \(config.network)")
    }
}

public struct BackendError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}
