import NetBase

#if canImport(Glibc)
import Glibc
#endif

/// flannel's subnet file (`/run/flannel/subnet.env`, flag `-subnet-file`),
/// which the CNI "flannel" plugin and Docker's `--bip`/`--mtu` read:
/// ```
/// FLANNEL_NETWORK=10.2.0.0/16
/// FLANNEL_SUBNET=10.2.72.1/24
/// FLANNEL_MTU=1472
/// FLANNEL_IPMASQ=false
/// ```
/// `FLANNEL_SUBNET` is the lease's first host address with the lease prefix.
/// In a dual-stack network `FLANNEL_IPV6_NETWORK` and `FLANNEL_IPV6_SUBNET`
/// (again the first host address, e.g. `fd00:10:244:5::1/64`) follow
/// `FLANNEL_SUBNET`, as flanneld writes them. An IPv6-only network's file
/// (EnableIPv4 false) has no `FLANNEL_NETWORK` or `FLANNEL_SUBNET`, as
/// flanneld leaves them out: `network` and `subnet` are nil.
public struct SubnetEnv: Sendable, Equatable {
    public var network: IPv4Network?
    /// The lease's subnet (base address, e.g. 10.2.72.0/24).
    public var subnet: IPv4Network?
    public var mtu: Int
    public var ipMasq: Bool
    /// The IPv6Network of a dual-stack network; nil otherwise.
    public var ipv6Network: IPv6Network?
    /// The lease's IPv6 subnet (base address, e.g. fd00:10:244:5::/64).
    public var ipv6Subnet: IPv6Network?

    public static let defaultPath = "/run/flannel/subnet.env"

    /// flannel's longest SubnetLen: a lease is never longer than /30, the
    /// network config refuses a longer SubnetLen and this file a longer FLANNEL_SUBNET.
    public static let longestSubnetLen = 30

    public init(
        network: IPv4Network?,
        subnet: IPv4Network?,
        mtu: Int,
        ipMasq: Bool,
        ipv6Network: IPv6Network? = nil,
        ipv6Subnet: IPv6Network? = nil
    ) {
        self.network = network
        self.subnet = subnet
        self.mtu = mtu
        self.ipMasq = ipMasq
        self.ipv6Network = ipv6Network
        self.ipv6Subnet = ipv6Subnet
    }

    /// The file's text, in flannel's order.
    public var text: String {
        var out = ""
        if let network, let subnet {
            out +=
                "FLANNEL_NETWORK=\(network)\n"
                + "FLANNEL_SUBNET=\(subnet.firstHost)/\(subnet.prefixLength)\n"
        }
        if let ipv6Network, let ipv6Subnet {
            out +=
                "FLANNEL_IPV6_NETWORK=\(ipv6Network)\n"
                + "FLANNEL_IPV6_SUBNET=\(ipv6Subnet.firstHost)/\(ipv6Subnet.prefixLength)\n"
        }
        return out + "FLANNEL_MTU=\(mtu)\n"
            + "FLANNEL_IPMASQ=\(ipMasq)\n"
    }

    /// Writes the file atomically (temporary file, fsync, rename), creating
    /// its directory if needed, mode 0644 as flannel does.
    public func write(to path: String = SubnetEnv.defaultPath) throws(SystemError) {
        let (directory, _) = FileIO.split(path)
        do {
            try FileIO.makeDirectories(directory, mode: 0o755)
            try FileIO.writeAtomically(path, Array(text.utf8), mode: 0o644)
        } catch {
            throw SystemError(
                error.operation,
                on: error.path,
                errno: error.errno,
                hint: Self.hint(for: error.errno)
            )
        }
    }

    /// Checks, before anything is leased, that a subnet file can be written
    /// at `path`: creates its directory and a scratch file next to it, then
    /// removes the scratch file. The error names the path and what to do.
    public static func checkWritable(_ path: String = SubnetEnv.defaultPath) throws(SystemError) {
        let (directory, name) = FileIO.split(path)
        let scratch = "\(directory)/.\(name).check-\(getpid())"
        do {
            try FileIO.makeDirectories(directory, mode: 0o755)
            try FileIO.writeAtomically(scratch, [], mode: 0o644)
            try FileIO.remove(scratch)
        } catch {
            throw SystemError(
                error.operation,
                on: error.path,
                errno: error.errno,
                hint: "the subnet file \(path) cannot be written there; "
                    + (Self.hint(for: error.errno) ?? "choose another -subnet-file")
            )
        }
    }

