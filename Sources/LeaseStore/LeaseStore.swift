import FlannelFiles
import Foundation
import NetBase

/// What a node records about itself in its lease: flannel's lease value
/// (`{"PublicIP":"…","PublicIPv6":null,"BackendType":…,"BackendData":…}`).
///
/// 16 bytes: the public IP, and the rest in one shared, immutable box (none
/// for a udp lease, one box shared by every host-gw lease read in one list),
/// since a host keeps one of these per peer and may have 60,000 peers.
public struct LeaseAttributes: Sendable, Equatable {
    public var publicIP: IPv4Address
    private var extra: Extra?

    /// What a lease holds besides its public IP.
    final class Extra: Sendable, Equatable {
        let publicIPv6: IPv6Address?
        let backendType: String?
        let backendData: JSONValue?
        let backendV6Data: JSONValue?

        init(publicIPv6: IPv6Address?, backendType: String?, backendData: JSONValue?, backendV6Data: JSONValue?) {
            self.publicIPv6 = publicIPv6
            self.backendType = backendType
            self.backendData = backendData
            self.backendV6Data = backendV6Data
        }

        static func == (a: Extra, b: Extra) -> Bool {
            a === b
                || (a.publicIPv6 == b.publicIPv6 && a.backendType == b.backendType
                    && a.backendData == b.backendData && a.backendV6Data == b.backendV6Data)
        }

        static func make(
            _ publicIPv6: IPv6Address?,
            _ backendType: String?,
            _ backendData: JSONValue?,
            _ backendV6Data: JSONValue?
        ) -> Extra? {
            publicIPv6 == nil && backendType == nil && backendData == nil && backendV6Data == nil
                ? nil
                : Extra(
                    publicIPv6: publicIPv6,
                    backendType: backendType,
                    backendData: backendData,
                    backendV6Data: backendV6Data
                )
        }
    }

    /// The host's IPv6 address for other hosts (`-public-ipv6`, or the
    /// interface's); flannel writes `null` when it has none.
    public var publicIPv6: IPv6Address? {
        get { extra?.publicIPv6 }
        set { extra = .make(newValue, backendType, backendData, backendV6Data) }
    }
    /// Absent for udp nodes (flannel's udp backend writes no BackendType).
    public var backendType: String? {
        get { extra?.backendType }
        set { extra = .make(publicIPv6, newValue, backendData, backendV6Data) }
    }
    /// Backend-specific data (vxlan: `{"VNI":1,"VtepMAC":"…"}`), kept verbatim.
    public var backendData: JSONValue? {
        get { extra?.backendData }
        set { extra = .make(publicIPv6, backendType, newValue, backendV6Data) }
    }
    /// Backend-specific data for the IPv6 side (vxlan: the MAC of its
    /// `flannel-v6.<VNI>` device), kept verbatim.
    public var backendV6Data: JSONValue? {
        get { extra?.backendV6Data }
        set { extra = .make(publicIPv6, backendType, backendData, newValue) }
    }

    /// Whether a lease with these attributes belongs to the host whose own
    /// attributes are `host`: the same PublicIP, as flannel matches leases
    /// and reservations to hosts. A key whose PublicIP is 0.0.0.0 names no
    /// IPv4 address (what flanneld writes in an IPv6-only network, and how
    /// an IPv6 subnet is reserved for a host there): it belongs to the host
    /// with its PublicIPv6. (flanneld's own IPv6-only hosts all write
    /// 0.0.0.0, so each takes whichever such key it lists first.)
    public func belongs(to host: LeaseAttributes) -> Bool {
        if publicIP != IPv4Address(0) { return publicIP == host.publicIP }
        guard let publicIPv6 else { return false }
        return publicIPv6 == host.publicIPv6
    }

    public init(
        publicIP: IPv4Address,
        publicIPv6: IPv6Address? = nil,
        backendType: String? = nil,
        backendData: JSONValue? = nil,
        backendV6Data: JSONValue? = nil
    ) {
        self.publicIP = publicIP
        self.extra = .make(publicIPv6, backendType, backendData, backendV6Data)
    }

