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
///
/// One keeper serves one address family (`Route` or `IPv6Route`); a
/// dual-stack backend has one of each.
final class RouteKeeper<KernelRoute: PeerRoute>: Sendable {
    typealias Destination = KernelRoute.Destination
    let routeSocket: RouteSocket
    let logger: Logger
    let owns: @Sendable (KernelRoute) -> Bool
    private let wanted = Mutex<[Destination: KernelRoute]>([:])
    /// Peers whose route the kernel refused, so that the periodic check does
    /// not repeat the same error every time.
    private let failing = Mutex<[Destination: String]>([:])
    /// Changes to `wanted` (the table's generation) and routes put back by
    /// `check()`, for `tunneld status` and the metrics endpoint.
    private let counts = Mutex<(changes: UInt64, restored: UInt64)>((0, 0))

    init(routeSocket: RouteSocket, logger: Logger, owns: @escaping @Sendable (KernelRoute) -> Bool) {
        self.routeSocket = routeSocket
        self.logger = logger
        self.owns = owns
    }

    var routes: [KernelRoute] { wanted.withLock { Array($0.values) } }

    /// Wanted routes, changes made to them, and routes restored by `check()`.
    var tally: (routes: Int, changes: UInt64, restored: UInt64) {
        let n = wanted.withLock { $0.count }
        let c = counts.withLock { $0 }
        return (n, c.changes, c.restored)
    }

    func describe(_ route: KernelRoute) -> String {
        route.description(device: routeSocket.linkName(route.outputIndex))
    }

    /// Installs `route` for its destination (replacing what was there).
    /// Returns false, after one error line for this peer, when the kernel
    /// refuses it.
    @discardableResult
    func set(_ route: KernelRoute, peer: String) -> Bool {
        let previous = wanted.withLock { table -> KernelRoute? in
            defer { table[route.destination] = route }
            return table[route.destination]
        }
        if previous != route { counts.withLock { $0.changes &+= 1 } }
        if let previous, previous != route { try? previous.delete(using: routeSocket) }
        return install(route, peer: peer)
    }

    private func install(_ route: KernelRoute, peer: String) -> Bool {
        do {
            try route.add(using: routeSocket)
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
    func remove(_ destination: Destination) {
        guard let route = wanted.withLock({ $0.removeValue(forKey: destination) }) else { return }
        counts.withLock { $0.changes &+= 1 }
        failing.withLock { $0[destination] = nil }
        do { try route.delete(using: routeSocket) } catch {
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
        let present: [KernelRoute]
        do { present = try KernelRoute.list(using: routeSocket) } catch {
            logger.warning("route check: cannot list routes: \(error)")
            return
        }
        let wanted = self.wanted.withLock { $0 }
        for route in present where owns(route) {
            if let want = wanted[route.destination], Self.same(want, route) { continue }
            do {
                try route.delete(using: routeSocket)
                logger.info("removed route \(describe(route)): no peer has that subnet now")
            } catch {
                logger.warning("could not remove stale route \(describe(route)): \(error)")
            }
        }
        // One pass over each list (a /8 of /24s has 65,535 routes; comparing
        // every wanted route with every present one would be quadratic).
        var presentByDestination: [Destination: [KernelRoute]] = [:]
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
    static func same(_ a: KernelRoute, _ b: KernelRoute) -> Bool {
        a.destination == b.destination && a.gateway == b.gateway && a.outputIndex == b.outputIndex
            && a.onlink == b.onlink
    }
}

/// A kernel route of one address family, as a `RouteKeeper` handles it.
protocol PeerRoute: Hashable, Sendable {
    associatedtype Destination: Hashable, Sendable, CustomStringConvertible
    var destination: Destination { get }
    var outputIndex: Int32 { get }
    var onlink: Bool { get }
    associatedtype Gateway: Hashable
    var gateway: Gateway? { get }
    func description(device: String) -> String
    static func list(using socket: RouteSocket) throws -> [Self]
    func add(using socket: RouteSocket) throws
    func delete(using socket: RouteSocket) throws
}

extension Route: PeerRoute {
    static func list(using socket: RouteSocket) throws -> [Route] { try socket.routes() }
    func add(using socket: RouteSocket) throws { try socket.addRoute(self) }
    func delete(using socket: RouteSocket) throws { try socket.deleteRoute(self) }
}

extension IPv6Route: PeerRoute {
    static func list(using socket: RouteSocket) throws -> [IPv6Route] { try socket.ipv6Routes() }
    func add(using socket: RouteSocket) throws { try socket.addRoute(self) }
    func delete(using socket: RouteSocket) throws { try socket.deleteRoute(self) }
}

/// Routes in the shape both kernel backends install for a peer: a subnet of
/// the network, of SubnetLen, through a gateway.
///
/// An IPv6-only network's `network` is 0.0.0.0/0 (no IPv4): nothing is a
/// peer route of it (the default route least of all).
func isPeerRoute(_ route: Route, network: IPv4Network, subnetLen: Int) -> Bool {
    network.prefixLength > 0 && route.gateway != nil && route.destination.prefixLength == subnetLen
        && network.contains(route.destination)
}

/// The IPv6 side of `isPeerRoute`.
func isPeerRoute(_ route: IPv6Route, network: IPv6Network, subnetLen: Int) -> Bool {
    route.gateway != nil && route.destination.prefixLength == subnetLen && network.contains(route.destination)
}
