import Foundation
import LeaseStore
import Logging
import NetBase
import PacketRing
import ServiceLifecycle
import UDPEncap

/// Keeps the subnet table equal to the store's leases, and this node's own
/// lease alive.
///
/// The table starts from a list at revision R and follows a watch from R;
/// when the store has forgotten the changes we need (compaction), the list is
/// read again and the table diffed against it. A broken watch is resumed from
/// the last revision seen, with backoff. Our own lease deleted behind our
/// back is acquired again (the same subnet while it is free) and forwarding
/// never stops meanwhile.
final class PeerSync: Sendable {
    let store: any LeaseStore
    let table: SubnetTable
    let holder: LeaseHolder
    let port: UInt16
    let config: NetworkConfig
    let attributes: LeaseAttributes
    let logger: Logger
    let onSubnetChange: @Sendable (Lease) -> Void

    init(store: any LeaseStore, table: SubnetTable, holder: LeaseHolder, port: UInt16,
         config: NetworkConfig, attributes: LeaseAttributes, logger: Logger,
         onSubnetChange: @escaping @Sendable (Lease) -> Void) {
        self.store = store
        self.table = table
        self.holder = holder
        self.port = port
        self.config = config
        self.attributes = attributes
        self.logger = logger
        self.onSubnetChange = onSubnetChange
    }

    /// Fills the table from a fresh list; returns the revision to watch from.
    func loadInitialPeers() async throws -> Int64 {
        let snapshot = try await store.leases()
        sync(with: snapshot)
        return snapshot.revision
    }

    /// Makes the table hold exactly the peers of `snapshot`.
    func sync(with snapshot: LeaseSnapshot) {
        let own = holder.lease.subnet
        var wanted: [IPv4Network: Route] = [:]
        for lease in snapshot.leases where lease.subnet != own {
            if let route = route(for: lease) { wanted[lease.subnet] = route }
        }
        let current = table.allRoutes
        for (subnet, route) in current where route != .local && wanted[subnet] == nil {
            table.remove(subnet)
            logger.info("peer \(subnet) is gone")
        }
        for (subnet, route) in wanted where current[subnet] != route {
            set(subnet, route)
        }
        if !snapshot.leases.contains(where: { $0.subnet == own }) {
            logger.warning("our lease \(own) is missing from the store")
        }
    }

    private func route(for lease: Lease) -> Route? {
        guard lease.attributes.backendType == nil || lease.attributes.backendType == "udp" else {
            logger.warning("lease \(lease.subnet) of \(lease.attributes.publicIP) is for backend \(lease.attributes.backendType!); the udp backend cannot reach it")
            return nil
        }
        guard config.network.contains(lease.subnet) else {
            logger.warning("lease \(lease.subnet) of \(lease.attributes.publicIP) lies outside the network \(config.network); ignored")
            return nil
        }
        return .peer(UDPEndpoint(address: lease.attributes.publicIP, port: port))
    }

    private func set(_ subnet: IPv4Network, _ route: Route) {
        do {
            try table.set(subnet, to: route)
            logger.info("peer \(subnet) → \(route)")
        } catch {
            logger.warning("\(error)")
        }
    }

    func apply(_ event: LeaseEvent) async {
        let own = holder.lease.subnet
        switch event {
        case .put(let lease) where lease.subnet == own:
            if lease.attributes.publicIP == attributes.publicIP {
                holder.replace(lease)
            } else {
                logger.error("our subnet \(own) was written for \(lease.attributes.publicIP) by someone else; two hosts now claim it — remove the wrong lease")
            }
        case .put(let lease):
            if let route = route(for: lease), table.route(of: lease.subnet) != route {
                set(lease.subnet, route)
            }
        case .delete(let subnet, _) where subnet == own:
            logger.warning("our lease \(own) was deleted from \(store.location) (expired or removed); acquiring a lease again, forwarding continues")
            await reacquire(preferred: own)
        case .delete(let subnet, _):
            if table.route(of: subnet) != nil {
                table.remove(subnet)
                logger.info("peer \(subnet) is gone")
            }
        }
    }

