import CTunnel

/// Offloads of a TUN device that the reader takes on (TUNSETOFFLOAD).
public struct TunOffloads: OptionSet, Sendable, CustomStringConvertible {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// Packets may arrive with the TCP/UDP checksum left to the reader.
    public static let checksum = TunOffloads(rawValue: 1)
    /// TCP over IPv4 super-packets (TSO).
    public static let tso4 = TunOffloads(rawValue: 2)
    /// UDP super-packets (USO, Linux 6.2). Named for IPv4, as the metrics
    /// know it, but the kernel takes USO only for both IP versions at once.
    public static let uso4 = TunOffloads(rawValue: 4)
    /// TCP over IPv6 super-packets (TSO6).
    public static let tso6 = TunOffloads(rawValue: 8)

    var kernelFlags: UInt32 {
        var flags: UInt32 = 0
        if contains(.checksum) { flags |= ctunnel_TUN_F_CSUM }
        if contains(.tso4) { flags |= ctunnel_TUN_F_TSO4 }
        if contains(.tso6) { flags |= ctunnel_TUN_F_TSO6 }
        if contains(.uso4) { flags |= ctunnel_TUN_F_USO4 | ctunnel_TUN_F_USO6 }
        return flags
    }

    /// The offloads in the set, by name ("csum", "tso4", "tso6", "uso4").
    public var names: [String] {
        [(TunOffloads.checksum, "csum"), (.tso4, "tso4"), (.tso6, "tso6"), (.uso4, "uso4")]
            .filter { contains($0.0) }.map(\.1)
    }

    public var description: String { names.isEmpty ? "none" : names.joined(separator: "+") }
}
