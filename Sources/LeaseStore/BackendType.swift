/// The backends tunneld implements, by flannel's `Backend.Type` name: one
/// definition used by the config check, the `--backend` flag, the backends,
/// PeerSync, status and metrics.
///
/// `BackendConfig.type` stays a string: a config naming another of flannel's
/// backends (e.g. "ipsec") is valid for flannel and is stored, but no
/// tunneld host starts on it (`BackendType(rawValue:)` is nil).
public enum BackendType: String, CaseIterable, Sendable, CustomStringConvertible {
    case udp
    case vxlan
    case hostGW = "host-gw"
    case wireguard

    public var description: String { rawValue }

    /// "udp, vxlan, host-gw and wireguard", for messages.
    public static var supportedNames: String {
        let names = allCases.map(\.rawValue)
        return names.dropLast().joined(separator: ", ") + " and " + names.last!
    }

    /// The message for a config whose Backend.Type tunneld does not implement.
    public static func unsupported(_ type: String) -> String {
        "backend \"\(type)\" is not supported by tunneld (\(supportedNames) are); set Backend.Type to one of them"
    }
}

extension BackendConfig {
    /// The backend tunneld runs for this config; nil when it has none of that type.
    public var knownType: BackendType? { BackendType(rawValue: type) }
}
