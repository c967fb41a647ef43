import FlannelFiles

/// A CNI error result: what a plugin prints on standard output, with a
/// nonzero exit status, when an operation fails (CNI spec, "Error").
/// Codes 1–99 are the spec's well-known ones; 100 and up are this plugin's.
public struct CNIError: Error, Sendable, Equatable, CustomStringConvertible {
    public var code: Int
    public var msg: String
    public var details: String

    public init(code: Int, _ msg: String, details: String = "") {
        self.code = code
        self.msg = msg
        self.details = details
    }

    // The spec's well-known codes.
    public static let incompatibleVersion = 1
    public static let unsupportedField = 2
    public static let unknownContainer = 3
    public static let invalidEnvironment = 4
    public static let ioFailure = 5
    public static let decodingFailure = 6
    public static let invalidNetworkConfig = 7
    public static let tryAgainLater = 11
    // This plugin's.
    /// The subnet file exists but is not one flanneld or tunneld writes.
    public static let invalidSubnetFile = 100
    /// A delegate could not be found or run, or failed without a CNI error
    /// of its own (libcni's "internal" code, which flannel's plugin reports too).
    public static let delegateFailed = 999

    /// The error's JSON, as the spec shows it: cniVersion, code, msg, details.
    public func json(cniVersion: String) -> String {
        var fields: [String: JSONValue] = [
            "cniVersion": .string(cniVersion), "code": .number(Double(code)), "msg": .string(msg),
        ]
        if !details.isEmpty { fields["details"] = .string(details) }
        return JSONValue.object(fields).compactText
    }

    public var description: String {
        "CNI error \(code): \(msg)" + (details.isEmpty ? "" : " (\(details))")
    }
}
