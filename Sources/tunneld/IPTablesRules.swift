import Foundation
import Logging
import NetBase

/// One chain of tunneld's own, its rules, and the one jump into it from a
/// built-in chain: rules are replaced and removed as a whole, and no rule of
/// anyone else is touched.
struct IPTablesChain: Sendable, Equatable {
    /// Which program holds it: iptables or ip6tables.
    var family: IPFamily = .ipv4
    var table: String
    var name: String
    var parent: String
    /// Insert the jump first in `parent` (else append it).
    var jumpFirst: Bool
    var comment: String
    var rules: [[String]]

    var jump: [String] { ["-j", name, "-m", "comment", "--comment", comment] }

    static let natChain = "TUNNELD-POSTRTG"
    static let forwardChain = "TUNNELD-FWD"

    /// flanneld's `-ip-masq` (N = Network, S = this host's subnet): traffic
    /// from the overlay to anywhere outside it leaves with the host's
    /// address; traffic within the network keeps its container addresses.
    /// `randomFully`: source ports chosen at random (`--random-fully`), as
    /// flanneld does unless `-ip-masq-fully-random-disable` or an iptables
    /// older than 1.6.2.
    static func masquerade(network: IPv4Network, subnet: IPv4Network, randomFully: Bool = true) -> IPTablesChain {
        masquerade(.ipv4(network: network, subnet: subnet), randomFully: randomFully)
    }

    /// The same for either family: ip6tables gets the same four rules, with
    /// IPv6 multicast (ff00::/8) instead of 224.0.0.0/4, as flanneld's.
    static func masquerade(_ networks: FamilyNetworks, randomFully: Bool = true) -> IPTablesChain {
        let n = networks.network, s = networks.subnet
        let masquerade = randomFully ? ["-j", "MASQUERADE", "--random-fully"] : ["-j", "MASQUERADE"]
        // The jump goes first, as flanneld's does, so that no earlier rule
        // masquerades traffic that must keep its container address.
        return IPTablesChain(
            family: networks.family,
            table: "nat",
            name: natChain,
            parent: "POSTROUTING",
            jumpFirst: true,
            comment: "tunneld masquerade",
            rules: [
                ["-s", n, "-d", n, "-j", "RETURN"],
                ["-s", n, "!", "-d", networks.family.multicast] + masquerade,
                ["!", "-s", n, "-d", s, "-j", "RETURN"],
                ["!", "-s", n, "-d", n] + masquerade,
            ]
        )
    }

    /// flanneld's `-iptables-forward-rules`: forward whatever comes from or
    /// goes to the network, for hosts whose FORWARD policy is DROP (Docker
    /// sets it when it turns IP forwarding on). The jump is appended, as
    /// flanneld's is, after Docker's own FORWARD rules.
    static func forward(network: IPv4Network) -> IPTablesChain {
        forward(.ipv4(network: network, subnet: network))
    }

    /// The same for either family (the subnet plays no part).
    static func forward(_ networks: FamilyNetworks) -> IPTablesChain {
        let n = networks.network
        return IPTablesChain(
            family: networks.family,
            table: "filter",
            name: forwardChain,
            parent: "FORWARD",
            jumpFirst: false,
            comment: "tunneld forward",
            rules: [
                ["-s", n, "-j", "ACCEPT"],
                ["-d", n, "-j", "ACCEPT"],
            ]
        )
    }

    /// Every chain tunneld may own, per family: what a previous run left is found by these.
    static let all: [(table: String, name: String, parent: String, comment: String)] = [
        ("nat", natChain, "POSTROUTING", "tunneld masquerade"),
        ("filter", forwardChain, "FORWARD", "tunneld forward"),
    ]

    /// How a repair names it: "TUNNELD-FWD (filter, jump from FORWARD)",
    /// "(ip6tables filter, …)" for IPv6.
    var label: String {
        "\(name) (\(family == .ipv6 ? "ip6tables " : "")\(table), jump from \(parent))"
    }
}

/// The iptables program, run as flanneld runs it (through go-iptables).
struct IPTables: Sendable {
    /// Runs iptables with these arguments; its standard output, or an error
    /// naming the command and what iptables said.
    let run: @Sendable ([String]) throws -> String

    /// - Parameter purpose: the flags that need iptables, for the error.
    init(for purpose: String, family: IPFamily = .ipv4) throws {
        guard let found = Self.find(family) else {
            throw DaemonError(
                "\(purpose) needs the \(family.iptablesProgram) program, which is not installed (apt-get install iptables)"
            )
        }
        self = found
    }

