import NetBase

/// What `SubnetChooser` decided.
public struct SubnetChoice: Sendable, Equatable {
    public enum Source: Sendable, Equatable {
        /// A lease (or reservation) already held by our PublicIP; renew it
        /// (a reservation: update its attributes only) instead of creating one.
        case existingLease(Lease)
        /// The subnet from the subnet file, which is free and fits the config.
        case preferred
        /// A random free subnet among the first ones.
        case free
    }

    public var source: Source

    /// Subnets to create, in the order to try them: a store that loses the
    /// create race for one (someone else created it first) tries the next.
    /// Empty for `.existingLease`. For `.preferred` the preferred subnet comes
    /// first; after it, and for `.free`, the free subnets in random order.
    public var candidates: [IPv4Network]

    /// Expiring leases held by our PublicIP that no longer fit the config
    /// (another SubnetLen, outside SubnetMin…SubnetMax). flannel deletes
    /// them; the store should too, so peers stop routing them to us.
    /// Reservations are never listed here: they are the operator's to remove.
    public var obsolete: [Lease]

    /// In a dual-stack network, free IPv6 subnets to pair with `candidates`
    /// (`ipv6Candidate(_:)`): the preferred one first, then a random pick
    /// among the first free ones. Empty for `.existingLease` and IPv4-only
    /// networks.
    public var ipv6Candidates: [IPv6Network] = []

    /// The subnet chosen: the existing lease's, or the first candidate.
    public var subnet: IPv4Network {
        if case .existingLease(let lease) = source { return lease.subnet }
        return candidates[0]
    }

    /// The IPv6 subnet chosen: the existing lease's, or the first candidate.
    public var ipv6Subnet: IPv6Network? {
        if case .existingLease(let lease) = source { return lease.ipv6Subnet }
        return ipv6Candidates.first
    }

    /// The IPv6 subnet to create together with `candidates[index]`: each
    /// IPv4 candidate gets its own, so that a host that lost the race for
    /// an IPv4 subnet (to a host that likely drew the same IPv6 one) does
    /// not retry with the same IPv6 subnet. nil in IPv4-only networks.
    public func ipv6Candidate(_ index: Int) -> IPv6Network? {
        ipv6Candidates.isEmpty ? nil : ipv6Candidates[index % ipv6Candidates.count]
    }
}

/// flannel's subnet choice, independent of any store, so that the local
/// store and the etcd store pick alike. In order:
///
/// 1. a lease whose PublicIP is ours and that fits the config (prefix length
///    SubnetLen, between SubnetMin and SubnetMax) — reservations first;
/// 2. the preferred subnet (from the subnet file), if it fits and no lease
///    overlaps it;
/// 3. a random pick among the first ≤ 100 free subnets from SubnetMin up.
///
/// Only leases of the network count (`LeaseRule`): a key wider or narrower
/// than SubnetLen, outside the Network or conflicting with another neither
/// blocks a subnet nor is reused. The peer sync ignores the same keys.
public enum SubnetChooser {
    /// flannel picks at random among at most this many free subnets.
    public static let freeCandidateLimit = 100

