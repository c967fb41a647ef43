import Foundation
import Logging
import NetBase

/// tunneld's rules as one nftables table, `table inet tunneld`: the same
/// masquerade and forward rules as the iptables chains, for both families in
/// one table (an `inet` table sees IPv4 and IPv6; `ip`/`ip6` matches pick the
/// family per rule). One table is one thing to replace atomically, to check
/// and to delete; flanneld keeps one table per family because the library it
/// uses binds a table to one family. NAT in an `inet` table needs Linux 5.2.
enum NFTRuleset {
    static let family = "inet"
    static let table = "tunneld"
    static let natChain = "postrouting"
    static let forwardChain = "forward"
    /// How nft names the table in commands and the log.
    static var qualifiedName: String { "\(family) \(table)" }

    /// The table's definition, as `nft -f` reads it and close to how
    /// `nft list table` prints it.
    static func definition(_ networks: FirewallNetworks, masquerade: Bool, forward: Bool, randomFully: Bool) -> String {
        var lines = [
            "table \(qualifiedName) {",
            "\tcomment \"tunneld's masquerade and forward rules; tunneld replaces this table whole\"",
        ]
        if masquerade {
            let action = randomFully ? "masquerade fully-random" : "masquerade"
            // Priority srcnat, as Docker's and iptables-nft's nat chains: a
            // `return` here ends only this chain, so (as with the iptables
            // chain's RETURN) a later chain may still masquerade.
            lines += ["\tchain \(natChain) {", "\t\ttype nat hook postrouting priority srcnat; policy accept;"]
            for f in networks.families {
                let k = f.family.nftKeyword, n = f.network, s = f.subnet
                lines += [
                    "\t\t\(k) saddr \(n) \(k) daddr \(n) return",
                    "\t\t\(k) saddr \(n) \(k) daddr != \(f.family.multicast) \(action)",
                    "\t\t\(k) saddr != \(n) \(k) daddr \(s) return",
                    "\t\t\(k) saddr != \(n) \(k) daddr \(n) \(action)",
                ]
            }
            lines.append("\t}")
        }
        if forward {
            // An accept here does not override a drop in another table's
            // forward chain (nftables runs every base chain of a hook); with
            // policy accept it lets the overlay through where nothing else
            // drops it, as flanneld's nftables mode does.
            lines += ["\tchain \(forwardChain) {", "\t\ttype filter hook forward priority filter; policy accept;"]
            for f in networks.families {
                let k = f.family.nftKeyword
                lines += ["\t\t\(k) saddr \(f.network) accept", "\t\t\(k) daddr \(f.network) accept"]
            }
            lines.append("\t}")
        }
        lines.append("}")
        return lines.joined(separator: "\n") + "\n"
    }

    /// Removes the table whether or not it is there: declaring an empty table
    /// (a no-op when it exists) before deleting it keeps the batch from failing.
    static let removal = "table \(qualifiedName)\ndelete table \(qualifiedName)\n"

    /// One `nft -f` batch that replaces whatever the table holds with `table`:
    /// the kernel applies the batch as one transaction, so the rules are never
    /// seen half replaced, and anything someone added to our table goes.
    static func replacing(with table: String) -> String { removal + table }
}

/// The nft program (Debian's nftables package).
struct NFT: Sendable {
    /// Runs nft with these arguments and this standard input; its standard
    /// output, or an error naming the command and what nft said.
    let run: @Sendable (_ arguments: [String], _ input: String) throws -> String

    /// nft found through `path` (the daemon's PATH), so that what runs is the
    /// nft the operator's PATH names. iptables is never looked for here.
    init(for purpose: String, path: String? = ProcessInfo.processInfo.environment["PATH"]) throws {
        guard let program = findProgram("nft", in: path) else {
            throw DaemonError(
                "\(purpose) with EnableNFTables needs the nft program, which is not on PATH (\(path ?? "unset")): install the nftables package (apt-get install nftables)"
            )
        }
        run = { arguments, input in try runRuleProgram(program, arguments, input: input) }
    }

    /// nft as `run` (the unit tests' model of the kernel's tables).
    init(run: @escaping @Sendable (_ arguments: [String], _ input: String) throws -> String) {
        self.run = run
    }

    @discardableResult
    func callAsFunction(_ arguments: [String], input: String = "") throws -> String { try run(arguments, input) }

    /// Applies `batch` as one transaction (`nft -f -`).
    func apply(_ batch: String) throws { try self(["-f", "-"], input: batch) }

    /// Whether the kernel and nft take `masquerade fully-random`: a check-only
    /// batch (`nft -c`), which changes nothing.
    func hasFullyRandom() -> Bool {
        let probe =
            "table inet tunneld_probe {\n\tchain p {\n\t\ttype nat hook postrouting priority srcnat;\n\t\tmeta l4proto tcp masquerade fully-random\n\t}\n}\n"
        return (try? self(["-c", "-f", "-"], input: probe)) != nil
    }

    /// Our table as nft prints it; nil when it is not there (or nft fails).
    func listTable() -> String? { try? self(["list", "table", NFTRuleset.family, NFTRuleset.table]) }
}

