import LeaseStore
import Logging
import NetBase
import Netlink
import PeerControl

/// flannel's host-gw backend: no tunnel at all. Each peer's subnet is routed
/// to the peer's public IP over the underlay (`<subnet> via <PublicIP> dev
/// eth0`), so every host must be on one layer-2 segment with the others.
public final class HostGatewayBackend: Backend, HostBackend {
    public let type = BackendType.hostGW
    public let mtu: Int
    let host: HostContext
    let routes: RouteKeeper
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
    }

    /// flanneld's host-gw lease: `"BackendType":"host-gw"`, no BackendData.
    public func leaseAttributes() throws -> LeaseAttributes {
        LeaseAttributes(publicIP: publicIP, backendType: type.rawValue)
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
                let gateway = lease.attributes.publicIP
                guard underlayAddress.network.contains(gateway) else {
                    // Drop a route an earlier version of this lease had.
                    routes.remove(lease.subnet)
                    logger.error(
                        "peer \(lease.subnet) at \(gateway) is not directly reachable: it is outside \(underlay.name)'s network \(underlayAddress.network), and host-gw needs every host on one layer-2 network; its containers stay unreachable from here (use the vxlan backend for routed networks)"
                    )
                    continue
                }
                let route = Route(destination: lease.subnet, outputIndex: underlay.index, gateway: gateway)
                if routes.set(route, peer: "peer \(lease.subnet) (\(gateway))") {
                    log.note("peer \(lease.subnet) → via \(gateway) dev \(self.underlay.name)")
                }
            case .removed(let lease):
                routes.remove(lease.subnet)
            }
        }
    }

    public func report() -> BackendReport {
        let tally = routes.tally
        return BackendReport(
            type,
            summary: "kernel routes via \(underlay.name), checked every \(checkInterval)",
            tableEntries: tally.routes,
            tableGeneration: tally.changes,
            counters: [("routes_restored", tally.restored)]
        )
    }

    /// Checks the routes every `checkInterval` and restores what is missing.
    public func run() async throws {
        await routes.keepChecking(every: checkInterval)
    }

    /// The routes stay across a restart (traffic keeps flowing, as with
    /// flanneld) unless the host leaves the network.
    public func cleanUp(releasing: Bool) {
        if releasing {
            routes.removeAll()
            logger.info("removed the host-gw routes to every peer")
        } else {
            logger.info("host-gw routes kept for a restart")
        }
    }
}
