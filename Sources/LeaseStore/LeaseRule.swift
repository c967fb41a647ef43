import NetBase

/// A key under `<prefix>/subnets/` that is no lease of the network, and why.
/// Every reader of lease keys (the subnet chooser, the peer sync,
/// `tunneld leases`, `tunneld status`, the local store) ignores it alike.
public struct IgnoredLeaseKey: Sendable, Equatable, CustomStringConvertible {
    public enum Reason: Sendable, Equatable {
        /// Not a lease key such as 10.2.72.0-24 (another spelling, a deeper path, …).
        case malformed
        /// A prefix shorter than SubnetLen: it would cover other hosts' subnets.
        case wider(prefixLength: Int)
        /// A prefix longer than SubnetLen: no subnet flannel hands out.
        case narrower(prefixLength: Int)
        /// A subnet outside the Network.
        case outsideNetwork
        /// Names the same subnet as another key, which is the lease.
        case conflicts(with: String)
        /// In a dual-stack network, the key's IPv6 part is no IPv6 subnet of
        /// the network (outside IPv6Network, or not IPv6SubnetLen long).
        case ipv6Mismatch(IPv6Network)
        /// In an IPv6-only network, a key with no IPv6 part, or whose IPv4
        /// part is not 0.0.0.0-0.
        case notIPv6Only
    }

    /// The key's name under `<prefix>/subnets/` ("10.2.0.0-16").
    public var key: String
    public var reason: Reason
    /// Who wrote it, when its value could be read.
    public var publicIP: IPv4Address?
    /// The rule it broke, for the message.
    public var network: IPv4Network
    public var subnetLen: Int
    /// The IPv6 side of the rule, in a dual-stack network.
    public var ipv6Network: IPv6Network?
    public var ipv6SubnetLen: Int

    public init(
        key: String,
        reason: Reason,
        publicIP: IPv4Address?,
        network: IPv4Network,
        subnetLen: Int,
        ipv6Network: IPv6Network? = nil,
        ipv6SubnetLen: Int = 0
    ) {
        self.key = key
        self.reason = reason
        self.publicIP = publicIP
        self.network = network
        self.subnetLen = subnetLen
        self.ipv6Network = ipv6Network
        self.ipv6SubnetLen = ipv6SubnetLen
    }

    public var description: String {
        let whose = publicIP.map { " (PublicIP \($0))" } ?? ""
        let what: String
        switch reason {
        case .malformed:
            what =
                network.isNoIPv4
                ? "is not a lease key such as 0.0.0.0-0&fd00:10:244:1::-64"
                : "is not a lease key such as \(network.address)-\(subnetLen)"
        case .notIPv6Only:
            what =
                "is no lease of this IPv6-only network (EnableIPv4 false), whose keys are "
                + "0.0.0.0-0&<IPv6 subnet>-<IPv6SubnetLen>"
        case .wider(let length):
            what = "is a /\(length), wider than SubnetLen /\(subnetLen): it would cover other hosts' subnets"
        case .narrower(let length):
            what = "is a /\(length), narrower than SubnetLen /\(subnetLen): no subnet of this network"
        case .outsideNetwork:
            what = "lies outside the network \(network)"
        case .conflicts(let winner):
            what = "names the same subnet as the lease \(winner), which is kept"
        case .ipv6Mismatch(let subnet):
            what =
                "has the IPv6 subnet \(subnet), which is no /\(ipv6SubnetLen) of the IPv6Network "
                + (ipv6Network.map(\.description) ?? "(none)")
        }
        return "lease key \(key)\(whose) \(what); every host ignores it — delete it "
            + "(etcdctl del '<prefix>/subnets/\(key)', or the file subnets/\(key) of a local store)"
    }
}

/// The leases of one listing as every reader must see them.
public struct LeaseSet: Sendable, Equatable {
    /// The leases: of SubnetLen, inside the Network, one per subnet.
    public var leases: [Lease]
    /// Subnets of well-formed keys whose values cannot be read: not leases,
    /// but their keys exist, so nobody can create them.
    public var occupied: [IPv4Network]
    /// The IPv6 subnets of those keys (their IPv6 parts).
    public var occupiedIPv6: [IPv6Network] = []
    /// Leases that lost a conflict to another key of the same subnet (also
    /// in `ignored`); kept so that the winner's deletion can promote one.
    public var conflicting: [Lease]
    /// Every key left out, with why.
    public var ignored: [IgnoredLeaseKey]
}

