import CTunnel
import NetBase

#if canImport(Glibc)
import Glibc
#endif

extension RouteSocket {
    /// Sets the most segments the kernel puts in one GSO super-packet for
    /// this device (IFLA_GSO_MAX_SEGS; `ip link set … gso_max_segs`). A
    /// super-packet forwarded to the device with more is split in software
    /// first, so a reader of the device never sees more than `count`.
    public func setGSOMaxSegments(index: Int32, count: Int) throws {
        guard count > 0, count <= 65535 else {
            throw SystemError(
                "RTM_NEWLINK gso_max_segs \(count)",
                on: linkName(index),
                errno: .invalid,
                hint: "gso_max_segs is 1 to 65535"
            )
        }
        try setLinkAttribute(index: index, IFLA_GSO_MAX_SEGS, UInt32(count), named: "gso_max_segs")
    }
}
