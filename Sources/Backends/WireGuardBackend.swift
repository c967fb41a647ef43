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
///
/// With IPv6 (dual stack or IPv6-only), as flanneld lays it out by `Mode`:
/// `separate` (the default) adds a second device, flannel-wg-v6, on
/// `ListenPortV6` with the same key, whose peers are the leases' IPv6
/// subnets at [PublicIPv6]:ListenPortV6 (keys from BackendV6Data); `auto`,
/// `ipv4` and `ipv6` put both families on flannel-wg, one peer per lease
/// with both subnets, reached over the IPv4 underlay (`ipv4`), the IPv6 one
/// (`ipv6`) or whichever flanneld's rule picks (`auto`).
public final class WireGuardBackend: Backend, HostBackend {
    public static let deviceName = "flannel-wg"
    public static let deviceNameV6 = "flannel-wg-v6"

    /// One WireGuard device: its engine, what it carries and where it listens.
    final class Tunnel: Sendable {
        let device: String
        let engine: WireGuardEngine
        /// The families of the packets inside (the lease's subnet of each
        /// gets an address on the device, the network a route).
        let carriesIPv4: Bool
        let carriesIPv6: Bool
        let port: UInt16
        /// The underlays it has a socket on (one socket per family).
        let listensIPv4: Bool
        let listensIPv6: Bool
        let dataPath = Mutex<WireGuardDataPath?>(nil)

        init(
            device: String,
            engine: WireGuardEngine,
            carries: (ipv4: Bool, ipv6: Bool),
            port: UInt16,
            listens: (ipv4: Bool, ipv6: Bool)
        ) {
            self.device = device
            self.engine = engine
            (carriesIPv4, carriesIPv6) = carries
            self.port = port
            (listensIPv4, listensIPv6) = listens
        }

        var path: WireGuardDataPath? { dataPath.withLock { $0 } }

