import LeaseStore
import Logging
import NetBase
import Netlink
import PeerControl
import Synchronization

/// flannel's vxlan backend: the kernel's vxlan device `flannel.<VNI>` carries
/// the packets; tunneld only programs it. For each peer: a permanent ARP
/// entry (the peer subnet's base address is at the peer's VtepMAC), a
/// permanent FDB entry (that MAC is behind the peer's public IP) and a route
/// `<subnet> via <base> dev flannel.<VNI> onlink`. With DirectRouting, a
/// peer on our own underlay network gets a plain route via its public IP.
public final class VXLANBackend: Backend, HostBackend {
    public let type = BackendType.vxlan
    public let mtu: Int
    public let deviceName: String
    let host: HostContext
    let settings: VXLANSettings
    let checkInterval: Duration
    /// The device, once `leaseAttributes()` made (or found) it.
    private let device = Mutex<(index: Int32, mac: EthernetAddress)?>(nil)
    private let routes = Mutex<RouteKeeper?>(nil)
    /// What each peer got, so that an update or removal takes exactly that away.
    private let installed = Mutex<[IPv4Network: Entry]>([:])
    /// Peer changes and the start-up sweep of stale entries take turns, so
    /// that the sweep never removes the entry of a peer being added.
    private let programming = Mutex<Void>(())

    enum Entry: Equatable {
        case tunnel(mac: EthernetAddress, remote: IPv4Address)
        case direct
    }

    /// vxlan's outer Ethernet (14), IPv4 (20), UDP (8) and vxlan (8) headers.
    public static let overhead = 50

    public init(host: HostContext, checkInterval: Duration = .seconds(10)) throws {
        let (config, underlay, underlayAddress) = (host.config, host.underlay, host.underlayAddress)
        settings = VXLANSettings(
            vni: UInt32(config.backend.vni),
            port: config.backend.port,
            underlayIndex: underlay.index,
            localAddress: underlayAddress.address,
            learning: config.backend.learning,
            gbp: config.backend.gbp
        )
        deviceName = "flannel.\(config.backend.vni)"
        self.host = host
        self.checkInterval = checkInterval
        // flannel's Backend.MTU stands for the underlay's MTU; the device
        // (and subnet.env) get 50 less.
        mtu = (config.backend.mtu ?? underlay.mtu) - Self.overhead
        if let given = config.backend.mtu, given > underlay.mtu {
            host.logger.warning(
                "the config's Backend.MTU \(given) is above \(underlay.name)'s MTU \(underlay.mtu): vxlan packets of full size will be fragmented or dropped on the way; lower Backend.MTU or leave it out"
            )
        }
    }

    /// Makes (or reuses) the device: the lease must carry its MAC. A device
    /// of that name with the same settings is kept, MAC and all, so that a
    /// restart changes nothing the peers know; one with other settings is
    /// replaced.
    public func leaseAttributes() throws -> LeaseAttributes {
        var link = try? routeSocket.link(named: deviceName)
        if let existing = link {
            let current = try routeSocket.vxlanSettings(index: existing.index)
            if current != settings {
                logger.warning(
                    "\(deviceName) exists with \(current.map { "\($0)" } ?? "kind \(existing.kind ?? "unknown")"); replacing it with \(settings)"
                )
                try routeSocket.deleteLink(index: existing.index)
                link = nil
            } else {
                logger.info(
                    "reusing \(deviceName) (\(settings)), MAC \(existing.hardwareAddress.flatMap { EthernetAddress(bytes: $0) }.map(\.description) ?? "?")"
                )
            }
        }
        if link == nil {
            try routeSocket.createVXLAN(name: deviceName, settings: settings, mtu: mtu)
            link = try routeSocket.link(named: deviceName)
            logger.info("created \(deviceName) (\(settings)) on \(underlay.name)")
        }
        guard let link, let mac = link.hardwareAddress.flatMap({ EthernetAddress(bytes: $0) }) else {
            throw BackendError(
                "\(deviceName) has no MAC address; delete it (ip link del \(deviceName)) and start again"
            )
        }
        if link.mtu != mtu { try routeSocket.setMTU(index: link.index, mtu: mtu) }
        device.withLock { $0 = (link.index, mac) }
        let index = link.index, underlayIndex = underlay.index
        let network = config.network, subnetLen = config.subnetLen
        routes.withLock {
            $0 = RouteKeeper(routeSocket: routeSocket, logger: logger) { route in
                (route.outputIndex == index && network.contains(route.destination)
                    && route.destination.prefixLength == subnetLen)
                    || (route.outputIndex == underlayIndex
                        && isPeerRoute(route, network: network, subnetLen: subnetLen))
            }
        }
        return LeaseAttributes(
            publicIP: publicIP,
            backendType: type.rawValue,
            backendData: .object([
                "VNI": .number(Double(config.backend.vni)),
                "VtepMAC": .string(mac.description),
            ])
        )
    }

