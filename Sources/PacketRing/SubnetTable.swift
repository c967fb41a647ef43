import Atomics
import NetBase
import Synchronization
import UDPEncap

#if canImport(Glibc)
import Glibc
#endif

/// Where the data path sends packets for one subnet of the network: an
/// entry of the data path's table, not a kernel route (Netlink's `NextHop`).
public enum NextHop: Hashable, Sendable, CustomStringConvertible {
    /// A remote host over the IPv4 underlay: encapsulate and send to it.
    case peer(UDPEndpoint)
    /// A remote host over the IPv6 underlay.
    case peer6(UDPEndpoint6)
    /// This host's own subnet: never sent into the tunnel.
    case local

    public var description: String {
        switch self {
        case .peer(let endpoint): "peer \(endpoint)"
        case .peer6(let endpoint): "peer \(endpoint)"
        case .local: "local"
        }
    }
}

/// The subnet → host table of the data path.
///
/// Direct-indexed over the configured network: the entry of address `a` is
/// `(a − network) >> (32 − SubnetLen)`. Each entry is one 64-bit word
/// (kind | port | IPv4 address, or for a peer on the IPv6 underlay kind |
/// port | slot in `addresses6`), written and read atomically, so a reader
/// never sees half of an update and never takes a lock. Writers (the control
/// task) serialise among themselves.
///
/// The storage is an anonymous mapping: for a large network most entries are
/// never written and cost no memory (untouched pages read as zero = empty).
public final class SubnetTable: @unchecked Sendable {
    public let network: IPv4Network
    public let subnetLength: Int
    public let entryCount: Int
    /// Where entries of IPv6-underlay peers keep their addresses; shared
    /// with the IPv6 side of the table.
    public let addresses6: PeerAddresses6

    private let entries: EntryStorage
    private let storage: UnsafeMutablePointer<UnsafeAtomic<UInt64>.Storage>
    private let shift: UInt32
    private let base: UInt32
    /// The writers' view: what each subnet is set to, for listing and diffing.
    private let routes = Mutex<[IPv4Network: NextHop]>([:])
    /// Bumped by every change (a set, or a remove that removed something),
    /// under `routes`' lock; read by the metrics endpoint and `tunneld status`.
    private let changes = ManagedAtomic<UInt64>(0)

    static let kindPeer: UInt64 = 1 << 48
    static let kindLocal: UInt64 = 2 << 48
    /// Both bits: a peer (bit 48) whose address is in a slot.
    static let kindPeer6: UInt64 = 3 << 48

    public init(network: IPv4Network, subnetLength: Int, addresses6: PeerAddresses6? = nil) throws {
        guard subnetLength >= network.prefixLength, subnetLength <= 32 else {
            throw SubnetTableError.badSubnetLength(network: network, subnetLength: subnetLength)
        }
        self.network = network
        self.subnetLength = subnetLength
        self.entryCount = 1 << (subnetLength - network.prefixLength)
        self.shift = UInt32(32 - subnetLength)
        self.base = network.address.value
        entries = try EntryStorage(count: entryCount, for: "subnet table for \(network)")
        storage = entries.storage
        self.addresses6 = try addresses6 ?? PeerAddresses6()
    }

    // MARK: Data path (lock-free)

    /// The raw entry for a destination address (host byte order); 0 when no
    /// subnet holds it. Decode with `SubnetTable.endpoint(of:)`.
    @inline(__always)
    public func entry(for address: UInt32) -> UInt64 {
        let offset = address &- base
        let index = offset >> shift
        // An address outside the network wraps to an offset ≥ the network's
        // size, so to an index past the end.
        guard Int(index) < entryCount else { return 0 }
        return UnsafeAtomic<UInt64>(at: storage + Int(index)).load(ordering: .relaxed)
    }

