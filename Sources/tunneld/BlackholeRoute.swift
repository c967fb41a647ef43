import Foundation
import Logging
import NetBase
import Netlink

/// flanneld's `-ip-blackhole-route`: a blackhole route for this host's
/// subnet, so that a packet for an address of the subnet that no container
/// has is dropped here rather than sent back out by the route for the whole
/// network (a loop until its TTL runs out). Put back when someone removes it
/// (checked at the iptables resync period, as flanneld does), moved when the
/// subnet changes.
///
/// Unlike flanneld's (metric 0), tunneld's route has the lowest priority a
/// route can have: a blackhole at metric 0 that exists before Docker gives
/// its bridge the subnet's first address is listed ahead of the bridge's
/// route and wins, so the host's own containers become unreachable. At the
/// lowest priority every real route to the subnet wins and the blackhole
/// catches only what none of them does.
final class BlackholeRoute: @unchecked Sendable {
    static let metric = UInt32.max

    private let routeSocket: RouteSocket
    private let logger: Logger
    /// Guards `subnet`; serializes the route changes of the lease watcher
    /// (a new subnet) and the periodic check.
    private let lock = NSLock()
    private var subnet: IPv4Network?

    init(routeSocket: RouteSocket, logger: Logger) {
        self.routeSocket = routeSocket
        self.logger = logger
    }

    /// Blackholes `subnet` (and no longer the previous one).
    func set(_ subnet: IPv4Network) throws {
        try lock.withLock {
            if let old = self.subnet, old != subnet {
                try routeSocket.deleteBlackholeRoute(old, metric: Self.metric)
            }
            try routeSocket.addBlackholeRoute(subnet, metric: Self.metric)
            self.subnet = subnet
        }
    }

    /// Puts the route back if it is gone; the subnet whose route it put
    /// back, nil when nothing was missing.
    func repair() throws -> IPv4Network? {
        try lock.withLock {
            guard let subnet else { return nil }
            let present = try routeSocket.blackholeRoutes().contains {
                $0.destination == subnet && $0.metric == Self.metric
            }
            if present { return nil }
            try routeSocket.addBlackholeRoute(subnet, metric: Self.metric)
            return subnet
        }
    }

    /// Checks every `period` until cancelled, with one log line per repair.
    func keep(every period: Duration) async {
        while !Task.isCancelled {
            do { try await Task.sleep(for: period) } catch { return }
            do {
                if let subnet = try repair() {
                    logger.warning("put back the blackhole route for \(subnet): someone removed it")
                }
            } catch {
                logger.error("could not put back the blackhole route: \(error); trying again in \(period)")
            }
        }
    }

    /// Removes the route (when the host leaves the network).
    func remove() {
        lock.withLock {
            guard let subnet else { return }
            do {
                try routeSocket.deleteBlackholeRoute(subnet, metric: Self.metric)
                logger.info("removed the blackhole route for \(subnet)")
            } catch {
                logger.warning("could not remove the blackhole route for \(subnet): \(error)")
            }
            self.subnet = nil
        }
    }
}
