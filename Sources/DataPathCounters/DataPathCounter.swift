/// A Prometheus series: its name and labels.
public struct CounterSeries: Sendable, Equatable {
    public var name: String
    public var labels: [Label]
    public struct Label: Sendable, Equatable {
        public var name: String
        public var value: String
    }
    init(_ name: String, _ labels: [(String, String)] = []) {
        self.name = name
        self.labels = labels.map { Label(name: $0.0, value: $0.1) }
    }
}

/// What the udp data path counts, defined once: each counter's name (in the
/// daemon's exit line and `tunneld status`), its Prometheus series with
/// labels, and the series' help. PacketRing counts them; Observability
/// exports and shows them; neither keeps a list of its own. No dependencies,
/// so both can import it.
public enum DataPathCounter: Int, CaseIterable, Sendable, CustomStringConvertible {
    case tunPacketsRead
    case udpPacketsSent
    case udpBytesSent
    case udpDatagramsReceived
    case tunPacketsWritten
    case tunBytesWritten
    case icmpUnreachableSent
    case icmpTimeExceededSent
    case droppedNoRoute
    case droppedLocalDestination
    case droppedTTLExpired
    case droppedMalformedFromTun
    case droppedMalformed
    case droppedUnknownPeer
    case droppedSpoofedSource
    case droppedTruncated
    case sendErrors
    case tunWriteErrors
    case readErrors
    case batches
    /// TUN reads that held a GSO super-packet (TSO/USO from the kernel).
    case tunSuperPacketsRead
    /// IPv4 packets made by splitting super-packets.
    case segmentsMade
    /// sendmsg calls that carried more than one datagram (UDP_SEGMENT).
    case gsoSends
    /// Receives that returned more than one datagram (UDP_GRO).
    case groReceives
    /// Received segments merged into another segment's TUN write.
    case segmentsCoalesced
    /// TUN writes that carried a coalesced super-packet.
    case tunSuperPacketsWritten
    /// Packets from the TUN whose offload request could not be carried out.
    case droppedBadOffload
    /// UDP GSO sends refused by the kernel (the path then sends one datagram per call).
    case gsoSendErrors
    /// Datagrams whose inner source lies in our own subnet: no peer sends
    /// those, so someone forged them (counted with or without the sender check).
    case droppedLocalSource
    /// Datagrams whose inner destination is not in our own subnet: tunneld
    /// delivers into its own subnet only and never relays onwards.
    case droppedNotForUs
    /// Packets from the TUN bigger than the tunnel's MTU (only possible when
    /// the device's MTU was raised by hand); answered with "fragmentation
    /// needed" when DF is set.
    case droppedTooBig
    /// ICMP "fragmentation needed" (type 3 code 4) written back into the TUN.
    case icmpFragmentationNeededSent
    /// Completions (io_uring) or ready descriptors (simple loop) handled, over all batches:
    /// with `batches`, the mean batch size.
    case batchCompletions
    /// Batches by size class, powers of two (see `batchSizeClasses`).
    case batchesOf1, batchesOf2to3, batchesOf4to7, batchesOf8to15, batchesOf16to31, batchesOf32to63, batchesOf64Plus

    /// The batch-size counters with their class's name ("1", "2-3", … "64+").
    public static let batchSizeClasses: [(counter: DataPathCounter, size: String)] = [
        (.batchesOf1, "1"), (.batchesOf2to3, "2-3"), (.batchesOf4to7, "4-7"), (.batchesOf8to15, "8-15"),
        (.batchesOf16to31, "16-31"), (.batchesOf32to63, "32-63"), (.batchesOf64Plus, "64+"),
    ]

    public var description: String {
        switch self {
        case .tunPacketsRead: "tun_packets_read"
        case .udpPacketsSent: "udp_packets_sent"
        case .udpBytesSent: "udp_bytes_sent"
        case .udpDatagramsReceived: "udp_datagrams_received"
        case .tunPacketsWritten: "tun_packets_written"
        case .tunBytesWritten: "tun_bytes_written"
        case .icmpUnreachableSent: "icmp_unreachable_sent"
        case .icmpTimeExceededSent: "icmp_time_exceeded_sent"
        case .droppedNoRoute: "dropped_no_route"
        case .droppedLocalDestination: "dropped_local_destination"
        case .droppedTTLExpired: "dropped_ttl_expired"
        case .droppedMalformedFromTun: "dropped_malformed_from_tun"
        case .droppedMalformed: "dropped_malformed"
        case .droppedUnknownPeer: "dropped_unknown_peer"
        case .droppedSpoofedSource: "dropped_spoofed_source"
        case .droppedTruncated: "dropped_truncated"
        case .sendErrors: "udp_send_errors"
        case .tunWriteErrors: "tun_write_errors"
        case .readErrors: "read_errors"
        case .batches: "batches"
        case .tunSuperPacketsRead: "tun_super_packets_read"
        case .segmentsMade: "segments_made"
        case .gsoSends: "gso_sends"
        case .groReceives: "gro_receives"
        case .segmentsCoalesced: "segments_coalesced"
        case .tunSuperPacketsWritten: "tun_super_packets_written"
        case .droppedBadOffload: "dropped_bad_offload"
        case .gsoSendErrors: "gso_send_errors"
        case .droppedLocalSource: "dropped_local_source"
        case .droppedNotForUs: "dropped_not_for_us"
        case .droppedTooBig: "dropped_too_big"
        case .icmpFragmentationNeededSent: "icmp_frag_needed_sent"
        case .batchCompletions: "batch_completions"
        case .batchesOf1: "batches_of_1"
        case .batchesOf2to3: "batches_of_2_3"
        case .batchesOf4to7: "batches_of_4_7"
        case .batchesOf8to15: "batches_of_8_15"
        case .batchesOf16to31: "batches_of_16_31"
        case .batchesOf32to63: "batches_of_32_63"
        case .batchesOf64Plus: "batches_of_64_plus"
        }
    }
}