    /// Gets a lease again after ours vanished, retrying until it works or we
    /// are shut down.
    func reacquire(preferred: IPv4Network) async {
        var delay = Duration.seconds(1)
        while !Task.isCancelled && !Task.isShuttingDownGracefully {
            do {
                let old = holder.lease
                let lease = try await store.acquireLease(config: config, attributes: attributes, preferred: preferred)
                holder.replace(lease)
                if lease.subnet == old.subnet {
                    logger.info("lease \(lease.subnet) acquired again")
                } else {
                    logger.error("subnet \(old.subnet) was taken by another host; moved to \(lease.subnet): containers on this host must be restarted with the new subnet.env")
                    table.remove(old.subnet)
                    try? table.set(lease.subnet, to: .local)
                    onSubnetChange(lease)
                }
                return
            } catch {
                logger.error("could not acquire a lease again: \(error); retrying in \(delay)")
                try? await Task.sleep(for: delay)
                delay = min(delay * 2, .seconds(60))
            }
        }
    }

    /// Follows lease changes until cancelled.
    func watch(from start: Int64) async {
        var revision = start
        var delay = Duration.milliseconds(500)
        var relists = 0
        while !Task.isCancelled {
            do {
                for try await event in store.watchLeases(after: revision) {
                    await apply(event)
                    revision = max(revision, event.revision)
                    delay = .milliseconds(500)
                }
                if Task.isCancelled { return }
                logger.info("lease watch ended; resuming from revision \(revision)")
            } catch LeaseStoreError.compacted(let requested, let oldest) {
                relists += 1
                // `requested` is where the store's stream began; we may have
                // seen events past it before the stream broke.
                logger.warning("lease watch: changes after \(max(requested, revision)) were compacted (oldest kept \(oldest)); listing again (re-list #\(relists))")
                do {
                    let snapshot = try await store.leases()
                    sync(with: snapshot)
                    revision = snapshot.revision
                    continue
                } catch {
                    logger.error("lease list failed: \(error); retrying in \(delay)")
                }
            } catch {
                if Task.isCancelled { return }
                logger.warning("lease watch failed: \(error); resuming from revision \(revision) in \(delay)")
            }
            try? await Task.sleep(for: delay)
            delay = min(delay * 2, .seconds(30))
        }
    }

    /// Renews our lease before it expires until cancelled.
    func renew(margin: Duration) async {
        while !Task.isCancelled {
            let lease = holder.lease
            guard let expiration = lease.expiration else {
                // A reservation never expires; look again later in case it
                // was turned into a lease.
                try? await Task.sleep(for: .seconds(3600))
                continue
            }
            let remaining = expiration.timeIntervalSinceNow
            let marginSeconds = Double(margin.components.seconds)
            // With a TTL shorter than the margin, renew at half-life.
            let wait = remaining > 2 * marginSeconds ? remaining - marginSeconds : max(remaining / 2, 0)
            if wait > 0 {
                try? await Task.sleep(for: .milliseconds(Int(wait * 1000)))
                if Task.isCancelled { return }
            }
            guard holder.lease.subnet == lease.subnet else { continue }
            do {
                let renewed = try await store.renewLease(holder.lease)
                holder.replace(renewed)
                let until = renewed.expiration.map { " until \($0)" } ?? ""
                logger.info("renewed lease \(renewed.subnet)\(until)")
            } catch LeaseStoreError.leaseNotFound {
                logger.warning("lease \(lease.subnet) vanished before renewal; acquiring again")
                await reacquire(preferred: lease.subnet)
            } catch {
                // Keep forwarding; try again in a minute (or sooner when the
                // lease is about to run out).
                let retry = min(60, max(1, holder.lease.expiration.map { $0.timeIntervalSinceNow / 4 } ?? 60))
                logger.error("renewing lease \(lease.subnet) failed: \(error); retrying in \(Int(retry)) s")
                try? await Task.sleep(for: .seconds(retry))
            }
        }
    }
}
