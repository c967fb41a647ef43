import DataPathCounters
import Foundation
@_exported import StatusModel

/// What `tunneld status` shows, and what the metrics endpoint exports: read
/// from the running daemon (over its control socket) or, when none runs,
/// from the store. Plain values only, so that this module knows nothing of
/// backends or stores; the JSON form (`--json`) is this type encoded.
public struct StatusReport: Codable, Sendable, Equatable {
    public enum Source: String, Codable, Sendable {
        /// The running daemon answered: live peers, counters and offloads.
        case daemon
        /// No daemon answered: config and leases as the store holds them.
        case store
    }

    public struct Network: Codable, Sendable, Equatable {
        public var network: String
        public var subnetLen: Int
        public var subnetMin: String
        public var subnetMax: String
        /// The config's Backend.Type.
        public var backendType: String
        public var backendPort: Int?

        public init(
            network: String,
            subnetLen: Int,
            subnetMin: String,
            subnetMax: String,
            backendType: String,
            backendPort: Int? = nil
        ) {
            self.network = network
            self.subnetLen = subnetLen
            self.subnetMin = subnetMin
            self.subnetMax = subnetMax
            self.backendType = backendType
            self.backendPort = backendPort
        }
    }

    /// This host: its lease and how it reaches the others.
    public struct Node: Codable, Sendable, Equatable {
        public var subnet: String
        public var publicIP: String
        public var interface: String?
        public var interfaceAddress: String?
        /// The MTU containers get (subnet.env's FLANNEL_MTU).
        public var mtu: Int?
        /// nil for a reservation (a lease that never expires).
        public var leaseExpires: Date?
        public var leaseRevision: Int64

        public init(
            subnet: String,
            publicIP: String,
            interface: String? = nil,
            interfaceAddress: String? = nil,
            mtu: Int? = nil,
            leaseExpires: Date?,
            leaseRevision: Int64
        ) {
            self.subnet = subnet
            self.publicIP = publicIP
            self.interface = interface
            self.interfaceAddress = interfaceAddress
            self.mtu = mtu
            self.leaseExpires = leaseExpires
            self.leaseRevision = leaseRevision
        }
    }

    /// The backend's state: the one model PeerControl's `BackendReport` carries.
    public typealias Backend = BackendStatus

    public struct Peer: Codable, Sendable, Equatable {
        public var subnet: String
        public var publicIP: String
        public var backend: String
        /// When this daemon last added or changed the peer (daemon only).
        public var lastChange: Date?
        /// The store revision of the peer's lease.
        public var revision: Int64
        /// nil for a reservation.
        public var expires: Date?

        public init(
            subnet: String,
            publicIP: String,
            backend: String,
            lastChange: Date?,
            revision: Int64,
            expires: Date?
        ) {
            self.subnet = subnet
            self.publicIP = publicIP
            self.backend = backend
            self.lastChange = lastChange
            self.revision = revision
            self.expires = expires
        }
    }

    public var source: Source
    public var version: String
    /// Where the config and leases live ("etcd http://…/coreos.com/network").
    public var store: String
    public var generatedAt: Date
    /// When the daemon started (daemon only).
    public var startedAt: Date?
    public var network: Network
    /// nil when reading the store and no lease of this host was found.
    public var node: Node?
    /// nil when reading the store (the daemon chooses the data path).
    public var backend: Backend?
    public var peers: [Peer]
    /// Data-path counters summed over the workers, by name (daemon only).
    public var counters: [String: UInt64]
    /// What the reader should know: why the daemon was not asked, leases skipped…
    public var notes: [String]

    public init(
        source: Source,
        version: String,
        store: String,
        generatedAt: Date = Date(),
        startedAt: Date? = nil,
        network: Network,
        node: Node?,
        backend: Backend?,
        peers: [Peer],
        counters: [String: UInt64] = [:],
        notes: [String] = []
    ) {
        self.source = source
        self.version = version
        self.store = store
        self.generatedAt = generatedAt
        self.startedAt = startedAt
        self.network = network
        self.node = node
        self.backend = backend
        self.peers = peers
        self.counters = counters
        self.notes = notes
    }