extension DataPathCounter {
    /// The series this counter is exported as; nil for `batches`, which is
    /// the sum of the size classes and not exported on its own.
    public var series: CounterSeries? {
        switch self {
        case .udpPacketsSent: CounterSeries("tunneld_packets_total", [("direction", "tx")])
        case .tunPacketsWritten: CounterSeries("tunneld_packets_total", [("direction", "rx")])
        case .udpBytesSent: CounterSeries("tunneld_bytes_total", [("direction", "tx")])
        case .tunBytesWritten: CounterSeries("tunneld_bytes_total", [("direction", "rx")])
        case .tunPacketsRead: CounterSeries("tunneld_tun_reads_total")
        case .udpDatagramsReceived: CounterSeries("tunneld_udp_datagrams_received_total")
        case .icmpUnreachableSent: CounterSeries("tunneld_icmp_sent_total", [("type", "unreachable")])
        case .icmpTimeExceededSent: CounterSeries("tunneld_icmp_sent_total", [("type", "time_exceeded")])
        case .icmpFragmentationNeededSent: CounterSeries("tunneld_icmp_sent_total", [("type", "fragmentation_needed")])
        case .sendErrors: CounterSeries("tunneld_errors_total", [("operation", "udp_send")])
        case .tunWriteErrors: CounterSeries("tunneld_errors_total", [("operation", "tun_write")])
        case .readErrors: CounterSeries("tunneld_errors_total", [("operation", "read")])
        case .gsoSendErrors: CounterSeries("tunneld_errors_total", [("operation", "gso_send")])
        case .batchCompletions: CounterSeries("tunneld_datapath_batch_completions_total")
        case .tunSuperPacketsRead: CounterSeries("tunneld_offload_tun_super_packets_total", [("direction", "read")])
        case .tunSuperPacketsWritten:
            CounterSeries("tunneld_offload_tun_super_packets_total", [("direction", "written")])
        case .segmentsMade: CounterSeries("tunneld_offload_segments_total", [("operation", "split")])
        case .segmentsCoalesced: CounterSeries("tunneld_offload_segments_total", [("operation", "coalesced")])
        case .gsoSends: CounterSeries("tunneld_offload_udp_gso_sends_total")
        case .groReceives: CounterSeries("tunneld_offload_udp_gro_receives_total")
        case .batches: nil
        case .droppedNoRoute, .droppedLocalDestination, .droppedTTLExpired, .droppedMalformedFromTun,
            .droppedMalformed, .droppedUnknownPeer, .droppedSpoofedSource, .droppedTruncated, .droppedBadOffload,
            .droppedLocalSource, .droppedNotForUs, .droppedTooBig:
            CounterSeries(
                "tunneld_dropped_packets_total",
                [("reason", String(description.dropFirst("dropped_".count)))]
            )
        case .batchesOf1, .batchesOf2to3, .batchesOf4to7, .batchesOf8to15, .batchesOf16to31, .batchesOf32to63,
            .batchesOf64Plus:
            CounterSeries(
                "tunneld_datapath_batches_total",
                [("size", Self.batchSizeClasses.first { $0.counter == self }!.size)]
            )
        }
    }

    /// The help of each series the counters are exported as.
    public static let seriesHelp: [String: String] = [
        "tunneld_packets_total":
            "Packets carried: tx = sent to peers as UDP datagrams, rx = received from peers and written to the TUN device.",
        "tunneld_bytes_total":
            "Bytes carried (inner IPv4 packets): tx = sent to peers, rx = written to the TUN device.",
        "tunneld_tun_reads_total": "Reads from the TUN device that returned a packet or a super-packet.",
        "tunneld_udp_datagrams_received_total": "UDP datagrams received from peers.",
        "tunneld_dropped_packets_total": "Packets dropped by the data path, by reason.",
        "tunneld_icmp_sent_total": "ICMP errors the data path sent back to senders, by type.",
        "tunneld_errors_total": "Failed system calls of the data path, by operation.",
        "tunneld_datapath_batches_total":
            "Batches the data path handled (completions per ring turn; ready descriptors per wake-up for the simple loop), by size class.",
        "tunneld_datapath_batch_completions_total":
            "Completions handled over all batches; divided by the batches, the mean batch size.",
        "tunneld_offload_tun_super_packets_total":
            "TUN super-packets (TSO/USO): read = from the kernel, to be split; written = coalesced from received segments.",
        "tunneld_offload_segments_total":
            "Segments: split = packets made by splitting super-packets; coalesced = received segments merged into another's TUN write.",
        "tunneld_offload_udp_gso_sends_total": "UDP sends that carried more than one datagram (UDP_SEGMENT).",
        "tunneld_offload_udp_gro_receives_total": "UDP receives that returned more than one datagram (UDP_GRO).",
    ]

    /// The counter of a name (`description`), as a status report carries them.
    public init?(name: String) {
        guard let counter = Self.allCases.first(where: { $0.description == name }) else { return nil }
        self = counter
    }
}