    /// Parses the file's text. Lines other than the six variables (comments,
    /// anything else) are ignored; values may be quoted, lines may start
    /// with `export`. The IPv6 pair is optional, but one without the other
    /// is refused.
    public init(parsing text: String) throws(SubnetEnvError) {
        let values = Self.variables(text)
        func require(_ name: String) throws(SubnetEnvError) -> String {
            guard let value = values[name] else { throw SubnetEnvError(reason: "\(name) is missing") }
            return value
        }
        // IPv6-only (flanneld with EnableIPv4 false): neither IPv4 line.
        let ipv6Only =
            values["FLANNEL_NETWORK"] == nil && values["FLANNEL_SUBNET"] == nil
            && values["FLANNEL_IPV6_NETWORK"] != nil
        if ipv6Only {
            network = nil
            subnet = nil
        } else {
            let networkText = try require("FLANNEL_NETWORK")
            guard let network = IPv4Network(networkText) else {
                throw SubnetEnvError(
                    reason: "FLANNEL_NETWORK \"\(networkText)\" is not a network such as 10.2.0.0/16"
                )
            }
            self.network = network
            subnet = try Self.subnet(values["FLANNEL_SUBNET"])
        }
        let mtuText = try require("FLANNEL_MTU")
        guard let mtu = Int(mtuText), (68...65535).contains(mtu) else {
            throw SubnetEnvError(reason: "FLANNEL_MTU \"\(mtuText)\" is not an MTU (68…65535)")
        }
        self.mtu = mtu
        switch (values["FLANNEL_IPV6_NETWORK"], values["FLANNEL_IPV6_SUBNET"]) {
        case (nil, nil):
            ipv6Network = nil
            ipv6Subnet = nil
        case (let networkText?, let subnetText):
            guard let network = IPv6Network(networkText) else {
                throw SubnetEnvError(
                    reason: "FLANNEL_IPV6_NETWORK \"\(networkText)\" is not a network such as "
                        + "fd00:10:244::/48"
                )
            }
            ipv6Network = network
            guard let subnet = try Self.ipv6Subnet(subnetText) else {
                throw SubnetEnvError(reason: "FLANNEL_IPV6_SUBNET is missing (FLANNEL_IPV6_NETWORK is set)")
            }
            ipv6Subnet = subnet
        case (nil, _):
            throw SubnetEnvError(reason: "FLANNEL_IPV6_NETWORK is missing (FLANNEL_IPV6_SUBNET is set)")
        }
        let masqText = try require("FLANNEL_IPMASQ")
        switch masqText {
        case "true": ipMasq = true
        case "false": ipMasq = false
        default: throw SubnetEnvError(reason: "FLANNEL_IPMASQ \"\(masqText)\" is not true or false")
        }
    }

    /// Reads the file; `.success(nil)` if it does not exist. A malformed or
    /// unreadable file is a `.failure` the caller can log and carry on.
    public static func read(from path: String = SubnetEnv.defaultPath) -> Result<SubnetEnv?, SubnetEnvError> {
        switch readText(path) {
        case .failure(let error): return .failure(error)
        case .success(nil): return .success(nil)
        case .success(let text?):
            do {
                return .success(try SubnetEnv(parsing: text))
            } catch {
                return .failure(SubnetEnvError(path: path, reason: error.reason))
            }
        }
    }

    /// The subnet a previous run leased, from the file's FLANNEL_SUBNET
    /// (other variables are not needed): the preferred subnet on restart.
    /// `.success(nil)` if the file does not exist.
    public static func previousSubnet(at path: String = SubnetEnv.defaultPath) -> Result<IPv4Network?, SubnetEnvError> {
        switch readText(path) {
        case .failure(let error): return .failure(error)
        case .success(nil): return .success(nil)
        case .success(let text?):
            do {
                return .success(try subnet(variables(text)["FLANNEL_SUBNET"]))
            } catch {
                return .failure(SubnetEnvError(path: path, reason: error.reason))
            }
        }
    }