    /// Shares `previous`'s box when it holds the same values (consecutive
    /// leases of one list mostly do).
    mutating func share(with previous: LeaseAttributes) {
        if let mine = extra, let theirs = previous.extra, mine !== theirs, mine == theirs { extra = theirs }
    }
}

/// A subnet lease as stored: the subnet, who holds it, and until when.
public struct Lease: Sendable, Equatable, CustomStringConvertible {
    public var subnet: IPv4Network
    public var attributes: LeaseAttributes
    /// When the lease runs out; nil for a reservation (a key with no expiry).
    public var expiration: Date?
    /// The store revision at which this version of the lease was written.
    public var revision: Int64
    /// The key's name under `<prefix>/subnets/`: `10.2.72.0-24`, or a
    /// dual-stack key `10.2.72.0-24&fd00:10:244:1::-64`, which also names
    /// the lease's IPv6 subnet (flanneld keeps it only in the key).
    public var key: String

    /// - Parameter key: the key's name, when it is not the one flannel
    ///   writes for `subnet` and `ipv6Subnet`.
    public init(
        subnet: IPv4Network,
        ipv6Subnet: IPv6Network? = nil,
        attributes: LeaseAttributes,
        expiration: Date?,
        revision: Int64,
        key: String? = nil
    ) {
        self.subnet = subnet
        self.attributes = attributes
        self.expiration = expiration
        self.revision = revision
        self.key = key ?? LeaseKey.key(for: subnet, ipv6: ipv6Subnet)
    }

    /// The IPv6 subnet of a dual-stack lease, read from its key: nil for a
    /// plain key. Not stored, so that an IPv4 lease costs nothing more.
    public var ipv6Subnet: IPv6Network? { LeaseKey.ipv6Subnet(fromKey: key) }

    /// The IPv4 subnet; nil for a lease of an IPv6-only network, whose
    /// `subnet` is 0.0.0.0/0 (flanneld's key `0.0.0.0-0&fd00:10:244:1::-64`).
    /// Every use of `subnet` for routes, tables or rules goes through this.
    public var ipv4Subnet: IPv4Network? { subnet.isNoIPv4 ? nil : subnet }

    /// What names this lease among the leases of its network: the IPv4
    /// subnet, or in an IPv6-only network the IPv6 subnet (all such leases
    /// share the IPv4 part 0.0.0.0/0).
    public var primarySubnet: LeaseSubnet {
        if subnet.isNoIPv4, let v6 = ipv6Subnet { return .ipv6(v6) }
        return .ipv4(subnet)
    }

    public var isReservation: Bool { expiration == nil }

    /// Address order for lists: by IPv4 subnet, then (IPv6-only leases all
    /// have 0.0.0.0/0) by IPv6 subnet.
    public static func inAddressOrder(_ a: Lease, _ b: Lease) -> Bool {
        if a.subnet.address != b.subnet.address { return a.subnet.address < b.subnet.address }
        return (a.ipv6Subnet?.address.value ?? 0) < (b.ipv6Subnet?.address.value ?? 0)
    }

    /// The lease under key name `key`.
    public func withKey(_ key: String) -> Lease {
        var copy = self
        copy.key = key
        return copy
    }

    /// The `expiration` of an expiring lease whose remaining time the store
    /// did not look up (`LeaseStore.peerLeases(holder:)`).
    public static let expirationNotLookedUp = Date.distantFuture

    public var description: String {
        (ipv4Subnet.map { "\($0)" + (ipv6Subnet.map { " + \($0)" } ?? "") } ?? ipv6Subnet.map { "\($0)" } ?? "\(subnet)")
            + " → \(attributes.publicIP)"
            + (isReservation ? " (reserved)" : "")
    }
}

/// What names a lease among the leases of a network (`Lease.primarySubnet`):
/// its IPv4 subnet, or in an IPv6-only network its IPv6 subnet.
///
/// Stored as plain words rather than as an enum with an `IPv6Network`
/// payload: such an enum (16-byte aligned, for its UInt128) captured by a
/// `Mutex.withLock` closure crashed with a null dereference in PeerSync
/// (swift 6 on Linux); this layout has no such alignment.
public struct LeaseSubnet: Hashable, Sendable, CustomStringConvertible {
    private let high: UInt64
    private let low: UInt64
    private let length: UInt8
    private let isIPv6: Bool