    /// A peer on the IPv4 underlay.
    @inline(__always) public static func isPeer(_ entry: UInt64) -> Bool { entry & (0xff << 48) == kindPeer }
    /// A peer on the IPv6 underlay (its address in a slot of `addresses6`).
    @inline(__always) public static func isPeer6(_ entry: UInt64) -> Bool { entry & (0xff << 48) == kindPeer6 }
    /// A peer on either underlay.
    @inline(__always) public static func isAnyPeer(_ entry: UInt64) -> Bool { entry & kindPeer != 0 }
    @inline(__always) public static func isLocal(_ entry: UInt64) -> Bool { entry & (0xff << 48) == kindLocal }
    /// IPv4 address (host order) of an IPv4-underlay peer entry.
    @inline(__always) public static func peerAddress(_ entry: UInt64) -> UInt32 { UInt32(truncatingIfNeeded: entry) }
    /// The slot of an IPv6-underlay peer entry's address.
    @inline(__always) public static func peerSlot(_ entry: UInt64) -> Int { Int(UInt32(truncatingIfNeeded: entry)) }
    @inline(__always) public static func peerPort(_ entry: UInt64) -> UInt16 { UInt16(truncatingIfNeeded: entry >> 32) }

    /// The entry of an IPv4-underlay peer (address in host order).
    @inline(__always)
    static func entry(ipv4 address: UInt32, port: UInt16) -> UInt64 {
        kindPeer | UInt64(port) << 32 | UInt64(address)
    }

    /// The entry for `route`; an IPv6 peer's address takes a slot in
    /// `addresses` the first time it is seen.
    static func encode(_ route: NextHop, _ addresses: PeerAddresses6) throws(SubnetTableError) -> UInt64 {
        switch route {
        case .peer(let e): entry(ipv4: e.address.value, port: e.port)
        case .peer6(let e): kindPeer6 | UInt64(e.port) << 32 | UInt64(try addresses.slot(for: e.address))
        case .local: kindLocal
        }
    }

    /// The route an entry stands for (nil: empty).
    static func decode(_ entry: UInt64, _ addresses: PeerAddresses6) -> NextHop? {
        if isPeer(entry) {
            return .peer(UDPEndpoint(address: IPv4Address(peerAddress(entry)), port: peerPort(entry)))
        }
        if isPeer6(entry) {
            return .peer6(
                UDPEndpoint6(address: IPv6Address(addresses.address(peerSlot(entry))), port: peerPort(entry))
            )
        }
        return isLocal(entry) ? .local : nil
    }

    /// The entry of `route` as this table stores it (tests compare the
    /// data path's decisions with it).
    public func entry(of route: NextHop) throws -> UInt64 { try SubnetTable.encode(route, addresses6) }

    /// What the data path would do for `address`.
    public func nextHop(for address: IPv4Address) -> NextHop? {
        SubnetTable.decode(entry(for: address.value), addresses6)
    }

    // MARK: Control side

    /// Points `subnet` at `route`. The subnet must lie in the network and be
    /// no smaller than SubnetLen (a larger one fills several entries). As in
    /// a routing table the most specific subnet wins: a wider subnet set over
    /// narrower ones fills only the entries none of them holds.
    public func set(_ subnet: IPv4Network, to route: NextHop) throws {
        let range = try indices(of: subnet)
        // An IPv6 peer's slot is taken here, outside the lock, so that
        // refresh never meets an address without one.
        _ = try SubnetTable.encode(route, addresses6)
        routes.withLock { routes in
            routes[subnet] = route
            refresh(range, from: routes)
            changes.wrappingIncrement(ordering: .relaxed)
        }
    }

    /// Forgets `subnet`; packets for it then go to the next wider subnet set
    /// around it, or get "network unreachable" when there is none.
    public func remove(_ subnet: IPv4Network) {
        guard let range = try? indices(of: subnet) else { return }
        routes.withLock { routes in
            guard routes.removeValue(forKey: subnet) != nil else { return }
            refresh(range, from: routes)
            changes.wrappingIncrement(ordering: .relaxed)
        }
    }

