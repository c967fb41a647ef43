import CTunnel
import CURing
import NetBase
import Offload
import UDPEncap

#if canImport(Glibc)
import Glibc
#endif

/// Which offloads a loop uses; decided once at start from what the kernel
/// accepted (see `TunDevice.enableOffloads`, `UDPSocket`).
public struct LoopOffloads: Sendable, Equatable, CustomStringConvertible {
    /// The TUN fd was opened with IFF_VNET_HDR: every read and write starts
    /// with a virtio_net_hdr, reads may be super-packets (TSO/USO) and
    /// writes may be coalesced super-packets.
    public var virtioHeader: Bool
    /// One sendmsg may carry many datagrams (UDP_SEGMENT).
    public var segmentation: Bool
    /// One receive may return many datagrams (UDP_GRO is on for the socket).
    public var receiveCoalescing: Bool

    public init(virtioHeader: Bool = false, segmentation: Bool = false, receiveCoalescing: Bool = false) {
        self.virtioHeader = virtioHeader
        self.segmentation = segmentation
        self.receiveCoalescing = receiveCoalescing
    }

    public static let none = LoopOffloads()

    /// The offloads in use by the names the log, reports and metrics give them.
    public var names: [String] {
        [(virtioHeader, "tun-vnet-hdr"), (segmentation, "udp-gso"), (receiveCoalescing, "udp-gro")]
            .filter(\.0).map(\.1)
    }

    public var description: String { names.isEmpty ? "none" : names.joined(separator: "+") }
}

/// How a data-path loop is sized and what it reads and writes.
public struct LoopConfiguration: Sendable {
    /// Buffer slots per direction: the most TUN reads and UDP receives one
    /// turn of a loop handles (io_uring: buffers in each provided-buffer
    /// ring; system calls: reads per turn and the `recvmmsg` vector).
    public var depth: Int
    /// Room for one received datagram (after the headroom) when there are
    /// no offloads. TUN reads always have room for the largest IPv4 packet,
    /// so that a packet bigger than the tunnel's MTU (a device MTU raised by
    /// hand) is read whole and answered, not truncated into garbage.
    public var packetCapacity: Int
    public var offloads: LoopOffloads
    /// The most packets one super-packet is split into (more is dropped and
    /// counted; TCP's smallest MSS of 536 gives 123 for 64 KiB).
    public var maxSegments: Int
    /// After a turn that moved something, look for more completions for up
    /// to this long before sleeping (0: sleep at once). A reply usually
    /// follows a request within a few hundred microseconds; catching it
    /// awake saves a sleep and a wake-up per hop, which on a virtual
    /// machine is most of the tunnel's latency. An idle loop sleeps.
    public var busyPollMicroseconds: Int = 0
    /// The socket is a dual-stack AF_INET6 one (`UDPSocket.family == .dualStack`):
    /// IPv4 peers are written as IPv4-mapped `sockaddr_in6`. False: an
    /// AF_INET socket, which can reach IPv4 peers only.
    public var dualStackSocket: Bool = false

    public init(depth: Int = DataPath.defaultBatchSize, mtu: Int, offloads: LoopOffloads = .none) {
        self.depth = depth
        // Room for the largest packet the TUN may hand us, and for an ICMP
        // error (28 + 548 bytes) built in place.
        self.packetCapacity = max(mtu, 1024)
        self.offloads = offloads
        self.maxSegments = 256
    }
}

/// Runs a loop that moves packets between one TUN queue and one UDP socket
/// until `stop()`. One loop per thread; several loops (one TUN queue and one
/// socket each) can share a `Forwarder` and its table.
public protocol DataPathLoop: AnyObject, Sendable {
    var statistics: Statistics { get }
    /// Moves packets on the calling thread until `stop()` is called or a
    /// fatal error occurs.
    func run() throws
    /// Asks the loop to return from `run()`; callable from any thread.
    func stop()
}

/// What a send or write belongs to: the operation and the buffer slot, packed
/// into 64 bits (operation in the top byte) — io_uring's user_data, and how the
/// system-call loop reports its own results to the engine.
struct CompletionTag: Equatable {
    enum Op: UInt8 {
        /// `udpSend`: the sends of a split super-packet (slot: the send's
        /// message); `udpSendBatch`: a batch of single packets (slot: its
        /// leading TUN slot).
        case tunRead = 1, udpSend, tunReply, udpRecv, tunWrite, wake, udpSendBatch
    }
    var op: Op
    var slot: Int

    @inline(__always) var userData: UInt64 { UInt64(op.rawValue) << 56 | UInt64(UInt32(truncatingIfNeeded: slot)) }

    @inline(__always) init(_ op: Op, slot: Int = 0) {
        self.op = op
        self.slot = slot
    }

    @inline(__always) init?(userData: UInt64) {
        guard let op = Op(rawValue: UInt8(truncatingIfNeeded: userData >> 56)) else { return nil }
        self.op = op
        self.slot = Int(userData & 0xffff_ffff)
    }
}