/// The one rule for what a lease is. A key under `<prefix>/subnets/` is a
/// lease of the network when it is a lease key (`LeaseKey.subnet(fromKey:)`),
/// its subnet has exactly SubnetLen bits and lies inside the Network, and no
/// other such key names the same subnet first (`precedes`). Everything else
/// is ignored — neither a peer, nor a subnet that blocks an allocation, nor
/// a line of `tunneld leases` — and reported once, with what to do.
///
/// SubnetMin and SubnetMax are not part of it: they bound what a host may
/// take, while leases outside them (written under an older config) are still
/// hosts to route to, as in flannel.
///
/// In a dual-stack network, a key's IPv6 part (flannel's `…&fd00::-64`)
/// must also be an IPv6SubnetLen subnet inside the IPv6Network, and no two
/// leases may name the same IPv6 subnet. A plain key is still a lease there:
/// a host that has not (yet) got an IPv6 subnet is an IPv4 peer. In an
/// IPv4-only network the IPv6 part is not looked at beyond its spelling.
public struct LeaseRule: Sendable, Equatable {
    public let network: IPv4Network
    public let subnetLen: Int
    /// The IPv6Network and IPv6SubnetLen of a dual-stack network.
    public let ipv6Network: IPv6Network?
    public let ipv6SubnetLen: Int

    public init(network: IPv4Network, subnetLen: Int, ipv6Network: IPv6Network? = nil, ipv6SubnetLen: Int = 0) {
        self.network = network
        self.subnetLen = subnetLen
        self.ipv6Network = ipv6Network
        self.ipv6SubnetLen = ipv6SubnetLen
    }

    public init(_ config: NetworkConfig) {
        self.init(
            network: config.network,
            subnetLen: config.subnetLen,
            ipv6Network: config.ipv6?.network,
            ipv6SubnetLen: config.ipv6?.subnetLen ?? 0
        )
    }

    /// Why a key whose IPv6 part names `subnet` is no lease of a dual-stack
    /// network; nil when the network is IPv4-only or the part fits.
    public func problem(withIPv6 subnet: IPv6Network) -> IgnoredLeaseKey.Reason? {
        guard let ipv6Network else { return nil }
        if subnet.prefixLength != ipv6SubnetLen || !ipv6Network.contains(subnet) { return .ipv6Mismatch(subnet) }
        return nil
    }

    /// Whether this is the rule of an IPv6-only network (its `network` is
    /// 0.0.0.0/0, `IPv4Network.noIPv4`).
    public var isIPv6Only: Bool { network.isNoIPv4 && ipv6Network != nil }

    /// `problem(with:)` and `problem(withIPv6:)` of a key. In an IPv6-only
    /// network a lease key is `0.0.0.0-0&<IPv6 subnet>`, as flanneld
    /// writes it.
    public func problem(withKey key: String, subnet: IPv4Network) -> IgnoredLeaseKey.Reason? {
        if isIPv6Only {
            guard subnet.isNoIPv4, let v6 = LeaseKey.ipv6Subnet(fromKey: key) else { return .notIPv6Only }
            return problem(withIPv6: v6)
        }
        if let reason = problem(with: subnet) { return reason }
        if ipv6Network != nil, let v6 = LeaseKey.ipv6Subnet(fromKey: key) { return problem(withIPv6: v6) }
        return nil
    }

    /// Why a key naming `subnet` is no lease of the network; nil when it is one
    /// (up to conflicts with other keys, which need the whole listing).
    public func problem(with subnet: IPv4Network) -> IgnoredLeaseKey.Reason? {
        if isIPv6Only { return subnet.isNoIPv4 ? nil : .notIPv6Only }
        // A /8 over a /16 network is too wide rather than outside it.
        if !network.overlaps(subnet) { return .outsideNetwork }
        if subnet.prefixLength < subnetLen { return .wider(prefixLength: subnet.prefixLength) }
        if subnet.prefixLength > subnetLen { return .narrower(prefixLength: subnet.prefixLength) }
        return nil
    }

    /// Of two keys naming the same subnet, whether `a` is the lease and `b`
    /// the conflict: the plain key (`10.2.72.0-24`, what flannel writes
    /// without IPv6 and tunneld always writes) before a dual-stack one
    /// (`10.2.72.0-24&fd00::-64`), then the smaller key. It needs nothing but
    /// the two keys, so a host that follows the watch and one that lists
    /// agree without knowing which key came first.
    public static func precedes(_ a: String, _ b: String) -> Bool {
        let aDual = a.contains("&"), bDual = b.contains("&")
        if aDual != bDual { return !aDual }
        return a < b
    }

