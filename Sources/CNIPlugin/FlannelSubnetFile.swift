import FlannelFiles
import NetBase

#if canImport(Glibc)
import Glibc
#endif

/// An IPv4 or IPv6 network in its canonical text (host bits cleared), as
/// Go's `net.ParseCIDR` gives it to flannel's plugin: "10.2.72.1/24" is
/// 10.2.72.0/24, "fd00:1::1/64" is fd00:1::/64.
public struct IPNetworkText: Sendable, Hashable, CustomStringConvertible {
    public let text: String
    public let isIPv6: Bool

    public init?(_ value: some StringProtocol) {
        if let v4 = IPv4Network(value) {
            text = v4.description
            isIPv6 = false
            return
        }
        let parts = value.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, parts[1].count <= 3, parts[1].allSatisfy({ $0.isASCII && $0.isNumber }),
            let length = Int(parts[1]), (0...128).contains(length)
        else { return nil }
        var bytes = [UInt8](repeating: 0, count: 16)
        guard inet_pton(AF_INET6, String(parts[0]), &bytes) == 1 else { return nil }
        for i in 0..<16 {
            let keep = max(0, min(8, length - i * 8))
            bytes[i] &= keep == 8 ? 0xff : ~(0xff >> UInt8(keep))
        }
        var buffer = [UInt8](repeating: 0, count: Int(INET6_ADDRSTRLEN))
        let formatted = buffer.withUnsafeMutableBytes { raw in
            inet_ntop(AF_INET6, bytes, raw.baseAddress!.assumingMemoryBound(to: CChar.self), socklen_t(raw.count))
                != nil
        }
        guard formatted else { return nil }
        text = "\(String(decoding: buffer.prefix { $0 != 0 }, as: UTF8.self))/\(length)"
        isIPv6 = true
    }

    public var description: String { text }
}

/// flannel's subnet file as flannel's CNI plugin reads it: besides the four
/// IPv4 variables tunneld writes, `FLANNEL_NETWORK` may list several networks
/// (comma-separated) and a dual-stack or IPv6-only flanneld adds
/// `FLANNEL_IPV6_NETWORK` and `FLANNEL_IPV6_SUBNET`.
public struct FlannelSubnetFile: Sendable, Equatable {
    public var networks: [IPNetworkText]
    public var subnet: IPNetworkText?
    public var ipv6Networks: [IPNetworkText]
    public var ipv6Subnet: IPNetworkText?
    public var mtu: Int
    public var ipMasq: Bool

    /// Parses the file's text; `path` only names the file in errors.
    public init(parsing text: String, path: String) throws(CNIError) {
        let values = SubnetEnv.variables(text)
        func fail(_ reason: String) -> CNIError {
            CNIError(
                code: CNIError.invalidSubnetFile,
                "subnet file \(path): \(reason)",
                details:
                    "tunneld and flanneld write this file; check which process wrote it, or point \"subnetFile\" in the network config at the right one"
            )
        }
        func networkList(_ name: String) throws(CNIError) -> [IPNetworkText] {
            guard let value = values[name] else { return [] }
            var list: [IPNetworkText] = []
            for item in value.split(separator: ",", omittingEmptySubsequences: false) {
                guard let network = IPNetworkText(item.trimmingSpaces) else {
                    throw fail("\(name) \"\(item)\" is not a network such as 10.2.0.0/16")
                }
                if !list.contains(network) { list.append(network) }
            }
            return list
        }
        func single(_ name: String) throws(CNIError) -> IPNetworkText? {
            guard let value = values[name] else { return nil }
            guard let network = IPNetworkText(value) else {
                throw fail("\(name) \"\(value)\" is not an address/prefix such as 10.2.72.1/24")
            }
            return network
        }
        networks = try networkList("FLANNEL_NETWORK")
        subnet = try single("FLANNEL_SUBNET")
        ipv6Networks = try networkList("FLANNEL_IPV6_NETWORK")
        ipv6Subnet = try single("FLANNEL_IPV6_SUBNET")

        var missing: [String] = []
        if networks.isEmpty && ipv6Networks.isEmpty { missing += ["FLANNEL_NETWORK", "FLANNEL_IPV6_NETWORK"] }
        if subnet == nil && ipv6Subnet == nil { missing += ["FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET"] }
        if values["FLANNEL_MTU"] == nil { missing.append("FLANNEL_MTU") }
        if values["FLANNEL_IPMASQ"] == nil { missing.append("FLANNEL_IPMASQ") }
        if !missing.isEmpty {
            let what = missing.count == 1 ? missing[0] : missing.joined(separator: ", ")
            throw fail("\(what) \(missing.count == 1 ? "is" : "are") missing")
        }
        let mtuText = values["FLANNEL_MTU"]!
        guard let mtu = Int(mtuText), (68...65535).contains(mtu) else {
            throw fail("FLANNEL_MTU \"\(mtuText)\" is not an MTU (68…65535)")
        }
        self.mtu = mtu
        switch values["FLANNEL_IPMASQ"]! {
        case "true": ipMasq = true
        case "false": ipMasq = false
        case let other: throw fail("FLANNEL_IPMASQ \"\(other)\" is not true or false")
        }
    }

    /// Reads the file. A missing file is code 11 ("try again later"): the
    /// daemon writes it once it holds a lease, so the runtime should retry.
    public static func read(_ path: String) throws(CNIError) -> FlannelSubnetFile {
        let bytes: [UInt8]?
        do {
            bytes = try FileIO.read(path, limit: 64 << 10)
        } catch {
            throw CNIError(code: CNIError.ioFailure, "cannot read subnet file \(error.path): \(error.reason)")
        }
        guard let bytes else {
            throw CNIError(
                code: CNIError.tryAgainLater,
                "subnet file \(path) does not exist",
                details:
                    "tunneld (or flanneld) writes it once it holds a lease for this host: check that it runs here with this -subnet-file, or set \"subnetFile\" in the network config"
            )
        }
        return try FlannelSubnetFile(parsing: String(decoding: bytes, as: UTF8.self), path: path)
    }
}

extension Substring {
    fileprivate var trimmingSpaces: Substring {
        var s = self
        while let c = s.first, c == " " || c == "\t" { s.removeFirst() }
        while let c = s.last, c == " " || c == "\t" { s.removeLast() }
        return s
    }
}
