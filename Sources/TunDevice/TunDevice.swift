import CTunnel
import NetBase
import Netlink
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A TUN device (layer 3, `IFF_TUN | IFF_NO_PI`): every read gives one IPv4
/// or IPv6 packet, every write injects one — with a 10-byte virtio_net_hdr
/// in front when created with `vnetHeader`.
///
/// The device is not persistent: it exists while one of its queue file
/// descriptors is open, and the kernel deletes it, and every route through
/// it, when the last one closes.
public final class TunDevice: Sendable {
    /// The name the kernel gave the device.
    public let name: String
    public let multiQueue: Bool
    public let vnetHeader: Bool
    /// The network namespace the device was created in (nil: the creating
    /// thread's own).
    public let namespacePath: String?
    private let state: Mutex<State>

    private struct State {
        var queues: [FileDescriptor]
        var routes: [Route] = []
    }

    private init(name: String, multiQueue: Bool, vnetHeader: Bool, namespacePath: String?, first: FileDescriptor) {
        self.name = name
        self.multiQueue = multiQueue
        self.vnetHeader = vnetHeader
        self.namespacePath = namespacePath
        self.state = Mutex(State(queues: [first]))
    }

    /// Creates (or attaches to) the TUN device `name`: opens /dev/net/tun
    /// non-blocking and close-on-exec and sets it up with TUNSETIFF.
    ///
    /// `namespacePath` creates the device in that network namespace
    /// (`/var/run/netns/<name>`): the kernel puts a TUN device in the
    /// namespace of whoever opened /dev/net/tun.
    public static func create(
        name: String,
        multiQueue: Bool = false,
        vnetHeader: Bool = false,
        namespacePath: String? = nil
    ) throws -> TunDevice {
        try validate(name: name)
        let (fd, actualName) = try openQueue(
            name: name,
            multiQueue: multiQueue,
            vnetHeader: vnetHeader,
            namespacePath: namespacePath
        )
        return TunDevice(
            name: actualName,
            multiQueue: multiQueue,
            vnetHeader: vnetHeader,
            namespacePath: namespacePath,
            first: fd
        )
    }

    /// The first queue's file descriptor.
    public var fd: FileDescriptor { state.withLock { $0.queues[0] } }

    /// Every queue's file descriptor, the first one first.
    public var queues: [FileDescriptor] { state.withLock { $0.queues } }

    /// Opens one more queue of a multi-queue device; the kernel spreads
    /// flows over the queues by hash.
    public func addQueue() throws -> FileDescriptor {
        guard multiQueue else {
            throw SystemError(
                "TUNSETIFF (add queue)",
                on: name,
                errno: .invalid,
                hint: "\(name) was created without multiQueue; create it with multiQueue: true"
            )
        }
        let (fd, _) = try TunDevice.openQueue(
            name: name,
            multiQueue: true,
            vnetHeader: vnetHeader,
            namespacePath: namespacePath
        )
        state.withLock { $0.queues.append(fd) }
        return fd
    }

    /// Sets the MTU, assigns `address/prefixLength`, brings the device up and
    /// adds a route `<net> dev <name>` for each of `routes`, in that order
    /// (the kernel refuses routes through a device that is down). `socket`
    /// must be in the device's network namespace. Safe to repeat.
    /// The link of an IPv6-only network: MTU, no IPv4 address, no
    /// link-local address, up; `configureIPv6` then gives the address and
    /// the route.
    public func bringUp(mtu: Int, using socket: RouteSocket) throws {
        let index = try socket.linkIndex(named: name)
        try socket.setMTU(index: index, mtu: mtu)
        try? socket.setIPv6LinkLocal(index: index, enabled: false)
        try socket.setLinkUp(index: index)
    }

