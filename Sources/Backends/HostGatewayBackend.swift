import LeaseStore
import Logging
import NetBase
import Netlink
import PeerControl

/// flannel's host-gw backend: no tunnel at all. Each peer's subnet is routed
/// to the peer's public IP over the underlay (`<subnet> via <PublicIP> dev
/// eth0`), so every host must be on one layer-2 segment with the others.
/// In a dual-stack network each peer's IPv6 subnet is routed the same way to
/// its PublicIPv6 (`<v6 subnet> via <PublicIPv6> dev eth0`).
public final class HostGatewayBackend: Backend, HostBackend {
    public let type = BackendType.hostGW
    public let mtu: Int
    let host: HostContext
    let routes: RouteKeeper<Route>
    /// The IPv6 routes, in a dual-stack network.
    let ipv6Routes: RouteKeeper<IPv6Route>?
    /// How often routes are checked and restored (flanneld: every 10 s).
    let checkInterval: Duration

    public init(host: HostContext, checkInterval: Duration = .seconds(10)) throws {
        let (underlay, underlayAddress, publicIP) = (host.underlay, host.underlayAddress, host.publicIP)
        guard publicIP == underlayAddress.address else {
            // The peers route to our PublicIP as a next hop on their link; an
            // address behind NAT is no next hop.
            throw BackendError(
                "host-gw needs the public IP to be the address of \(underlay.name) (\(underlayAddress.address)), not \(publicIP): other hosts route to it directly on the link; drop --public-ip or use the vxlan backend"
            )
        }
        self.host = host
        self.checkInterval = checkInterval
        mtu = underlay.mtu
        let index = underlay.index, network = host.config.network, subnetLen = host.config.subnetLen
        routes = RouteKeeper(routeSocket: host.routeSocket, logger: host.logger) { route in
            route.outputIndex == index && isPeerRoute(route, network: network, subnetLen: subnetLen)
        }
        if let ipv6 = host.config.ipv6 {
            ipv6Routes = RouteKeeper(routeSocket: host.routeSocket, logger: host.logger) { route in
                route.outputIndex == index && isPeerRoute(route, network: ipv6.network, subnetLen: ipv6.subnetLen)
            }
            if let publicIPv6 = host.publicIPv6, !host.underlayIPv6.contains(where: { $0.address == publicIPv6 }) {
                host.logger.warning(
                    "host-gw: the public IPv6 \(publicIPv6) is not an address of \(underlay.name): other hosts route IPv6 to it directly on the link, so it must be one; drop -public-ipv6 or give \(underlay.name)'s address"
                )
            }
        } else {
            ipv6Routes = nil
        }
    }

    /// flanneld's host-gw lease: `"BackendType":"host-gw"`, no BackendData
    /// (and the PublicIPv6 in a dual-stack network).
    public func leaseAttributes() throws -> LeaseAttributes {
        LeaseAttributes(publicIP: publicIP, publicIPv6: publicIPv6, backendType: type.rawValue)
    }

    public func activate(lease: Lease) throws {
        logger.info(
            "host-gw: peers are routed via their public IPs on \(underlay.name) (\(underlayAddress)), MTU \(mtu)"
        )
    }

    public func move(from old: Lease, to new: Lease) throws {}

    public func unusableReason(_ lease: Lease) -> String? { nil }

    public func apply(_ changes: [PeerChange]) {
        var log = PeerLog(for: logger)
        defer { log.flush(to: logger) }
        for change in changes {
            switch change {
            case .added(let lease), .updated(_, let lease):
                // IPv6-only: no IPv4 route (lease.subnet is 0.0.0.0/0).
                guard let subnet = lease.ipv4Subnet else { continue }
                let gateway = lease.attributes.publicIP
                guard underlayAddress.network.contains(gateway) else {
                    // Drop a route an earlier version of this lease had.
                    routes.remove(subnet)
                    logger.error(
                        "peer \(subnet) at \(gateway) is not directly reachable: it is outside \(underlay.name)'s network \(underlayAddress.network), and host-gw needs every host on one layer-2 network; its containers stay unreachable from here (use the vxlan backend for routed networks)"
                    )
                    continue
                }
                let route = Route(destination: subnet, outputIndex: underlay.index, gateway: gateway)
                if routes.set(route, peer: "peer \(subnet) (\(gateway))") {
                    log.note("peer \(subnet) → via \(gateway) dev \(self.underlay.name)")
                }
            case .removed(let lease):
                if let subnet = lease.ipv4Subnet { routes.remove(subnet) }
            }
        }
        if let ipv6Routes { applyIPv6(changes, routes: ipv6Routes, log: &log) }
    }

    /// The IPv6 side: a peer without an IPv6 subnet (an IPv4-only lease) gets
    /// none; one without a PublicIPv6, or with one off our link, is said once
    /// and skipped, its IPv4 route kept.
    private func applyIPv6(_ changes: [PeerChange], routes: RouteKeeper<IPv6Route>, log: inout PeerLog) {
        for change in changes {
            switch change {
            case .added(let lease), .updated(_, let lease):
                if case .updated(let old, _) = change, let oldSubnet = old.ipv6Subnet, oldSubnet != lease.ipv6Subnet {
                    routes.remove(oldSubnet)
                }
                guard let subnet = lease.ipv6Subnet else { continue }
                guard let gateway = lease.attributes.publicIPv6 else {
                    routes.remove(subnet)
                    logger.error(
                        "peer \(lease.primarySubnet) has the IPv6 subnet \(subnet) but no PublicIPv6 in its lease: no IPv6 route to it\(lease.ipv4Subnet == nil ? "" : " (its IPv4 route stays)"); start that host with an IPv6 address on its interface or -public-ipv6"
                    )
                    continue
                }
                guard host.isOnLink(gateway) else {
                    routes.remove(subnet)
                    logger.error(
                        "peer \(subnet) at \(gateway) is not directly reachable: it is outside the networks of \(underlay.name)'s IPv6 addresses, and host-gw needs every host on one layer-2 network; no IPv6 route to it (use the vxlan backend for routed networks)"
                    )
                    continue
                }
                let route = IPv6Route(destination: subnet, outputIndex: underlay.index, gateway: gateway)
                if routes.set(route, peer: "peer \(subnet) (\(gateway))") {
                    log.note("peer \(subnet) → via \(gateway) dev \(self.underlay.name)")
                }
            case .removed(let lease):
                if let subnet = lease.ipv6Subnet { routes.remove(subnet) }
            }
        }
    }

    public func report() -> BackendReport {
        let tally = routes.tally
        let v6 = ipv6Routes?.tally ?? (routes: 0, changes: 0, restored: 0)
        return BackendReport(
            type,
            summary: "kernel routes via \(underlay.name), checked every \(checkInterval)"
                + (ipv6Routes == nil ? "" : ", IPv6 too"),
            tableEntries: tally.routes + v6.routes,
            tableGeneration: tally.changes &+ v6.changes,
            counters: [("routes_restored", tally.restored &+ v6.restored)]
        )
    }

    /// Checks the routes every `checkInterval` and restores what is missing.
    public func run() async throws {
        async let v4: Void = routes.keepChecking(every: checkInterval)
        if let ipv6Routes { await ipv6Routes.keepChecking(every: checkInterval) }
        await v4
    }

    /// The routes stay across a restart (traffic keeps flowing, as with
    /// flanneld) unless the host leaves the network.
    public func cleanUp(releasing: Bool) {
        if releasing {
            routes.removeAll()
            ipv6Routes?.removeAll()
            logger.info("removed the host-gw routes to every peer")
        } else {
            logger.info("host-gw routes kept for a restart")
        }
    }
}
