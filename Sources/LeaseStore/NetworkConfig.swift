import NetBase

// PLACEHOLDER until the LeaseStore work lands: the public shape other modules rely on.
public struct NetworkConfig: Sendable, Equatable {
    public var network: IPv4Network
    public var subnetLen: Int
    public var subnetMin: IPv4Network
    public var subnetMax: IPv4Network
    public var enableIPv4: Bool
    public var enableIPv6: Bool
    public var backend: BackendConfig
    /// The JSON exactly as stored.
    public var json: String

    public init(json: String) throws {
        fatalError("not yet written")
    }
}

public struct BackendConfig: Sendable, Equatable {
    /// Lower-cased backend type; "udp" when the config has no Backend.
    public var type: String
    /// udp: Backend.Port (default 8285); vxlan: Backend.Port (default 8472).
    public var port: UInt16
    /// vxlan: Backend.VNI (default 1).
    public var vni: Int
    /// vxlan: Backend.DirectRouting (default false).
    public var directRouting: Bool
    /// Every field of the Backend object, as given.
    public var options: [String: JSONValue]
}

public enum JSONValue: Sendable, Equatable, Codable {
    case null
    case bool(Bool)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])
}