    /// The program for `family` where Debian and others install it; nil when absent.
    static func find(_ family: IPFamily) -> IPTables? {
        let program = family.iptablesProgram
        guard
            let path = ["/usr/sbin/\(program)", "/sbin/\(program)", "/usr/bin/\(program)"]
                .first(where: { FileManager.default.isExecutableFile(atPath: $0) })
        else { return nil }
        return IPTables(run: { arguments in try runRuleProgram(path, arguments, options: ["-w", "5"]) })
    }

    /// iptables as `run` (the unit tests' model of the kernel's tables).
    init(run: @escaping @Sendable ([String]) throws -> String) {
        self.run = run
    }

    @discardableResult
    func callAsFunction(_ arguments: [String]) throws -> String { try run(arguments) }

    /// iptables' version from `iptables --version` ("iptables v1.8.9
    /// (nf_tables)"); nil when the text holds none.
    static func version(from text: String) -> (major: Int, minor: Int, patch: Int)? {
        guard let start = text.range(of: "v") else { return nil }
        let numbers = text[start.upperBound...].prefix { $0.isNumber || $0 == "." }.split(separator: ".").compactMap {
            Int($0)
        }
        guard numbers.count >= 2 else { return nil }
        return (numbers[0], numbers[1], numbers.count > 2 ? numbers[2] : 0)
    }

    /// Whether this iptables knows MASQUERADE's `--random-fully` (1.6.2 and
    /// later, the test go-iptables makes for flanneld); false when its
    /// version cannot be told.
    func hasRandomFully() -> Bool {
        guard let text = try? self(["--version"]), let version = Self.version(from: text) else { return false }
        return Self.hasRandomFully(version)
    }

    static func hasRandomFully(_ version: (major: Int, minor: Int, patch: Int)) -> Bool {
        (version.major, version.minor, version.patch) >= (1, 6, 2)
    }

    @discardableResult
    func succeeds(_ arguments: [String]) -> Bool { (try? self(arguments)) != nil }
}

/// Installs tunneld's chains, puts them back when someone else removes them
/// (flanneld's `-iptables-resync`: a Docker or firewalld restart flushes
/// rules), and removes them on exit. IPv4 chains through iptables, IPv6
/// chains (the same names) through ip6tables, as flanneld keeps them.
final class IPTablesKeeper: FirewallKeeper, @unchecked Sendable {
    let masquerade: Bool
    let forward: Bool
    /// MASQUERADE with `--random-fully`.
    let randomFully: Bool
    /// The programs by family; ip6tables may be absent when no IPv6 network is
    /// configured (then IPv6 chains an earlier run left cannot be looked for).
    private let programs: [IPFamily: IPTables]
    let logger: Logger
    /// Guards `wanted` and serializes iptables runs (install from the lease
    /// watcher, repair from the resync loop).
    private let lock = NSLock()
    private var wanted: [IPTablesChain] = []
    let resyncQueue = DispatchQueue(label: "tunneld.iptables")
    let mechanism = "iptables"

    /// nil when neither masquerading nor forward rules are asked for.
    /// `fullyRandomDisabled`: flanneld's `-ip-masq-fully-random-disable`;
    /// `ipv6`: an IPv6 network is configured, so ip6tables is needed too.
    convenience init?(
        masquerade: Bool,
        forward: Bool,
        fullyRandomDisabled: Bool = false,
        ipv6: Bool = false,
        logger: Logger
    ) throws {
        guard masquerade || forward else { return nil }
        let flags = [
            masquerade ? "-ip-masq" : nil,
            forward ? "-iptables-forward-rules (on by default; -iptables-forward-rules=false turns it off)" : nil,
        ]
        .compactMap { $0 }.joined(separator: " and ")
        let iptables = try IPTables(for: flags)
        let ip6tables = try ipv6 ? IPTables(for: flags + " with an IPv6 network", family: .ipv6) : IPTables.find(.ipv6)
        var randomFully = false
        if masquerade && !fullyRandomDisabled {
            // ip6tables comes in the same package, at the same version.
            randomFully = iptables.hasRandomFully()
            if !randomFully {
                logger.notice(
                    "iptables is older than 1.6.2 (or did not say its version): masquerading without --random-fully"
                )
            }
        }
        self.init(
            masquerade: masquerade,
            forward: forward,
            randomFully: randomFully,
            iptables: iptables,
            ip6tables: ip6tables,
            logger: logger
        )
    }

