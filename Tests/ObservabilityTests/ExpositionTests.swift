import CoreMetrics
import Foundation
import Observability
import PacketRing
import Prometheus
import Synchronization
import Testing

/// A report as a udp daemon with two peers would give it.
func sampleReport(
    counters: [String: UInt64] = [
        "udp_packets_sent": 10, "udp_bytes_sent": 14_000,
        "tun_packets_written": 7, "dropped_no_route": 2,
        "batches": 4, "batch_completions": 9, "batches_of_2_3": 3,
        "batches_of_1": 1,
    ],
    now: Date = Date(timeIntervalSince1970: 1_800_000_000)
) -> StatusReport {
    StatusReport(
        source: .daemon,
        version: "0.1.0",
        store: "local /var/lib/tunneld",
        generatedAt: now,
        startedAt: now.addingTimeInterval(-3725),
        network: .init(
            network: "10.2.0.0/16",
            subnetLen: 24,
            subnetMin: "10.2.1.0",
            subnetMax: "10.2.254.0",
            backendType: "udp",
            backendPort: 8285
        ),
        node: .init(
            subnet: "10.2.5.0/24",
            publicIP: "198.18.0.1",
            interface: "eth0",
            interfaceAddress: "198.18.0.1",
            mtu: 1472,
            leaseExpires: now.addingTimeInterval(86_000),
            leaseRevision: 12
        ),
        backend: .init(
            type: "udp",
            device: "flannel0",
            summary: "io_uring data path, 2 worker(s)",
            workers: 2,
            offloads: ["tun-vnet-hdr", "udp-gso"],
            datapathTier: "syscall",
            datapathNote: "io_uring unusable (io_uring_queue_init failed: Operation not permitted)",
            tableEntries: 3,
            tableGeneration: 5
        ),
        peers: [
            .init(
                subnet: "10.2.7.0/24",
                publicIP: "198.18.0.2",
                backend: "udp",
                lastChange: now.addingTimeInterval(-90),
                revision: 14,
                expires: now.addingTimeInterval(80_000)
            ),
            .init(
                subnet: "10.2.100.0/24",
                publicIP: "198.18.0.3",
                backend: "udp",
                lastChange: now.addingTimeInterval(-5),
                revision: 20,
                expires: nil
            ),
        ],
        counters: counters
    )
}

/// Prometheus text as series (name with labels, as printed) → value.
func series(_ text: String) -> [String: Double] {
    var values: [String: Double] = [:]
    for line in text.split(separator: "\n") where !line.hasPrefix("#") {
        guard let space = line.lastIndex(of: " "), let value = Double(line[line.index(after: space)...]) else {
            continue
        }
        values[String(line[..<space])] = value
    }
    return values
}

@Suite struct ExpositionTests {
    @Test func dataPathCountersBecomeLabelledSeriesWithHelpAndType() {
        let exporter = MetricsExporter(registry: PrometheusCollectorRegistry(), source: { sampleReport() })
        let text = String(decoding: exporter.exposition(), as: UTF8.self)
        let values = series(text)
        #expect(values["tunneld_packets_total{direction=\"tx\"}"] == 10)
        #expect(values["tunneld_packets_total{direction=\"rx\"}"] == 7)
        #expect(values["tunneld_bytes_total{direction=\"tx\"}"] == 14_000)
        #expect(values["tunneld_dropped_packets_total{reason=\"no_route\"}"] == 2)
        #expect(values["tunneld_datapath_batches_total{size=\"2-3\"}"] == 3)
        #expect(values["tunneld_datapath_batch_completions_total"] == 9)
        #expect(values["tunneld_peers"] == 2)
        #expect(values["tunneld_table_entries"] == 3)
        #expect(values["tunneld_table_generation"] == 5)
        #expect(values["tunneld_datapath_workers"] == 2)
        #expect(values["tunneld_offload_enabled{offload=\"udp-gso\"}"] == 1)
        #expect(values["tunneld_offload_enabled{offload=\"udp-gro\"}"] == 0)
        #expect(values["tunneld_datapath_tier{tier=\"syscall\"}"] == 1)
        for tier in ["uring", "uring-single", "simple"] {
            #expect(values["tunneld_datapath_tier{tier=\"\(tier)\"}"] == 0, "\(tier)")
        }
        #expect(abs((values["tunneld_lease_expiry_timestamp_seconds"] ?? 0) - 1_800_086_000) < 0.001)
        #expect(abs((values["tunneld_start_time_seconds"] ?? 0) - (1_800_000_000 - 3725)) < 0.001)
        #expect(values["tunneld_build_info{version=\"0.1.0\",backend=\"udp\"}"] == 1)
        // `batches` is the sum of the size classes, not a series of its own.
        #expect(!text.contains("tunneld_datapath_batches_total 4"))
        #expect(text.contains("# TYPE tunneld_packets_total counter\n"))
        #expect(text.contains("# TYPE tunneld_peers gauge\n"))
        #expect(text.contains("# HELP tunneld_dropped_packets_total Packets dropped by the data path, by reason.\n"))
        // Every series is tunneld's.
        for line in text.split(separator: "\n") {
            let name = line.hasPrefix("# ") ? String(line.split(separator: " ")[2]) : String(line)
            #expect(name.hasPrefix("tunneld_"), "\(line)")
        }
    }

