import CTunnel
import NetBase
import UDPEncap

#if canImport(Glibc)
import Glibc
#endif

/// flannel's data path: poll, then one read and one send (or one receive and
/// one write) per packet, no offloads — what flannel's udp backend does.
/// Kept as `--datapath simple`: the benchmarks' baseline and the last resort.
public final class SimpleLoop: DataPathLoop, @unchecked Sendable {
    public let statistics = Statistics()
    private let forwarder: Forwarder
    private let tunFD: Int32
    private let udpFD: Int32
    private let capacity: Int
    private let wakeFD: Int32
    private let buffer: UnsafeMutableRawPointer
    private let names: PeerNames

    public init(forwarder: Forwarder, tunFD: Int32, udpFD: Int32, configuration: LoopConfiguration) throws {
        self.forwarder = forwarder
        self.tunFD = tunFD
        self.udpFD = udpFD
        self.capacity = configuration.packetCapacity
        names = PeerNames(addresses6: forwarder.table.addresses6, dualStack: configuration.dualStackSocket)
        // Room for the largest packet a TUN read may return (see
        // LoopConfiguration.packetCapacity); receives take `capacity`.
        buffer = .allocate(byteCount: DataPath.headroom + DataPath.maxPacketSize, alignment: 64)
        wakeFD = eventfd(0, Int32(EFD_CLOEXEC | EFD_NONBLOCK))
        guard wakeFD >= 0 else { throw SystemError("eventfd", on: "data path", errno: .current) }
    }

    deinit {
        buffer.deallocate()
        close(wakeFD)
    }

    public func stop() {
        var one: UInt64 = 1
        _ = write(wakeFD, &one, 8)
    }

    public func run() throws {
        var fds = [
            pollfd(fd: tunFD, events: Int16(POLLIN), revents: 0),
            pollfd(fd: udpFD, events: Int16(POLLIN), revents: 0),
            pollfd(fd: wakeFD, events: Int16(POLLIN), revents: 0),
        ]
        let p = buffer + DataPath.headroom
        var peer = sockaddr_in6()
        while true {
            let n = poll(&fds, 3, -1)
            if n < 0 {
                if errno == EINTR { continue }
                throw SystemError("poll", on: "data path", errno: .current)
            }
            if fds[2].revents != 0 { return }
            statistics.addBatch(completions: Int(n))
            if fds[0].revents & Int16(POLLIN) != 0 {
                let r = read(tunFD, p, DataPath.maxPacketSize)
                if r > 0 {
                    switch forwarder.fromTun(p, length: r, capacity: DataPath.maxPacketSize, stats: statistics) {
                    case .send(let entry, let length):
                        let s = withUnsafeMutableBytes(of: &peer) { name in
                            let nameLength = names.write(entry, to: name.baseAddress!)
                            return sendto(
                                udpFD,
                                p,
                                length,
                                0,
                                name.baseAddress!.assumingMemoryBound(to: sockaddr.self),
                                nameLength
                            )
                        }
                        if s < 0 {
                            statistics.add(.sendErrors)
                        } else {
                            statistics.add(.udpPacketsSent)
                            statistics.add(.udpBytesSent, UInt64(s))
                        }
                    case .reply(let length):
                        if write(tunFD, p, length) < 0 { statistics.add(.tunWriteErrors) }
                    case .drop:
                        break
                    }
                } else if r < 0 && errno != EAGAIN && errno != EINTR {
                    statistics.add(.readErrors)
                }
            } else if fds[0].revents & Int16(POLLERR | POLLHUP | POLLNVAL) != 0 {
                throw SystemError("poll", on: "TUN device", errno: Errno(EIO), hint: "the device went away")
            }
            if fds[1].revents & Int16(POLLIN | POLLERR) != 0 {
                var len = socklen_t(MemoryLayout<sockaddr_in6>.size)
                let r = withUnsafeMutablePointer(to: &peer) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                        recvfrom(udpFD, p, capacity, Int32(MSG_TRUNC), $0, &len)
                    }
                }
                if r > capacity {
                    statistics.add(.udpDatagramsReceived)
                    statistics.add(.droppedTruncated)
                } else if r >= 0 {
                    if let sender = withUnsafeBytes(of: &peer, { UnderlaySender(name: $0.baseAddress!) }),
                        let length = forwarder.fromNetwork(p, length: r, sender: sender, stats: statistics)
                    {
                        let w = write(tunFD, p, length)
                        if w < 0 {
                            statistics.add(.tunWriteErrors)
                        } else {
                            statistics.add(.tunPacketsWritten)
                            statistics.add(.tunBytesWritten, UInt64(w))
                        }
                    }
                } else if errno != EAGAIN && errno != EINTR {
                    statistics.add(.readErrors)
                }
            }
            statistics.publish()
        }
    }
}