    /// - Parameters:
    ///   - leases: every current (unexpired) lease and reservation, as listed
    ///     (`LeaseRule` is applied here).
    ///   - occupied: subnets taken by entries that could not be read
    ///     (corrupt values): never offered, since creating them would fail.
    /// - Throws: `LeaseStoreError.outOfSubnets`, naming the keys that take
    ///   every subnet, when nothing is free.
    public static func choose(
        config: NetworkConfig,
        leases listed: [Lease],
        host: LeaseAttributes,
        preferred: IPv4Network?,
        preferredIPv6: IPv6Network? = nil,
        occupied listedOccupied: [IPv4Network] = [],
        using generator: inout some RandomNumberGenerator
    ) throws(LeaseStoreError) -> SubnetChoice {
        let rule = LeaseRule(config)
        let leases = rule.sort(leases: listed).leases
        let occupied = listedOccupied.filter { rule.problem(with: $0) == nil }
        let own = leases.filter { $0.attributes.belongs(to: host) }
        // Our own expiring keys that do not fit (of an older SubnetLen, say)
        // are deleted, as flannel does, whether or not they are leases by
        // the rule: they are ours to clean up.
        let obsolete = listed.filter {
            $0.attributes.belongs(to: host) && !$0.isReservation && !fits(config, $0)
        }
        let obsoleteKeys = Set(obsolete.map(\.key))

        // 1. Reuse: a reservation before an expiring lease, then the longest-lived.
        let reusable = own.filter { fits(config, $0) }.sorted { a, b in
            if a.isReservation != b.isReservation { return a.isReservation }
            if a.expiration != b.expiration {
                return (a.expiration ?? .distantFuture) > (b.expiration ?? .distantFuture)
            }
            return a.subnet.address < b.subnet.address || (a.subnet == b.subnet && a.key < b.key)
        }
        if let lease = reusable.first {
            return SubnetChoice(source: .existingLease(lease), candidates: [], obsolete: obsolete)
        }

        // Obsolete leases are about to be deleted: their space is free.
        let taken = OccupiedRanges(
            leases.filter { !obsoleteKeys.contains($0.key) }.map(\.subnet)
                + occupied
        )
        var free = firstFree(in: config.subnets, taken: taken, limit: freeCandidateLimit)
        free.shuffle(using: &generator)

        // The IPv6 side, chosen from the same listing.
        var ipv6Candidates: [IPv6Network] = []
        if let v6 = config.ipv6 {
            let takenV6 = leases.filter { !obsoleteKeys.contains($0.key) }.compactMap(\.ipv6Subnet)
            ipv6Candidates = firstFreeIPv6(v6, taken: takenV6, limit: freeCandidateLimit)
            ipv6Candidates.shuffle(using: &generator)
            if ipv6Candidates.isEmpty {
                throw .outOfSubnets(
                    network: config.network,
                    blockedBy: leases.filter { $0.ipv6Subnet != nil }.map(\.key).sorted()
                )
            }
            if let preferredIPv6, v6.fits(preferredIPv6), !takenV6.contains(where: { $0.overlaps(preferredIPv6) }) {
                ipv6Candidates.removeAll { $0 == preferredIPv6 }
                ipv6Candidates.insert(preferredIPv6, at: 0)
            }
        }

        // IPv6-only: every key's IPv4 part is 0.0.0.0-0, so only the IPv6
        // side is chosen; one try per IPv6 candidate.
        if config.isIPv6Only {
            let source: SubnetChoice.Source =
                preferredIPv6 != nil && ipv6Candidates.first == preferredIPv6 ? .preferred : .free
            return SubnetChoice(
                source: source,
                candidates: Array(repeating: .noIPv4, count: ipv6Candidates.count),
                obsolete: obsolete,
                ipv6Candidates: ipv6Candidates
            )
        }

        // 2. The subnet we had before, if it is still ours to take.
        if let preferred, config.fits(preferred), !taken.overlaps(preferred) {
            free.removeAll { $0 == preferred }
            return SubnetChoice(
                source: .preferred,
                candidates: [preferred] + free,
                obsolete: obsolete,
                ipv6Candidates: ipv6Candidates
            )
        }

        // 3. A random free one.
        guard !free.isEmpty else {
            let range = config.subnets
            let end = IPv4Network(address: range.highestAddress, prefixLength: range.prefixLength).lastAddress
            func blocks(_ subnet: IPv4Network) -> Bool {
                subnet.lastAddress >= range.lowestAddress && subnet.address <= end
            }
            let keys =
                leases.filter { !obsoleteKeys.contains($0.key) && blocks($0.subnet) }
                .sorted { $0.subnet.address < $1.subnet.address }.map(\.key)
                + occupied.filter(blocks).map(\.leaseKey)
            throw .outOfSubnets(network: config.network, blockedBy: keys)
        }
        return SubnetChoice(source: .free, candidates: free, obsolete: obsolete, ipv6Candidates: ipv6Candidates)
    }

