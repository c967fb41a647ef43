import Logging
import NetBase
import Netlink
import PacketRing
import TunDevice
import UDPEncap

/// What `--offload` allows.
public enum OffloadMode: String, CaseIterable, Sendable {
    /// Use every offload the kernel accepts.
    case auto
    /// One packet per read, send, receive and write.
    case off
}

/// The udp backend's data path: the TUN device (one queue per worker), one
/// UDP socket per worker on the backend port, and one loop per worker, all
/// sharing one forwarder and its table. Decides once, from what the kernel
/// offers, which loop and which offloads to use, and says so.
final class UDPDataPath: Sendable {
    let tun: TunDevice
    let sockets: [UDPSocket]
    let loops: [any DataPathLoop]
    /// The loop that runs, chosen at start from what the kernel offers.
    let tier: DataPathTier
    /// Why the tier is not the one asked for, or nil.
    let tierNote: String?
    /// One line for the log: tier, workers, offloads and why.
    let summary: String
    /// The offloads in use, by name: the loop's (tun-vnet-hdr, udp-gso,
    /// udp-gro) and what the TUN accepted (tun-csum, tun-tso4, tun-tso6, tun-uso4).
    let offloadNames: [String]

    struct Settings {
        var device: String
        var port: UInt16
        var mtu: Int
        var datapath: DataPathChoice
        var offload: OffloadMode
        var workers: Int
        var queueDepth: Int
        var busyPollMicroseconds: Int
        /// The device carries IPv6 too (a dual-stack network): TSO6 is
        /// offered to the kernel as well.
        var carriesIPv6 = false
        /// This host has a PublicIPv6: peers may be reached over the IPv6
        /// underlay, so the socket must be a dual-stack one.
        var needsIPv6Underlay = false
    }

