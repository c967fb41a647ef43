import Foundation

/// flanneld's command-line habits, translated for ArgumentParser so that an
/// existing unit file runs unchanged after `tunneld run`:
/// single-dash long flags (`-etcd-endpoints=…`, `-iface ens33`), Go-style
/// booleans (`-ip-masq=true`, `--ip-masq=false`), and the environment form
/// `FLANNELD_<FLAG_IN_UPPER_SNAKE>` (or `TUNNELD_…`) for flags not given.
enum FlannelArguments {
    /// Long options that take a value.
    static let valueFlags: Set<String> = [
        "etcd-endpoints", "etcd-prefix", "etcd-keyfile", "etcd-certfile", "etcd-cafile",
        "etcd-username", "etcd-password", "iface", "iface-regex", "public-ip", "public-ipv6", "subnet-file",
        "subnet-lease-renew-margin", "healthz-ip", "healthz-port", "backend", "store", "store-dir",
        "device", "datapath", "queue-depth", "log-level", "log-format", "v", "subnet-lease-ttl",
        "iptables-resync", "iface-can-reach",
        "metrics-address", "control-socket", "etcd-keepalive-time", "etcd-keepalive-timeout",
    ]
    /// Long options that are on/off switches.
    static let booleanFlags: Set<String> = [
        "ip-masq", "accept-unknown-peers", "release-on-exit", "iptables-forward-rules",
        "ip-masq-fully-random-disable", "ip-blackhole-route",
    ]
    /// Switches that are on unless turned off (`-iptables-forward-rules=false`
    /// becomes `--no-iptables-forward-rules`).
    static let onByDefault: Set<String> = ["iptables-forward-rules"]
    /// Flags that may be given more than once (and in the environment as a
    /// comma-separated list).
    static let repeatableFlags: Set<String> = ["iface", "iface-regex"]
    /// What every subcommand that reads the store accepts: the only flags
    /// taken from the environment for subcommands other than `run`, so that
    /// a shell with flanneld's environment (FLANNELD_IFACE, FLANNELD_IP_MASQ…)
    /// can still run `tunneld leases` or `tunneld config get` against the
    /// same etcd.
    static let storeFlags: Set<String> = [
        "etcd-endpoints", "etcd-prefix", "etcd-keyfile", "etcd-certfile", "etcd-cafile",
        "etcd-username", "etcd-password", "store", "store-dir", "etcd-keepalive-time", "etcd-keepalive-timeout",
    ]

    /// Subcommands whose arguments are not flanneld's: `docker-opts` takes
    /// mk-docker-opts.sh's getopts flags (`-ci`, `-kNAME`), which must not
    /// become long options, and none of flanneld's FLANNELD_* variables.
    static let foreignSubcommands: Set<String> = ["docker-opts"]

    /// flanneld flags tunneld does not offer, with what to do instead; said
    /// in one line rather than the parser's "Unknown option".
    static let unsupportedFlags: [String: String] = [
        "kube-subnet-mgr":
            "tunneld keeps leases in etcd (or its local store), not in Kubernetes node objects; run it with -etcd-endpoints",
        "kubeconfig-file": "tunneld does not use the Kubernetes API; leases live in etcd",
        "kube-api-url": "tunneld does not use the Kubernetes API; leases live in etcd",
        "kube-annotation-prefix": "tunneld does not use the Kubernetes API; leases live in etcd",
        "net-config-path": "the network config lives in etcd at <prefix>/config (tunneld config set FILE writes it)",
        "auto-detect-ipv6":
            "tunneld does not detect the IPv6 address on its own: give -public-ipv6, or -iface an interface with a global IPv6 address",
        "ipv6-masq": "IPv6 masquerading is not built in tunneld yet",
        "subnet-dir":
            "tunneld offers the udp, vxlan, host-gw and wireguard backends; the ipsec backend's options do not apply",
    ]

