import CURing

#if canImport(Glibc)
import Glibc
#endif

/// What `--datapath` asks for.
public enum DataPathChoice: String, CaseIterable, Sendable {
    /// The fastest tier this host offers (probed at start).
    case auto
    /// io_uring: with multishot read where the kernel has it, else with a
    /// re-armed read; batched system calls where io_uring is refused.
    case uring
    /// Batched system calls with every offload, no io_uring.
    case syscall
    /// flannel's loop: one system call per packet, no offloads.
    case simple
}

/// The loop that runs: chosen once at start from what the kernel offers.
/// Every tier but `simple` carries the same offloads (TUN virtio header
/// with TSO, UDP GSO and GRO, each where the kernel has it).
public enum DataPathTier: String, CaseIterable, Sendable, CustomStringConvertible {
    /// io_uring with a multishot TUN read (Linux 6.7).
    case uring
    /// io_uring with one re-armed TUN read (Linux 6.0: multishot recvmsg
    /// and provided-buffer rings); only with `--datapath uring`, since the
    /// system-call tier measured faster on such kernels.
    case uringSingleRead = "uring-single"
    /// poll + read/writev on the TUN, sendmmsg/recvmmsg on the socket.
    case syscall
    /// One packet per system call.
    case simple

    public var description: String { rawValue }

    /// Whether the tier uses the kernel's offloads and several workers.
    public var batches: Bool { self != .simple }

    /// The tier for `choice` on a host with `features`, and the reason in
    /// words when it is not the one asked for (nil: as asked).
    public static func choose(
        _ choice: DataPathChoice,
        features: @autoclosure () -> URingFeatures
    )
        -> (tier: DataPathTier, note: String?)
    {
        switch choice {
        case .simple: return (.simple, nil)
        case .syscall: return (.syscall, nil)
        case .auto, .uring:
            let features = features()
            if features.usable { return (.uring, nil) }
            // Without multishot read, `auto` takes the system-call tier: it
            // measured faster than a re-armed io_uring read on every figure
            // (docs/BENCHMARKS.md, "Tiers"); `--datapath uring` still gets it.
            if features.usableWithSingleRead && choice == .uring {
                return (
                    .uringSingleRead,
                    "io_uring without multishot read (\(features.problem ?? "")): one re-armed TUN read"
                )
            }
            if features.usableWithSingleRead {
                return (
                    .syscall,
                    "io_uring without multishot read (\(features.problem ?? "")): batched system calls, "
                        + "faster than a re-armed io_uring read (--datapath uring to use io_uring anyway)"
                )
            }
            return (.syscall, "io_uring unusable (\(features.problem ?? "unknown reason")): batched system calls")
        }
    }
}

/// What the kernel's io_uring offers the data path, probed once at start.
///
/// The io_uring loop needs provided-buffer rings (Linux 5.19) and a
/// multishot recvmsg on the socket (6.0); a multishot read on the TUN
/// (IORING_OP_READ_MULTISHOT, 6.7) saves re-arming a read per packet.
/// Without io_uring at all (refused by seccomp as Docker's default profile
/// does, `kernel.io_uring_disabled`, gVisor, kernels before 5.19) the
/// system-call tier carries the same offloads.
public struct URingFeatures: Sendable, Equatable {
    /// io_uring can be set up at all (it may be disabled by sysctl or seccomp).
    public var available: Bool
    /// IORING_OP_READ_MULTISHOT is in the kernel's opcode list.
    public var multishotRead: Bool
    /// A multishot recvmsg is accepted (IORING_RECV_MULTISHOT).
    public var multishotReceive: Bool
    /// A provided-buffer ring could be registered.
    public var bufferRings: Bool
    /// Why the best io_uring tier is unusable, in words (nil when usable).
    public var problem: String?

    public init(
        available: Bool,
        multishotRead: Bool,
        multishotReceive: Bool,
        bufferRings: Bool,
        problem: String? = nil
    ) {
        self.available = available
        self.multishotRead = multishotRead
        self.multishotReceive = multishotReceive
        self.bufferRings = bufferRings
        self.problem = problem
    }

    public var usable: Bool { usableWithSingleRead && multishotRead }
    public var usableWithSingleRead: Bool { available && bufferRings && multishotReceive }

    /// Tests (and the benchmark's `tunneld-udp-uring-single` mode) set this
    /// variable to 1 to take multishot read away, reaching the tier of
    /// kernels 6.0–6.6 on a newer kernel. Not for production use.
    public static let noMultishotReadVariable = "TUNNELD_TEST_URING_NO_MULTISHOT_READ"

