import CTunnel

#if canImport(Glibc)
import Glibc
#endif

/// The control messages of the udp data path's sends and receives: the
/// UDP_SEGMENT size a send carries (GSO: one buffer leaves as many equal
/// datagrams) and the UDP_GRO size a receive reports (many datagrams of one
/// sender back to back). Every loop builds and reads them here, whatever
/// system call or io_uring request carries the `msghdr`.
public enum UDPControlMessage {
    /// Bytes a control buffer needs for one UDP_SEGMENT or UDP_GRO message
    /// (CMSG_SPACE of an int, rounded up to a multiple of 8).
    public static let space = 32

    /// Prepares `control` (at least `space` bytes) to carry a UDP_SEGMENT
    /// size: the header is written once, the size with `setSegmentSize`.
    @inline(__always)
    public static func prepareSegmentSize(_ control: UnsafeMutableRawPointer) {
        memset(control, 0, space)
        let header = control.assumingMemoryBound(to: cmsghdr.self)
        header.pointee.cmsg_len = ctunnel_cmsg_len(MemoryLayout<UInt16>.size)
        header.pointee.cmsg_level = ctunnel_SOL_UDP
        header.pointee.cmsg_type = ctunnel_UDP_SEGMENT
    }

    /// Makes `message` a GSO send of `size`-byte datagrams through its
    /// prepared `control`, or a plain send of one datagram (nil).
    @inline(__always)
    public static func setSegmentSize(
        _ message: UnsafeMutablePointer<msghdr>,
        control: UnsafeMutableRawPointer?,
        _ size: Int
    ) {
        guard let control else {
            message.pointee.msg_control = nil
            message.pointee.msg_controllen = 0
            return
        }
        ctunnel_cmsg_data(control.assumingMemoryBound(to: cmsghdr.self))
            .withMemoryRebound(to: UInt16.self, capacity: 1) { $0.pointee = UInt16(truncatingIfNeeded: size) }
        message.pointee.msg_control = control
        message.pointee.msg_controllen = ctunnel_cmsg_space(MemoryLayout<UInt16>.size)
    }

    /// The segment size of a send prepared by `setSegmentSize` (nil: none).
    public static func segmentSize(of message: UnsafeMutablePointer<msghdr>) -> Int? {
        guard message.pointee.msg_controllen > 0, let first = ctunnel_cmsg_firsthdr(message) else { return nil }
        var header: UnsafeMutablePointer<cmsghdr>? = first
        while let h = header {
            if h.pointee.cmsg_level == ctunnel_SOL_UDP && h.pointee.cmsg_type == ctunnel_UDP_SEGMENT {
                return Int(ctunnel_cmsg_data(h).withMemoryRebound(to: UInt16.self, capacity: 1) { $0.pointee })
            }
            header = ctunnel_cmsg_nxthdr(message, h)
        }
        return nil
    }

    /// The value of a UDP_GRO control message (the size of each coalesced
    /// datagram), or nil when `header` is another message.
    @inline(__always)
    public static func receiveSegmentSize(_ header: UnsafeMutablePointer<cmsghdr>) -> Int? {
        guard header.pointee.cmsg_level == ctunnel_SOL_UDP && header.pointee.cmsg_type == ctunnel_UDP_GRO else {
            return nil
        }
        let size = ctunnel_cmsg_data(header).withMemoryRebound(to: Int32.self, capacity: 1) { $0.pointee }
        return size > 0 ? Int(size) : nil
    }

    /// The UDP_GRO segment size among the control messages a recvmsg or
    /// recvmmsg filled into `message` (nil: the receive is one datagram).
    @inline(__always)
    public static func receiveSegmentSize(of message: UnsafeMutablePointer<msghdr>) -> Int? {
        guard message.pointee.msg_controllen > 0 else { return nil }
        var header = ctunnel_cmsg_firsthdr(message)
        while let h = header {
            if let size = receiveSegmentSize(h) { return size }
            header = ctunnel_cmsg_nxthdr(message, h)
        }
        return nil
    }
}
