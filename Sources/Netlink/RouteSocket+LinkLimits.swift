#if canImport(Glibc)
import Glibc
#endif
import CTunnel
import NetBase

extension RouteSocket {
    /// Sets the largest GSO super-packet the kernel builds for this device
    /// (IFLA_GSO_MAX_SIZE; `ip link set … gso_max_size`). The udp backend
    /// keeps a TSO super-packet small enough that its segments, headers
    /// included, fit in one UDP_SEGMENT send (65507 bytes).
    public func setGSOMaxSize(index: Int32, bytes: Int) throws {
        guard bytes > 0, bytes <= 65536 else {
            throw SystemError("RTM_NEWLINK gso_max_size \(bytes)", on: linkName(index), errno: .invalid,
                              hint: "gso_max_size is 1 to 65536 bytes")
        }
        var request = NetlinkRequest(type: RTM_NEWLINK)
        var header = ifinfomsg()
        header.ifi_family = UInt8(AF_UNSPEC)
        header.ifi_index = index
        request.append(header: header)
        request.append(attribute: IFLA_GSO_MAX_SIZE, uint32: UInt32(bytes))
        try perform(request) { failure in
            ("RTM_NEWLINK gso_max_size \(bytes)", linkName(index), hint(failure, index: index))
        }
    }
}