    public func configure(
        address: IPv4Address,
        prefixLength: Int = 32,
        mtu: Int,
        routes: [IPv4Network],
        using socket: RouteSocket
    ) throws {
        let index = try socket.linkIndex(named: name)
        try socket.setMTU(index: index, mtu: mtu)
        try socket.addAddress(index: index, address: address, prefixLength: prefixLength)
        // The tunnel carries IPv4 only: no fe80:: address, so no IPv6
        // chatter to read and drop. A kernel without IPv6 refuses this,
        // and has nothing to turn off.
        try? socket.setIPv6LinkLocal(index: index, enabled: false)
        try socket.setLinkUp(index: index)
        for network in routes {
            let route = Route(destination: network, outputIndex: index)
            try socket.addRoute(route)
            state.withLock { state in
                if !state.routes.contains(route) { state.routes.append(route) }
            }
        }
    }

    /// The IPv6 side of a dual-stack network: `address`/128 (without
    /// duplicate address detection, so usable at once) and a route for
    /// each of `routes` through the device. Call after `configure`. The
    /// kernel deletes both with the device.
    public func configureIPv6(address: IPv6Address, routes: [IPv6Network], using socket: RouteSocket) throws {
        let index = try socket.linkIndex(named: name)
        do {
            try socket.addAddress(index: index, ipv6: address, prefixLength: 128)
        } catch let error as SystemError {
            // EACCES (as root): IPv6 is switched off on the device.
            throw SystemError(
                error.operation,
                on: error.object,
                errno: error.errno,
                hint: error.errno == .accessDenied
                    ? "IPv6 is disabled on \(name); a dual-stack network needs it: set sysctl net.ipv6.conf.all.disable_ipv6 and net.ipv6.conf.default.disable_ipv6 to 0"
                    : error.hint
            )
        }
        for network in routes {
            try socket.addRoute(IPv6Route(destination: network, outputIndex: index))
        }
    }

    /// Removes the IPv6 address `configureIPv6` gave (a subnet that moved).
    public func removeIPv6(address: IPv6Address, using socket: RouteSocket) throws {
        try socket.deleteAddress(index: socket.linkIndex(named: name), ipv6: address, prefixLength: 128)
    }

    /// Removes the routes `configure` added. Routes already gone are fine.
    public func removeRoutes(using socket: RouteSocket) throws {
        let routes = state.withLock { $0.routes }
        for route in routes {
            try socket.deleteRoute(route)
            state.withLock { state in state.routes.removeAll { $0 == route } }
        }
    }

    /// The routes `configure` added and `removeRoutes` has not removed.
    public var routes: [Route] { state.withLock { $0.routes } }

    /// TUNSETOFFLOAD: the offloads (TUN_F_CSUM, TUN_F_TSO4, …) the reader of
    /// this device can handle. Needs `vnetHeader`.
    public func setOffload(_ flags: UInt32) throws {
        let fd = self.fd
        guard fd.isOpen else {
            throw SystemError("TUNSETOFFLOAD", on: name, errno: Errno(EBADF), hint: "the device is closed")
        }
        if case .failure(let e) = TunSyscall.ioctl(fd.rawValue, ctunnel_TUNSETOFFLOAD, value: UInt(flags)) {
            throw SystemError(
                "TUNSETOFFLOAD 0x\(String(flags, radix: 16))",
                on: name,
                errno: e,
                hint: e == .invalid
                    ? (vnetHeader
                        ? "the kernel does not support one of these offloads"
                        : "offloads need a device created with vnetHeader: true") : nil
            )
        }
    }

    /// Turns on the offloads the data path can handle, best first, and
    /// returns what the kernel accepted: checksum + TSO (+ TSO6) + USO, else
    /// checksum + TSO (+ TSO6) (USO needs Linux 6.2), else checksum alone,
    /// else nothing (a device without `vnetHeader`, or a kernel that
    /// refuses). With checksum offload the kernel may hand us packets whose
    /// TCP/UDP checksum is left to us (NEEDS_CSUM); with TSO/USO,
    /// super-packets of up to 64 KiB that we must split.
    ///
    /// - Parameter ipv6: whether the device carries IPv6 (TSO6 is offered
    ///   then; USO always covers both versions).
    public func enableOffloads(ipv6: Bool = false) -> TunOffloads {
        guard vnetHeader else { return [] }
        let tso: TunOffloads = ipv6 ? [.checksum, .tso4, .tso6] : [.checksum, .tso4]
        let candidates: [TunOffloads] = [tso.union(.uso4), tso, [.checksum]]
        for candidate in candidates {
            if (try? setOffload(candidate.kernelFlags)) != nil { return candidate }
        }
        return []
    }