    private init(high: UInt64, low: UInt64, length: Int, isIPv6: Bool) {
        self.high = high
        self.low = low
        self.length = UInt8(length)
        self.isIPv6 = isIPv6
    }

    public static func ipv4(_ subnet: IPv4Network) -> LeaseSubnet {
        LeaseSubnet(high: 0, low: UInt64(subnet.address.value), length: subnet.prefixLength, isIPv6: false)
    }

    public static func ipv6(_ subnet: IPv6Network) -> LeaseSubnet {
        let value = subnet.address.value
        return LeaseSubnet(
            high: UInt64(truncatingIfNeeded: value >> 64),
            low: UInt64(truncatingIfNeeded: value),
            length: subnet.prefixLength,
            isIPv6: true
        )
    }

    /// The IPv4 subnet, if this names one.
    public var ipv4: IPv4Network? {
        isIPv6
            ? nil
            : IPv4Network(address: IPv4Address(UInt32(truncatingIfNeeded: low)), prefixLength: Int(length))
    }

    /// The IPv6 subnet, if this names one (an IPv6-only network's lease).
    public var ipv6: IPv6Network? {
        isIPv6
            ? IPv6Network(address: IPv6Address(UInt128(high) << 64 | UInt128(low)), prefixLength: Int(length))
            : nil
    }

    public var description: String {
        if let ipv6 { return ipv6.description }
        return ipv4!.description
    }

    /// The subnet named by lease key `key` whose IPv4 part is `subnet`.
    public init(subnet: IPv4Network, key: String) {
        if subnet.isNoIPv4, let v6 = LeaseKey.ipv6Subnet(fromKey: key) {
            self = .ipv6(v6)
        } else {
            self = .ipv4(subnet)
        }
    }
}

extension IPv4Network {
    /// 0.0.0.0/0: the IPv4 part of a lease key in an IPv6-only network
    /// (flanneld writes `0.0.0.0-0&<IPv6 subnet>`), and the `network` of an
    /// IPv6-only config. Never a subnet to route.
    public static let noIPv4 = IPv4Network(address: IPv4Address(0), prefixLength: 0)

    /// Whether this is `noIPv4`.
    public var isNoIPv4: Bool { prefixLength == 0 && address.value == 0 }
}

/// All leases at one store revision: the starting point of a watch.
public struct LeaseSnapshot: Sendable, Equatable {
    public var leases: [Lease]
    public var revision: Int64
    /// Entries that could not be read (`LeaseStoreError.corrupt` naming the
    /// entry and why) and were left out rather than failing the whole list.
    public var skipped: [LeaseStoreError]
    /// The lease keys (names under `<prefix>/subnets/`) of those entries.
    public var unreadableKeys: [String]
    /// Names under `<prefix>/subnets/` that are no lease keys.
    public var malformedKeys: [String]

    /// `leases` are every readable entry under a lease key, as stored: apply
    /// `LeaseRule` to know which of them are leases of the network.
    public init(
        leases: [Lease],
        revision: Int64,
        skipped: [LeaseStoreError] = [],
        unreadableKeys: [String] = [],
        malformedKeys: [String] = []
    ) {
        self.leases = leases
        self.revision = revision
        self.skipped = skipped
        self.unreadableKeys = unreadableKeys
        self.malformedKeys = malformedKeys
    }
}

/// A host's start in the store: its lease, and every lease (its own
/// included, as it is now) from the same read at one revision — the peers to
/// load, and where their watch starts.
public struct LeaseJoin: Sendable {
    public var lease: Lease
    public var peers: LeaseSnapshot

    public init(lease: Lease, peers: LeaseSnapshot) {
        self.lease = lease
        self.peers = peers
    }
}

/// One change to the set of leases.
public enum LeaseEvent: Sendable, Equatable {
    /// A lease was created or updated (renewed, attributes changed).
    case put(Lease)
    /// A lease was released, deleted, or expired; `key` as `Lease.key`.
    case delete(subnet: IPv4Network, revision: Int64, key: String)

