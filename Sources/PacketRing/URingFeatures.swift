#if canImport(Glibc)
import Glibc
#endif
import CURing

/// What the kernel's io_uring offers the data path, probed once at start.
///
/// `URingLoop` needs a multishot read on the TUN (IORING_OP_READ_MULTISHOT,
/// Linux 6.7), multishot recvmsg (6.0) and provided-buffer rings (5.19).
/// Without them it would start and then fail on its first completion, so
/// the daemon asks first and falls back to the system-call loop with a line
/// saying why.
public struct URingFeatures: Sendable, Equatable {
    /// io_uring can be set up at all (it may be disabled by sysctl or seccomp).
    public var available: Bool
    /// IORING_OP_READ_MULTISHOT is in the kernel's opcode list.
    public var multishotRead: Bool
    /// A provided-buffer ring could be registered.
    public var bufferRings: Bool
    /// Why io_uring is unusable, in words (nil when usable).
    public var problem: String?

    public var usable: Bool { available && multishotRead && bufferRings }

    public static func probe() -> URingFeatures {
        var features = URingFeatures(available: false, multishotRead: false, bufferRings: false, problem: nil)
        let ring = UnsafeMutablePointer<io_uring>.allocate(capacity: 1)
        defer { ring.deallocate() }
        let rc = io_uring_queue_init(4, ring, 0)
        guard rc == 0 else {
            features.problem = "io_uring_queue_init failed: \(String(cString: strerror(-rc)))"
                + (rc == -EPERM || rc == -ENOSYS ? " (io_uring is disabled here, e.g. kernel.io_uring_disabled)" : "")
            return features
        }
        defer { io_uring_queue_exit(ring) }
        features.available = true
        if let probe = io_uring_get_probe_ring(ring) {
            features.multishotRead = io_uring_opcode_supported(probe, URingLoop.readMultishot) != 0
            io_uring_free_probe(probe)
        }
        // Register a one-entry buffer ring and take it away again.
        var memory: UnsafeMutableRawPointer?
        if posix_memalign(&memory, 4096, 4096) == 0, let memory {
            memset(memory, 0, 4096)
            var registration = io_uring_buf_reg()
            registration.ring_addr = UInt64(UInt(bitPattern: memory))
            registration.ring_entries = 1
            registration.bgid = 7
            if io_uring_register_buf_ring(ring, &registration, 0) == 0 {
                features.bufferRings = true
                _ = io_uring_unregister_buf_ring(ring, 7)
            }
            free(memory)
        }
        if !features.multishotRead {
            features.problem = "the kernel has no multishot read for io_uring (Linux 6.7 or later)"
        } else if !features.bufferRings {
            features.problem = "the kernel has no provided-buffer rings for io_uring (Linux 5.19 or later)"
        }
        return features
    }
}