    /// Closes every queue; with the last one the kernel deletes the device
    /// and its routes.
    public func close() {
        let queues = state.withLock { state in
            defer { state.routes.removeAll() }
            return state.queues
        }
        for queue in queues { queue.close() }
    }

    // MARK: - Opening

    private static func openQueue(
        name: String,
        multiQueue: Bool,
        vnetHeader: Bool,
        namespacePath: String?
    ) throws -> (FileDescriptor, String) {
        if let namespacePath {
            return try NetworkNamespace.run(inNamespaceAt: namespacePath) {
                try openQueue(name: name, multiQueue: multiQueue, vnetHeader: vnetHeader)
            }
        }
        return try openQueue(name: name, multiQueue: multiQueue, vnetHeader: vnetHeader)
    }

    private static func openQueue(name: String, multiQueue: Bool, vnetHeader: Bool) throws -> (FileDescriptor, String) {
        let device = "/dev/net/tun"
        let fd: FileDescriptor
        switch openDescriptor(device, O_RDWR | O_NONBLOCK | O_CLOEXEC) {
        case .success(let raw): fd = FileDescriptor(taking: raw)
        case .failure(let e):
            let hint: String? =
                switch e {
                case .noSuchFile, .noSuchDevice, Errno(ENXIO): "load the tun module (modprobe tun)"
                default: nil
                }
            throw SystemError("open \(device)", on: name, errno: e, hint: hint)
        }
        var flags = ctunnel_IFF_TUN | ctunnel_IFF_NO_PI
        if multiQueue { flags |= ctunnel_IFF_MULTI_QUEUE }
        if vnetHeader { flags |= ctunnel_IFF_VNET_HDR }
        var request = ifreq()
        ctunnel_ifreq_set_name(&request, name)
        ctunnel_ifreq_set_flags(&request, flags)
        if case .failure(let e) = TunSyscall.ioctl(fd.rawValue, ctunnel_TUNSETIFF, &request) {
            let hint: String? =
                switch e {
                case .busy: "\(name) is in use by another process (is another tunneld or flanneld running?)"
                case .invalid:
                    "a device named \(name) already exists and is not a TUN device with these flags "
                        + "(multiQueue \(multiQueue), vnetHeader \(vnetHeader)); delete it (ip link del \(name)) or choose another name"
                default: nil
                }
            throw SystemError("TUNSETIFF", on: name, errno: e, hint: hint)
        }
        let actualName = withUnsafeBytes(of: &request.ifr_ifrn.ifrn_name) { raw in
            String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
        }
        return (fd, actualName)
    }

    private static func validate(name: String) throws {
        // IFNAMSIZ is 16 including the NUL; the kernel would refuse the rest
        // with a bare EINVAL.
        guard !name.isEmpty, name.utf8.count < 16, !name.contains("/"), !name.contains(where: \.isWhitespace),
            name != ".", name != ".."
        else {
            throw SystemError(
                "TUNSETIFF",
                on: name.isEmpty ? "\"\"" : name,
                errno: .invalid,
                hint: "an interface name is 1 to 15 bytes without '/' or spaces"
            )
        }
    }
}

/// The system calls of this module; each returns its result or the errno,
/// retrying on EINTR.
enum TunSyscall {
    static func ioctl(_ fd: Int32, _ request: UInt, _ argument: UnsafeMutableRawPointer) -> Result<Void, Errno> {
        retryingInterrupts { Glibc.ioctl(fd, request, argument) }.map { _ in () }
    }

    static func ioctl(_ fd: Int32, _ request: UInt, value: UInt) -> Result<Void, Errno> {
        retryingInterrupts { ctunnel_ioctl_value(fd, request, value) }.map { _ in () }
    }
}