    /// A deletion of the plain key of `subnet`.
    public static func delete(subnet: IPv4Network, revision: Int64) -> LeaseEvent {
        .delete(subnet: subnet, revision: revision, key: subnet.leaseKey)
    }

    public var revision: Int64 {
        switch self {
        case .put(let lease): lease.revision
        case .delete(_, let revision, _): revision
        }
    }

    public var subnet: IPv4Network {
        switch self {
        case .put(let lease): lease.subnet
        case .delete(let subnet, _, _): subnet
        }
    }

    public var key: String {
        switch self {
        case .put(let lease): lease.key
        case .delete(_, _, let key): key
        }
    }

    /// As `Lease.primarySubnet`.
    public var primarySubnet: LeaseSubnet {
        switch self {
        case .put(let lease): lease.primarySubnet
        case .delete(let subnet, _, let key): LeaseSubnet(subnet: subnet, key: key)
        }
    }
}

/// The storage a node needs, in flannel's terms (see docs/DESIGN.md):
/// a network config, subnet leases with an expiry, and a watch over leases
/// that can resume from a revision. Implemented by the embedded local store
/// (one machine) and by etcd v3 (clusters).
public protocol LeaseStore: Sendable {
    /// Where the store lives, for log lines ("etcd http://…/docker/network", "local /var/lib/tunneld").
    var location: String { get }

    /// The network config JSON as stored; nil if none has been written.
    func rawNetworkConfig() async throws -> String?

    /// Validates `json` with flannel's rules and stores it verbatim.
    @discardableResult
    func setNetworkConfig(json: String) async throws -> NetworkConfig

    /// Obtains a lease for `attributes.publicIP`, in flannel's order: a lease
    /// already held by this PublicIP that fits `config`; else `preferred` (the
    /// subnet from the subnet file) if free; else a random free subnet among the
    /// first ones. Lost races are retried with another subnet. In a dual-stack
    /// network the IPv6 subnet is chosen in the same write, `preferredIPv6`
    /// (the subnet file's FLANNEL_IPV6_SUBNET) first when it is free.
    func acquireLease(
        config: NetworkConfig,
        attributes: LeaseAttributes,
        preferred: IPv4Network?,
        preferredIPv6: IPv6Network?
    ) async throws -> Lease

    /// `acquireLease`, and the peers as `peerLeases(holder:)` lists them,
    /// from one read where the store can: a host starting among 60,000
    /// leases reads them once. Changes after `peers.revision` (the lease's
    /// own write among them) come from `watchPeerLeases(after:)`.
    func join(
        config: NetworkConfig,
        attributes: LeaseAttributes,
        preferred: IPv4Network?,
        preferredIPv6: IPv6Network?
    ) async throws -> LeaseJoin

    /// Extends a lease by the store's TTL. Reservations are returned unchanged.
    func renewLease(_ lease: Lease) async throws -> Lease

    /// Deletes a lease (the subnet becomes free for others).
    func releaseLease(_ lease: Lease) async throws

    /// All current leases (expired ones excluded) and the revision they were read at.
    func leases() async throws -> LeaseSnapshot

    /// Changes after `revision`, in order. The stream ends with
    /// `LeaseStoreError.compacted` if those changes are no longer known; the
    /// caller then lists again and diffs.
    func watchLeases(after revision: Int64) -> AsyncThrowingStream<LeaseEvent, any Error>

    /// `leases()` as a host that follows its peers needs it: the store may
    /// skip looking up how long leases not held by `holder` have left (they
    /// carry `Lease.expirationNotLookedUp`). A peer's expiry is of no use to
    /// the others, and in etcd each costs a request: a /8 network of /24
    /// subnets has 65,535 leases.
    func peerLeases(holder: IPv4Address) async throws -> LeaseSnapshot

    /// `watchLeases(after:)` with expiries looked up only for `holder`'s
    /// leases, as `peerLeases(holder:)`.
    func watchPeerLeases(after revision: Int64, holder: IPv4Address) -> AsyncThrowingStream<LeaseEvent, any Error>
}

