import Foundation
import Logging
import NetBase
import Netlink

/// flanneld's `-ip-blackhole-route`: a blackhole route for each of this
/// host's subnets (IPv4, IPv6 or both, as flanneld adds one per enabled
/// family), so that a packet for an address of the subnet that no container
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
    /// Guards the subnets; serializes the route changes of the lease
    /// watcher (a new subnet) and the periodic check.
    private let lock = NSLock()
    private var ipv4: IPv4Network?
    private var ipv6: IPv6Network?

    init(routeSocket: RouteSocket, logger: Logger) {
        self.routeSocket = routeSocket
        self.logger = logger
    }

    /// The subnets blackholed, for the log.
    var subnets: String {
        lock.withLock { [ipv4?.description, ipv6?.description].compactMap { $0 }.joined(separator: " and ") }
    }

    /// Blackholes the lease's subnets (and no longer the previous ones).
    /// Each family is handled even when the other's route change fails;
    /// the first failure is thrown afterwards.
    func set(ipv4 newIPv4: IPv4Network?, ipv6 newIPv6: IPv6Network?) throws {
        try lock.withLock {
            let failures = [Result { try move(&ipv4, to: newIPv4) }, Result { try move(&ipv6, to: newIPv6) }]
            for case .failure(let error) in failures { throw error }
        }
    }

    private func move<Subnet: RouteDestination>(_ current: inout Subnet?, to new: Subnet?) throws {
        if let old = current, old != new {
            try routeSocket.deleteBlackholeRoute(old, metric: Self.metric)
            current = nil
        }
        if let new {
            try routeSocket.addBlackholeRoute(new, metric: Self.metric)
            current = new
        }
    }

    /// What one check did: the subnets whose route it put back, and the
    /// subnets it could not check or put back, with why.
    struct Repair {
        var putBack: [String] = []
        var failed: [(subnet: String, error: any Error)] = []
    }

    /// Puts back the routes that are gone, each family on its own: one that
    /// cannot be checked or put back does not keep the other from it.
    func repair() -> Repair {
        lock.withLock {
            var outcome = Repair()
            repair(ipv4, into: &outcome)
            repair(ipv6, into: &outcome)
            return outcome
        }
    }

    private func repair<Subnet: RouteDestination>(_ subnet: Subnet?, into outcome: inout Repair) {
        guard let subnet else { return }
        do {
            let present = try routeSocket.blackholeRoutes(Subnet.self).contains {
                $0.destination == subnet && $0.metric == Self.metric
            }
            if present { return }
            try routeSocket.addBlackholeRoute(subnet, metric: Self.metric)
            outcome.putBack.append(subnet.description)
        } catch {
            outcome.failed.append((subnet.description, error))
        }
    }

    /// Checks every `period` until cancelled, with one log line per repair
    /// and per failure.
    func keep(every period: Duration) async {
        while !Task.isCancelled {
            do { try await Task.sleep(for: period) } catch { return }
            let outcome = repair()
            for subnet in outcome.putBack {
                logger.warning("put back the blackhole route for \(subnet): someone removed it")
            }
            for (subnet, error) in outcome.failed {
                logger.error(
                    "could not put back the blackhole route for \(subnet): \(error); trying again in \(period)"
                )
            }
        }
    }

    /// Removes the routes (when the host leaves the network).
    func remove() {
        lock.withLock {
            remove(&ipv4)
            remove(&ipv6)
        }
    }

    private func remove<Subnet: RouteDestination>(_ subnet: inout Subnet?) {
        guard let route = subnet else { return }
        do {
            try routeSocket.deleteBlackholeRoute(route, metric: Self.metric)
            logger.info("removed the blackhole route for \(route)")
        } catch {
            logger.warning("could not remove the blackhole route for \(route): \(error)")
        }
        subnet = nil
    }
}
