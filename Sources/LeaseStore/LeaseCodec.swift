import FlannelFiles
import NetBase

extension LeaseAttributes {
    /// flannel's lease value, byte for byte as flanneld writes it: `PublicIP`,
    /// `PublicIPv6` (`null` when absent), then `BackendType` and
    /// `BackendData`, `BackendV6Data` only when present. A udp node writes
    /// exactly `{"PublicIP":"198.18.0.1","PublicIPv6":null}`; the IPv6
    /// subnet of a dual-stack lease is not in the value but in the key.
    public var flannelJSON: String {
        // Written by hand: a JSON encoder would not promise this field order.
        var out = "{\"PublicIP\":"
        JSONValue.writeString(publicIP.description, to: &out)
        out += ",\"PublicIPv6\":"
        if let publicIPv6 {
            JSONValue.writeString(publicIPv6.description, to: &out)
        } else {
            out += "null"
        }
        // Go's `omitempty` drops an empty BackendType as well as a missing one.
        if let backendType, !backendType.isEmpty {
            out += ",\"BackendType\":"
            JSONValue.writeString(backendType, to: &out)
        }
        if let backendData {
            out += ",\"BackendData\":"
            backendData.write(to: &out)
        }
        if let backendV6Data {
            out += ",\"BackendV6Data\":"
            backendV6Data.write(to: &out)
        }
        out += "}"
        return out
    }

    /// Reads a lease value written by any flannel version (with or without
    /// `PublicIPv6`, `BackendType`, `BackendData`, extra fields such as
    /// `BackendV6Data`). `key` names the entry in the error.
    public init(flannelJSON text: String, key: String) throws(LeaseStoreError) {
        let value: JSONValue
        do {
            value = try JSONValue(parsing: text)
        } catch {
            throw .corrupt(key: key, reason: "lease value is not JSON (\(error))")
        }
        try self.init(flannelValue: value, key: key)
    }

    /// `init(flannelJSON:key:)` from the value's bytes as stored, without
    /// making a string of them first.
    public init(flannelJSON bytes: [UInt8], key: String) throws(LeaseStoreError) {
        let value: JSONValue
        do {
            value = try JSONValue(parsing: bytes)
        } catch {
            throw .corrupt(key: key, reason: "lease value is not JSON (\(error))")
        }
        try self.init(flannelValue: value, key: key)
    }

    /// Reads an already parsed lease value; see `init(flannelJSON:key:)`.
    public init(flannelValue value: JSONValue, key: String) throws(LeaseStoreError) {
        guard case .object = value else {
            throw .corrupt(key: key, reason: "lease value is \(value.kindName), not an object with PublicIP")
        }
        guard let ipValue = NetworkConfig.present(value.field("PublicIP")) else {
            throw .corrupt(key: key, reason: "lease value has no PublicIP")
        }
        guard case .string(let ipText) = ipValue, let publicIP = IPv4Address(ipText) else {
            throw .corrupt(key: key, reason: "PublicIP \(ipValue.compactText) is not an IPv4 address")
        }
        var publicIPv6: IPv6Address?
        if let v6 = NetworkConfig.present(value.field("PublicIPv6")) {
            // flanneld cannot read such a value either (its JSON decoder fails).
            guard case .string(let text) = v6, let address = IPv6Address(text) else {
                throw .corrupt(key: key, reason: "PublicIPv6 \(v6.compactText) is not an IPv6 address or null")
            }
            publicIPv6 = address
        }
        var backendType: String?
        if let bt = NetworkConfig.present(value.field("BackendType")) {
            guard case .string(let text) = bt else {
                throw .corrupt(key: key, reason: "BackendType \(bt.compactText) is not a string")
            }
            backendType = text.isEmpty ? nil : text
        }
        self.init(
            publicIP: publicIP,
            publicIPv6: publicIPv6,
            backendType: backendType,
            backendData: NetworkConfig.present(value.field("BackendData")),
            backendV6Data: NetworkConfig.present(value.field("BackendV6Data"))
        )
    }
}

