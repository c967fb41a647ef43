import NetBase

#if canImport(Glibc)
import Glibc
#endif

/// Docker daemon options from a subnet file, as flannel's
/// `dist/mk-docker-opts.sh` writes them, for a systemd unit's
/// `EnvironmentFile=`:
/// ```
/// DOCKER_OPT_BIP="--bip=10.2.72.1/24"
/// DOCKER_OPT_IPMASQ="--ip-masq=true"
/// DOCKER_OPT_MTU="--mtu=1472"
/// DOCKER_OPTS=" --bip=10.2.72.1/24 --ip-masq=true --mtu=1472"
/// ```
/// The script's habits are kept byte for byte: variables in name order (it
/// lists them with `set`), the combined value starting with a space (each
/// option is appended after one), `--ip-masq` inverted (flannel masquerades,
/// so Docker must not, and the other way round), and an existing value of
/// the combined variable (in the subnet file or the environment) kept in
/// front of the options, followed by a space.
///
/// With `FLANNEL_IPV6_SUBNET` in the subnet file (a dual-stack network),
/// tunneld adds `DOCKER_OPT_IPV6="--ipv6"` and
/// `DOCKER_OPT_FIXED_CIDR_V6="--fixed-cidr-v6=fd00:10:244:5::/64"` (the
/// lease's IPv6 subnet), in the same name order; flannel's script has no
/// IPv6 options at all.
///
/// An IPv6-only network's subnet file (no FLANNEL_SUBNET) gives no
/// DOCKER_OPT_BIP: Docker keeps its own IPv4 bridge network, which the
/// overlay does not carry, and its containers reach other hosts over IPv6.
///
/// Where the script writes a file that leaves Docker off the overlay — the
/// subnet file missing, FLANNEL_SUBNET or FLANNEL_MTU missing or malformed —
/// this is an error instead.
public struct DockerOptions: Sendable, Equatable {
    /// `-i`: the DOCKER_OPT_* variables.
    public var individual: Bool
    /// `-c`: the combined variable.
    public var combined: Bool
    /// The combined variable's name (`-k`; distributions use DOCKER_NETWORK_OPTIONS).
    public var combinedKey: String
    /// Without `-m`: DOCKER_OPT_IPMASQ from FLANNEL_IPMASQ.
    public var ipMasqOption: Bool

    public static let defaultCombinedKey = "DOCKER_OPTS"
    public static let defaultPath = "/run/docker_opts.env"

    /// As the script: neither `-i` nor `-c` means both.
    public init(
        individual: Bool = false,
        combined: Bool = false,
        combinedKey: String = DockerOptions.defaultCombinedKey,
        ipMasqOption: Bool = true
    ) {
        self.individual = individual || !combined
        self.combined = combined || !individual
        self.combinedKey = combinedKey
        self.ipMasqOption = ipMasqOption
    }

    /// One variable of the output.
    public struct Option: Sendable, Equatable {
        public var name: String
        public var value: String
    }

    /// The options a subnet file's text gives, in the script's order.
    public func options(subnetEnv text: String) throws(DockerOptionsError) -> [Option] {
        let values = SubnetEnv.variables(text)
        func required(_ name: String, example: String) throws(DockerOptionsError) -> String {
            guard let value = values[name] else {
                throw DockerOptionsError(
                    "\(name) is missing (a subnet file as tunneld or flanneld writes it has \(name)=\(example))"
                )
            }
            guard !value.isEmpty else {
                throw DockerOptionsError("\(name) is empty (expected e.g. \(name)=\(example))")
            }
            return value
        }
        // An IPv6-only network's file (no FLANNEL_NETWORK, FLANNEL_SUBNET,
        // but FLANNEL_IPV6_SUBNET): no --bip, Docker keeps its own IPv4
        // bridge network, which the overlay does not carry.
        let ipv6Only =
            values["FLANNEL_SUBNET"] == nil && values["FLANNEL_NETWORK"] == nil
            && !(values["FLANNEL_IPV6_SUBNET"] ?? "").isEmpty
        var options: [Option] = []
        if !ipv6Only {
            let subnet = try required("FLANNEL_SUBNET", example: "10.2.72.1/24")
            // Docker's --bip is the bridge's own address with the prefix length.
            guard IPv4Network(subnet) != nil else {
                throw DockerOptionsError(
                    "FLANNEL_SUBNET \"\(subnet)\" is not an address/prefix such as 10.2.72.1/24"
                )
            }
            options.append(Option(name: "DOCKER_OPT_BIP", value: "--bip=\(subnet)"))
        }
        let mtuText = try required("FLANNEL_MTU", example: "1472")
        guard let mtu = Int(mtuText), (68...65535).contains(mtu) else {
            throw DockerOptionsError("FLANNEL_MTU \"\(mtuText)\" is not an MTU (a number from 68 to 65535)")
        }
        // Like the script: no FLANNEL_IPMASQ (or an empty one) means no option.
        if ipMasqOption, let masq = values["FLANNEL_IPMASQ"], !masq.isEmpty {
            switch masq {
            case "true": options.append(Option(name: "DOCKER_OPT_IPMASQ", value: "--ip-masq=false"))
            case "false": options.append(Option(name: "DOCKER_OPT_IPMASQ", value: "--ip-masq=true"))
            default:
                throw DockerOptionsError(
                    "FLANNEL_IPMASQ \"\(masq)\" is neither true nor false (use -m to leave out Docker's --ip-masq)"
                )
            }
        }
        options.append(Option(name: "DOCKER_OPT_MTU", value: "--mtu=\(mtu)"))
        // tunneld's addition (the script knows no IPv6): a dual-stack subnet
        // file gives Docker IPv6 on its bridge from the lease's IPv6 subnet.
        if let v6 = values["FLANNEL_IPV6_SUBNET"], !v6.isEmpty {
            guard let subnet = IPv6Network(v6) else {
                throw DockerOptionsError(
                    "FLANNEL_IPV6_SUBNET \"\(v6)\" is not an address/prefix such as fd00:10:244:5::1/64"
                )
            }
            options.append(Option(name: "DOCKER_OPT_IPV6", value: "--ipv6"))
            // Docker wants the subnet itself, not the bridge's address in it.
            options.append(Option(name: "DOCKER_OPT_FIXED_CIDR_V6", value: "--fixed-cidr-v6=\(subnet)"))
        }
        // In name order, as the script lists them (with `set`).
        return options.sorted { $0.name < $1.name }
    }