    public func ignored(_ key: String, _ reason: IgnoredLeaseKey.Reason, publicIP: IPv4Address?) -> IgnoredLeaseKey {
        IgnoredLeaseKey(
            key: key,
            reason: reason,
            publicIP: publicIP,
            network: network,
            subnetLen: subnetLen,
            ipv6Network: ipv6Network,
            ipv6SubnetLen: ipv6SubnetLen
        )
    }

    /// Sorts the keys of one listing into leases, occupied subnets and
    /// ignored keys.
    public func sort(_ snapshot: LeaseSnapshot) -> LeaseSet {
        sort(leases: snapshot.leases, unreadableKeys: snapshot.unreadableKeys, malformedKeys: snapshot.malformedKeys)
    }

    /// - Parameters:
    ///   - leases: readable leases under lease keys (`Lease.key`).
    ///   - unreadableKeys: lease keys whose values cannot be read.
    ///   - malformedKeys: names under `subnets/` that are no lease keys.
    public func sort(leases: [Lease], unreadableKeys: [String] = [], malformedKeys: [String] = []) -> LeaseSet {
        var result = LeaseSet(leases: [], occupied: [], conflicting: [], ignored: [])
        for key in malformedKeys { result.ignored.append(ignored(key, .malformed, publicIP: nil)) }
        // Indices into `leases`, not copies: a list of 60,000 leases goes
        // through here at every start.
        var winners: [LeaseSubnet: Int] = [:]
        winners.reserveCapacity(leases.count)
        var isWinner = [Bool](repeating: false, count: leases.count)
        for (index, lease) in leases.enumerated() {
            if let reason = problem(withKey: lease.key, subnet: lease.subnet) {
                result.ignored.append(ignored(lease.key, reason, publicIP: lease.attributes.publicIP))
                continue
            }
            let name = lease.primarySubnet
            guard let other = winners[name] else {
                winners[name] = index
                isWinner[index] = true
                continue
            }
            if Self.precedes(leases[other].key, lease.key) {
                result.conflicting.append(lease)
            } else {
                winners[name] = index
                isWinner[other] = false
                isWinner[index] = true
                result.conflicting.append(leases[other])
            }
        }
        // Reported against the final winner of each subnet.
        for loser in result.conflicting {
            let winner = winners[loser.primarySubnet].map { leases[$0].key } ?? loser.subnet.leaseKey
            result.ignored.append(ignored(loser.key, .conflicts(with: winner), publicIP: loser.attributes.publicIP))
        }
        result.leases.reserveCapacity(winners.count)
        for (index, lease) in leases.enumerated() where isWinner[index] { result.leases.append(lease) }
        if ipv6Network != nil { dropIPv6Conflicts(&result) }
        for key in unreadableKeys {
            guard let subnet = LeaseKey.subnet(fromKey: key) else {
                result.ignored.append(ignored(key, .malformed, publicIP: nil))
                continue
            }
            if let reason = problem(withKey: key, subnet: subnet) {
                result.ignored.append(ignored(key, reason, publicIP: nil))
            } else {
                result.occupied.append(subnet)
                if let v6 = LeaseKey.ipv6Subnet(fromKey: key) { result.occupiedIPv6.append(v6) }
            }
        }
        return result
    }

    /// Of leases naming the same IPv6 subnet (with different IPv4 subnets),
    /// the one whose key `precedes` stays; the others are conflicts.
    private func dropIPv6Conflicts(_ result: inout LeaseSet) {
        var byIPv6: [IPv6Network: String] = [:]
        for lease in result.leases {
            guard let v6 = lease.ipv6Subnet else { continue }
            if let other = byIPv6[v6], Self.precedes(other, lease.key) { continue }
            byIPv6[v6] = lease.key
        }
        var kept: [Lease] = []
        for lease in result.leases {
            if let v6 = lease.ipv6Subnet, let winner = byIPv6[v6], winner != lease.key {
                result.conflicting.append(lease)
                result.ignored.append(ignored(lease.key, .conflicts(with: winner), publicIP: lease.attributes.publicIP))
            } else {
                kept.append(lease)
            }
        }
        result.leases = kept
    }
}