    /// The first flanneld flag in `arguments` that tunneld does not offer,
    /// as an error message, or nil.
    static func unsupported(_ arguments: [String]) -> String? {
        for argument in arguments where argument.hasPrefix("-") {
            let name = String(argument.drop { $0 == "-" }.prefix { $0 != "=" })
            if let advice = unsupportedFlags[name] {
                return "flanneld's -\(name) is not supported by tunneld: \(advice) (see docs/MIGRATING.md)"
            }
            if name.hasPrefix("charon") {
                return
                    "flanneld's -\(name) belongs to the ipsec backend, which tunneld does not offer (udp, vxlan, host-gw and wireguard are; see docs/MIGRATING.md)"
            }
        }
        return nil
    }

    static func normalize(_ arguments: [String], environment: [String: String]) -> [String] {
        if let subcommand = arguments.first, foreignSubcommands.contains(subcommand) { return arguments }
        var result: [String] = []
        var given: Set<String> = []
        var index = 0
        while index < arguments.count {
            var argument = arguments[index]
            index += 1
            if argument == "--" {
                result.append(contentsOf: arguments[(index - 1)...])
                break
            }
            guard argument.hasPrefix("-"), argument.count > 2 else {
                result.append(argument)
                continue
            }
            if !argument.hasPrefix("--") { argument = "-" + argument }
            let body = argument.dropFirst(2)
            let name = String(body.split(separator: "=", maxSplits: 1).first ?? body)
            if booleanFlags.contains(name) {
                given.insert(name)
                if let eq = body.firstIndex(of: "=") {
                    let value = body[body.index(after: eq)...].lowercased()
                    if let on = boolean(value) {
                        if let flag = switchArgument(name, on: on) { result.append(flag) }
                    } else {
                        result.append(argument)  // let the parser complain
                    }
                } else {
                    result.append("--\(name)")
                }
                continue
            }
            if name.hasPrefix("no-"), booleanFlags.contains(String(name.dropFirst(3))) {
                given.insert(String(name.dropFirst(3)))
            }
            if valueFlags.contains(name) { given.insert(name) }
            // The parser reports unknown options itself.
            result.append(argument)
        }
        // The environment fills in what the command line left out: every
        // flag for the daemon, the store's for the other subcommands.
        let subcommand = arguments.first { !$0.hasPrefix("-") }
        // `status` also finds the daemon where the unit's environment put
        // its control socket (TUNNELD_CONTROL_SOCKET in tunneld.env).
        let fromEnvironment =
            switch subcommand {
            case "run": valueFlags.union(booleanFlags)
            case "status": storeFlags.union(["control-socket"])
            default: storeFlags
            }
        for name in fromEnvironment.sorted() where !given.contains(name) {
            let suffix = name.uppercased().replacingOccurrences(of: "-", with: "_")
            guard let value = environment["TUNNELD_" + suffix] ?? environment["FLANNELD_" + suffix],
                !value.isEmpty
            else { continue }
            if booleanFlags.contains(name) {
                if let on = boolean(value.lowercased()), let flag = switchArgument(name, on: on) { result.append(flag) }
            } else if repeatableFlags.contains(name) {
                for item in value.split(separator: ",") { result += ["--\(name)", String(item)] }
            } else {
                result += ["--\(name)", value]
            }
        }
        return result
    }

    /// Go's strconv.ParseBool words (lowercased), as flanneld accepts them.
    private static func boolean(_ value: some StringProtocol) -> Bool? {
        if ["true", "1", "t", "yes"].contains(value) { return true }
        if ["false", "0", "f", "no"].contains(value) { return false }
        return nil
    }

    /// The parser's spelling of switch `name` set to `on`; nil where that
    /// is the default and the parser has no spelling for it.
    private static func switchArgument(_ name: String, on: Bool) -> String? {
        if on { return "--\(name)" }
        return onByDefault.contains(name) ? "--no-\(name)" : nil
    }
}
