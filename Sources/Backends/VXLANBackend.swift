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
///
/// In a dual-stack network a second device, `flannel-v6.<VNI>`, carries
/// IPv6 over the IPv6 underlay (local address the PublicIPv6), with its own
/// MAC in the lease's BackendV6Data and the same per-peer entries for each
/// peer's IPv6 subnet (flannel's layout).
public final class VXLANBackend: Backend, HostBackend {
    public let type = BackendType.vxlan
    /// What containers get (subnet.env's FLANNEL_MTU): the IPv4 device's
    /// MTU, or in a dual-stack network the IPv6 device's (20 bytes less), so
    /// that a full-size packet of either family fits its tunnel.
    public let mtu: Int
    /// The IPv4 device's MTU: the underlay's less vxlan's overhead.
    let deviceMTU: Int
    public let deviceName: String
    let host: HostContext
    let settings: VXLANSettings
    let checkInterval: Duration
    /// The device, once `leaseAttributes()` made (or found) it.
    private let device = Mutex<(index: Int32, mac: EthernetAddress)?>(nil)
    private let routes = Mutex<RouteKeeper<Route>?>(nil)
    /// What each peer got, so that an update or removal takes exactly that away.
    private let installed = Mutex<[IPv4Network: Entry]>([:])
    /// The IPv6 side, in a dual-stack network.
    let ipv6: IPv6Side?
    /// Peer changes and the start-up sweep of stale entries take turns, so
    /// that the sweep never removes the entry of a peer being added.
    private let programming = Mutex<Void>(())

    enum Entry: Equatable {
        case tunnel(mac: EthernetAddress, remote: IPv4Address)
        case direct
    }

    /// The device `flannel-v6.<VNI>` and what each peer's IPv6 subnet got.
    final class IPv6Side: Sendable {
        let deviceName: String
        let settings: VXLANSettings
        let mtu: Int
        let config: IPv6NetworkConfig
        let device = Mutex<(index: Int32, mac: EthernetAddress)?>(nil)
        let routes = Mutex<RouteKeeper<IPv6Route>?>(nil)
        let installed = Mutex<[IPv6Network: Entry6]>([:])

        init(deviceName: String, settings: VXLANSettings, mtu: Int, config: IPv6NetworkConfig) {
            self.deviceName = deviceName
            self.settings = settings
            self.mtu = mtu
            self.config = config
        }

        func current() throws -> (index: Int32, mac: EthernetAddress, routes: RouteKeeper<IPv6Route>) {
            guard let device = device.withLock({ $0 }), let routes = routes.withLock({ $0 }) else {
                throw BackendError("the vxlan backend was used before leaseAttributes() made \(deviceName)")
            }
            return (device.index, device.mac, routes)
        }
    }

    enum Entry6: Equatable {
        case tunnel(mac: EthernetAddress, remote: IPv6Address)
        case direct
    }

    /// vxlan's outer Ethernet (14), IPv4 (20), UDP (8) and vxlan (8) headers.
    public static let overhead = 50
    /// The same over an IPv6 underlay (a 40-byte IPv6 header). flanneld
    /// gives its IPv6 device the IPv4 figure (see docs/MIGRATING.md).
    public static let ipv6Overhead = 70

