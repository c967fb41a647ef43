import LeaseStore
import Logging
import NetBase
@_exported import StatusModel

/// One change to the set of peers a backend must reach.
public enum PeerChange: Sendable, Equatable, CustomStringConvertible {
    /// A host joined (or became usable).
    case added(Lease)
    /// A host's lease changed in a way that matters (public IP, backend data).
    case updated(old: Lease, new: Lease)
    /// A host left: its lease was released, deleted or expired.
    case removed(Lease)

    public var subnet: IPv4Network {
        switch self {
        case .added(let lease), .removed(let lease), .updated(_, let lease): lease.subnet
        }
    }

    public var description: String {
        switch self {
        case .added(let lease): "added \(lease)"
        case .updated(let old, let new): "updated \(old) to \(new)"
        case .removed(let lease): "removed \(lease)"
        }
    }
}

/// What carries this host's traffic to the other hosts: udp (tunneld's own
/// data path), vxlan or host-gw (the kernel's, programmed through rtnetlink).
///
/// The life of a backend, in the order the daemon calls it:
/// 1. `leaseAttributes()` — what our lease must carry. vxlan creates its
///    device here, because the lease carries the device's MAC.
/// 2. `activate(lease:)` — the lease is ours: address the device, install
///    what does not depend on peers.
/// 3. `apply(_:)` — peers come and go (first the whole list, then the
///    watch's changes), always from one task at a time.
/// 4. `run()` — until cancelled: the data path (udp), the periodic route
///    check (host-gw).
/// 5. `cleanUp(releasing:)` — on exit.
///
/// `PeerSync` decides which leases reach `apply`: not our own, only of our
/// `type`, and only those `unusableReason(_:)` accepts.
public protocol Backend: AnyObject, Sendable {
    /// Which of flannel's backends this is.
    var type: BackendType { get }
    /// The MTU containers get (subnet.env's FLANNEL_MTU).
    var mtu: Int { get }

    /// What our lease carries besides the public IP (BackendType, BackendData).
    func leaseAttributes() throws -> LeaseAttributes

    /// Called once with the lease we hold.
    func activate(lease: Lease) throws

    /// Called when re-acquisition gave us another subnet: the old one's
    /// addresses must go, the new one's come.
    func move(from old: Lease, to new: Lease) throws

    /// Why a peer lease of our type cannot be used (e.g. vxlan data without
    /// a VtepMAC); nil when it can.
    func unusableReason(_ lease: Lease) -> String?

    /// Brings the kernel (or the data path's table) in line with the changes.
    /// Failures are logged per peer; one bad peer does not stop the others.
    func apply(_ changes: [PeerChange])

    /// Runs until cancelled or failed.
    func run() async throws

    /// What the backend has to say to `tunneld status` and the metrics
    /// endpoint, read when they ask (never pushed by the data path).
    func report() -> BackendReport

    /// On exit. `releasing`: the host leaves the network (its lease is
    /// released), so everything it installed goes; otherwise kernel state
    /// stays so that traffic keeps flowing across a restart, as with flanneld.
    func cleanUp(releasing: Bool)
}

/// What a backend reports: its state (`BackendStatus`, the model `tunneld
/// status` and the metrics share) and, for udp, the data path's counters.
public struct BackendReport: Sendable, Equatable {
    public var status: BackendStatus
    /// Counters by name, summed over the data-path workers (udp: PacketRing's
    /// `DataPathCounter` names; kernel backends: routes_restored).
    public var counters: [(name: String, value: UInt64)]

    public init(
        _ type: BackendType,
        device: String? = nil,
        summary: String = "",
        workers: Int = 0,
        offloads: [String] = [],
        datapathTier: String? = nil,
        datapathNote: String? = nil,
        tableEntries: Int = 0,
        tableGeneration: UInt64 = 0,
        counters: [(name: String, value: UInt64)] = []
    ) {
        status = BackendStatus(
            type: type.rawValue,
            device: device,
            summary: summary,
            workers: workers,
            offloads: offloads,
            datapathTier: datapathTier,
            datapathNote: datapathNote,
            tableEntries: tableEntries,
            tableGeneration: tableGeneration
        )
        self.counters = counters
    }

    public static func == (a: BackendReport, b: BackendReport) -> Bool {
        a.status == b.status
            && a.counters.map(\.name) == b.counters.map(\.name) && a.counters.map(\.value) == b.counters.map(\.value)
    }
}

extension Backend {
    /// A backend with nothing more to say than its type.
    public func report() -> BackendReport { BackendReport(type, summary: type.rawValue) }
}

extension LeaseAttributes {
    /// The backend a lease was written for; flannel's udp backend writes no
    /// BackendType, so none means udp.
    public var effectiveBackendType: String { backendType?.lowercased() ?? BackendType.udp.rawValue }
}

/// The log lines of one batch of peer changes: one line per peer for a few
/// changes, as peers come and go; for a large batch — the first list of a
/// network with thousands of hosts — one summary line, the per-peer lines
/// at debug level (60,000 info lines at start help no one).
public struct PeerLog {
    /// Up to this many peer lines in one batch are logged one by one at info.
    public static let perPeerLimit = 16
    /// The first `perPeerLimit + 1` lines (enough to know whether the batch
    /// is large) and the last; beyond those, at debug level, each line is
    /// written as it comes rather than held (a first list of 60,000 peers).
    private var lines: [String] = []
    /// The latest line beyond the first ones, built only when the summary
    /// needs it (at info level a first list of 60,000 peers would otherwise
    /// format 60,000 lines to keep one).
    private var last: (() -> String)?
    private var count = 0
    private let logger: Logger
    private let debugging: Bool

    /// `logger`: where the lines go (its level decides what is written).
    public init(for logger: Logger) {
        self.logger = logger
        debugging = logger.logLevel <= .debug
    }

    public mutating func note(_ line: @escaping @autoclosure () -> String) {
        count += 1
        if lines.count <= PeerLog.perPeerLimit {
            lines.append(line())
            // The batch just became large: what was held goes out at debug.
            if lines.count > PeerLog.perPeerLimit && debugging {
                for held in lines { logger.debug("\(held)") }
            }
        } else if debugging {
            let text = line()
            logger.debug("\(text)")
            last = { text }
        } else {
            last = line
        }
    }

    /// Writes the batch's lines at info, or for a large batch one summary
    /// line (the per-peer lines went out at debug as they came).
    public func flush(to logger: Logger) {
        guard count > PeerLog.perPeerLimit else {
            for line in lines { logger.info("\(line)") }
            return
        }
        logger.info(
            "\(count) peers programmed, from \(lines[0]) to \(last?() ?? lines[lines.count - 1]) (one line per peer at --log-level debug)"
        )
    }
}