    /// flannel's compatibility test for reusing a lease: its IPv4 subnet
    /// fits, and it has an IPv6 subnet that fits exactly when the network
    /// is dual-stack (an IPv4-only lease in a dual-stack network is replaced
    /// by one with both, keeping the IPv4 subnet when the subnet file names it).
    static func fits(_ config: NetworkConfig, _ lease: Lease) -> Bool {
        guard config.fits(lease.subnet) else { return false }
        guard let v6 = config.ipv6 else { return lease.ipv6Subnet == nil }
        guard let subnet = lease.ipv6Subnet else { return false }
        return v6.fits(subnet)
    }

    /// The first `limit` IPv6 subnets from IPv6SubnetMin up that overlap
    /// none of `taken`, in address order; skips a taken run at once.
    static func firstFreeIPv6(_ config: IPv6NetworkConfig, taken: [IPv6Network], limit: Int) -> [IPv6Network] {
        let ranges = taken.map { $0.address.value...$0.lastAddress.value }.sorted { $0.lowerBound < $1.lowerBound }
        var result: [IPv6Network] = []
        var cursor = 0
        var subnet = config.subnetMin
        let end = config.subnetMax.address
        while subnet.address <= end && result.count < limit {
            let start = subnet.address.value, last = subnet.lastAddress.value
            while cursor < ranges.count && ranges[cursor].upperBound < start { cursor += 1 }
            if cursor < ranges.count && ranges[cursor].lowerBound <= last {
                // Past the taken range, to the next subnet boundary.
                let after = ranges[cursor].upperBound
                guard after < UInt128.max else { break }
                let next = IPv6Network(address: IPv6Address(after + 1), prefixLength: config.subnetLen)
                let aligned = next.address.value == after + 1 ? next : next.next
                guard aligned.address > subnet.address else { break }  // wrapped
                subnet = aligned
                continue
            }
            result.append(subnet)
            let next = subnet.next
            guard next.address > subnet.address else { break }  // the end of the address space
            subnet = next
        }
        return result
    }

    /// The first `limit` subnets of `range` that overlap nothing in `taken`,
    /// in address order. Skips whole taken ranges at once, so a full /8 with
    /// thousands of leases costs one pass over the leases, not one per subnet.
    static func firstFree(in range: SubnetRange, taken: OccupiedRanges, limit: Int) -> [IPv4Network] {
        var result: [IPv4Network] = []
        var index = 0
        var cursor = 0  // into taken.ranges, sorted by start
        let size = UInt64(1) << UInt64(32 - range.prefixLength)
        let count = range.count
        while index < count && result.count < limit {
            let subnet = range[index]
            let start = UInt64(subnet.address.value)
            let end = start + size - 1
            // Ranges ending before this subnet can never overlap a later one.
            while cursor < taken.ranges.count && taken.ranges[cursor].upperBound < start { cursor += 1 }
            if cursor < taken.ranges.count && taken.ranges[cursor].lowerBound <= end {
                // Jump past the taken range to the next subnet boundary.
                let next = (taken.ranges[cursor].upperBound + 1 - UInt64(range.lowestAddress.value) + size - 1) / size
                index = max(index + 1, Int(clamping: next))
                continue
            }
            result.append(subnet)
            index += 1
        }
        return result
    }
}

/// Address ranges covered by leases, merged and sorted, for overlap tests.
struct OccupiedRanges {
    let ranges: [ClosedRange<UInt64>]

    init(_ subnets: some Sequence<IPv4Network>) {
        let sorted = subnets.map { UInt64($0.address.value)...UInt64($0.lastAddress.value) }
            .sorted { $0.lowerBound < $1.lowerBound }
        var merged: [ClosedRange<UInt64>] = []
        for r in sorted {
            if let last = merged.last, r.lowerBound <= last.upperBound + 1 {
                merged[merged.count - 1] = last.lowerBound...max(last.upperBound, r.upperBound)
            } else {
                merged.append(r)
            }
        }
        ranges = merged
    }

    func overlaps(_ subnet: IPv4Network) -> Bool {
        let start = UInt64(subnet.address.value)
        let end = UInt64(subnet.lastAddress.value)
        // First range whose upper bound reaches `start`.
        var low = 0
        var high = ranges.count
        while low < high {
            let mid = (low + high) / 2
            if ranges[mid].upperBound < start { low = mid + 1 } else { high = mid }
        }
        return low < ranges.count && ranges[low].lowerBound <= end
    }
}