extension LeaseStore {
    public func peerLeases(holder: IPv4Address) async throws -> LeaseSnapshot { try await leases() }

    /// `acquireLease` with no IPv6 subnet preferred.
    public func acquireLease(
        config: NetworkConfig,
        attributes: LeaseAttributes,
        preferred: IPv4Network?
    ) async throws -> Lease {
        try await acquireLease(config: config, attributes: attributes, preferred: preferred, preferredIPv6: nil)
    }

    /// `join` with no IPv6 subnet preferred.
    public func join(
        config: NetworkConfig,
        attributes: LeaseAttributes,
        preferred: IPv4Network?
    ) async throws -> LeaseJoin {
        try await join(config: config, attributes: attributes, preferred: preferred, preferredIPv6: nil)
    }

    /// Two reads: the lease, then the peers (which then include it).
    public func join(
        config: NetworkConfig,
        attributes: LeaseAttributes,
        preferred: IPv4Network?,
        preferredIPv6: IPv6Network?
    ) async throws -> LeaseJoin {
        let lease = try await acquireLease(
            config: config,
            attributes: attributes,
            preferred: preferred,
            preferredIPv6: preferredIPv6
        )
        return LeaseJoin(lease: lease, peers: try await peerLeases(holder: attributes.publicIP))
    }

    public func watchPeerLeases(
        after revision: Int64,
        holder: IPv4Address
    )
        -> AsyncThrowingStream<LeaseEvent, any Error>
    {
        watchLeases(after: revision)
    }
}

extension LeaseStore {
    /// The parsed, validated network config.
    public func networkConfig() async throws -> NetworkConfig {
        guard let json = try await rawNetworkConfig() else {
            throw LeaseStoreError.configNotFound(location: location)
        }
        return try NetworkConfig(json: json)
    }
}

public enum LeaseStoreError: Error, Sendable, Equatable, CustomStringConvertible {
    case configNotFound(location: String)
    /// `blockedBy`: the keys holding the subnets a host may take.
    case outOfSubnets(network: IPv4Network, blockedBy: [String])
    case compacted(requested: Int64, oldest: Int64)
    case leaseNotFound(subnet: IPv4Network)
    case corrupt(key: String, reason: String)
    case io(path: String, reason: String)

    /// The first keys and how many more: an error names what blocks it
    /// without printing 65,000 keys.
    static func list(_ keys: [String], first: Int = 8) -> String {
        guard !keys.isEmpty else { return "nothing (SubnetMin is above SubnetMax)" }
        let shown = keys.prefix(first).joined(separator: ", ")
        let noun = keys.count == 1 ? "key" : "keys"
        return keys.count > first
            ? "\(keys.count) \(noun): \(shown) and \(keys.count - first) more"
            : "\(keys.count) \(noun): \(shown)"
    }

    public var description: String {
        switch self {
        case .configNotFound(let location):
            "no network config in \(location): write one with `tunneld config set FILE` (or etcdctl put <prefix>/config)"
        case .outOfSubnets(let network, let keys) where network.isNoIPv4:
            "out of subnets: every IPv6 subnet of the IPv6Network from IPv6SubnetMin to IPv6SubnetMax is taken, by "
                + Self.list(keys) + "; release a lease or widen IPv6Network/IPv6SubnetMin/IPv6SubnetMax"
        case .outOfSubnets(let network, let keys):
            "out of subnets: every subnet of \(network) from SubnetMin to SubnetMax is taken, by "
                + Self.list(keys) + "; release a lease or widen Network/SubnetMin/SubnetMax"
        case .compacted(let requested, let oldest):
            "changes after revision \(requested) are no longer kept (oldest kept: \(oldest)); list again"
        case .leaseNotFound(let subnet) where subnet.isNoIPv4:
            "our IPv6-only lease was not found (expired or deleted)"
        case .leaseNotFound(let subnet):
            "lease for \(subnet) not found (expired or deleted)"
        case .corrupt(let key, let reason):
            "store entry \(key) is unreadable: \(reason)"
        case .io(let path, let reason):
            "\(path): \(reason)"
        }
    }
}