    /// Creates the device and the sockets; `configure` the device afterwards.
    init(settings: Settings, forwarder: Forwarder, routeSocket: RouteSocket) throws {
        var notes: [String] = []
        let (tier, tierNote) = DataPathTier.choose(settings.datapath, features: URingFeatures.probe())
        if let tierNote { notes.append(tierNote) }
        // The simple loop is flannel's: one packet per system call.
        let wantOffloads = tier.batches && settings.offload == .auto
        let workers = tier.batches ? settings.workers : 1

        // A device of this name that exists belongs to someone: a
        // non-persistent TUN lives only while its owner holds it open, and a
        // multi-queue TUNSETIFF would quietly join that owner's device.
        if (try? routeSocket.linkIndex(named: settings.device)) != nil {
            throw BackendError(
                "a device named \(settings.device) already exists: is another tunneld or flanneld running? Stop it, delete the device (ip link del \(settings.device)) or choose another --device"
            )
        }
        var tun: TunDevice
        var virtio = false
        do {
            tun = try TunDevice.create(name: settings.device, multiQueue: workers > 1, vnetHeader: wantOffloads)
            virtio = wantOffloads
        } catch  where wantOffloads {
            notes.append("TUN with a virtio header refused (\(error)); offloads off")
            tun = try TunDevice.create(name: settings.device, multiQueue: workers > 1, vnetHeader: false)
        }
        var tunOffloads: TunOffloads = []
        if virtio {
            tunOffloads = tun.enableOffloads(ipv6: settings.carriesIPv6)
            if !tunOffloads.contains(.tso4) {
                notes.append("the kernel refused TSO on the TUN (got \(tunOffloads)): packets are read one by one")
            } else {
                // A super-packet may hold no more segments than a read may be
                // split into; the kernel splits a bigger one before the TUN
                // (a flow with a tiny MSS: 64 KiB of 100-byte segments).
                do {
                    try routeSocket.setGSOMaxSegments(
                        index: routeSocket.linkIndex(named: tun.name),
                        count: UDPDataPath.maxSegments
                    )
                } catch {
                    notes.append(
                        "could not limit super-packets to \(UDPDataPath.maxSegments) segments (\(error)); "
                            + "flows with a very small MSS will lose packets"
                    )
                }
            }
            // No gso_max_size below 64 KiB on the TUN, although a full
            // super-packet's segments take two UDP_SEGMENT sends (65507-byte
            // limit): the containers' super-packets are forwarded to the TUN,
            // and the kernel splits any larger than its limit in software —
            // ~45 single packets that overflow the TUN's queue (measured:
            // 2.9–4.1 Gbit/s with 50 000+ retransmits against 6.3–6.8 with
            // almost none).
        }
        do {
            for _ in 1..<max(1, workers) { _ = try tun.addQueue() }
        } catch {
            tun.close()
            throw error
        }

        // Sockets: with several workers all bind the backend port with
        // SO_REUSEPORT. Bind it once alone first, so that a port already
        // taken (flanneld) is an error and not a silent share.
        var sockets: [UDPSocket] = []
        do {
            if workers > 1 {
                let probe = try UDPSocket(port: settings.port, family: .dualStack)
                probe.close()
            }
            for _ in 0..<workers {
                sockets.append(try UDPSocket(port: settings.port, reusePort: workers > 1, family: .dualStack))
            }
            if settings.needsIPv6Underlay && sockets[0].family != .dualStack {
                throw BackendError(
                    "this host has a PublicIPv6 but the kernel refuses IPv6 sockets (socket(AF_INET6): Address family not supported; booted with ipv6.disable=1?): enable IPv6, or drop -public-ipv6 so that peers reach this host over IPv4"
                )
            }
        } catch {
            sockets.forEach { $0.close() }
            tun.close()
            throw error
        }
        var segmentation = false, receiveCoalescing = false
        if wantOffloads {
            segmentation = sockets[0].supportsSegmentation
            if !segmentation { notes.append("the kernel has no UDP_SEGMENT: one datagram per send") }
            receiveCoalescing = sockets.allSatisfy { $0.enableReceiveCoalescing() }
            if !receiveCoalescing { notes.append("the kernel has no UDP_GRO: one datagram per receive") }
        }
        let offloads = LoopOffloads(
            virtioHeader: virtio,
            segmentation: segmentation,
            receiveCoalescing: receiveCoalescing
        )
        if sockets[0].family != .dualStack {
            notes.append("the kernel has no IPv6 sockets: peers are reached over the IPv4 underlay only")
        }
        var configuration = LoopConfiguration(depth: settings.queueDepth, mtu: settings.mtu, offloads: offloads)
        configuration.maxSegments = UDPDataPath.maxSegments
        configuration.busyPollMicroseconds = settings.busyPollMicroseconds
        configuration.dualStackSocket = sockets[0].family == .dualStack

        var loops: [any DataPathLoop] = []
        do {
            for (i, socket) in sockets.enumerated() {
                let fd = tun.queues[i].rawValue
                loops.append(
                    try tier.makeLoop(
                        forwarder: forwarder,
                        tunFD: fd,
                        udpFD: socket.fd.rawValue,
                        configuration: configuration
                    )
                )
            }
        } catch {
            tun.close()
            sockets.forEach { $0.close() }
            throw error
        }
        self.tun = tun
        self.sockets = sockets
        self.loops = loops
        self.tier = tier
        self.tierNote = tierNote
        var summary = "\(tier.longName) data path, \(workers) worker(s), offloads: "
        summary +=
            settings.offload == .off
            ? "off (--offload off)"
            : tier == .simple
                ? "none (simple loop)"
                : "\(offloads)" + (virtio ? " (tun \(tunOffloads))" : "")
        if !notes.isEmpty { summary += "; " + notes.joined(separator: "; ") }
        self.summary = summary
        offloadNames = offloads.reportNames(tun: tunOffloads)
    }

    var statistics: [Statistics] { loops.map(\.statistics) }

    /// The most segments one TUN read is split into (TCP's usual MSS of
    /// 1400+ gives ~46 for 64 KiB; 256 covers an MSS down to 256 bytes).
    static let maxSegments = 256

    /// Starts one named thread per loop.
    func start() -> [DataPathThread] {
        loops.enumerated().map { i, loop in
            DataPathThread(loop: loop, name: loops.count == 1 ? "tunneld-dp" : "tunneld-dp\(i)")
        }
    }

    func closeSockets() { sockets.forEach { $0.close() } }
}

extension DataPathTier {
    /// The tier in words, for the log and `tunneld status`.
    var longName: String {
        switch self {
        case .uring: "io_uring (multishot read)"
        case .uringSingleRead: "io_uring (single read)"
        case .syscall: "system-call (sendmmsg/recvmmsg)"
        case .simple: "simple"
        }
    }
}
