import CoreMetrics
import DataPathCounters
import Prometheus
import Synchronization

/// The `tunneld_…` series: their help text, and how each data-path counter
/// maps to a series (both derived from `DataPathCounter` for the data path's
/// series). One place, so that the help of a series is the same wherever it
/// is made (the registry insists) and docs/OPERATIONS.md has one list to follow.
public enum MetricCatalog {
    /// Help text by series name.
    public static let help: [String: String] = DataPathCounter.seriesHelp.merging(otherHelp) { a, _ in a }
    static let otherHelp: [String: String] = [
        "tunneld_build_info": "Always 1; the labels say which tunneld runs with which backend.",
        "tunneld_start_time_seconds": "When the daemon started, in seconds since the Unix epoch.",
        "tunneld_lease_expiry_timestamp_seconds":
            "When this host's lease expires unless renewed, in seconds since the Unix epoch; 0 for a reservation (never expires).",
        "tunneld_peers": "Peers the backend currently reaches.",
        "tunneld_table_entries":
            "Entries of the table traffic is steered by: the udp data path's subnet table (ours and the peers'), or the peers programmed into the kernel (vxlan, host-gw).",
        "tunneld_table_generation": "Changes the steering table has seen since start.",
        "tunneld_datapath_workers": "Data-path worker threads (udp backend).",
        "tunneld_datapath_tier":
            "1 for the udp data path's tier that runs (uring, uring-single, syscall, simple), 0 for the others; the reason for a fallback is in the log and in tunneld status.",
        "tunneld_offload_enabled": "1 for each offload the udp data path chose at start, 0 for the others.",
        "tunneld_routes_restored_total": "Peer routes put back after someone removed them (vxlan, host-gw).",
        "tunneld_peer_changes_total": "Peers added, updated or removed.",
        "tunneld_lease_renewals_total": "Renewals of this host's lease.",
        "tunneld_lease_renewal_failures_total": "Renewals of this host's lease that failed (retried).",
        "tunneld_lease_reacquisitions_total":
            "Times this host's lease was acquired again after it vanished from the store.",
        "tunneld_store_watch_restarts_total": "Times the lease watch ended or failed and was resumed.",
        "tunneld_store_compactions_total":
            "Times the changes the watch needed were compacted away, so the leases were listed again.",
        "tunneld_store_watch_reconnects_total":
            "Times the etcd watch stream was re-established after a broken connection.",
        "tunneld_store_request_retries_total": "etcd requests repeated because no endpoint answered.",
    ]

    /// The series of each data-path counter, by its name — derived from
    /// `DataPathCounter`, the one definition.
    public static let dataPathSeries: [String: (name: String, labels: [(String, String)])] = {
        var table: [String: (name: String, labels: [(String, String)])] = [
            "routes_restored": ("tunneld_routes_restored_total", [])
        ]
        for counter in DataPathCounter.allCases {
            guard let series = counter.series else { continue }
            table[counter.description] = (series.name, series.labels.map { ($0.name, $0.value) })
        }
        return table
    }()

    /// Counters that are another's sum and not exported on their own
    /// (`batches` is the sum of the size classes).
    public static let derivedCounters: Set<String> = Set(
        DataPathCounter.allCases.filter { $0.series == nil }
            .map(\.description)
    )

    /// Every offload the udp data path may choose, for `tunneld_offload_enabled`.
    /// The udp data path's tiers (PacketRing's `DataPathTier` raw values;
    /// Observability does not import the data path).
    public static let tiers = ["uring", "uring-single", "syscall", "simple"]
    public static let offloads = ["tun-vnet-hdr", "udp-gso", "udp-gro", "tun-csum", "tun-tso4", "tun-tso6", "tun-uso4"]

    /// The registry's description of a series: its full name and help.
    static func descriptor(_ name: String) -> MetricNameDescriptor {
        MetricNameDescriptor(metricName: name, unitName: "", helpText: help[name] ?? "")
    }

    /// A series for a counter this table does not know (a newer data path):
    /// exported rather than lost.
    static func fallbackSeries(_ counter: String) -> String {
        "tunneld_datapath_" + counter.map { $0.isLetter || $0.isNumber ? $0 : "_" }.reduce("") { $0 + String($1) }
            + "_total"
    }
}

/// swift-metrics' factory for the daemon: swift-prometheus' registry, with
/// the catalog's help text on each series (the stock factory registers none).
public struct TunneldMetricsFactory: MetricsFactory {
    public let registry: PrometheusCollectorRegistry
    private let stock: PrometheusMetricsFactory

    public init(registry: PrometheusCollectorRegistry) {
        self.registry = registry
        self.stock = PrometheusMetricsFactory(registry: registry)
    }

    public func makeCounter(label: String, dimensions: [(String, String)]) -> any CounterHandler {
        let descriptor = MetricCatalog.descriptor(label)
        return dimensions.isEmpty
            ? registry.makeCounter(descriptor: descriptor)
            : registry.makeCounter(descriptor: descriptor, labels: dimensions)
    }