    /// The devices this backend keeps across a restart.
    public var deviceNames: [String] { [deviceName] + (ipv6.map { [$0.deviceName] } ?? []) }

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
        let base = config.backend.mtu ?? underlay.mtu
        deviceMTU = base - Self.overhead
        if let ipv6Config = config.ipv6 {
            guard let publicIPv6 = host.publicIPv6 else {
                throw BackendError(
                    "the network is dual-stack, but this host has no public IPv6 for flannel-v6.\(config.backend.vni)'s tunnel: give -public-ipv6 or an IPv6 address on \(underlay.name)"
                )
            }
            ipv6 = IPv6Side(
                deviceName: "flannel-v6.\(config.backend.vni)",
                settings: VXLANSettings(
                    vni: UInt32(config.backend.vni),
                    port: config.backend.port,
                    underlayIndex: underlay.index,
                    localAddress: nil,
                    localIPv6: publicIPv6,
                    learning: config.backend.learning,
                    gbp: config.backend.gbp
                ),
                mtu: base - Self.ipv6Overhead,
                config: ipv6Config
            )
            mtu = base - Self.ipv6Overhead
        } else {
            ipv6 = nil
            mtu = deviceMTU
        }
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
        let (link, mac) = try ensureDevice(named: deviceName, settings: settings, mtu: deviceMTU)
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
        var attributes = LeaseAttributes(
            publicIP: publicIP,
            backendType: type.rawValue,
            backendData: .object([
                "VNI": .number(Double(config.backend.vni)),
                "VtepMAC": .string(mac.description),
            ])
        )
        if let ipv6 {
            let (link6, mac6) = try ensureDevice(named: ipv6.deviceName, settings: ipv6.settings, mtu: ipv6.mtu)
            ipv6.device.withLock { $0 = (link6.index, mac6) }
            let index6 = link6.index, v6 = ipv6.config
            ipv6.routes.withLock {
                $0 = RouteKeeper(routeSocket: routeSocket, logger: logger) { route in
                    (route.outputIndex == index6 && v6.network.contains(route.destination)
                        && route.destination.prefixLength == v6.subnetLen)
                        || (route.outputIndex == underlayIndex
                            && isPeerRoute(route, network: v6.network, subnetLen: v6.subnetLen))
                }
            }
            // flanneld's BackendV6Data has BackendData's shape, with the IPv6 device's MAC.
            attributes.publicIPv6 = publicIPv6
            attributes.backendV6Data = .object([
                "VNI": .number(Double(config.backend.vni)),
                "VtepMAC": .string(mac6.description),
            ])
        }
        return attributes
    }

    private func ensureDevice(
        named deviceName: String,
        settings: VXLANSettings,
        mtu: Int
    ) throws -> (Link, EthernetAddress) {
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
        return (link, mac)
    }

    private func current() throws -> (index: Int32, mac: EthernetAddress, routes: RouteKeeper<Route>) {
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
            "device \(deviceName) up: \(lease.subnet.address)/32 MTU \(deviceMTU), VNI \(settings.vni), port \(settings.port), MAC \(mac)"
        )
        if let ipv6 {
            let (index6, mac6, _) = try ipv6.current()
            let address = try ipv6Address(of: lease)
            try setAddress(address, on: ipv6, index: index6)
            try routeSocket.setLinkUp(index: index6)
            logger.info(
                "device \(ipv6.deviceName) up: \(address)/128 MTU \(ipv6.mtu), VNI \(settings.vni), port \(settings.port), local \(publicIPv6.map(\.description) ?? "-"), MAC \(mac6)"
            )
        }
    }

    /// flanneld's address for flannel-v6.<VNI>: the IPv6 subnet's base address, /128.
    private func ipv6Address(of lease: Lease) throws -> IPv6Address {
        guard let subnet = lease.ipv6Subnet else {
            throw BackendError(
                "the network is dual-stack, but this host's lease \(lease.key) has no IPv6 subnet; remove the lease (it is renewed with one) or restart"
            )
        }
        return subnet.address
    }

    private func setAddress(_ address: IPv6Address, on side: IPv6Side, index: Int32) throws {
        try routeSocket.addAddress(index: index, ipv6: address, prefixLength: 128)
        for stale in try routeSocket.ipv6Addresses()
        where stale.index == index && stale.address != address && !stale.address.isLinkLocalUnicast {
            try routeSocket.deleteAddress(index: index, ipv6: stale.address, prefixLength: stale.prefixLength)
            logger.info("removed old address \(stale.address)/\(stale.prefixLength) from \(side.deviceName)")
        }
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
        if let ipv6 { try setAddress(ipv6Address(of: new), on: ipv6, index: ipv6.current().index) }
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

    /// The IPv6 device's MAC from BackendV6Data, or why there is none.
    private static func ipv6MAC(of lease: Lease) -> Result<EthernetAddress, BackendError> {
        guard let data = lease.attributes.backendV6Data else {
            return .failure(
                BackendError(
                    "its lease has no BackendV6Data (a dual-stack vxlan lease carries {\"VNI\":…,\"VtepMAC\":\"…\"} there)"
                )
            )
        }
        guard case .string(let text)? = data.field("VtepMAC"), let mac = EthernetAddress(text) else {
            return .failure(BackendError("its BackendV6Data \(data.compactText) has no usable VtepMAC"))
        }
        return .success(mac)
    }

    /// Entries: peers programmed (ARP + FDB + route, or a direct route);
    /// generation: changes to the peer routes.
    public func report() -> BackendReport {
        let keeper: RouteKeeper<Route>? = routes.withLock { $0 }
        let keeper6: RouteKeeper<IPv6Route>? = ipv6?.routes.withLock { $0 }
        let tally = keeper?.tally ?? (routes: 0, changes: 0, restored: 0)
        let tally6 = keeper6?.tally ?? (routes: 0, changes: 0, restored: 0)
        let peers = installed.withLock { $0.count } + (ipv6?.installed.withLock { $0.count } ?? 0)
        return BackendReport(
            type,
            device: deviceName,
            summary: "kernel vxlan device \(deviceName), VNI \(settings.vni), port \(settings.port)"
                + (ipv6.map { ", IPv6 on \($0.deviceName)" } ?? "")
                + (config.backend.directRouting ? ", direct routing" : ""),
            tableEntries: peers,
            tableGeneration: tally.changes &+ tally6.changes,
            counters: [("routes_restored", tally.restored &+ tally6.restored)]
        )
    }

    public func apply(_ changes: [PeerChange]) {
        guard let device = try? current() else {
            logger.error("vxlan backend: peer changes before the device exists; ignored")
            return
        }
        let (index, routes) = (device.index, device.routes)
        var log = PeerLog(for: logger)
        let side6 = ipv6.flatMap { side in (try? side.current()).map { (side, $0.index, $0.routes) } }
        programming.withLock { _ in
            for change in changes {
                apply(change, index: index, routes: routes, log: &log)
                if let (side, index6, routes6) = side6 {
                    apply6(change, side: side, index: index6, routes: routes6, log: &log)
                }
            }
        }
        log.flush(to: logger)
    }

    private func apply6(
        _ change: PeerChange,
        side: IPv6Side,
        index: Int32,
        routes: RouteKeeper<IPv6Route>,
        log: inout PeerLog
    ) {
        switch change {
        case .added(let lease):
            add6(lease, side: side, index: index, routes: routes, log: &log)
        case .updated(let old, let new):
            remove6(old, side: side, index: index, routes: routes, keepingRoute: old.ipv6Subnet == new.ipv6Subnet)
            add6(new, side: side, index: index, routes: routes, log: &log)
        case .removed(let lease):
            remove6(lease, side: side, index: index, routes: routes, keepingRoute: false)
        }
    }

    /// A peer with an IPv6 subnet gets (as flanneld does) a neighbour entry
    /// for its subnet's base address at its IPv6 VtepMAC, an FDB entry for
    /// that MAC at its PublicIPv6, and `<subnet> via <base> dev flannel-v6.N
    /// onlink`; with DirectRouting and its PublicIPv6 on our link, a plain
    /// route via that address. A peer without an IPv6 subnet gets nothing here.
    private func add6(
        _ lease: Lease,
        side: IPv6Side,
        index: Int32,
        routes: RouteKeeper<IPv6Route>,
        log: inout PeerLog
    ) {
        guard let subnet = lease.ipv6Subnet else { return }
        func skip(_ why: String) {
            routes.remove(subnet)
            logger.error(
                "peer \(lease.subnet) (IPv6 \(subnet)): \(why); no IPv6 route to it, its IPv4 side is unchanged"
            )
        }
        guard let remote = lease.attributes.publicIPv6 else {
            return skip(
                "its lease has no PublicIPv6 to send the tunnel's packets to; restart that host with an IPv6 address on its interface or -public-ipv6"
            )
        }
        if config.backend.directRouting && host.isOnLink(remote) {
            let route = IPv6Route(destination: subnet, outputIndex: underlay.index, gateway: remote)
            if routes.set(route, peer: "peer \(subnet) (\(remote))") {
                side.installed.withLock { $0[subnet] = .direct }
                log.note("peer \(subnet) → via \(remote) dev \(self.underlay.name) (direct routing)")
            }
            return
        }
        let mac: EthernetAddress
        switch Self.ipv6MAC(of: lease) {
        case .success(let found): mac = found
        case .failure(let error): return skip("\(error)")
        }
        do {
            try routeSocket.setNeighbour(index: index, ipv6: subnet.address, hardwareAddress: mac)
            try routeSocket.setForwardingEntry(index: index, hardwareAddress: mac, remote: remote)
        } catch {
            logger.error("cannot program \(side.deviceName) for peer \(subnet) (\(remote)): \(error)")
            routes.remove(subnet)
            return
        }
        side.installed.withLock { $0[subnet] = .tunnel(mac: mac, remote: remote) }
        let route = IPv6Route(destination: subnet, outputIndex: index, gateway: subnet.address, onlink: true)
        if routes.set(route, peer: "peer \(subnet) (\(remote))") {
            log.note("peer \(subnet) → vtep \(mac) at \(remote) dev \(side.deviceName)")
        }
    }

    private func remove6(
        _ lease: Lease,
        side: IPv6Side,
        index: Int32,
        routes: RouteKeeper<IPv6Route>,
        keepingRoute: Bool
    ) {
        guard let subnet = lease.ipv6Subnet else { return }
        let entry = side.installed.withLock { $0.removeValue(forKey: subnet) }
        if !keepingRoute { routes.remove(subnet) }
        guard case .tunnel(let mac, let remote)? = entry else { return }
        do {
            try routeSocket.deleteNeighbour(index: index, ipv6: subnet.address)
            try routeSocket.deleteForwardingEntry(index: index, hardwareAddress: mac, remote: remote)
        } catch {
            logger.warning("could not remove \(side.deviceName)'s entries for \(subnet): \(error)")
        }
    }

    private func apply(_ change: PeerChange, index: Int32, routes: RouteKeeper<Route>, log: inout PeerLog) {
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

    private func add(_ lease: Lease, index: Int32, routes: RouteKeeper<Route>, log: inout PeerLog) {
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

    private func remove(_ lease: Lease, index: Int32, routes: RouteKeeper<Route>, keepingRoute: Bool) {
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
        let side6 = try ipv6.map { side in (side, try side.current()) }
        programming.withLock { _ in
            removeStaleEntries(index: index)
            if let (side, device) = side6 { removeStaleEntries(side, index: device.index) }
        }
        async let v4: Void = routes.keepChecking(every: checkInterval)
        if let (_, device) = side6 { await device.routes.keepChecking(every: checkInterval) }
        await v4
    }

    private func removeStaleEntries(_ side: IPv6Side, index: Int32) {
        let wanted = side.installed.withLock { $0 }
        var addresses = Set<IPv6Address>(), macs = Set<EthernetAddress>()
        for (subnet, entry) in wanted {
            if case .tunnel(let mac, _) = entry { addresses.insert(subnet.address); macs.insert(mac) }
        }
        do {
            for neighbour in try routeSocket.ipv6Neighbours(index: index) where neighbour.isPermanent {
                guard let address = neighbour.ipv6Address, !addresses.contains(address) else { continue }
                try routeSocket.deleteNeighbour(index: index, ipv6: address)
                logger.info("removed stale neighbour entry \(address) on \(side.deviceName)")
            }
            for entry in try routeSocket.forwardingEntries(index: index) {
                guard let mac = entry.hardwareAddress, !macs.contains(mac) else { continue }
                if let remote = entry.ipv6Address {
                    try routeSocket.deleteForwardingEntry(index: index, hardwareAddress: mac, remote: remote)
                } else {
                    try routeSocket.deleteForwardingEntry(index: index, hardwareAddress: mac, remote: entry.address)
                }
                logger.info("removed stale FDB entry \(mac) dst \(entry) on \(side.deviceName)")
            }
        } catch {
            logger.warning("could not clean \(side.deviceName)'s old entries: \(error)")
        }
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
        guard let ipv6, let device6 = try? ipv6.current() else { return }
        device6.routes.removeAll()
        do {
            try routeSocket.deleteLink(index: device6.index)
            logger.info("removed device \(ipv6.deviceName) with its routes, neighbour and FDB entries")
        } catch {
            logger.warning("could not remove \(ipv6.deviceName): \(error)")
        }
    }
}