    /// The IPv6 subnet a previous run leased, from FLANNEL_IPV6_SUBNET;
    /// `.success(nil)` if the file or the variable does not exist.
    public static func previousIPv6Subnet(
        at path: String = SubnetEnv.defaultPath
    )
        -> Result<IPv6Network?, SubnetEnvError>
    {
        switch readText(path) {
        case .failure(let error): return .failure(error)
        case .success(nil): return .success(nil)
        case .success(let text?):
            do {
                return .success(try ipv6Subnet(variables(text)["FLANNEL_IPV6_SUBNET"]))
            } catch {
                return .failure(SubnetEnvError(path: path, reason: error.reason))
            }
        }
    }

    /// "fd00:10:244:5::1/64": the host address is cleared to the subnet's base.
    private static func ipv6Subnet(_ value: String?) throws(SubnetEnvError) -> IPv6Network? {
        guard let value else { return nil }
        guard let subnet = IPv6Network(value), subnet.prefixLength <= 126 else {
            throw SubnetEnvError(
                reason: "FLANNEL_IPV6_SUBNET \"\(value)\" is not an address/prefix (at most /126) "
                    + "such as fd00:10:244:5::1/64"
            )
        }
        return subnet
    }

    private static func subnet(_ value: String?) throws(SubnetEnvError) -> IPv4Network {
        guard let value else { throw SubnetEnvError(reason: "FLANNEL_SUBNET is missing") }
        // "10.2.72.1/24": the host address is cleared to the subnet's base.
        guard let subnet = IPv4Network(value) else {
            throw SubnetEnvError(reason: "FLANNEL_SUBNET \"\(value)\" is not an address/prefix such as 10.2.72.1/24")
        }
        // A lease is never longer than /30 (flannel's longest SubnetLen); a /31 or /32
        // leaves no room for a bridge and a container, and for a /32 the "first host"
        // this file names would lie outside the subnet itself.
        guard subnet.prefixLength <= SubnetEnv.longestSubnetLen else {
            throw SubnetEnvError(
                reason: "FLANNEL_SUBNET \"\(value)\" is longer than /\(SubnetEnv.longestSubnetLen), "
                    + "the longest subnet flannel leases: use the lease's subnet, such as 10.2.72.1/24"
            )
        }
        return subnet
    }

    private static func readText(_ path: String) -> Result<String?, SubnetEnvError> {
        do {
            // The file is a few lines; anything large is not a subnet file.
            guard let bytes = try FileIO.read(path, limit: 64 << 10) else { return .success(nil) }
            return .success(String(decoding: bytes, as: UTF8.self))
        } catch {
            return .failure(SubnetEnvError(path: path, reason: error.reason))
        }
    }

    /// The file's `NAME=value` lines as a dictionary, read the way `init(parsing:)`
    /// reads them (comments skipped, `export` and quotes allowed); the CNI
    /// plugin reads flannel's dual-stack variables through it.
    public static func variables(_ text: String) -> [String: String] {
        var values: [String: String] = [:]
        for rawLine in text.split(whereSeparator: \.isNewline) {
            var line = rawLine.trimmingSpaces
            if line.isEmpty || line.hasPrefix("#") { continue }
            if line.hasPrefix("export ") { line = line.dropFirst(7).trimmingSpaces }
            guard let equals = line.firstIndex(of: "=") else { continue }
            let name = line[..<equals].trimmingSpaces
            var value = line[line.index(after: equals)...].trimmingSpaces
            if value.count >= 2, let q = value.first, q == "\"" || q == "'", value.last == q {
                value = value.dropFirst().dropLast()
            }
            values[String(name)] = String(value)
        }
        return values
    }

    private static func hint(for errno: Errno) -> String? {
        switch errno {
        case .accessDenied, .notPermitted: "run tunneld as root, or choose a writable -subnet-file"
        case Errno(EROFS): "choose a -subnet-file on a writable file system"
        default: nil
        }
    }
}

/// Why a subnet file could not be used.
public struct SubnetEnvError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The file, when one was read.
    public var path: String?
    public var reason: String

    public init(path: String? = nil, reason: String) {
        self.path = path
        self.reason = reason
    }

    public var description: String {
        (path.map { "subnet file \($0): " } ?? "subnet file: ") + reason
    }
}

extension Substring {
    fileprivate var trimmingSpaces: Substring {
        var s = self
        while let c = s.first, c == " " || c == "\t" { s.removeFirst() }
        while let c = s.last, c == " " || c == "\t" || c == "\r" { s.removeLast() }
        return s
    }
}