        /// "udp port 51820", "udp port 51820 (IPv4 and IPv6)".
        var listening: String {
            "udp port \(port)" + (listensIPv4 && listensIPv6 ? " (IPv4 and IPv6)" : listensIPv6 ? " (IPv6)" : "")
        }
    }

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
    /// flannel-wg, flannel-wg-v6 or both (mode separate in a dual-stack network).
    let tunnels: [Tunnel]
    private let publicKey: PublicKey

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
        let settings = host.config.backend.wireguard ?? WireGuardConfig()
        self.settings = settings
        self.keyFile = keyFile
        mtu = settings.deviceMTU(interfaceMTU: host.underlay.mtu)
        guard mtu >= 68 else {
            throw BackendError(
                "the wireguard device's MTU would be \(mtu) (interface \(host.underlay.name) MTU \(host.underlay.mtu) "
                    + "less \(WireGuardConfig.overhead)): set Backend.MTU to the path MTU between hosts"
            )
        }
        let config = host.config
        let ipv6 = config.ipv6
        // Tunnels over the IPv6 underlay need an address there for the peers.
        let needsIPv6Underlay =
            settings.mode == .ipv6 || (settings.mode == .separate && ipv6 != nil)
        if needsIPv6Underlay, host.publicIPv6 == nil {
            throw BackendError(
                ipv6 == nil
                    ? "Backend.Mode is ipv6 (tunnels over the IPv6 underlay), but the network config has no IPv6 "
                        + "(EnableIPv6, IPv6Network): enable IPv6 or use Mode separate, auto or ipv4"
                    : "the wireguard backend (Mode \(settings.mode.rawValue)) carries IPv6 over the IPv6 underlay, but "
                        + "this host has no public IPv6 address on \(host.underlay.name): give it one, or set -public-ipv6"
            )
        }
        let (key, created) = try WireGuardKeyFile.loadOrCreate(at: keyFile)
        var psk = PresharedKey.none
        if let text = settings.psk {
            do { psk = try PresharedKey(base64: text) } catch {
                throw BackendError("Backend.PSK: \(error)")
            }
        }
        let deviceMTU = mtu
        func engine(ipv4: Bool, ipv6 v6: Bool) -> WireGuardEngine {
            WireGuardEngine(
                privateKey: key,
                presharedKey: psk,
                persistentKeepalive: settings.persistentKeepaliveInterval,
                subnetLength: ipv4 ? config.subnetLen : nil,
                subnetLength6: v6 ? ipv6?.subnetLen : nil,
                mtu: deviceMTU
            )
        }
        var tunnels: [Tunnel] = []
        if settings.mode == .separate {
            // flanneld: flannel-wg for IPv4, flannel-wg-v6 for IPv6, both from the one key file.
            if config.enableIPv4 {
                tunnels.append(
                    Tunnel(
                        device: Self.deviceName,
                        engine: engine(ipv4: true, ipv6: false),
                        carries: (true, false),
                        port: settings.listenPort,
                        listens: (true, false)
                    )
                )
            }
            if ipv6 != nil {
                tunnels.append(
                    Tunnel(
                        device: Self.deviceNameV6,
                        engine: engine(ipv4: false, ipv6: true),
                        carries: (false, true),
                        port: settings.listenPortV6,
                        listens: (false, true)
                    )
                )
            }
        } else {
            let listens: (Bool, Bool) =
                switch settings.mode {
                case .ipv4: (true, false)
                case .ipv6: (false, true)
                default: (true, ipv6 != nil && host.publicIPv6 != nil)
                }
            tunnels.append(
                Tunnel(
                    device: Self.deviceName,
                    engine: engine(ipv4: config.enableIPv4, ipv6: ipv6 != nil),
                    carries: (config.enableIPv4, ipv6 != nil),
                    port: settings.listenPort,
                    listens: listens
                )
            )
        }
        self.tunnels = tunnels
        publicKey = key.publicKey
        host.logger.info(
            "WireGuard key \(created ? "created in" : "read from") \(keyFile); public key \(publicKey)"
        )
        if ipv6 != nil {
            let layout = tunnels.map {
                let families = [$0.carriesIPv4 ? "IPv4" : nil, $0.carriesIPv6 ? "IPv6" : nil].compactMap { $0 }
                return "\($0.device) carries \(families.joined(separator: " and ")) on \($0.listening)"
            }
            host.logger.info("WireGuard Mode \(settings.mode.rawValue): \(layout.joined(separator: "; "))")
        }
        if WireGuardClock.rate != 1 {
            host.logger.warning(
                "TUNNELD_TEST_WIREGUARD_CLOCK_RATE=\(WireGuardClock.rate): WireGuard's timers run \(WireGuardClock.rate) times as fast (a test hook; unset it)"
            )
        }
    }

    /// The device names, for leftovers and status.
    public var deviceNames: [String] { tunnels.map(\.device) }

    /// flanneld's lease: the one public key in BackendData (IPv4 enabled)
    /// and in BackendV6Data (IPv6 enabled), whichever devices there are.
    public func leaseAttributes() throws -> LeaseAttributes {
        var attributes = LeaseAttributes(
            publicIP: publicIP,
            backendType: type.rawValue,
            backendData: .object(["PublicKey": .string(publicKey.base64)])
        )
        if config.ipv6 != nil {
            attributes.publicIPv6 = publicIPv6
            attributes.backendV6Data = attributes.backendData
        }
        if !config.enableIPv4 { attributes.backendData = nil }
        return attributes
    }

    public func activate(lease: Lease) throws {
        var made: [(Tunnel, WireGuardDataPath)] = []
        do {
            for tunnel in tunnels { made.append((tunnel, try open(tunnel, lease: lease))) }
        } catch {
            for (_, path) in made { close(path) }
            throw error
        }
        for (tunnel, path) in made { tunnel.dataPath.withLock { $0 = path } }
    }

    /// Makes `tunnel`'s TUN and sockets and gives the device flanneld's
    /// addresses and routes.
    private func open(_ tunnel: Tunnel, lease: Lease) throws -> WireGuardDataPath {
        let device = tunnel.device
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
            // TSO6 where the device carries IPv6: IPv6 TCP super-packets are cut as IPv4 ones are.
            tunOffloads = tun.enableOffloads(ipv6: tunnel.carriesIPv6)
        } else {
            tun = try TunDevice.create(name: device)
        }
        var sockets: [UDPSocket] = []
        do {
            if tunnel.listensIPv4 { sockets.append(try UDPSocket(port: tunnel.port)) }
            if tunnel.listensIPv6 { sockets.append(try UDPSocket(port: tunnel.port, family: .ipv6Only)) }
            if tunnel.carriesIPv4, let subnet = lease.ipv4Subnet {
                try tun.configure(
                    address: subnet.address,
                    prefixLength: 32,
                    mtu: mtu,
                    routes: [config.network],
                    using: routeSocket
                )
            } else {
                try tun.bringUp(mtu: mtu, using: routeSocket)
            }
            // flanneld's ConfigureV6: the IPv6 subnet's address /128, a route for the IPv6 network.
            if tunnel.carriesIPv6, let v6 = config.ipv6, let subnet6 = lease.ipv6Subnet {
                try tun.configureIPv6(address: subnet6.address, routes: [v6.network], using: routeSocket)
            }
        } catch {
            tun.close()
            for socket in sockets { socket.close() }
            throw error
        }
        let path = WireGuardDataPath(
            tun: tun,
            socket: sockets[0],
            socket6: sockets.count > 1 ? sockets[1] : nil,
            engine: tunnel.engine,
            mtu: mtu,
            tunOffloads: tunOffloads,
            workers: workers,
            busyPollMicroseconds: busyPollMicroseconds
        )
        var addresses: [String] = []
        var routes: [String] = []
        if tunnel.carriesIPv4, let subnet = lease.ipv4Subnet {
            addresses.append("\(subnet.address)/32")
            routes.append("\(config.network)")
        }
        if tunnel.carriesIPv6, let v6 = config.ipv6, let subnet6 = lease.ipv6Subnet {
            addresses.append("\(subnet6.address)/128")
            routes.append("\(v6.network)")
        }
        logger.info(
            "device \(device) up: \(addresses.joined(separator: " and ")) MTU \(mtu), route \(routes.joined(separator: " and ")) dev \(device), WireGuard on \(tunnel.listening)"
        )
        return path
    }

    private func close(_ path: WireGuardDataPath) {
        path.stop()
        do { try path.tun.removeRoutes(using: routeSocket) } catch {
            logger.warning("could not remove route \(config.network) dev \(path.tun.name): \(error)")
        }
        path.tun.close()
        path.closeSockets()
    }

    public func move(from old: Lease, to new: Lease) throws {
        for tunnel in tunnels {
            guard let tun = tunnel.path?.tun else { continue }
            if tunnel.carriesIPv4, let subnet = new.ipv4Subnet, old.ipv4Subnet != subnet {
                try tun.configure(
                    address: subnet.address,
                    prefixLength: 32,
                    mtu: mtu,
                    routes: [config.network],
                    using: routeSocket
                )
                if let gone = old.ipv4Subnet {
                    try routeSocket.deleteAddress(
                        index: routeSocket.linkIndex(named: tun.name),
                        address: gone.address,
                        prefixLength: 32
                    )
                }
            }
            if tunnel.carriesIPv6, let v6 = config.ipv6, old.ipv6Subnet != new.ipv6Subnet {
                if let subnet6 = new.ipv6Subnet {
                    try tun.configureIPv6(address: subnet6.address, routes: [v6.network], using: routeSocket)
                }
                if let gone = old.ipv6Subnet { try tun.removeIPv6(address: gone.address, using: routeSocket) }
            }
        }
    }

    /// The public key a lease gives for the IPv4 side (BackendData) or the
    /// IPv6 side (BackendV6Data).
    private static func publicKey(of lease: Lease, ipv6: Bool) -> PublicKey? {
        let data = ipv6 ? lease.attributes.backendV6Data : lease.attributes.backendData
        guard case .string(let text)? = data?.field("PublicKey") else { return nil }
        return try? PublicKey(base64: text)
    }

    /// Why `lease` gives no public key for its IPv4 side (BackendData) or
    /// its IPv6 side (BackendV6Data); nil when it gives one.
    static func keyProblem(of lease: Lease, ipv6: Bool) -> String? {
        let field = ipv6 ? "BackendV6Data" : "BackendData"
        let data = ipv6 ? lease.attributes.backendV6Data : lease.attributes.backendData
        guard case .string(let text)? = data?.field("PublicKey") else {
            return "its lease has no \(field).PublicKey (a wireguard lease carries {\"PublicKey\":\"…\"} there)"
        }
        if (try? PublicKey(base64: text)) == nil {
            return "its \(field).PublicKey is not a WireGuard public key (base64 of 32 bytes)"
        }
        return nil
    }

    /// Whether the peer's IPv6 side is what a tunnel uses: in an IPv6-only
    /// network, or where flanneld reads the key from BackendV6Data (mode
    /// separate's flannel-wg-v6; the other modes when the lease has IPv6).
    private func usesIPv6Side(of lease: Lease, for tunnel: Tunnel) -> Bool {
        if settings.mode == .separate { return !tunnel.carriesIPv4 }
        return config.ipv6 != nil && lease.ipv6Subnet != nil
    }

    /// Whether `lease` has a subnet `tunnel` carries.
    private func hasSubnet(_ lease: Lease, for tunnel: Tunnel) -> Bool {
        (tunnel.carriesIPv4 && lease.ipv4Subnet != nil) || (tunnel.carriesIPv6 && lease.ipv6Subnet != nil)
    }

    /// A lease is refused only when no device can use it. flanneld sets up
    /// each family on its own: in mode separate a lease whose IPv4 side
    /// (BackendData) is good gets its flannel-wg peer even when its IPv6
    /// side (BackendV6Data) is missing or bad, and the other way round;
    /// `apply` says which side is left out.
    public func unusableReason(_ lease: Lease) -> String? {
        var problems: [String] = []
        for tunnel in tunnels where hasSubnet(lease, for: tunnel) {
            guard let problem = Self.keyProblem(of: lease, ipv6: usesIPv6Side(of: lease, for: tunnel)) else {
                return nil
            }
            if !problems.contains(problem) { problems.append(problem) }
        }
        if problems.isEmpty { return nil }
        return problems.joined(separator: "; ") + "; rewrite it or restart that host"
    }

    /// A peer of `tunnel` for `lease`: its subnets, key and endpoint as
    /// flanneld's handleSubnetEvents picks them; nil when the lease has
    /// nothing for this tunnel (e.g. no IPv6 subnet for flannel-wg-v6).
    func peer(
        of lease: Lease,
        for tunnel: Tunnel
    ) -> (subnet: IPv4Network?, subnet6: IPv6Network?, key: PublicKey?, endpoint: Endpoint?)? {
        let subnet = tunnel.carriesIPv4 ? lease.ipv4Subnet : nil
        let subnet6 = tunnel.carriesIPv6 ? lease.ipv6Subnet : nil
        guard subnet != nil || subnet6 != nil else { return nil }
        let key = Self.publicKey(of: lease, ipv6: usesIPv6Side(of: lease, for: tunnel))
        let v4 = lease.attributes.publicIP
        let v6 = lease.attributes.publicIPv6
        let useIPv6: Bool
        switch settings.mode {
        case .separate: useIPv6 = !tunnel.carriesIPv4
        case .ipv4: useIPv6 = false
        case .ipv6: useIPv6 = true
        // Only an underlay this device listens on (no IPv6 socket without an IPv6 address here).
        case .auto:
            useIPv6 = tunnel.listensIPv6 && Self.autoPicksIPv6(peer: (v4, v6), host: (publicIP, publicIPv6))
        }
        let endpoint: Endpoint?
        if useIPv6 {
            endpoint = v6.map { a in Endpoint(ipv6: a.bytes.withUnsafeBytes { Bytes16(copying: $0) }, port: tunnel.port)
            }
        } else {
            endpoint = v4.value == 0 ? nil : Endpoint(ipv4: v4.value, port: tunnel.port)
        }
        return (subnet, subnet6, key, endpoint)
    }

    /// flanneld's choice in mode auto: IPv4 when the peer has no IPv6, or
    /// its IPv4 is not private (RFC 1918) and this host has IPv4; IPv6 when
    /// the peer's and this host's IPv6 are not private (fc00::/7); IPv4
    /// otherwise. A peer without IPv4 (0.0.0.0, an IPv6-only host) gets IPv6,
    /// where flanneld would try 0.0.0.0.
    static func autoPicksIPv6(
        peer: (v4: IPv4Address, v6: IPv6Address?),
        host: (v4: IPv4Address, v6: IPv6Address?)
    ) -> Bool {
        guard let peerV6 = peer.v6 else { return false }
        if peer.v4.value == 0 { return true }
        func isPrivate(_ a: IPv4Address) -> Bool {
            a.value >> 24 == 10 || a.value >> 20 == 0xAC1 || a.value >> 16 == 0xC0A8
        }
        func isPrivate(_ a: IPv6Address) -> Bool { a.value >> 121 == 0x7E }
        if !isPrivate(peer.v4), host.v4.value != 0 { return false }
        if !isPrivate(peerV6), let mine = host.v6, !isPrivate(mine) { return true }
        return false
    }

    public func apply(_ changes: [PeerChange]) {
        var log = PeerLog(for: logger)
        defer { log.flush(to: logger) }
        for change in changes {
            for tunnel in tunnels {
                let engine = tunnel.engine
                switch change {
                case .added(let lease), .updated(_, let lease):
                    if case .updated(let old, _) = change,
                        old.ipv4Subnet != lease.ipv4Subnet || old.ipv6Subnet != lease.ipv6Subnet
                    {
                        engine.removePeer(subnet: old.ipv4Subnet, subnet6: old.ipv6Subnet)
                    }
                    guard let peer = peer(of: lease, for: tunnel) else { continue }
                    let subnets = [peer.subnet?.description, peer.subnet6?.description].compactMap { $0 }
                        .joined(separator: " and ")
                    // One side of a lease left out (mode separate): said once per
                    // lease change, and an earlier peer of that side goes.
                    func leaveOut(_ problem: String) {
                        engine.removePeer(subnet: peer.subnet, subnet6: peer.subnet6)
                        let other =
                            tunnels.count > 1
                            ? " (its \(tunnel.carriesIPv4 ? "IPv6" : "IPv4") side is set up on its own, as flanneld does)"
                            : ""
                        logger.warning(
                            "peer \(lease.primarySubnet) (\(lease.attributes.publicIP)): \(problem); no peer for \(subnets) on \(tunnel.device)\(other); rewrite the lease or restart that host"
                        )
                    }
                    guard let key = peer.key else {
                        leaveOut(
                            Self.keyProblem(of: lease, ipv6: usesIPv6Side(of: lease, for: tunnel)) ?? "no public key"
                        )
                        continue
                    }
                    guard let endpoint = peer.endpoint else {
                        leaveOut(
                            "its lease has no public address for \(tunnel.device)'s underlay (\(tunnel.listensIPv4 ? "PublicIP" : "PublicIPv6"))"
                        )
                        continue
                    }
                    do {
                        try engine.setPeer(
                            subnet: peer.subnet,
                            subnet6: peer.subnet6,
                            publicKey: key,
                            endpoint: endpoint
                        )
                        let on = tunnels.count > 1 ? " on \(tunnel.device)" : ""
                        // A lease under a plain key in a dual-stack network: a host
                        // without IPv6 (e.g. a flanneld started before EnableIPv6).
                        let ipv4Only =
                            tunnel.carriesIPv4 && config.ipv6 != nil && lease.ipv6Subnet == nil
                            ? "; its lease (\(lease.key)) has no IPv6 subnet: IPv4 only, IPv6 to it is not tunnelled"
                            : ""
                        log.note("peer \(subnets) → \(endpoint), key \(key)\(on)\(ipv4Only)")
                    } catch {
                        logger.warning("peer \(subnets): \(error)")
                    }
                case .removed(let lease):
                    engine.removePeer(subnet: lease.ipv4Subnet, subnet6: lease.ipv6Subnet)
                    if tunnel === tunnels[0] { log.note("peer \(lease.primarySubnet) removed; its sessions ended") }
                }
            }
        }
    }

    public func run() async throws {
        let paths = tunnels.compactMap(\.path)
        guard paths.count == tunnels.count else {
            throw BackendError("the wireguard backend was not activated before run()")
        }
        var threads: [AsyncThrowingStream<Void, any Error>] = []
        for (tunnel, path) in zip(tunnels, paths) {
            threads += path.start()
            logger.info(
                "WireGuard data path running on \(tunnel.listening) for \(tunnel.device), \(tunnel.engine.peerCount) peer(s), \(workers) crypto worker(s) each way, UDP_SEGMENT sends \(path.usesSegmentation ? "on" : "off (the kernel has none)"), UDP_GRO receives \(path.receiveCoalescing ? "on" : "off (the kernel has none)"), \(CipherContext.fastestPathDescription)"
            )
        }
        let stopAll: @Sendable () -> Void = { for path in paths { path.stop() } }
        try await withTaskCancellationHandler {
            try await withThrowingTaskGroup(of: Void.self) { group in
                for thread in threads { group.addTask { for try await _ in thread {} } }
                defer {
                    stopAll()
                    group.cancelAll()
                }
                try await group.next()
            }
        } onCancel: {
            stopAll()
        }
        logger.info("WireGuard data path stopped; \(counterSummary())")
    }

    /// Counters summed over the devices.
    private func counterValues() -> [(counter: WireGuardCounter, value: UInt64)] {
        var sums = [UInt64](repeating: 0, count: WireGuardCounter.allCases.count)
        for tunnel in tunnels {
            for (counter, value) in tunnel.engine.counterValues() { sums[counter.rawValue] += value }
        }
        return WireGuardCounter.allCases.map { ($0, sums[$0.rawValue]) }
    }

    private func counterSummary() -> String {
        counterValues().filter { $0.value > 0 }.map { "\($0.counter)=\($0.value)" }.joined(separator: " ")
    }

    public func report() -> BackendReport {
        let counters = counterValues().map { (name: $0.counter.description, value: $0.value) }
        // Each device chose its own (flannel-wg-v6's socket is IPv6); `offloads` is what all of them have.
        let perDevice = tunnels.compactMap { tunnel in
            tunnel.path.map { DeviceOffloads(device: tunnel.device, offloads: $0.offloadNames) }
        }
        let common = perDevice.first.map { first in
            first.offloads.filter { offload in perDevice.allSatisfy { $0.offloads.contains(offload) } }
        }
        var report = BackendReport(
            type,
            device: deviceNames.joined(separator: ", "),
            summary: "userspace WireGuard on "
                + tunnels.map { tunnels.count > 1 ? "\($0.listening) (\($0.device))" : $0.listening }.joined(
                    separator: " and "
                ) + ", public key \(publicKey)",
            workers: workers,
            offloads: common ?? [],
            tableEntries: tunnels.reduce(0) { $0 + $1.engine.peerCount },
            counters: counters
        )
        if perDevice.count > 1 { report.status.deviceOffloads = perDevice }
        let now = WireGuardClock.now(), wallNow = Date()
        report.status.tunnels = tunnels.flatMap { $0.engine.tunnels(now: now, wallNow: wallNow) }
        return report
    }

    /// The devices go with the process (flanneld removes its devices on
    /// exit too); the key file stays, so the host keeps its public key.
    public func cleanUp(releasing: Bool) {
        for tunnel in tunnels {
            guard
                let path = tunnel.dataPath.withLock({ current -> WireGuardDataPath? in
                    defer { current = nil }
                    return current
                })
            else { continue }
            close(path)
            let route = tunnel.carriesIPv4 ? " and route \(config.network)" : ""
            logger.info("removed device \(path.tun.name)\(route)")
        }
    }

    /// Counters by name, summed over the devices, for tests.
    func counter(_ counter: WireGuardCounter) -> UInt64 {
        counterValues().first { $0.counter == counter }?.value ?? 0
    }
}