    // MARK: - JSON

    public func json() -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        encoder.dateEncodingStrategy = .iso8601
        // Only plain values: encoding cannot fail.
        return Array((try? encoder.encode(self)) ?? Data("{}".utf8)) + [UInt8(ascii: "\n")]
    }

    public static func decode(json: [UInt8]) throws -> StatusReport {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        return try decoder.decode(StatusReport.self, from: Data(json))
    }

    // MARK: - Table

    /// The report for people, in the manner of `wg show`: the network, this
    /// host, its peers, then the data path's counters.
    public func table(now: Date = Date()) -> String {
        var out: [String] = []
        func field(_ name: String, _ value: String) { out.append("  \(name): \(value)") }

        out.append("network: \(network.network)")
        field("subnets", "/\(network.subnetLen) from \(network.subnetMin) to \(network.subnetMax)")
        field("backend", network.backendType + (network.backendPort.map { " (port \($0))" } ?? ""))
        field("store", store)
        switch source {
        case .daemon:
            field(
                "daemon",
                "running" + (startedAt.map { " since \(Self.time($0)) (\(Self.age($0, now: now)))" } ?? "")
                    + ", tunneld \(version)"
            )
        case .store:
            field("daemon", "not asked (read from the store)")
        }

        out.append("")
        if let node {
            out.append("node: \(node.subnet)")
            field("public ip", node.publicIP)
            if let interface = node.interface {
                field("interface", interface + (node.interfaceAddress.map { " (\($0))" } ?? ""))
            }
            if let mtu = node.mtu { field("mtu", "\(mtu)") }
            field(
                "lease expires",
                node.leaseExpires.map { "\(Self.time($0)) (\(Self.until($0, now: now)))" }
                    ?? "never (reservation)"
            )
        } else {
            out.append("node: no lease of this host found")
        }
        if let backend {
            field("backend", backend.type + (backend.device.map { ", device \($0)" } ?? ""))
            field("data path", backend.summary)
            if let tier = backend.datapathTier { field("tier", tier + (backend.datapathNote.map { " (\($0))" } ?? "")) }
            if backend.workers > 0 {
                func list(_ offloads: [String]) -> String {
                    offloads.isEmpty ? "none" : offloads.joined(separator: ", ")
                }
                if let devices = backend.deviceOffloads, devices.count > 1 {
                    for device in devices { field("offloads \(device.device)", list(device.offloads)) }
                } else {
                    field("offloads", list(backend.offloads))
                }
            }
            field("table", "\(backend.tableEntries) entries, generation \(backend.tableGeneration)")
        }
        if let tunnels = backend?.tunnels {
            // wireguard: one line per peer, like `wg show`.
            out.append("")
            out.append("tunnels: \(tunnels.count)")
            if !tunnels.isEmpty {
                let header = ["SUBNET", "ENDPOINT", "LATEST-HANDSHAKE", "TRANSFER", "PUBLIC-KEY"]
                let rows = tunnels.map { tunnel in
                    [
                        tunnel.subnet, tunnel.endpoint ?? "(none yet)",
                        tunnel.latestHandshake.map {
                            Self.age($0, now: now) + (tunnel.hasSession ? "" : ", keys expired")
                        }
                            ?? "none",
                        "\(Self.bytes(tunnel.bytesReceived)) received, \(Self.bytes(tunnel.bytesSent)) sent",
                        tunnel.publicKey,
                    ]
                }
                out += Self.columns([header] + rows).map { "  " + $0 }
            }
        }

        out.append("")
        out.append("peers: \(peers.count)")
        if !peers.isEmpty {
            let header = ["SUBNET", "PUBLIC-IP", "BACKEND", "LAST-CHANGE", "EXPIRES"]
            let rows = peers.map { peer in
                [
                    peer.subnet, peer.publicIP, peer.backend,
                    peer.lastChange.map { Self.age($0, now: now) } ?? "rev \(peer.revision)",
                    peer.expires.map { Self.until($0, now: now) } ?? "never (reservation)",
                ]
            }
            out += Self.columns([header] + rows).map { "  " + $0 }
        }

        if !counters.isEmpty {
            out.append("")
            out.append("data path:")
            out += Self.counterLines(counters).map { "  " + $0 }
        }
        if !notes.isEmpty {
            out.append("")
            out += notes.map { "note: \($0)" }
        }
        return out.joined(separator: "\n") + "\n"
    }

    /// Packets and bytes each way first, then the drops and errors that
    /// happened, then everything else that is not zero.
    static func counterLines(_ counters: [String: UInt64]) -> [String] {
        typealias C = DataPathCounter
        func n(_ counter: C) -> UInt64 { counters[counter.description] ?? 0 }
        var lines = [
            "sent to peers: \(n(.udpPacketsSent)) packets, \(bytes(n(.udpBytesSent)))"
                + " (from \(n(.tunPacketsRead)) TUN reads)",
            "received from peers: \(n(.udpDatagramsReceived)) datagrams, delivered \(n(.tunPacketsWritten)) packets, \(bytes(n(.tunBytesWritten)))",
        ]
        let batches = n(.batches)
        if batches > 0 {
            let mean = Double(n(.batchCompletions)) / Double(batches)
            lines.append("batches: \(batches), \(String(format: "%.1f", mean)) completions each on average")
        }
        let shown = Set(
            [
                C.udpPacketsSent, .udpBytesSent, .tunPacketsRead, .udpDatagramsReceived, .tunPacketsWritten,
                .tunBytesWritten, .batches, .batchCompletions,
            ].map(\.description)
        )
        let sizeClasses = Set(C.batchSizeClasses.map(\.counter.description))
        let drops = counters.filter { C(name: $0.key)?.series?.name == "tunneld_dropped_packets_total" && $0.value > 0 }
            .sorted { $0.key < $1.key }
        lines.append(
            "dropped: "
                + (drops.isEmpty
                    ? "none"
                    : drops.map { "\(C(name: $0.key)!.series!.labels[0].value)=\($0.value)" }.joined(separator: " "))
        )
        let dropNames = Set(drops.map(\.key))
        let rest = counters.filter {
            !shown.contains($0.key) && !dropNames.contains($0.key)
                && !sizeClasses.contains($0.key) && !$0.key.hasPrefix("dropped_") && $0.value > 0
        }.sorted { $0.key < $1.key }
        if !rest.isEmpty {
            lines.append("other: " + rest.map { "\($0.key)=\($0.value)" }.joined(separator: " "))
        }
        return lines
    }

    /// Left-aligned columns two spaces apart.
    static func columns(_ rows: [[String]]) -> [String] {
        guard let width = rows.map(\.count).max() else { return [] }
        let widths = (0..<width).map { i in rows.map { i < $0.count ? $0[i].count : 0 }.max() ?? 0 }
        return rows.map { row in
            row.enumerated().map { i, cell in
                i == row.count - 1 ? cell : cell.padding(toLength: widths[i] + 2, withPad: " ", startingAt: 0)
            }.joined()
        }
    }

    static func bytes(_ n: UInt64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        var value = Double(n), unit = 0
        while value >= 1024 && unit < units.count - 1 { value /= 1024; unit += 1 }
        return unit == 0 ? "\(n) B" : String(format: "%.1f %@", value, units[unit])
    }

    static func time(_ date: Date) -> String {
        let formatter = ISO8601DateFormatter()
        return formatter.string(from: date)
    }

    static func duration(_ seconds: Double) -> String {
        var s = Int(seconds.rounded(.down))
        let d = s / 86400; s %= 86400
        let h = s / 3600; s %= 3600
        let m = s / 60; s %= 60
        if d > 0 { return "\(d)d\(h)h" }
        if h > 0 { return "\(h)h\(m)m" }
        if m > 0 { return "\(m)m\(s)s" }
        return "\(s)s"
    }

    static func age(_ date: Date, now: Date) -> String {
        "\(duration(max(0, now.timeIntervalSince(date)))) ago"
    }

    static func until(_ date: Date, now: Date) -> String {
        let left = date.timeIntervalSince(now)
        return left >= 0 ? "in \(duration(left))" : "expired \(duration(-left)) ago"
    }
}
