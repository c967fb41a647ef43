import CTunnel
import NetBase
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// An rtnetlink (AF_NETLINK / NETLINK_ROUTE) socket: links, addresses and
/// routes of the network namespace it was opened in.
///
/// Every change is sent with NLM_F_ACK and waits for the kernel's answer, so
/// a call returns only after the kernel applied the change or refused it.
/// Dumps collect multi-part replies until NLMSG_DONE. One request is in
/// flight at a time: the lock that holds the sequence number also spans the
/// send and the receive, so any thread may use the socket.
///
/// Every error is a `SystemError` whose operation names the request much as
/// `ip` would print it ("RTM_NEWROUTE 10.2.0.0/16 dev tun0", "RTM_NEWLINK mtu
/// 1472"), whose object is the device concerned (its name, else "ifindex N";
/// "rtnetlink" for dumps), and whose hint carries the kernel's extended-ack
/// message when it sent one, then what to do.
public final class RouteSocket: Sendable {
    private let descriptor: FileDescriptor
    /// The socket's netlink port id (the kernel's nl_pid for it).
    public let portID: UInt32
    /// The last sequence number used. Held across a whole request/reply
    /// exchange.
    private let sequence = Mutex<UInt32>(0)

    /// How long to wait for each reply datagram before giving up.
    static let replyTimeoutSeconds = 10
    /// An upper bound for one whole exchange (a dump of a very large table
    /// still takes well under this).
    static let exchangeDeadlineSeconds = 60.0
    static let dumpAttempts = 5

    /// Opens a socket in the calling thread's network namespace.
    public init() throws {
        (descriptor, portID) = try RouteSocket.open().get()
    }

    /// Opens a socket in the network namespace at `namespacePath`
    /// (`/var/run/netns/<name>`, `/proc/<pid>/ns/net`). A socket stays in the
    /// namespace it was created in, so every later call acts there, from any
    /// thread.
    public convenience init(namespacePath: String) throws {
        let opened = try NetworkNamespace.run(inNamespaceAt: namespacePath) { try RouteSocket.open().get() }
        self.init(descriptor: opened.0, portID: opened.1)
    }

    private init(descriptor: FileDescriptor, portID: UInt32) {
        self.descriptor = descriptor
        self.portID = portID
    }

    /// Closes the socket; later calls fail with EBADF.
    public func close() { descriptor.close() }

    private static func open() -> Result<(FileDescriptor, UInt32), SystemError> {
        func fail(_ what: String, _ e: Errno) -> Result<(FileDescriptor, UInt32), SystemError> {
            .failure(SystemError(what, on: "rtnetlink socket", errno: e))
        }
        let fd: FileDescriptor
        switch Syscall.socket(AF_NETLINK, Int32(SOCK_RAW.rawValue | SOCK_CLOEXEC.rawValue), NETLINK_ROUTE) {
        case .success(let raw): fd = FileDescriptor(taking: raw)
        case .failure(let e): return fail("socket(AF_NETLINK, NETLINK_ROUTE)", e)
        }
        // Extended acks carry the kernel's own words for a refusal ("Nexthop
        // device is not up"); capped acks leave out the echo of our request.
        // Both are optional: older kernels without them still work.
        _ = Syscall.setOption(fd.rawValue, SOL_NETLINK, NETLINK_EXT_ACK, Int32(1))
        _ = Syscall.setOption(fd.rawValue, SOL_NETLINK, NETLINK_CAP_ACK, Int32(1))
        let timeout = timeval(tv_sec: replyTimeoutSeconds, tv_usec: 0)
        if case .failure(let e) = Syscall.setOption(fd.rawValue, SOL_SOCKET, SO_RCVTIMEO, timeout) {
            return fail("setsockopt(SO_RCVTIMEO)", e)
        }
        var local = sockaddr_nl()
        local.nl_family = sa_family_t(AF_NETLINK)
        if case .failure(let e) = Syscall.bind(fd.rawValue, local) { return fail("bind", e) }
        switch Syscall.localAddress(fd.rawValue) {
        case .success(let address): return .success((fd, address.nl_pid))
        case .failure(let e): return fail("getsockname", e)
        }
    }

    // MARK: - Generic requests