    private func current() throws -> (index: Int32, mac: EthernetAddress, routes: RouteKeeper) {
        guard let device = device.withLock({ $0 }), let routes = routes.withLock({ $0 }) else {
            throw BackendError("the vxlan backend was used before leaseAttributes() made its device")
        }
        return (device.index, device.mac, routes)
    }

    /// Address = lease base /32 (any other IPv4 address — an old subnet's —
    /// is removed), then up.
    public func activate(lease: Lease) throws {
        let (index, mac, _) = try current()
        try setAddress(lease.subnet.address, index: index)
        try routeSocket.setLinkUp(index: index)
        logger.info(
            "device \(deviceName) up: \(lease.subnet.address)/32 MTU \(mtu), VNI \(settings.vni), port \(settings.port), MAC \(mac)"
        )
    }

    private func setAddress(_ address: IPv4Address, index: Int32) throws {
        try routeSocket.addAddress(index: index, address: address, prefixLength: 32)
        for stale in try routeSocket.addresses() where stale.index == index && stale.address != address {
            try routeSocket.deleteAddress(index: index, address: stale.address, prefixLength: stale.prefixLength)
            logger.info("removed old address \(stale.address)/\(stale.prefixLength) from \(deviceName)")
        }
    }

    public func move(from old: Lease, to new: Lease) throws {
        try setAddress(new.subnet.address, index: current().index)
    }

    public func unusableReason(_ lease: Lease) -> String? {
        guard let data = lease.attributes.backendData else {
            return
                "its lease has no BackendData (a vxlan lease carries {\"VNI\":…,\"VtepMAC\":\"…\"}); rewrite it or restart that host"
        }
        guard let text = data.field("VtepMAC"), case .string(let macText) = text else {
            return "its BackendData \(data.compactText) has no VtepMAC; rewrite the lease or restart that host"
        }
        guard EthernetAddress(macText) != nil else {
            return "its VtepMAC \"\(macText)\" is not a MAC address (expected aa:bb:cc:dd:ee:ff)"
        }
        return nil
    }

    private static func mac(of lease: Lease) -> EthernetAddress? {
        guard case .string(let text)? = lease.attributes.backendData?.field("VtepMAC") else { return nil }
        return EthernetAddress(text)
    }

    /// Entries: peers programmed (ARP + FDB + route, or a direct route);
    /// generation: changes to the peer routes.
    public func report() -> BackendReport {
        let keeper: RouteKeeper? = routes.withLock { $0 }
        let tally = keeper?.tally ?? (routes: 0, changes: 0, restored: 0)
        let peers = installed.withLock { $0.count }
        return BackendReport(
            type,
            device: deviceName,
            summary: "kernel vxlan device \(deviceName), VNI \(settings.vni), port \(settings.port)"
                + (config.backend.directRouting ? ", direct routing" : ""),
            tableEntries: peers,
            tableGeneration: tally.changes,
            counters: [("routes_restored", tally.restored)]
        )
    }

    public func apply(_ changes: [PeerChange]) {
        guard let device = try? current() else {
            logger.error("vxlan backend: peer changes before the device exists; ignored")
            return
        }
        let (index, routes) = (device.index, device.routes)
        var log = PeerLog(for: logger)
        programming.withLock { _ in
            for change in changes { apply(change, index: index, routes: routes, log: &log) }
        }
        log.flush(to: logger)
    }

    private func apply(_ change: PeerChange, index: Int32, routes: RouteKeeper, log: inout PeerLog) {
        switch change {
        case .added(let lease):
            add(lease, index: index, routes: routes, log: &log)
        case .updated(let old, let new):
            remove(old, index: index, routes: routes, keepingRoute: true)
            add(new, index: index, routes: routes, log: &log)
        case .removed(let lease):
            remove(lease, index: index, routes: routes, keepingRoute: false)
        }
    }