    @Test func eachScrapeShowsTheWorkersTotalsNotASumOfScrapes() {
        let totals = Mutex(UInt64(10))
        let exporter = MetricsExporter(
            registry: PrometheusCollectorRegistry(),
            source: {
                sampleReport(counters: ["udp_packets_sent": totals.withLock { $0 }])
            }
        )
        #expect(
            series(String(decoding: exporter.exposition(), as: UTF8.self))["tunneld_packets_total{direction=\"tx\"}"]
                == 10
        )
        totals.withLock { $0 = 25 }
        #expect(
            series(String(decoding: exporter.exposition(), as: UTF8.self))["tunneld_packets_total{direction=\"tx\"}"]
                == 25
        )
        #expect(
            series(String(decoding: exporter.exposition(), as: UTF8.self))["tunneld_packets_total{direction=\"tx\"}"]
                == 25
        )
    }

    @Test func everyDataPathCounterHasANamedSeries() {
        for counter in DataPathCounter.allCases where !MetricCatalog.derivedCounters.contains(counter.description) {
            let series = MetricCatalog.dataPathSeries[counter.description]
            #expect(series != nil, "PacketRing's \(counter) has no series in MetricCatalog.dataPathSeries")
            if let series { #expect(MetricCatalog.help[series.name] != nil, "\(series.name) has no help") }
        }
    }

    @Test func anUnknownCounterIsExportedRatherThanLost() {
        let exporter = MetricsExporter(
            registry: PrometheusCollectorRegistry(),
            source: {
                sampleReport(counters: ["frobs-made": 3])
            }
        )
        #expect(
            series(String(decoding: exporter.exposition(), as: UTF8.self))["tunneld_datapath_frobs_made_total"] == 3
        )
    }

    @Test func swiftMetricsCountersLandInTheRegistryWithTheCatalogsHelp() {
        let registry = PrometheusCollectorRegistry()
        let factory = TunneldMetricsFactory(registry: registry)
        let renewals = CoreMetrics.Counter(label: "tunneld_lease_renewals_total", factory: factory)
        renewals.increment()
        renewals.increment()
        CoreMetrics.Counter(label: "tunneld_peer_changes_total", dimensions: [("change", "added")], factory: factory)
            .increment(by: 3)
        let exporter = MetricsExporter(registry: registry, source: { sampleReport() })
        let text = String(decoding: exporter.exposition(), as: UTF8.self)
        #expect(series(text)["tunneld_lease_renewals_total"] == 2)
        #expect(series(text)["tunneld_peer_changes_total{change=\"added\"}"] == 3)
        #expect(text.contains("# HELP tunneld_lease_renewals_total Renewals of this host's lease.\n"))
    }

    @Test func theSizeClassesOfBatchesAreExportedAsTheirSizeLabels() {
        let ours = MetricCatalog.dataPathSeries.filter { $0.value.name == "tunneld_datapath_batches_total" }
        let theirs = DataPathCounter.batchSizeClasses
        #expect(ours.count == theirs.count)
        #expect(
            Set(ours.values.compactMap { $0.labels.first?.1 }) == ["1", "2-3", "4-7", "8-15", "16-31", "32-63", "64+"]
        )
        for (counter, size) in theirs {
            #expect(ours[counter.description]?.labels.first?.1 == size, "\(counter)")
        }
    }
}
