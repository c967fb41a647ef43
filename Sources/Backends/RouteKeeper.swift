import Logging
import NetBase
import Netlink
import Synchronization

/// The kernel routes a backend wants, one per peer subnet, kept in the main
/// table: added and removed with the peers, and checked now and then so that
/// a route someone deleted (or one left by an earlier run) is put right.
///
/// `owns` says which kernel routes are this backend's to manage; a route it
/// owns that no peer wants is removed by `check()`. The host's own routes
/// (the container bridge's subnet route has no gateway) are never owned.
final class RouteKeeper: Sendable {
    let routeSocket: RouteSocket
    let logger: Logger
    let owns: @Sendable (Route) -> Bool
    private let wanted = Mutex<[IPv4Network: Route]>([:])
    /// Peers whose route the kernel refused, so that the periodic check does
    /// not repeat the same error every time.
    private let failing = Mutex<[IPv4Network: String]>([:])
    /// Changes to `wanted` (the table's generation) and routes put back by
    /// `check()`, for `tunneld status` and the metrics endpoint.
    private let counts = Mutex<(changes: UInt64, restored: UInt64)>((0, 0))

    init(routeSocket: RouteSocket, logger: Logger, owns: @escaping @Sendable (Route) -> Bool) {
        self.routeSocket = routeSocket
        self.logger = logger
        self.owns = owns
    }

    var routes: [Route] { wanted.withLock { Array($0.values) } }

    /// Wanted routes, changes made to them, and routes restored by `check()`.
    var tally: (routes: Int, changes: UInt64, restored: UInt64) {
        let n = wanted.withLock { $0.count }
        let c = counts.withLock { $0 }
        return (n, c.changes, c.restored)
    }

    func describe(_ route: Route) -> String {
        route.description(device: routeSocket.linkName(route.outputIndex))
    }

    /// Installs `route` for its destination (replacing what was there).
    /// Returns false, after one error line for this peer, when the kernel
    /// refuses it.
    @discardableResult
    func set(_ route: Route, peer: String) -> Bool {
        let previous = wanted.withLock { table -> Route? in
            defer { table[route.destination] = route }
            return table[route.destination]
        }
        if previous != route { counts.withLock { $0.changes &+= 1 } }
        if let previous, previous != route { try? routeSocket.deleteRoute(previous) }
        return install(route, peer: peer)
    }

    private func install(_ route: Route, peer: String) -> Bool {
        do {
            try routeSocket.addRoute(route)
            failing.withLock { $0[route.destination] = nil }
            return true
        } catch {
            let message = "cannot add route \(describe(route)) for \(peer): \(error)"
            let isNew = failing.withLock { seen -> Bool in
                guard seen[route.destination] != message else { return false }
                seen[route.destination] = message
                return true
            }
            if isNew { logger.error("\(message)") }
            return false
        }
    }

    /// Removes the route to `destination`, if we installed one.
    func remove(_ destination: IPv4Network) {
        guard let route = wanted.withLock({ $0.removeValue(forKey: destination) }) else { return }
        counts.withLock { $0.changes &+= 1 }
        failing.withLock { $0[destination] = nil }
        do { try routeSocket.deleteRoute(route) } catch {
            logger.warning("could not remove route \(describe(route)): \(error)")
        }
    }

    /// Checks now, then every `interval` until the task is cancelled.
    func keepChecking(every interval: Duration) async {
        check()
        while !Task.isCancelled {
            try? await Task.sleep(for: interval)
            if Task.isCancelled { break }
            check()
        }
    }

    /// Puts back wanted routes that are missing and removes owned routes
    /// that nobody wants (left by an earlier run or another backend).
    func check() {
        let present: [Route]
        do { present = try routeSocket.routes() } catch {
            logger.warning("route check: cannot list routes: \(error)")
            return
        }
        let wanted = self.wanted.withLock { $0 }
        for route in present where owns(route) {
            if let want = wanted[route.destination], Self.same(want, route) { continue }
            do {
                try routeSocket.deleteRoute(route)
                logger.info("removed route \(describe(route)): no peer has that subnet now")
            } catch {
                logger.warning("could not remove stale route \(describe(route)): \(error)")
            }
        }
        // One pass over each list (a /8 of /24s has 65,535 routes; comparing
        // every wanted route with every present one would be quadratic).
        var presentByDestination: [IPv4Network: [Route]] = [:]
        for route in present { presentByDestination[route.destination, default: []].append(route) }
        for (destination, route) in wanted
        where !(presentByDestination[destination] ?? []).contains(where: { Self.same(route, $0) }) {
            let known = failing.withLock { $0[destination] != nil }
            if install(route, peer: "\(destination)") {
                counts.withLock { $0.restored &+= 1 }
                if !known { logger.info("restored route \(describe(route)) (it had been removed)") }
            }
        }
    }

    /// Removes every route we installed.
    func removeAll() {
        for destination in wanted.withLock({ Array($0.keys) }) { remove(destination) }
    }

    /// The same route as far as forwarding goes (the kernel may report a
    /// metric or source we did not set).
    static func same(_ a: Route, _ b: Route) -> Bool {
        a.destination == b.destination && a.gateway == b.gateway && a.outputIndex == b.outputIndex
            && a.onlink == b.onlink
    }
}

/// Routes in the shape both kernel backends install for a peer: a subnet of
/// the network, of SubnetLen, through a gateway.
func isPeerRoute(_ route: Route, network: IPv4Network, subnetLen: Int) -> Bool {
    route.gateway != nil && route.destination.prefixLength == subnetLen && network.contains(route.destination)
}