    public static func probe() -> URingFeatures {
        var features = probeKernel()
        if let value = getenv(noMultishotReadVariable), String(cString: value) == "1", features.multishotRead {
            features.multishotRead = false
            if features.problem == nil {
                features.problem = "multishot read taken away by \(noMultishotReadVariable)=1"
            }
        }
        return features
    }

    private static func probeKernel() -> URingFeatures {
        var features = URingFeatures(
            available: false,
            multishotRead: false,
            multishotReceive: false,
            bufferRings: false
        )
        let ring = UnsafeMutablePointer<io_uring>.allocate(capacity: 1)
        defer { ring.deallocate() }
        let rc = io_uring_queue_init(4, ring, 0)
        guard rc == 0 else {
            features.problem =
                "io_uring_queue_init failed: \(String(cString: strerror(-rc)))"
                + (rc == -EPERM
                    ? " (refused: a seccomp profile such as Docker's default, or kernel.io_uring_disabled)"
                    : rc == -ENOSYS ? " (the kernel has no io_uring, or a sandbox hides it)" : "")
            return features
        }
        defer { io_uring_queue_exit(ring) }
        features.available = true
        if let probe = io_uring_get_probe_ring(ring) {
            features.multishotRead = io_uring_opcode_supported(probe, curing_op_read_multishot) != 0
            io_uring_free_probe(probe)
        }
        // Register a one-entry buffer ring; keep it for the recvmsg probe.
        var memory: UnsafeMutableRawPointer?
        guard posix_memalign(&memory, 4096, 4096) == 0, let memory else { return features }
        defer { free(memory) }
        memset(memory, 0, 4096)
        var registration = io_uring_buf_reg()
        registration.ring_addr = UInt64(UInt(bitPattern: memory))
        registration.ring_entries = 1
        registration.bgid = 7
        if io_uring_register_buf_ring(ring, &registration, 0) == 0 {
            features.bufferRings = true
            features.multishotReceive = probeMultishotReceive(ring, group: 7)
            _ = io_uring_unregister_buf_ring(ring, 7)
        }
        if !features.bufferRings {
            features.problem = "the kernel has no provided-buffer rings for io_uring (Linux 5.19 or later)"
        } else if !features.multishotReceive {
            features.problem = "the kernel has no multishot recvmsg for io_uring (Linux 6.0 or later)"
        } else if !features.multishotRead {
            features.problem = "the kernel has no multishot read for io_uring (Linux 6.7 or later)"
        }
        return features
    }

    /// Posts a multishot recvmsg on an unbound UDP socket: a kernel without
    /// it completes the request at once with EINVAL; one with it keeps the
    /// request waiting (cancelled when the ring goes).
    private static func probeMultishotReceive(_ ring: UnsafeMutablePointer<io_uring>, group: UInt16) -> Bool {
        let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var message = msghdr()
        guard let sqe = io_uring_get_sqe(ring) else { return false }
        io_uring_prep_recvmsg_multishot(sqe, fd, &message, 0)
        sqe.pointee.flags |= UInt8(curing_iosqe_buffer_select)
        sqe.pointee.buf_group = group
        io_uring_sqe_set_data64(sqe, 1)
        guard io_uring_submit(ring) == 1 else { return false }
        var cqe: UnsafeMutablePointer<io_uring_cqe>?
        var timeout = __kernel_timespec(tv_sec: 0, tv_nsec: 20_000_000)
        // No completion within the wait: the request is armed, so supported.
        guard io_uring_wait_cqe_timeout(ring, &cqe, &timeout) == 0, let cqe else { return true }
        let result = cqe.pointee.res
        io_uring_cqe_seen(ring, cqe)
        return result != -EINVAL
    }
}

extension DataPathTier {
    /// The loop of this tier for one TUN queue and one socket.
    public func makeLoop(
        forwarder: Forwarder,
        tunFD: Int32,
        udpFD: Int32,
        configuration: LoopConfiguration
    ) throws -> any DataPathLoop {
        switch self {
        case .uring, .uringSingleRead:
            try URingLoop(
                forwarder: forwarder,
                tunFD: tunFD,
                udpFD: udpFD,
                configuration: configuration,
                multishotRead: self == .uring
            )
        case .syscall:
            try SyscallBatchLoop(forwarder: forwarder, tunFD: tunFD, udpFD: udpFD, configuration: configuration)
        case .simple:
            try SimpleLoop(forwarder: forwarder, tunFD: tunFD, udpFD: udpFD, configuration: configuration)
        }
    }
}
