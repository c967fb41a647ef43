import LeaseStore
import Logging
import NetBase
import Netlink

/// What another mode left on this host, removed when the host starts in a
/// new one (the deployment's vxlan → host-gw switch is a restart with a new
/// Backend.Type in the store). The udp backend's TUN device goes with its
/// process; a vxlan device and host-gw routes outlive theirs, on purpose, so
/// that traffic keeps flowing across a restart in the same mode.
public enum Leftovers {
    /// Deletes every vxlan device named `flannel.*` or `flannel-v6.*` except
    /// those in `keepingDevices`
    /// (its routes, ARP and FDB entries go with it); when `peerRoutesToo`,
    /// also the routes to subnets of `network` via a gateway on the underlay
    /// (host-gw's, or vxlan DirectRouting's). The kernel backends pass false
    /// there: their own route check removes such routes unless a peer wants them.
    public static func remove(
        keepingDevices: [String],
        peerRoutesToo: Bool,
        network: IPv4Network,
        subnetLen: Int,
        ipv6: IPv6NetworkConfig? = nil,
        underlay: Link,
        routeSocket: RouteSocket,
        logger: Logger
    ) {
        do {
            for link in try routeSocket.links()
            where link.kind == "vxlan" && (link.name.hasPrefix("flannel.") || link.name.hasPrefix("flannel-v6."))
                && !keepingDevices.contains(link.name)
            {
                try routeSocket.deleteLink(index: link.index)
                logger.info("removed \(link.name), left by the vxlan backend, with its routes, ARP and FDB entries")
            }
        } catch {
            logger.warning("could not remove vxlan devices left by an earlier mode: \(error)")
        }
        guard peerRoutesToo else { return }
        do {
            for route in try routeSocket.routes()
            where route.outputIndex == underlay.index && isPeerRoute(route, network: network, subnetLen: subnetLen) {
                try routeSocket.deleteRoute(route)
                logger.info("removed route \(route.description(device: underlay.name)), left by the host-gw backend")
            }
            if let ipv6 {
                for route in try routeSocket.ipv6Routes()
                where route.outputIndex == underlay.index
                    && isPeerRoute(route, network: ipv6.network, subnetLen: ipv6.subnetLen)
                {
                    try routeSocket.deleteRoute(route)
                    logger.info(
                        "removed route \(route.description(device: underlay.name)), left by the host-gw backend"
                    )
                }
            }
        } catch {
            logger.warning("could not remove routes left by an earlier mode: \(error)")
        }
    }
}
