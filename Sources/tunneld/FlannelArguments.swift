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
        "etcd-username", "etcd-password", "iface", "iface-regex", "public-ip", "subnet-file",
        "subnet-lease-renew-margin", "healthz-ip", "healthz-port", "backend", "store", "store-dir",
        "device", "datapath", "queue-depth", "log-level", "log-format", "v", "subnet-lease-ttl",
        "metrics-address", "control-socket",
    ]
    /// Long options that are on/off switches.
    static let booleanFlags: Set<String> = [
        "ip-masq", "accept-unknown-peers", "release-on-exit",
    ]
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
        "etcd-username", "etcd-password", "store", "store-dir",
    ]

    static func normalize(_ arguments: [String], environment: [String: String]) -> [String] {
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
                    if ["true", "1", "t", "yes"].contains(value) { result.append("--\(name)") }
                    else if !["false", "0", "f", "no"].contains(value) { result.append(argument) }  // let the parser complain
                } else {
                    result.append("--\(name)")
                }
                continue
            }
            if valueFlags.contains(name) { given.insert(name) }
            // The parser reports unknown options itself.
            result.append(argument)
        }
        // The environment fills in what the command line left out: every
        // flag for the daemon, the store's for the other subcommands.
        let subcommand = arguments.first { !$0.hasPrefix("-") }
        let fromEnvironment = subcommand == "run" ? valueFlags.union(booleanFlags) : storeFlags
        for name in fromEnvironment.sorted() where !given.contains(name) {
            let suffix = name.uppercased().replacingOccurrences(of: "-", with: "_")
            guard let value = environment["TUNNELD_" + suffix] ?? environment["FLANNELD_" + suffix],
                  !value.isEmpty else { continue }
            if booleanFlags.contains(name) {
                if ["true", "1", "t", "yes"].contains(value.lowercased()) { result.append("--\(name)") }
            } else if repeatableFlags.contains(name) {
                for item in value.split(separator: ",") { result += ["--\(name)", String(item)] }
            } else {
                result += ["--\(name)", value]
            }
        }
        return result
    }
}
