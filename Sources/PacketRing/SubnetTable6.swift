import Atomics
import NetBase
import Synchronization

/// The IPv6 side of the data path's table in a dual-stack network: which
/// peer holds the IPv6 subnet of a destination.
///
/// Direct-indexed like `SubnetTable`: the entry of address `a` is
/// `(a − network) >> (128 − IPv6SubnetLen)`, one atomic 64-bit word in
/// `SubnetTable`'s encoding (a peer's IPv4 endpoint, an IPv6 endpoint's
/// slot in the shared `PeerAddresses6`, or local), so the loops decode both
/// sides alike and never take a lock. Every IPv6 lease is
/// exactly IPv6SubnetLen long (`LeaseRule`), so a subnet is one entry.
public final class SubnetTable6: @unchecked Sendable {
    public let network: IPv6Network
    public let subnetLength: Int
    public let entryCount: Int
    /// The IPv6 peer addresses, shared with the IPv4 side.
    public let addresses6: PeerAddresses6

    /// At most 2^24 subnets (128 MiB of address space for the table, of
    /// which only written pages cost memory): a /40 network of /64s.
    public static let maximumSubnetBits = 24

    private let entries: EntryStorage
    private let storage: UnsafeMutablePointer<UnsafeAtomic<UInt64>.Storage>
    private let shift: UInt128
    private let base: UInt128
    /// The writers' view, for listing.
    private let routes = Mutex<[IPv6Network: NextHop]>([:])

    public init(network: IPv6Network, subnetLength: Int, addresses6: PeerAddresses6? = nil) throws {
        guard subnetLength >= network.prefixLength, subnetLength <= 128 else {
            throw SubnetTable6Error.badSubnetLength(network: network, subnetLength: subnetLength)
        }
        guard subnetLength - network.prefixLength <= Self.maximumSubnetBits else {
            throw SubnetTable6Error.tooManySubnets(network: network, subnetLength: subnetLength)
        }
        self.network = network
        self.subnetLength = subnetLength
        entryCount = 1 << (subnetLength - network.prefixLength)
        shift = UInt128(128 - subnetLength)
        base = network.address.value
        entries = try EntryStorage(count: entryCount, for: "IPv6 subnet table for \(network)")
        storage = entries.storage
        self.addresses6 = try addresses6 ?? PeerAddresses6()
    }

    // MARK: Data path (lock-free)

    /// The raw entry for a destination address; 0 when no subnet holds it.
    /// Decode with `SubnetTable`'s `isPeer`, `peerAddress`, … .
    @inline(__always)
    public func entry(for address: UInt128) -> UInt64 {
        let offset = address &- base
        // An address outside the network wraps to an offset past its size.
        guard offset >> shift < UInt128(entryCount) else { return 0 }
        return UnsafeAtomic<UInt64>(at: storage + Int(truncatingIfNeeded: offset >> shift)).load(ordering: .relaxed)
    }

    /// The base address of the IPv6 subnet `address` lies in (the source of
    /// an ICMPv6 error about a packet for it, as `Forwarder.errorSource`).
    @inline(__always)
    public func subnetBase(of address: UInt128) -> UInt128 { address & IPv6Network.mask(subnetLength) }

    /// What the data path would do for `address`.
    public func nextHop(for address: IPv6Address) -> NextHop? {
        SubnetTable.decode(entry(for: address.value), addresses6)
    }

    // MARK: Control side

    /// Points `subnet` (IPv6SubnetLen long, in the network) at `route`.
    public func set(_ subnet: IPv6Network, to route: NextHop) throws {
        let index = try self.index(of: subnet)
        let value = try SubnetTable.encode(route, addresses6)
        routes.withLock { routes in
            routes[subnet] = route
            // Releasing: see `SubnetTable.refresh`.
            UnsafeAtomic<UInt64>(at: storage + index).store(value, ordering: .releasing)
        }
    }

    /// Forgets `subnet`: packets for it get "no route" from then on.
    public func remove(_ subnet: IPv6Network) {
        guard let index = try? self.index(of: subnet) else { return }
        routes.withLock { routes in
            guard routes.removeValue(forKey: subnet) != nil else { return }
            UnsafeAtomic<UInt64>(at: storage + index).store(0, ordering: .relaxed)
        }
    }

    /// What `subnet` is set to, as the writers see it.
    public func nextHop(of subnet: IPv6Network) -> NextHop? { routes.withLock { $0[subnet] } }

    /// Every subnet currently set.
    public var allNextHops: [IPv6Network: NextHop] { routes.withLock { $0 } }

    private func index(of subnet: IPv6Network) throws -> Int {
        guard network.contains(subnet) else {
            throw SubnetTable6Error.outsideNetwork(subnet: subnet, network: network)
        }
        guard subnet.prefixLength == subnetLength else {
            throw SubnetTable6Error.notSubnetLength(subnet: subnet, subnetLength: subnetLength)
        }
        return Int(truncatingIfNeeded: (subnet.address.value &- base) >> shift)
    }
}

public enum SubnetTable6Error: Error, Sendable, CustomStringConvertible {
    case badSubnetLength(network: IPv6Network, subnetLength: Int)
    case tooManySubnets(network: IPv6Network, subnetLength: Int)
    case outsideNetwork(subnet: IPv6Network, network: IPv6Network)
    case notSubnetLength(subnet: IPv6Network, subnetLength: Int)

    public var description: String {
        switch self {
        case .badSubnetLength(let network, let length):
            "IPv6SubnetLen /\(length) does not fit IPv6Network \(network)"
        case .tooManySubnets(let network, let length):
            "IPv6Network \(network) holds 2^\(length - network.prefixLength) subnets of /\(length), more than the udp backend's table takes (2^\(SubnetTable6.maximumSubnetBits)): use a longer IPv6Network prefix or a shorter IPv6SubnetLen"
        case .outsideNetwork(let subnet, let network):
            "IPv6 subnet \(subnet) lies outside the network \(network); ignoring it"
        case .notSubnetLength(let subnet, let length):
            "IPv6 subnet \(subnet) is not IPv6SubnetLen (/\(length)) long; ignoring it"
        }
    }
}