    /// The output file's text for a subnet file's text; `environment`
    /// supplies an existing value of the combined variable when the subnet
    /// file has none.
    public func render(subnetEnv text: String, environment: [String: String] = [:]) throws(DockerOptionsError) -> String
    {
        guard Self.isVariableName(combinedKey) else {
            throw DockerOptionsError(
                "-k \"\(combinedKey)\" is not a shell variable name (letters, digits and _, not starting with a digit), e.g. DOCKER_NETWORK_OPTIONS"
            )
        }
        let options = try options(subnetEnv: text)
        var output = ""
        let existing = SubnetEnv.variables(text)[combinedKey] ?? environment[combinedKey] ?? ""
        var joined = existing.isEmpty ? "" : existing + " "
        for option in options {
            if individual { output += "\(option.name)=\"\(option.value)\"\n" }
            joined += " " + option.value
        }
        if combined { output += "\(combinedKey)=\"\(joined)\"\n" }
        return output
    }

    /// The subnet file's text, with errors that say what to do.
    public static func readSubnetFile(_ path: String) throws(DockerOptionsError) -> String {
        let bytes: [UInt8]?
        do {
            bytes = try FileIO.read(path, limit: 64 << 10)
        } catch {
            throw DockerOptionsError(path: path, "cannot read it: \(error.reason)")
        }
        guard let bytes else {
            throw DockerOptionsError(
                path: path,
                "does not exist: start tunneld (or flanneld) first, which writes it once it has a lease, or give its path with -f (tunneld run's --subnet-file)"
            )
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// The lease's subnet (base address) named by a subnet file's
    /// FLANNEL_SUBNET, once `options(subnetEnv:)` accepted it.
    public static func subnet(subnetEnv text: String) -> IPv4Network? {
        SubnetEnv.variables(text)["FLANNEL_SUBNET"].flatMap { IPv4Network($0) }
    }

    /// Writes `text` to `path` atomically (a reader sees the old file or the
    /// new one, never a part), mode 0644, creating its directory.
    public static func writeOutput(_ text: String, to path: String) throws(DockerOptionsError) {
        let (directory, _) = FileIO.split(path)
        do {
            try FileIO.makeDirectories(directory, mode: 0o755)
            try FileIO.writeAtomically(path, Array(text.utf8), mode: 0o644)
        } catch {
            throw DockerOptionsError(path: path, "cannot write it: \(error.reason)")
        }
    }

    static func isVariableName(_ name: String) -> Bool {
        guard let first = name.utf8.first, !(UInt8(ascii: "0")...UInt8(ascii: "9")).contains(first) else {
            return false
        }
        return name.utf8.allSatisfy { c in
            c == UInt8(ascii: "_") || (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(c)
                || (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(c)
                || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(c)
        }
    }
}

/// Why Docker options could not be written; names the file when one is involved.
public struct DockerOptionsError: Error, Sendable, Equatable, CustomStringConvertible {
    public var path: String?
    public var reason: String

    public init(path: String? = nil, _ reason: String) {
        self.path = path
        self.reason = reason
    }

    public var description: String { (path.map { "\($0): " } ?? "") + reason }
}
