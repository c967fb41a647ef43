import CTunnel
import NetBase

#if canImport(Glibc)
import Glibc
#endif

// Every system call of this module goes through one of these functions:
// each returns the call's result or the errno, retrying on EINTR. Callers
// turn an Errno into a SystemError that says what was attempted on what.
enum Syscall {
    static func socket(_ domain: Int32, _ type: Int32, _ proto: Int32) -> Result<Int32, Errno> {
        retryingInterrupts { Glibc.socket(domain, type, proto) }
    }

    static func setOption<T: BitwiseCopyable>(
        _ fd: Int32,
        _ level: Int32,
        _ name: Int32,
        _ value: T
    ) -> Result<Void, Errno> {
        retryingInterrupts {
            withUnsafeBytes(of: value) { Glibc.setsockopt(fd, level, name, $0.baseAddress, socklen_t($0.count)) }
        }.map { _ in () }
    }

    static func bind(_ fd: Int32, _ address: sockaddr_nl) -> Result<Void, Errno> {
        var address = address
        return retryingInterrupts {
            withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    Glibc.bind(fd, $0, socklen_t(MemoryLayout<sockaddr_nl>.size))
                }
            }
        }.map { _ in () }
    }

    static func localAddress(_ fd: Int32) -> Result<sockaddr_nl, Errno> {
        var address = sockaddr_nl()
        var length = socklen_t(MemoryLayout<sockaddr_nl>.size)
        return retryingInterrupts {
            withUnsafeMutablePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.getsockname(fd, $0, &length) }
            }
        }.map { _ in address }
    }

    /// Sends one datagram to the kernel (netlink port 0).
    static func sendToKernel(_ fd: Int32, _ bytes: [UInt8]) -> Result<Int, Errno> {
        var kernel = sockaddr_nl()
        kernel.nl_family = sa_family_t(AF_NETLINK)
        return retryingInterrupts {
            bytes.withUnsafeBytes { buffer in
                withUnsafePointer(to: &kernel) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                        Glibc.sendto(
                            fd,
                            buffer.baseAddress,
                            buffer.count,
                            0,
                            $0,
                            socklen_t(MemoryLayout<sockaddr_nl>.size)
                        )
                    }
                }
            }
        }
    }

    /// Receives one whole datagram, however large: its size is asked with
    /// MSG_PEEK|MSG_TRUNC first, so a reply is never cut short. Returns the
    /// datagram and the sender's port id (0 for the kernel).
    static func receiveDatagram(_ fd: Int32) -> Result<(bytes: [UInt8], senderPort: UInt32), Errno> {
        let peeked = retryingInterrupts {
            Glibc.recv(fd, nil, 0, Int32(MSG_PEEK | MSG_TRUNC))
        }
        let size: Int
        switch peeked {
        case .success(let n): size = n
        case .failure(let e): return .failure(e)
        }
        var bytes = [UInt8](repeating: 0, count: max(size, NetlinkLayout.messageHeaderSize))
        var sender = sockaddr_nl()
        var senderLength = socklen_t(MemoryLayout<sockaddr_nl>.size)
        let received = retryingInterrupts {
            bytes.withUnsafeMutableBytes { buffer in
                withUnsafeMutablePointer(to: &sender) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                        Glibc.recvfrom(fd, buffer.baseAddress, buffer.count, 0, $0, &senderLength)
                    }
                }
            }
        }
        switch received {
        case .success(let n):
            bytes.removeSubrange(min(n, bytes.count)...)
            return .success((bytes, sender.nl_pid))
        case .failure(let e):
            return .failure(e)
        }
    }

    static func joinNetworkNamespace(_ fd: Int32) -> Result<Void, Errno> {
        retryingInterrupts { ctunnel_setns_net(fd) }.map { _ in () }
    }
}