    /// Sends `request` with NLM_F_ACK and waits for the kernel's answer.
    /// Returns the messages the kernel sent before the ack (a GET request's
    /// reply; nothing for a change). An errno in `accepting` counts as
    /// success ("already exists", "already gone").
    @discardableResult
    public func request(
        _ request: NetlinkRequest,
        operation: String,
        object: String,
        accepting: Set<Errno> = [],
        hint: ((Errno) -> String?)? = nil
    ) throws -> [NetlinkMessage] {
        try perform(request, accepting: accepting) { failure in
            (operation, object, hint?(failure.errno))
        }
    }

    /// Sends `request` with NLM_F_DUMP and returns every message of the
    /// multi-part reply. A dump the kernel marks inconsistent (NLM_F_DUMP_INTR:
    /// the table changed while it was read) is repeated, a few times at most.
    public func dump(_ request: NetlinkRequest, operation: String) throws -> [NetlinkMessage] {
        let dumping = NetlinkRequest(copying: request, addingFlags: UInt16(NLM_F_DUMP))
        var lastFailure: NetlinkFailure?
        for _ in 0..<RouteSocket.dumpAttempts {
            switch exchange(dumping) {
            case .success(let messages): return messages
            case .failure(let failure) where failure.dumpInterrupted: lastFailure = failure
            case .failure(let failure): throw systemError(failure, operation: operation, object: "rtnetlink", hint: nil)
            }
        }
        throw systemError(
            lastFailure ?? NetlinkFailure(errno: Errno(EINTR)),
            operation: operation,
            object: "rtnetlink",
            hint: "the table kept changing during \(RouteSocket.dumpAttempts) dumps; try again"
        )
    }

    /// `request` with NLM_F_ACK; on failure `describe` names the request,
    /// the object and a hint (called only then, so it may make requests of
    /// its own, such as looking up a device name).
    @discardableResult
    func perform(
        _ request: NetlinkRequest,
        accepting: Set<Errno> = [],
        describe: (NetlinkFailure) -> (operation: String, object: String, hint: String?)
    ) throws -> [NetlinkMessage] {
        let acked = NetlinkRequest(copying: request, addingFlags: UInt16(NLM_F_ACK))
        switch exchange(acked) {
        case .success(let messages):
            return messages
        case .failure(let failure) where accepting.contains(failure.errno):
            return []
        case .failure(let failure):
            let (operation, object, hint) = describe(failure)
            throw systemError(failure, operation: operation, object: object, hint: hint)
        }
    }

    func systemError(_ failure: NetlinkFailure, operation: String, object: String, hint: String?) -> SystemError {
        var parts: [String] = []
        if let message = failure.kernelMessage, !message.isEmpty { parts.append("kernel says: \(message)") }
        if let hint {
            parts.append(hint)
        } else if failure.errno == .notPermitted || failure.errno == .accessDenied {
            parts.append("run as root or grant CAP_NET_ADMIN")
        } else if failure.errno == Errno(ETIMEDOUT) {
            parts.append("the kernel did not answer within \(RouteSocket.replyTimeoutSeconds) s")
        }
        return SystemError(
            operation,
            on: object,
            errno: failure.errno,
            hint: parts.isEmpty ? nil : parts.joined(separator: "; ")
        )
    }

