import ArgumentParser
import Backends
import CoreMetrics
import Foundation
import LeaseStore
import NetBase
import Netlink
import Observability
import PeerControl
import Prometheus

/// The daemon's endpoints besides health: metrics and the control socket.
///
/// Metrics are served on flanneld's health listener (`--healthz-ip`,
/// `--healthz-port`) at /metrics, so a flanneld unit gains them unchanged;
/// `--metrics-address` adds a listener of their own (e.g. on 127.0.0.1 while
/// health stays on every address). The control socket serves `tunneld status`.
struct ObservabilityOptions: ParsableArguments {
    @Option(
        help: ArgumentHelp(
            "Another listener for GET /metrics (and /healthz, /readyz), besides --healthz-port's; e.g. 127.0.0.1:9464.",
            valueName: "ip:port"
        )
    )
    var metricsAddress: String?

    @Option(
        help: ArgumentHelp(
            "Unix socket `tunneld status` asks the running daemon on; empty = none.",
            valueName: "path"
        )
    )
    var controlSocket: String = defaultControlSocket

    static let defaultControlSocket = "/run/tunneld/tunneld.sock"

    /// `--metrics-address` split, or nil when not given.
    func metricsListener() throws -> (host: String, port: Int)? {
        guard let metricsAddress else { return nil }
        let parts = metricsAddress.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 2, IPv4Address(String(parts[0])) != nil, let port = Int(parts[1]),
            (1...65535).contains(port)
        else {
            throw ValidationError(
                "--metrics-address \(metricsAddress) is not ip:port (e.g. 127.0.0.1:9464, port 1–65535)"
            )
        }
        return (String(parts[0]), port)
    }

    func validate() throws {
        _ = try metricsListener()
    }

    /// The registry every `tunneld_…` series lives in; swift-metrics is
    /// bootstrapped with it before the store and the peers make their counters.
    static let registry = PrometheusCollectorRegistry()

    static func bootstrapMetrics() {
        MetricsSystem.bootstrap(TunneldMetricsFactory(registry: registry))
    }
}

/// The version `tunneld --version`, build info and status report.
let tunneldVersion = "0.1.0"

extension Daemon {
    /// What `tunneld status` and a scrape see, assembled when asked.
    struct Observed: Sendable {
        let config: NetworkConfig
        let location: String
        let interface: String
        let interfaceAddress: IPv4Address
        let publicIP: IPv4Address
        let mtu: Int
        let startedAt: Date
        let backend: any Backend
        let peers: PeerSync

        func report() -> StatusReport {
            let lease = peers.holder.lease
            let times = peers.peerChangeTimes
            let backendReport = backend.report()
            var counters: [String: UInt64] = [:]
            for (name, value) in backendReport.counters { counters[name] = value }
            return StatusReport(
                source: .daemon,
                version: tunneldVersion,
                store: location,
                startedAt: startedAt,
                network: .init(config),
                node: .init(
                    subnet: lease.primarySubnet.description,
                    publicIP: lease.attributes.publicIP.description,
                    interface: interface,
                    interfaceAddress: interfaceAddress.description,
                    mtu: mtu,
                    leaseExpires: lease.expiration,
                    leaseRevision: lease.revision
                ),
                backend: backendReport.status,
                peers: peers.currentPeers.values.sorted(by: Lease.inAddressOrder).map {
                    StatusReport.Peer($0, lastChange: times[$0.primarySubnet])
                },
                counters: counters,
                // Keys every host ignores, and peers this one cannot use: what the operator should fix.
                notes: peers.ignoredKeys.sorted { $0.key < $1.key }.map(\.value)
            )
        }
    }

    /// Health, metrics and the control socket, on one swift-nio endpoint.
    /// nil when all three are off.
    func startEndpoint(_ observed: Observed, readiness: Readiness) throws -> HTTPEndpoint? {
        var listeners: [HTTPEndpoint.Listener] = []
        if options.healthzPort != 0 {
            listeners.append(
                .tcp(
                    host: options.healthzIP,
                    port: options.healthzPort,
                    label: "healthz",
                    hint: "choose another --healthz-port, or --healthz-port 0 to turn it off"
                )
            )
        }
        if let metrics = try options.observability.metricsListener() {
            listeners.append(
                .tcp(
                    host: metrics.host,
                    port: metrics.port,
                    label: "metrics",
                    hint: "choose another --metrics-address, or leave it out"
                )
            )
        }
        var socket = options.observability.controlSocket
        if !socket.isEmpty {
            // Another tunneld on this machine (a second network, a test)
            // keeps its socket; this one goes without rather than failing.
            if ControlClient.isAnswering(socket) {
                logger.warning(
                    "another tunneld answers on the control socket \(socket); this one has none (give it its own --control-socket)"
                )
                socket = ""
            } else {
                listeners.append(.unix(path: socket))
            }
        }
        guard !listeners.isEmpty else { return nil }
        let exporter = MetricsExporter(registry: ObservabilityOptions.registry, source: observed.report)
        let routes = HTTPEndpoint.Routes(
            metrics: exporter.exposition,
            status: { observed.report().json() },
            waitingFor: { readiness.waitingFor }
        )
        let endpoint: HTTPEndpoint
        do {
            endpoint = try HTTPEndpoint(listeners: listeners, routes: routes)
        } catch  where !socket.isEmpty && ControlClient.isAnswering(socket) {
            // Another tunneld started at the same moment took the socket
            // between the look above and our bind: go without, as above.
            logger.warning(
                "another tunneld answers on the control socket \(socket); this one has none (give it its own --control-socket)"
            )
            listeners.removeAll { if case .unix = $0 { true } else { false } }
            guard !listeners.isEmpty else { return nil }
            endpoint = try HTTPEndpoint(listeners: listeners, routes: routes)
        }
        for listener in endpoint.bound {
            switch listener {
            case .tcp: logger.info("health and metrics: \(listener)/healthz, \(listener)/readyz, \(listener)/metrics")
            case .unix(let path): logger.info("control socket for `tunneld status`: \(path)")
            }
        }
        return endpoint
    }
}

extension StatusReport.Network {
    init(_ config: NetworkConfig) {
        // An IPv6-only network: its IPv6 side (the IPv4 one is 0.0.0.0/0).
        let v6Only = config.isIPv6Only ? config.ipv6 : nil
        self.init(
            network: v6Only.map { $0.network.description } ?? config.network.description,
            subnetLen: v6Only?.subnetLen ?? config.subnetLen,
            subnetMin: v6Only.map { $0.subnetMin.address.description } ?? config.subnetMin.address.description,
            subnetMax: v6Only.map { $0.subnetMax.address.description } ?? config.subnetMax.address.description,
            backendType: config.backend.type,
            backendPort: config.backend.knownType == .hostGW ? nil : Int(config.backend.port)
        )
    }
}

extension StatusReport.Peer {
    init(_ lease: Lease, lastChange: Date?) {
        self.init(
            subnet: lease.primarySubnet.description,
            publicIP: lease.attributes.publicIP.description,
            backend: lease.attributes.effectiveBackendType,
            lastChange: lastChange,
            revision: lease.revision,
            expires: lease.expiration
        )
    }
}