/// flannel's lease keys: `10.2.72.0-24`, or for a dual-stack lease
/// `10.2.72.0-24&fd00:10:244:1::-64`, under `<prefix>/subnets/`. flanneld
/// keeps a dual-stack lease's IPv6 subnet only here, not in the value.
public enum LeaseKey {
    /// The key for an IPv4 lease ("10.2.72.0-24").
    public static func key(for subnet: IPv4Network) -> String { subnet.leaseKey }

    /// The key flanneld writes: the IPv4 part, then "&" and the IPv6 part
    /// for a dual-stack lease.
    public static func key(for subnet: IPv4Network, ipv6: IPv6Network?) -> String {
        guard let ipv6 else { return subnet.leaseKey }
        return subnet.leaseKey + "&" + ipv6.leaseKey
    }

    /// The IPv4 subnet a key names; nil for keys that are not lease keys
    /// (flannel skips those). Anything up to the last "/" (the etcd prefix)
    /// is ignored; of a dual-stack key, the IPv4 part is taken (the IPv6
    /// part must be a lease key part too).
    ///
    /// Only the one spelling flannel writes names a subnet: "10.2.072.0-24" or
    /// "10.2.72.0-024" would be a second key for 10.2.72.0/24, which could shadow
    /// the real lease or outlive it (renewals and deletions use the real key).
    /// flannel refuses octets with leading zeros too (Go's IP parser does).
    public static func subnet(fromKey key: some StringProtocol) -> IPv4Network? {
        subnet(fromKeyBytes: Substring(key).utf8)
    }

    /// `subnet(fromKey:)` over the key's UTF-8 bytes, in one pass with no
    /// strings built (a list of 60,000 leases reads 60,000 keys).
    public static func subnet(fromKeyBytes key: some BidirectionalCollection<UInt8>) -> IPv4Network? {
        var name = key[...]
        if let slash = name.lastIndex(of: UInt8(ascii: "/")) { name = name[name.index(after: slash)...] }
        var v4 = name
        if let amp = name.firstIndex(of: UInt8(ascii: "&")) {
            v4 = name[..<amp]
            guard ipv6Part(name[name.index(after: amp)...]) != nil else { return nil }
        }
        return IPv4Network.parse(v4, separator: UInt8(ascii: "-"), canonical: true, strict: true)
    }

    /// The IPv6 subnet of a dual-stack key ("…&fd00:10:244:1::-64"); nil
    /// for a plain key or one that is no lease key.
    public static func ipv6Subnet(fromKey key: some StringProtocol) -> IPv6Network? {
        var name = Substring(key).utf8[...]
        if let slash = name.lastIndex(of: UInt8(ascii: "/")) { name = name[name.index(after: slash)...] }
        guard let amp = name.firstIndex(of: UInt8(ascii: "&")),
            IPv4Network.parse(name[..<amp], separator: UInt8(ascii: "-"), canonical: true, strict: true) != nil
        else { return nil }
        return ipv6Part(name[name.index(after: amp)...])
    }

    /// "fd00:10:244:1::-64": lower-case hex digits and colons (flannel's
    /// key pattern, which has no dots or upper case), host bits zero. Other
    /// spellings of one IPv6 subnet are accepted, as flanneld accepts them:
    /// two keys naming one IPv6 subnet are a conflict `LeaseRule` settles.
    private static func ipv6Part(_ part: some BidirectionalCollection<UInt8>) -> IPv6Network? {
        guard let dash = part.lastIndex(of: UInt8(ascii: "-")) else { return nil }
        guard
            part[..<dash].allSatisfy({ b in
                b == UInt8(ascii: ":") || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(b)
                    || (UInt8(ascii: "a")...UInt8(ascii: "f")).contains(b)
            })
        else { return nil }
        return IPv6Network.parse(part, separator: UInt8(ascii: "-"), strict: true)
    }
}
