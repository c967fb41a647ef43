/// The operations a runtime asks of a plugin through `CNI_COMMAND`.
public enum CNICommand: String, Sendable, CaseIterable {
    case add = "ADD"
    case del = "DEL"
    case check = "CHECK"
    case version = "VERSION"

    /// The environment variables the spec requires for the command
    /// (`CNI_NETNS` may be empty on DEL: the namespace may be gone already).
    var requiredVariables: [String] {
        switch self {
        case .add, .check: ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"]
        case .del: ["CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"]
        case .version: []
        }
    }
}

/// One invocation as a runtime makes it: the `CNI_*` environment and the
/// network config on standard input.
public struct CNIRequest: Sendable {
    public var command: CNICommand
    public var containerID: String
    public var netns: String
    public var ifName: String
    /// `CNI_PATH`, split: where delegates are looked up, in order.
    public var searchPath: [String]
    /// The whole environment, passed on to delegates.
    public var environment: [String: String]
    public var stdin: [UInt8]

    /// Reads and checks the environment. A missing `CNI_COMMAND` is
    /// `nil` (someone ran the plugin by hand); anything else wrong is a
    /// `CNIError` with code 4 (invalid environment variables) or 3 (no
    /// container ID), as the spec asks.
    public init?(environment: [String: String], stdin: [UInt8]) throws(CNIError) {
        guard let commandText = environment["CNI_COMMAND"], !commandText.isEmpty else { return nil }
        guard let command = CNICommand(rawValue: commandText) else {
            throw CNIError(
                code: CNIError.invalidEnvironment,
                "unknown CNI_COMMAND \"\(commandText)\"",
                details: "this plugin handles " + CNICommand.allCases.map(\.rawValue).joined(separator: ", ")
            )
        }
        let missing = command.requiredVariables.filter { (environment[$0] ?? "").isEmpty }
        if !missing.isEmpty {
            throw CNIError(
                code: CNIError.invalidEnvironment,
                "required environment variables missing: \(missing.joined(separator: ", "))",
                details:
                    "a container runtime sets CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME and CNI_PATH; to run the plugin by hand set them too (see docs/CNI.md)"
            )
        }
        self.command = command
        containerID = environment["CNI_CONTAINERID"] ?? ""
        netns = environment["CNI_NETNS"] ?? ""
        ifName = environment["CNI_IFNAME"] ?? ""
        searchPath = (environment["CNI_PATH"] ?? "").split(separator: ":").map(String.init)
        self.environment = environment
        self.stdin = stdin
        if command != .version {
            try Self.checkContainerID(containerID)
            try Self.checkInterfaceName(ifName)
        }
    }

    /// The container ID names the saved delegate config, so it must be a
    /// plain file name; the spec allows letters, digits, `_`, `.` and `-`.
    static func checkContainerID(_ id: String) throws(CNIError) {
        let allowed = id.utf8.allSatisfy { c in
            (c >= UInt8(ascii: "a") && c <= UInt8(ascii: "z")) || (c >= UInt8(ascii: "A") && c <= UInt8(ascii: "Z"))
                || (c >= UInt8(ascii: "0") && c <= UInt8(ascii: "9"))
                || c == UInt8(ascii: "_") || c == UInt8(ascii: ".") || c == UInt8(ascii: "-")
        }
        guard allowed, let first = id.utf8.first, first != UInt8(ascii: "."), first != UInt8(ascii: "-") else {
            throw CNIError(
                code: CNIError.invalidEnvironment,
                "invalid characters in CNI_CONTAINERID \"\(id)\"",
                details: "a container ID starts with a letter or digit and holds only letters, digits, '_', '.' and '-'"
            )
        }
    }

    /// A Linux interface name: 1–15 bytes, no '/', ':' or white space, not "." or "..".
    static func checkInterfaceName(_ name: String) throws(CNIError) {
        let bad =
            name.utf8.count > 15 || name == "." || name == ".."
            || name.utf8.contains { $0 == UInt8(ascii: "/") || $0 == UInt8(ascii: ":") || $0 <= 0x20 || $0 == 0x7f }
        if bad {
            throw CNIError(
                code: CNIError.invalidEnvironment,
                "CNI_IFNAME \"\(name)\" is not an interface name",
                details: "an interface name has 1 to 15 characters and no '/', ':' or spaces"
            )
        }
    }
}