    private func add(_ lease: Lease, index: Int32, routes: RouteKeeper, log: inout PeerLog) {
        let remote = lease.attributes.publicIP
        if config.backend.directRouting && underlayAddress.network.contains(remote) {
            let route = Route(destination: lease.subnet, outputIndex: underlay.index, gateway: remote)
            if routes.set(route, peer: "peer \(lease.subnet) (\(remote))") {
                installed.withLock { $0[lease.subnet] = .direct }
                log.note("peer \(lease.subnet) → via \(remote) dev \(self.underlay.name) (direct routing)")
            }
            return
        }
        guard let mac = Self.mac(of: lease) else { return }  // PeerSync lets no such lease through
        do {
            // ARP and FDB before the route: the first packet finds both.
            try routeSocket.setNeighbour(index: index, address: lease.subnet.address, hardwareAddress: mac)
            try routeSocket.setForwardingEntry(index: index, hardwareAddress: mac, remote: remote)
        } catch {
            logger.error("cannot program \(deviceName) for peer \(lease.subnet) (\(remote)): \(error)")
            return
        }
        installed.withLock { $0[lease.subnet] = .tunnel(mac: mac, remote: remote) }
        let route = Route(destination: lease.subnet, outputIndex: index, gateway: lease.subnet.address, onlink: true)
        if routes.set(route, peer: "peer \(lease.subnet) (\(remote))") {
            log.note("peer \(lease.subnet) → vtep \(mac) at \(remote) dev \(self.deviceName)")
        }
    }

    private func remove(_ lease: Lease, index: Int32, routes: RouteKeeper, keepingRoute: Bool) {
        let entry = installed.withLock { $0.removeValue(forKey: lease.subnet) }
        if !keepingRoute { routes.remove(lease.subnet) }
        guard case .tunnel(let mac, let remote)? = entry else { return }
        do {
            try routeSocket.deleteNeighbour(index: index, address: lease.subnet.address)
            try routeSocket.deleteForwardingEntry(index: index, hardwareAddress: mac, remote: remote)
        } catch {
            logger.warning("could not remove \(deviceName)'s entries for \(lease.subnet): \(error)")
        }
    }

    /// Removes what an earlier run left for peers that are gone (ARP and FDB
    /// entries, routes), then checks the routes every `checkInterval`.
    public func run() async throws {
        let (index, _, routes) = try current()
        programming.withLock { _ in removeStaleEntries(index: index) }
        await routes.keepChecking(every: checkInterval)
    }

    private func removeStaleEntries(index: Int32) {
        let wanted = installed.withLock { $0 }
        var addresses = Set<IPv4Address>(), macs = Set<EthernetAddress>()
        for (subnet, entry) in wanted {
            if case .tunnel(let mac, _) = entry { addresses.insert(subnet.address); macs.insert(mac) }
        }
        do {
            for neighbour in try routeSocket.neighbours(index: index) where neighbour.isPermanent {
                guard let address = neighbour.address, !addresses.contains(address) else { continue }
                try routeSocket.deleteNeighbour(index: index, address: address)
                logger.info("removed stale ARP entry \(address) on \(deviceName)")
            }
            for entry in try routeSocket.forwardingEntries(index: index) {
                guard let mac = entry.hardwareAddress, !macs.contains(mac) else { continue }
                try routeSocket.deleteForwardingEntry(index: index, hardwareAddress: mac, remote: entry.address)
                logger.info(
                    "removed stale FDB entry \(mac) dst \(entry.address.map(\.description) ?? "-") on \(deviceName)"
                )
            }
        } catch {
            logger.warning("could not clean \(deviceName)'s old entries: \(error)")
        }
    }

    /// The device (and with it its routes, ARP and FDB entries) stays across
    /// a restart so that traffic keeps flowing, as with flanneld; a host
    /// leaving the network removes it.
    public func cleanUp(releasing: Bool) {
        guard releasing, let device = try? current() else {
            logger.info("\(deviceName) and its peers' entries kept for a restart")
            return
        }
        let (index, routes) = (device.index, device.routes)
        routes.removeAll()
        do {
            try routeSocket.deleteLink(index: index)
            logger.info("removed device \(deviceName) with its routes, ARP and FDB entries")
        } catch {
            logger.warning("could not remove \(deviceName): \(error)")
        }
    }
}
