import LeaseStore
import Logging
import NetBase
import Netlink
import PeerControl

/// What every backend is handed about the host it runs on — flannel's
/// `ExternalInterface` plus the network config, the route socket and the
/// logger — so that a backend declares only what is its own.
public struct HostContext: Sendable {
    public var config: NetworkConfig
    /// The underlay link (`--iface`).
    public var underlay: Link
    /// Its address the lease's PublicIP falls back to.
    public var underlayAddress: InterfaceAddress
    /// What the lease says other hosts send to.
    public var publicIP: IPv4Address
    /// In a dual-stack network, what the lease's PublicIPv6 says other hosts
    /// send IPv6 to (`-public-ipv6` or the underlay's address); nil otherwise.
    public var publicIPv6: IPv6Address?
    /// The underlay's global IPv6 addresses: a peer whose PublicIPv6 is in
    /// one of their networks is reachable on the link (host-gw, DirectRouting).
    public var underlayIPv6: [InterfaceIPv6Address]
    public var routeSocket: RouteSocket
    public var logger: Logger

    public init(
        config: NetworkConfig,
        underlay: Link,
        underlayAddress: InterfaceAddress,
        publicIP: IPv4Address,
        publicIPv6: IPv6Address? = nil,
        underlayIPv6: [InterfaceIPv6Address] = [],
        routeSocket: RouteSocket,
        logger: Logger
    ) {
        self.config = config
        self.underlay = underlay
        self.underlayAddress = underlayAddress
        self.publicIP = publicIP
        self.publicIPv6 = publicIPv6
        self.underlayIPv6 = underlayIPv6
        self.routeSocket = routeSocket
        self.logger = logger
    }

    /// Removes what another mode left on this host (see `Leftovers`).
    func removeLeftovers(keepingDevices devices: [String] = [], peerRoutesToo: Bool) {
        Leftovers.remove(
            keepingDevices: devices,
            peerRoutesToo: peerRoutesToo,
            network: config.network,
            subnetLen: config.subnetLen,
            ipv6: config.ipv6,
            underlay: underlay,
            routeSocket: routeSocket,
            logger: logger
        )
    }
}

extension HostContext {
    /// Whether `address` is on the underlay's link: inside the network of one
    /// of its global IPv6 addresses.
    func isOnLink(_ address: IPv6Address) -> Bool {
        underlayIPv6.contains { IPv6Network(address: $0.address, prefixLength: $0.prefixLength).contains(address) }
    }
}

/// A backend built from a `HostContext`: the context's parts by name.
protocol HostBackend {
    var host: HostContext { get }
}

extension HostBackend {
    var config: NetworkConfig { host.config }
    var underlay: Link { host.underlay }
    var underlayAddress: InterfaceAddress { host.underlayAddress }
    var publicIP: IPv4Address { host.publicIP }
    var publicIPv6: IPv6Address? { host.publicIPv6 }
    var routeSocket: RouteSocket { host.routeSocket }
    var logger: Logger { host.logger }
}

/// What a backend type's constructor may need beyond the host: the udp
/// data path's options (the kernel backends take none).
public struct BackendOptions: Sendable {
    public var udp: UDPBackend.Options
    /// The wireguard backend's threads per direction that share a batch's crypto.
    public var wireguardWorkers: Int
    public init(udp: UDPBackend.Options = .init(), wireguardWorkers: Int = 1) {
        self.udp = udp
        self.wireguardWorkers = wireguardWorkers
    }
}

extension BackendType {
    /// The backend of this type for `host`, after removing what the other
    /// modes left (a restart with a new Backend.Type switches modes): each
    /// type knows which of its own leftovers to keep. A new backend is one
    /// file and one case here.
    public func makeBackend(_ host: HostContext, options: BackendOptions = .init()) throws -> any Backend {
        switch self {
        case .udp:
            // The TUN goes with its process; vxlan devices and host-gw
            // routes of an earlier mode go now.
            host.removeLeftovers(peerRoutesToo: true)
            return try UDPBackend(host: host, options: options.udp)
        case .vxlan:
            // Its own device (and DirectRouting routes) stay across a restart.
            let backend = try VXLANBackend(host: host)
            host.removeLeftovers(keepingDevices: backend.deviceNames, peerRoutesToo: false)
            return backend
        case .hostGW:
            // Its own routes are checked by its route keeper, not removed.
            let backend = try HostGatewayBackend(host: host)
            host.removeLeftovers(peerRoutesToo: false)
            return backend
        case .wireguard:
            // Its TUN goes with its process, like udp's.
            host.removeLeftovers(peerRoutesToo: true)
            return try WireGuardBackend(
                host: host,
                offload: options.udp.offload,
                workers: options.wireguardWorkers,
                busyPollMicroseconds: options.udp.busyPollMicroseconds
            )
        }
    }
}
