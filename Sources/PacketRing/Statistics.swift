import Atomics

/// What the data path counts. Each loop keeps its own counts in plain memory
/// and publishes them once per batch; readers see totals at most one batch old.
public enum Counter: Int, CaseIterable, Sendable, CustomStringConvertible {
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
    public static let batchSizeClasses: [(counter: Counter, size: String)] = [
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

/// Counts of one data-path worker; the published side is atomic.
public final class Statistics: @unchecked Sendable {
    private let published: UnsafeMutablePointer<UnsafeAtomic<UInt64>.Storage>
    /// The worker's private counts; only the owning worker touches them.
    let local: UnsafeMutablePointer<UInt64>

    public init() {
        let n = Counter.allCases.count
        published = .allocate(capacity: n)
        local = .allocate(capacity: n)
        for i in 0..<n {
            (published + i).initialize(to: .init(0))
            (local + i).initialize(to: 0)
        }
    }

    deinit {
        published.deallocate()
        local.deallocate()
    }

    @inline(__always)
    func add(_ counter: Counter, _ n: UInt64 = 1) { local[counter.rawValue] &+= n }

    /// One batch of `completions` (≥ 1) handled: its count, its size and its
    /// size class. Once per batch, never per packet.
    @inline(__always)
    func addBatch(completions: Int) {
        let n = max(completions, 1)
        local[Counter.batches.rawValue] &+= 1
        local[Counter.batchCompletions.rawValue] &+= UInt64(n)
        // Class k holds sizes 2^k … 2^(k+1) − 1; the last one everything above.
        let sizeClass = min(Counter.batchesOf64Plus.rawValue - Counter.batchesOf1.rawValue,
                            Int.bitWidth - 1 - n.leadingZeroBitCount)
        local[Counter.batchesOf1.rawValue + sizeClass] &+= 1
    }

    /// Makes the worker's counts visible to readers (once per batch).
    @inline(__always)
    func publish() {
        for i in 0..<Counter.allCases.count {
            UnsafeAtomic<UInt64>(at: published + i).store(local[i], ordering: .relaxed)
        }
    }

    public subscript(counter: Counter) -> UInt64 {
        UnsafeAtomic<UInt64>(at: published + counter.rawValue).load(ordering: .relaxed)
    }

    /// Every counter summed over `workers`, in `Counter` order: what the
    /// metrics endpoint and `tunneld status` read (at scrape time, from the
    /// published side; the workers never wait for a reader).
    public static func totals(of workers: [Statistics]) -> [(counter: Counter, value: UInt64)] {
        Counter.allCases.map { ($0, total($0, of: workers)) }
    }

    /// All counters that are not zero, for logs.
    public var summary: String { Statistics.summary(of: [self]) }

    /// A counter summed over several workers.
    public static func total(_ counter: Counter, of workers: [Statistics]) -> UInt64 {
        workers.reduce(0) { $0 &+ $1[counter] }
    }

    /// The non-zero counters summed over several workers, for logs.
    public static func summary(of workers: [Statistics]) -> String {
        Counter.allCases.compactMap { c in
            let n = total(c, of: workers)
            return n == 0 ? nil : "\(c)=\(n)"
        }.joined(separator: " ")
    }
}