/// Installs tunneld's nftables table, replaces it whole when someone changed
/// or deleted it (the resync), and deletes it on exit.
final class NFTablesKeeper: FirewallKeeper, @unchecked Sendable {
    let masquerade: Bool
    let forward: Bool
    let randomFully: Bool
    private let nft: NFT
    let logger: Logger
    /// Guards `wanted`/`installed` and serializes nft runs.
    private let lock = NSLock()
    /// The table we mean to have, as we write it.
    private var wanted: String?
    /// The table as nft printed it right after we installed it: the resync
    /// compares what nft prints now with this, so nft's own way of printing
    /// (which differs between versions) never reads as drift.
    private var installed: String?
    let resyncQueue = DispatchQueue(label: "tunneld.nftables")
    let mechanism = "nftables"

    /// nil when neither masquerading nor forward rules are asked for. Looks
    /// up nft only (never iptables); checks once whether `fully-random` works.
    convenience init?(masquerade: Bool, forward: Bool, fullyRandomDisabled: Bool = false, logger: Logger) throws {
        guard masquerade || forward else { return nil }
        let flags = [
            masquerade ? "-ip-masq" : nil,
            forward ? "-iptables-forward-rules (on by default; -iptables-forward-rules=false turns it off)" : nil,
        ]
        .compactMap { $0 }.joined(separator: " and ")
        let nft = try NFT(for: flags)
        var randomFully = false
        if masquerade && !fullyRandomDisabled {
            randomFully = nft.hasFullyRandom()
            if !randomFully {
                logger.notice("nft or the kernel does not take 'masquerade fully-random': masquerading without it")
            }
        }
        self.init(masquerade: masquerade, forward: forward, randomFully: randomFully, nft: nft, logger: logger)
    }

    init(masquerade: Bool, forward: Bool, randomFully: Bool = true, nft: NFT, logger: Logger) {
        self.masquerade = masquerade
        self.forward = forward
        self.randomFully = randomFully
        self.nft = nft
        self.logger = logger
    }

    var masqueradeLocation: String {
        "nftables table \(NFTRuleset.qualifiedName), chain \(NFTRuleset.natChain)\(randomFully ? ", fully-random" : "")"
    }
    var forwardLocation: String { "nftables table \(NFTRuleset.qualifiedName), chain \(NFTRuleset.forwardChain)" }

    /// The table for `networks`, replacing whatever an earlier run (with
    /// other flags, or killed) left in it, in one transaction.
    func install(_ networks: FirewallNetworks) throws {
        let table = NFTRuleset.definition(networks, masquerade: masquerade, forward: forward, randomFully: randomFully)
        try lock.withLock {
            try apply(table)
            wanted = table
        }
    }

    /// Replaces the table when what nft prints differs from what it printed
    /// after the install (a rule flushed, added or changed; the table gone).
    @discardableResult
    func repair() throws -> [String] {
        try lock.withLock {
            guard let wanted else { return [] }
            let now = nft.listTable()
            guard now == nil || now != installed else { return [] }
            try apply(wanted)
            return ["table \(NFTRuleset.qualifiedName) (\(now == nil ? "deleted" : "changed"))"]
        }
    }

    /// Deletes the table; already gone is fine.
    func remove() {
        lock.withLock {
            do {
                try nft.apply(NFTRuleset.removal)
            } catch {
                logger.warning("nftables: could not delete table \(NFTRuleset.qualifiedName): \(error)")
            }
            wanted = nil
            installed = nil
        }
    }

    private func apply(_ table: String) throws {
        do {
            try nft.apply(NFTRuleset.replacing(with: table))
        } catch {
            guard let hint = Self.hint(for: "\(error)") else { throw error }
            throw DaemonError("\(error) (\(hint))")
        }
        installed = nft.listTable()
    }

    /// What to do when nft could not load the table because the kernel
    /// lacks what it needs; nil for other failures. Without nf_tables the
    /// netlink socket nft opens is refused ("Protocol not supported");
    /// without the NAT, masquerade or inet-NAT support a chain or rule is
    /// ("Operation not supported", or "No such file or directory" for a
    /// module that could not be loaded).
    static func hint(for nftMessage: String) -> String? {
        let fallback = "or leave EnableNFTables out of the network config to use iptables"
        if nftMessage.contains("Protocol not supported") {
            return
                "the kernel has no nf_tables: load it (modprobe nf_tables) or use a kernel built with CONFIG_NF_TABLES, \(fallback)"
        }
        if nftMessage.contains("Operation not supported") || nftMessage.contains("No such file or directory") {
            return
                "the kernel's nf_tables lacks what the table needs (NAT in an inet table needs Linux 5.2 and the nft_nat, nft_masq and nft_chain_nat modules): load them (modprobe nft_chain_nat nft_masq), \(fallback)"
        }
        return nil
    }

    /// Deletes the table an earlier run with `EnableNFTables` left (killed,
    /// or the config changed since), when nft is installed; for a host that
    /// runs with iptables now. Returns whether there was one.
    @discardableResult
    static func removeLeftover(path: String? = ProcessInfo.processInfo.environment["PATH"]) -> Bool {
        guard let nft = try? NFT(for: "", path: path), nft.listTable() != nil else { return false }
        return (try? nft.apply(NFTRuleset.removal)) != nil
    }
}