    init(
        masquerade: Bool,
        forward: Bool,
        randomFully: Bool = true,
        iptables: IPTables,
        ip6tables: IPTables? = nil,
        logger: Logger
    ) {
        var programs = [IPFamily.ipv4: iptables]
        programs[.ipv6] = ip6tables
        self.programs = programs
        self.masquerade = masquerade
        self.forward = forward
        self.randomFully = randomFully
        self.logger = logger
    }

    var masqueradeLocation: String {
        "iptables nat chain \(IPTablesChain.natChain)\(randomFully ? ", --random-fully" : "")"
    }
    var forwardLocation: String { "iptables filter chain \(IPTablesChain.forwardChain)" }

    /// The chains for `network` and our `subnet`, installed or replaced; a
    /// chain of ours that is not wanted (left by a run with other flags) is removed.
    func install(network: IPv4Network, subnet: IPv4Network) throws {
        try install(FirewallNetworks(network: network, subnet: subnet))
    }

    /// The chains for every family in `networks`; a chain of ours that is not
    /// wanted (left by a run with other flags, or with IPv6 when there is none
    /// now) is removed.
    func install(_ networks: FirewallNetworks) throws {
        var chains: [IPTablesChain] = []
        for family in networks.families {
            guard programs[family.family] != nil else {
                throw DaemonError(
                    "the IPv6 network's rules need the ip6tables program, which is not installed (apt-get install iptables)"
                )
            }
            if masquerade { chains.append(.masquerade(family, randomFully: randomFully)) }
            if forward { chains.append(.forward(family)) }
        }
        try lock.withLock {
            for (family, program) in programs.sorted(by: { $0.key.rawValue < $1.key.rawValue }) {
                for stale in IPTablesChain.all
                where !chains.contains(where: { $0.family == family && $0.name == stale.name }) {
                    remove(program, table: stale.table, chain: stale.name, parent: stale.parent, comment: stale.comment)
                }
            }
            for chain in chains { try apply(chain) }
            wanted = chains
        }
    }

    /// Puts back what is missing of the wanted chains; returns their names.
    @discardableResult
    func repair() throws -> [String] {
        try lock.withLock {
            var repaired: [String] = []
            for chain in wanted where !isIntact(chain) {
                try apply(chain)
                repaired.append(chain.label)
            }
            return repaired
        }
    }

    /// Removes the jumps and the chains; what is already gone is fine.
    func remove() {
        lock.withLock {
            for chain in wanted {
                guard let program = programs[chain.family] else { continue }
                remove(program, table: chain.table, chain: chain.name, parent: chain.parent, comment: chain.comment)
            }
            wanted = []
        }
    }

    private func isIntact(_ chain: IPTablesChain) -> Bool {
        guard let iptables = programs[chain.family] else { return false }
        let t = ["-t", chain.table]
        return iptables.succeeds(t + ["-C", chain.parent] + chain.jump)
            && chain.rules.allSatisfy { iptables.succeeds(t + ["-C", chain.name] + $0) }
    }

    private func apply(_ chain: IPTablesChain) throws {
        guard let iptables = programs[chain.family] else {
            throw DaemonError("no \(chain.family.iptablesProgram) program for \(chain.label)")
        }
        let t = ["-t", chain.table]
        if !iptables.succeeds(t + ["-S", chain.name]) { try iptables(t + ["-N", chain.name]) }
        try iptables(t + ["-F", chain.name])
        for rule in chain.rules { try iptables(t + ["-A", chain.name] + rule) }
        if !iptables.succeeds(t + ["-C", chain.parent] + chain.jump) {
            try iptables(t + (chain.jumpFirst ? ["-I", chain.parent, "1"] : ["-A", chain.parent]) + chain.jump)
        }
    }

    private func remove(_ iptables: IPTables, table: String, chain: String, parent: String, comment: String) {
        let t = ["-t", table]
        // Bounded: a jump per earlier run at most, in practice one.
        for _ in 0..<16 {
            guard iptables.succeeds(t + ["-D", parent, "-j", chain, "-m", "comment", "--comment", comment]) else {
                break
            }
        }
        if iptables.succeeds(t + ["-S", chain]) {
            iptables.succeeds(t + ["-F", chain])
            iptables.succeeds(t + ["-X", chain])
        }
    }
}
