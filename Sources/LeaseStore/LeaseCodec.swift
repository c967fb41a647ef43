import FlannelFiles
import NetBase

extension LeaseAttributes {
    /// flannel's lease value, byte for byte as flanneld writes it: `PublicIP`,
    /// `PublicIPv6` (`null` when absent), then `BackendType` and
    /// `BackendData` only when present. A udp node writes exactly
    /// `{"PublicIP":"198.18.0.1","PublicIPv6":null}`.
    public var flannelJSON: String {
        // Written by hand: a JSON encoder would not promise this field order.
        var out = "{\"PublicIP\":"
        JSONValue.writeString(publicIP.description, to: &out)
        out += ",\"PublicIPv6\":"
        if let publicIPv6 {
            JSONValue.writeString(publicIPv6, to: &out)
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
        var publicIPv6: String?
        if let v6 = NetworkConfig.present(value.field("PublicIPv6")) {
            guard case .string(let text) = v6 else {
                throw .corrupt(key: key, reason: "PublicIPv6 \(v6.compactText) is not a string or null")
            }
            publicIPv6 = text
        }
        var backendType: String?
        if let bt = NetworkConfig.present(value.field("BackendType")) {
            guard case .string(let text) = bt else {
                throw .corrupt(key: key, reason: "BackendType \(bt.compactText) is not a string")
            }
            backendType = text.isEmpty ? nil : text
        }
        self.init(publicIP: publicIP, publicIPv6: publicIPv6, backendType: backendType,
                  backendData: NetworkConfig.present(value.field("BackendData")))
    }
}

/// flannel's lease keys: `10.2.72.0-24`, or for a dual-stack lease
/// `10.2.72.0-24&fd00:10:244:1::-64`, under `<prefix>/subnets/`.
public enum LeaseKey {
    /// The key for an IPv4 lease ("10.2.72.0-24").
    public static func key(for subnet: IPv4Network) -> String { subnet.leaseKey }

    /// The IPv4 subnet a key names; nil for keys that are not lease keys
    /// (flannel skips those). Anything up to the last "/" (the etcd prefix)
    /// is ignored; of a dual-stack key, the IPv4 part is taken.
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
            let v6 = name[name.index(after: amp)...]
            guard !v6.contains(UInt8(ascii: "&")),
                  isIPv6KeyPart(Substring(decoding: v6, as: UTF8.self)) else { return nil }
        }
        return IPv4Network.parse(v4, separator: UInt8(ascii: "-"), canonical: true, strict: true)
    }

    /// "fd00:10:244:1::-64": hex digits and colons, then a prefix length ≤ 128.
    private static func isIPv6KeyPart(_ part: Substring) -> Bool {
        guard let dash = part.lastIndex(of: "-") else { return false }
        let address = part[..<dash]
        let length = part[part.index(after: dash)...]
        guard !address.isEmpty, address.contains(":"),
              address.allSatisfy({ $0 == ":" || $0 == "." || $0.isHexDigit }),
              !length.isEmpty, length.count <= 3, length.allSatisfy({ $0.isASCII && $0.isNumber }),
              let n = Int(length), n <= 128 else { return false }
        return true
    }
}