    /// Stores in each entry of `range` the route of the most specific subnet
    /// in `routes` that covers it (0: none). Control side only, under the
    /// lock; one dictionary look-up per entry and prefix length, and a
    /// lease is one entry.
    private func refresh(_ range: Range<Int>, from routes: [IPv4Network: NextHop]) {
        for i in range {
            let address = IPv4Address(base &+ UInt32(i) << shift)
            var value: UInt64 = 0
            var length = subnetLength
            while length >= network.prefixLength {
                if let covering = routes[IPv4Network(address: address, prefixLength: length)] {
                    value = (try? SubnetTable.encode(covering, addresses6)) ?? 0
                    break
                }
                length -= 1
            }
            // Releasing: an IPv6 peer's slot is written before the entry
            // that names it can be seen (`PeerAddresses6.address`).
            UnsafeAtomic<UInt64>(at: storage + i).store(value, ordering: .releasing)
        }
    }

    /// What `subnet` is currently set to, as the writers see it.
    public func nextHop(of subnet: IPv4Network) -> NextHop? { routes.withLock { $0[subnet] } }

    /// How many changes the table has seen: a new value means the data path
    /// is steering by a new set of routes.
    public var generation: UInt64 { changes.load(ordering: .relaxed) }

    /// How many subnets are set (peers and our own).
    public var count: Int { routes.withLock { $0.count } }

    /// Every subnet currently set, as the writers see it.
    public var allNextHops: [IPv4Network: NextHop] { routes.withLock { $0 } }

    private func indices(of subnet: IPv4Network) throws -> Range<Int> {
        guard network.contains(subnet) else {
            throw SubnetTableError.outsideNetwork(subnet: subnet, network: network)
        }
        guard subnet.prefixLength <= subnetLength else {
            throw SubnetTableError.smallerThanSubnetLength(subnet: subnet, subnetLength: subnetLength)
        }
        let first = Int((subnet.address.value &- base) >> shift)
        return first..<first + (1 << (subnetLength - subnet.prefixLength))
    }
}

public enum SubnetTableError: Error, Sendable, CustomStringConvertible {
    case badSubnetLength(network: IPv4Network, subnetLength: Int)
    case outsideNetwork(subnet: IPv4Network, network: IPv4Network)
    case smallerThanSubnetLength(subnet: IPv4Network, subnetLength: Int)
    case tooManyIPv6Peers(capacity: Int)

    public var description: String {
        switch self {
        case .badSubnetLength(let network, let len):
            "SubnetLen /\(len) does not fit Network \(network)"
        case .outsideNetwork(let subnet, let network):
            "subnet \(subnet) lies outside the network \(network); ignoring it"
        case .smallerThanSubnetLength(let subnet, let len):
            "subnet \(subnet) is smaller than SubnetLen /\(len); ignoring it"
        case .tooManyIPv6Peers(let capacity):
            "this daemon has seen \(capacity) different IPv6 underlay addresses of peers, all it can hold; ignoring the new one: restart tunneld to start afresh"
        }
    }
}

/// The entries of a data-path table: `count` 64-bit words, each read and
/// written atomically, in an anonymous mapping so that entries never
/// written cost no memory (untouched pages read as zero = empty).
final class EntryStorage: @unchecked Sendable {
    let storage: UnsafeMutablePointer<UnsafeAtomic<UInt64>.Storage>
    private let mappedBytes: Int

    /// `what` names the table in an error.
    init(count: Int, for what: String) throws {
        let bytes = count * MemoryLayout<UnsafeAtomic<UInt64>.Storage>.stride
        let pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))
        mappedBytes = (bytes + pageSize - 1) / pageSize * pageSize
        let p = mmap(nil, mappedBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let p, p != MAP_FAILED else {
            throw SystemError("mmap \(mappedBytes) bytes", on: what, errno: .current)
        }
        storage = p.bindMemory(to: UnsafeAtomic<UInt64>.Storage.self, capacity: count)
    }

    deinit { munmap(storage, mappedBytes) }
}