    /// One request/reply exchange under the lock.
    private func exchange(_ request: NetlinkRequest) -> Result<[NetlinkMessage], NetlinkFailure> {
        let fd = descriptor.rawValue
        return sequence.withLock { last -> Result<[NetlinkMessage], NetlinkFailure> in
            last = last == UInt32.max ? 1 : last + 1
            let seq = last
            let bytes = request.encoded(sequence: seq)
            guard descriptor.isOpen else { return .failure(NetlinkFailure(errno: Errno(EBADF))) }
            switch Syscall.sendToKernel(fd, bytes) {
            case .success(let sent) where sent == bytes.count: break
            case .success: return .failure(NetlinkFailure(errno: Errno(EMSGSIZE)))
            case .failure(let e): return .failure(NetlinkFailure(errno: e))
            }
            var replies: [NetlinkMessage] = []
            var interrupted = false
            let deadline = monotonicSeconds() + RouteSocket.exchangeDeadlineSeconds
            while monotonicSeconds() < deadline {
                let datagram: [UInt8]
                switch Syscall.receiveDatagram(fd) {
                case .success(let received):
                    // Only the kernel may answer; anything else is not ours.
                    guard received.senderPort == 0 else { continue }
                    datagram = received.bytes
                case .failure(let e) where e == .again:
                    return .failure(NetlinkFailure(errno: Errno(ETIMEDOUT)))
                case .failure(let e):
                    return .failure(NetlinkFailure(errno: e))
                }
                let messages: [NetlinkMessage]
                switch NetlinkMessage.parse(datagram: datagram) {
                case .success(let parsed): messages = parsed
                case .failure(let e): return .failure(NetlinkFailure(errno: e, kernelMessage: "malformed reply"))
                }
                for message in messages {
                    // A late answer to an earlier request that timed out.
                    guard message.sequence == seq, message.portID == portID || message.portID == 0 else { continue }
                    if message.flags & UInt16(NLM_F_DUMP_INTR) != 0 { interrupted = true }
                    switch Int32(message.type) {
                    case NLMSG_NOOP:
                        continue
                    case NLMSG_ERROR:
                        let failure = NetlinkFailure(errorMessage: message)
                        if failure.errno.rawValue == 0 {
                            // An ack ends a plain request; a dump never gets one.
                            return .success(replies)
                        }
                        return .failure(failure)
                    case NLMSG_DONE:
                        if let errno = NetlinkFailure.doneCode(message) {
                            var failure = NetlinkFailure(errno: errno)
                            failure.kernelMessage = NetlinkFailure.extendedAckMessage(
                                message.attributes(after: Int32.self),
                                flags: message.flags
                            )
                            return .failure(failure)
                        }
                        if interrupted {
                            var failure = NetlinkFailure(errno: Errno(EINTR))
                            failure.dumpInterrupted = true
                            return .failure(failure)
                        }
                        return .success(replies)
                    case NLMSG_OVERRUN:
                        return .failure(NetlinkFailure(errno: Errno(ENOBUFS), kernelMessage: "netlink overrun"))
                    default:
                        replies.append(message)
                    }
                }
            }
            return .failure(NetlinkFailure(errno: Errno(ETIMEDOUT)))
        }
    }
}

/// Why an exchange failed: the kernel's errno and, with extended acks, its
/// message.
struct NetlinkFailure: Error, Sendable {
    var errno: Errno
    var kernelMessage: String?
    var dumpInterrupted = false

    init(errno: Errno, kernelMessage: String? = nil) {
        self.errno = errno
        self.kernelMessage = kernelMessage
    }

    /// Reads an NLMSG_ERROR message: `struct nlmsgerr` (the negative errno,
    /// then the header of our request, plus its payload unless the ack is
    /// capped) followed by extended-ack attributes when NLM_F_ACK_TLVS is set.
    init(errorMessage message: NetlinkMessage) {
        let code = message.header(Int32.self) ?? -EPROTO
        errno = code == 0 ? Errno(0) : NetlinkFailure.errno(fromNegated: code)
        var attributesStart = MemoryLayout<nlmsgerr>.size
        if message.flags & UInt16(NLM_F_CAPPED) == 0, let echoed = message.header(nlmsgerr.self) {
            attributesStart = 4 + NetlinkLayout.align(Int(echoed.msg.nlmsg_len))
        }
        if message.flags & UInt16(NLM_F_ACK_TLVS) != 0, attributesStart <= message.payload.count {
            let attributes = NetlinkAttributes(parsing: message.payload[attributesStart...])
            kernelMessage = attributes[type: NLMSGERR_ATTR_MSG.rawValue]?.string
        }
    }

    /// The error an NLMSG_DONE carries (a dump that failed part way), nil when it
    /// ends the dump normally.
    static func doneCode(_ message: NetlinkMessage) -> Errno? {
        let code = message.header(Int32.self) ?? 0
        return code < 0 ? errno(fromNegated: code) : nil
    }

    /// The kernel reports an errno negated; INT32_MIN (which has no negation) or a
    /// positive value is not one, so it counts as a protocol error rather than trapping.
    static func errno(fromNegated code: Int32) -> Errno {
        code < 0 && code != Int32.min ? Errno(-code) : Errno(EPROTO)
    }

    static func extendedAckMessage(_ attributes: NetlinkAttributes, flags: UInt16) -> String? {
        guard flags & UInt16(NLM_F_ACK_TLVS) != 0 else { return nil }
        return attributes[type: NLMSGERR_ATTR_MSG.rawValue]?.string
    }
}

extension NetlinkRequest {
    init(copying other: NetlinkRequest, addingFlags extra: UInt16) {
        self = other
        self.addFlags(extra)
    }
}