    public func makeFloatingPointCounter(
        label: String,
        dimensions: [(String, String)]
    ) -> any FloatingPointCounterHandler {
        let descriptor = MetricCatalog.descriptor(label)
        return dimensions.isEmpty
            ? registry.makeCounter(descriptor: descriptor)
            : registry.makeCounter(descriptor: descriptor, labels: dimensions)
    }

    public func makeRecorder(label: String, dimensions: [(String, String)], aggregate: Bool) -> any RecorderHandler {
        stock.makeRecorder(label: label, dimensions: dimensions, aggregate: aggregate)
    }

    public func makeMeter(label: String, dimensions: [(String, String)]) -> any MeterHandler {
        stock.makeMeter(label: label, dimensions: dimensions)
    }

    public func makeTimer(label: String, dimensions: [(String, String)]) -> any TimerHandler {
        stock.makeTimer(label: label, dimensions: dimensions)
    }

    public func destroyCounter(_ handler: any CounterHandler) { stock.destroyCounter(handler) }
    public func destroyFloatingPointCounter(_ handler: any FloatingPointCounterHandler) {
        stock.destroyFloatingPointCounter(handler)
    }
    public func destroyRecorder(_ handler: any RecorderHandler) { stock.destroyRecorder(handler) }
    public func destroyMeter(_ handler: any MeterHandler) { stock.destroyMeter(handler) }
    public func destroyTimer(_ handler: any TimerHandler) { stock.destroyTimer(handler) }
}

/// Prometheus text for a scrape. What the control side counts arrives
/// through swift-metrics as it happens; what the data path counts is read
/// here, at scrape time, from the report the daemon assembles (the workers'
/// published counters), and copied into the registry's series. Scrapes take
/// turns on a lock so that one never sees another's half-copied values.
public final class MetricsExporter: Sendable {
    public let registry: PrometheusCollectorRegistry
    private let source: @Sendable () -> StatusReport
    private let lock = Mutex<Void>(())

    public init(registry: PrometheusCollectorRegistry, source: @escaping @Sendable () -> StatusReport) {
        self.registry = registry
        self.source = source
    }

    /// The exposition (text format 0.0.4) with values as of now.
    public func exposition() -> [UInt8] {
        let report = source()
        return lock.withLock { _ in
            update(from: report)
            return registry.emitToBuffer()
        }
    }

    public static let contentType = "text/plain; version=0.0.4; charset=utf-8"

    private func gauge(_ name: String, _ labels: [(String, String)] = []) -> Prometheus.Gauge {
        let descriptor = MetricCatalog.descriptor(name)
        return labels.isEmpty
            ? registry.makeGauge(descriptor: descriptor)
            : registry.makeGauge(descriptor: descriptor, labels: labels)
    }

    private func counter(_ name: String, _ labels: [(String, String)] = []) -> Prometheus.Counter {
        let descriptor = MetricCatalog.descriptor(name)
        return labels.isEmpty
            ? registry.makeCounter(descriptor: descriptor)
            : registry.makeCounter(descriptor: descriptor, labels: labels)
    }

    private func update(from report: StatusReport) {
        gauge("tunneld_build_info", [("version", report.version), ("backend", report.network.backendType)]).set(to: 1)
        if let started = report.startedAt {
            gauge("tunneld_start_time_seconds").set(started.timeIntervalSince1970)
        }
        if let node = report.node {
            gauge("tunneld_lease_expiry_timestamp_seconds").set(node.leaseExpires?.timeIntervalSince1970 ?? 0)
        }
        gauge("tunneld_peers").set(Int64(report.peers.count))
        if let backend = report.backend {
            gauge("tunneld_table_entries").set(Int64(backend.tableEntries))
            gauge("tunneld_table_generation").set(Int64(clamping: backend.tableGeneration))
            if backend.workers > 0 {
                gauge("tunneld_datapath_workers").set(Int64(backend.workers))
                if let tier = backend.datapathTier {
                    for name in MetricCatalog.tiers {
                        gauge("tunneld_datapath_tier", [("tier", name)]).set(to: name == tier ? 1 : 0)
                    }
                }
                for offload in Set(MetricCatalog.offloads + backend.offloads).sorted() {
                    gauge("tunneld_offload_enabled", [("offload", offload)]).set(
                        to: backend.offloads.contains(offload) ? 1 : 0
                    )
                }
            }
        }
        for (name, value) in report.counters where !MetricCatalog.derivedCounters.contains(name) {
            let series = MetricCatalog.dataPathSeries[name] ?? (MetricCatalog.fallbackSeries(name), [])
            // The workers' totals are the truth: the series is set to them
            // (a counter has no set, so reset and add, under the lock).
            let c = counter(series.name, series.labels)
            c.reset()
            c.increment(by: Int64(clamping: value))
        }
    }
}
