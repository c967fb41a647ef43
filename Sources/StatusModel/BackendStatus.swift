import Foundation

/// A backend's state as an operator sees it — one model for what a backend
/// reports (PeerControl's `BackendReport`), what `tunneld status` shows and
/// prints as JSON, and what the metrics endpoint exports (Observability's
/// `StatusReport.Backend`). No package dependencies, so both import it; rendering
/// stays in Observability.
public struct BackendStatus: Codable, Sendable, Equatable {
    /// flannel's backend name: udp, vxlan, host-gw, wireguard.
    public var type: String
    /// The device carrying traffic (flannel0, flannel.1), nil for host-gw.
    public var device: String?
    /// One line: the data path and its workers (udp), or what the kernel does.
    public var summary: String
    /// Data-path threads (udp), 0 for the kernel's backends.
    public var workers: Int
    /// The offloads the data path chose, by name (e.g. tun-vnet-hdr, udp-gso);
    /// with several devices, those every device has.
    public var offloads: [String]
    /// Each device's offloads, for a backend with more than one device
    /// (wireguard's flannel-wg and flannel-wg-v6 in mode separate); nil otherwise.
    public var deviceOffloads: [DeviceOffloads]?
    /// The udp data path's tier (uring, uring-single, syscall, simple); nil
    /// for the kernel's backends.
    public var datapathTier: String?
    /// Why that tier and not a faster one; nil when it is the one asked for.
    public var datapathNote: String?
    /// Entries of the table traffic is steered by: the udp data path's subnet
    /// table (ours and the peers'), or the kernel routes installed for peers.
    public var tableEntries: Int
    /// Changes the table has seen since start.
    public var tableGeneration: UInt64
    /// The encrypted tunnels, one per peer (wireguard), like `wg show`; nil
    /// for the other backends.
    public var tunnels: [TunnelStatus]?

    public init(
        type: String,
        device: String? = nil,
        summary: String = "",
        workers: Int = 0,
        offloads: [String] = [],
        datapathTier: String? = nil,
        datapathNote: String? = nil,
        tableEntries: Int = 0,
        tableGeneration: UInt64 = 0
    ) {
        self.type = type
        self.device = device
        self.summary = summary
        self.workers = workers
        self.offloads = offloads
        self.datapathTier = datapathTier
        self.datapathNote = datapathNote
        self.tableEntries = tableEntries
        self.tableGeneration = tableGeneration
    }
}

/// The offloads one device's data path chose.
public struct DeviceOffloads: Codable, Sendable, Equatable {
    public var device: String
    public var offloads: [String]

    public init(device: String, offloads: [String]) {
        self.device = device
        self.offloads = offloads
    }
}

/// One peer of the wireguard backend, as `wg show` shows it.
public struct TunnelStatus: Codable, Sendable, Equatable {
    /// The peer's lease subnet (its allowed source).
    public var subnet: String
    /// The peer's public key, base64.
    public var publicKey: String
    /// Where its datagrams go (updated from authenticated packets), nil before any.
    public var endpoint: String?
    /// When a handshake with it last completed; nil if none has.
    public var latestHandshake: Date?
    /// Whether a session's keys are in use now.
    public var hasSession: Bool
    /// Bytes of transport messages received from and sent to it.
    public var bytesReceived: UInt64
    public var bytesSent: UInt64

    public init(
        subnet: String,
        publicKey: String,
        endpoint: String?,
        latestHandshake: Date?,
        hasSession: Bool,
        bytesReceived: UInt64,
        bytesSent: UInt64
    ) {
        self.subnet = subnet
        self.publicKey = publicKey
        self.endpoint = endpoint
        self.latestHandshake = latestHandshake
        self.hasSession = hasSession
        self.bytesReceived = bytesReceived
        self.bytesSent = bytesSent
    }
}
