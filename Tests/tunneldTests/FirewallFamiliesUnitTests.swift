import Foundation
import Logging
import NetBase
import Synchronization
import Testing

@testable import tunneld

private let network = IPv4Network("10.2.0.0/16")!
private let subnet = IPv4Network("10.2.72.0/24")!
private let v6 = FamilyNetworks.ipv6(network: IPv6Network("fd00:2::/56")!, subnet: IPv6Network("fd00:2:0:48::/64")!)
private let dualStack = FirewallNetworks(ipv4: .ipv4(network: network, subnet: subnet), ipv6: v6)
private let logger = Logger(label: "firewall-test")

@Suite struct IP6TablesRuleTests {
    @Test func ipv6MasqueradeRulesAreTheIPv4OnesWithIPv6Multicast() {
        let chain = IPTablesChain.masquerade(v6)
        #expect(chain.family == .ipv6 && chain.table == "nat" && chain.parent == "POSTROUTING" && chain.jumpFirst)
        #expect(chain.name == "TUNNELD-POSTRTG")
        #expect(
            chain.rules == [
                ["-s", "fd00:2::/56", "-d", "fd00:2::/56", "-j", "RETURN"],
                ["-s", "fd00:2::/56", "!", "-d", "ff00::/8", "-j", "MASQUERADE", "--random-fully"],
                ["!", "-s", "fd00:2::/56", "-d", "fd00:2:0:48::/64", "-j", "RETURN"],
                ["!", "-s", "fd00:2::/56", "-d", "fd00:2::/56", "-j", "MASQUERADE", "--random-fully"],
            ]
        )
        #expect(
            IPTablesChain.masquerade(v6, randomFully: false).rules[1]
                == ["-s", "fd00:2::/56", "!", "-d", "ff00::/8", "-j", "MASQUERADE"]
        )
    }

    @Test func ipv6ForwardRulesAcceptTheNetworkBothWays() {
        let chain = IPTablesChain.forward(v6)
        #expect(chain.family == .ipv6 && chain.table == "filter" && chain.parent == "FORWARD" && !chain.jumpFirst)
        #expect(chain.rules == [["-s", "fd00:2::/56", "-j", "ACCEPT"], ["-d", "fd00:2::/56", "-j", "ACCEPT"]])
        #expect(chain.label == "TUNNELD-FWD (ip6tables filter, jump from FORWARD)")
        #expect(IPTablesChain.forward(network: network).label == "TUNNELD-FWD (filter, jump from FORWARD)")
    }

    @Test func aDualStackInstallPutsTheSameChainsInBothPrograms() throws {
        let v4Tables = FakeIPTables(), v6Tables = FakeIPTables()
        let keeper = IPTablesKeeper(
            masquerade: true,
            forward: true,
            iptables: v4Tables.iptables,
            ip6tables: v6Tables.iptables,
            logger: logger
        )
        try keeper.install(dualStack)
        #expect(
            v4Tables.rules("nat", "TUNNELD-POSTRTG") == IPTablesChain.masquerade(network: network, subnet: subnet).rules
        )
        #expect(v6Tables.rules("nat", "TUNNELD-POSTRTG") == IPTablesChain.masquerade(v6).rules)
        #expect(v6Tables.rules("filter", "TUNNELD-FWD") == IPTablesChain.forward(v6).rules)
        #expect(v6Tables.rules("nat", "POSTROUTING") == [IPTablesChain.masquerade(v6).jump])
        #expect(v6Tables.rules("filter", "FORWARD") == [IPTablesChain.forward(v6).jump])
        // No IPv6 address ever reaches iptables, nor IPv4 ip6tables.
        #expect(!v4Tables.commands.withLock { $0 }.joined().joined().contains("fd00"))
        #expect(!v6Tables.commands.withLock { $0 }.joined().joined().contains("10.2."))

        // Flushed in ip6tables only: put back there, named as ip6tables'.
        v6Tables.setRules("filter", "FORWARD", [])
        #expect(try keeper.repair() == ["TUNNELD-FWD (ip6tables filter, jump from FORWARD)"])
        #expect(v6Tables.rules("filter", "FORWARD") == [IPTablesChain.forward(v6).jump])

        keeper.remove()
        for tables in [v4Tables, v6Tables] {
            #expect(tables.rules("nat", "TUNNELD-POSTRTG") == nil && tables.rules("filter", "TUNNELD-FWD") == nil)
            #expect(tables.rules("nat", "POSTROUTING") == [] && tables.rules("filter", "FORWARD") == [])
        }
    }

    @Test func aRunWithoutIPv6RemovesTheIPv6ChainsAnEarlierRunLeft() throws {
        let v4Tables = FakeIPTables(), v6Tables = FakeIPTables()
        try IPTablesKeeper(
            masquerade: true,
            forward: true,
            iptables: v4Tables.iptables,
            ip6tables: v6Tables.iptables,
            logger: logger
        ).install(dualStack)
        // Killed; the next run has an IPv4 network only.
        try IPTablesKeeper(
            masquerade: true,
            forward: true,
            iptables: v4Tables.iptables,
            ip6tables: v6Tables.iptables,
            logger: logger
        ).install(FirewallNetworks(network: network, subnet: subnet))
        #expect(v6Tables.rules("nat", "TUNNELD-POSTRTG") == nil && v6Tables.rules("filter", "TUNNELD-FWD") == nil)
        #expect(v6Tables.rules("nat", "POSTROUTING") == [] && v6Tables.rules("filter", "FORWARD") == [])
        #expect(v4Tables.rules("nat", "TUNNELD-POSTRTG")?.count == 4)
    }

    @Test func anIPv6NetworkWithoutIp6tablesIsRefusedNamingThePackage() throws {
        let keeper = IPTablesKeeper(masquerade: true, forward: false, iptables: FakeIPTables().iptables, logger: logger)
        let error = #expect(throws: DaemonError.self) { try keeper.install(dualStack) }
        #expect(
            error?.description.contains("ip6tables") == true
                && error?.description.contains("apt-get install iptables") == true
        )
    }
}

/// nft as far as tunneld uses it: batches (`-f -`) that replace or delete
/// `table inet tunneld`, `list table`, and check-only batches (`-c`). It
/// prints the table differently from how it was written (blank lines between
/// chains, as nft does), so drift is never judged by comparing with our text.
final class FakeNFT: Sendable {
    /// The table as nft would print it; nil when there is none.
    let table = Mutex<String?>(nil)
    let batches = Mutex<[String]>([])
    /// When set, every batch fails with this text (a kernel without nf_tables).
    let failure = Mutex<String?>(nil)

    var nft: NFT { NFT(run: { try self.run($0, $1) }) }

    func run(_ arguments: [String], _ input: String) throws -> String {
        if let failure = failure.withLock({ $0 }) {
            throw DaemonError("nft \(arguments.joined(separator: " ")) failed (exit 1): \(failure)")
        }
        switch arguments {
        case ["-c", "-f", "-"]:
            return ""
        case ["-f", "-"]:
            batches.withLock { $0.append(input) }
            let removal = NFTRuleset.removal
            guard input.hasPrefix(removal) else { throw DaemonError("unexpected batch \(input)") }
            let rest = input.dropFirst(removal.count)
            table.withLock {
                $0 = rest.isEmpty ? nil : rest.replacingOccurrences(of: "\t}\n\tchain", with: "\t}\n\n\tchain")
            }
            return ""
        case ["list", "table", "inet", "tunneld"]:
            guard let text = table.withLock({ $0 }) else { throw DaemonError("No such file or directory") }
            return text
        default:
            throw DaemonError("unexpected nft \(arguments)")
        }
    }
}

@Suite struct NFTablesRulesetTests {
    @Test func theDualStackTableHoldsFlanneldsRulesForBothFamilies() {
        let text = NFTRuleset.definition(dualStack, masquerade: true, forward: true, randomFully: true)
        #expect(
            text == """
                table inet tunneld {
                \tcomment "tunneld's masquerade and forward rules; tunneld replaces this table whole"
                \tchain postrouting {
                \t\ttype nat hook postrouting priority srcnat; policy accept;
                \t\tip saddr 10.2.0.0/16 ip daddr 10.2.0.0/16 return
                \t\tip saddr 10.2.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random
                \t\tip saddr != 10.2.0.0/16 ip daddr 10.2.72.0/24 return
                \t\tip saddr != 10.2.0.0/16 ip daddr 10.2.0.0/16 masquerade fully-random
                \t\tip6 saddr fd00:2::/56 ip6 daddr fd00:2::/56 return
                \t\tip6 saddr fd00:2::/56 ip6 daddr != ff00::/8 masquerade fully-random
                \t\tip6 saddr != fd00:2::/56 ip6 daddr fd00:2:0:48::/64 return
                \t\tip6 saddr != fd00:2::/56 ip6 daddr fd00:2::/56 masquerade fully-random
                \t}
                \tchain forward {
                \t\ttype filter hook forward priority filter; policy accept;
                \t\tip saddr 10.2.0.0/16 accept
                \t\tip daddr 10.2.0.0/16 accept
                \t\tip6 saddr fd00:2::/56 accept
                \t\tip6 daddr fd00:2::/56 accept
                \t}
                }

                """
        )
    }

    @Test func withoutFullyRandomTheMasqueradeIsPlain() {
        let text = NFTRuleset.definition(
            FirewallNetworks(network: network, subnet: subnet),
            masquerade: true,
            forward: false,
            randomFully: false
        )
        #expect(!text.contains("fully-random") && !text.contains("chain forward") && !text.contains("ip6"))
        #expect(text.components(separatedBy: "masquerade\n").count - 1 == 2, "\(text)")
        #expect(text.contains("\t\tip saddr 10.2.0.0/16 ip daddr != 224.0.0.0/4 masquerade\n"))
    }

    @Test func forwardRulesAloneMakeATableWithoutANatChain() {
        let text = NFTRuleset.definition(
            FirewallNetworks(ipv4: nil, ipv6: v6),
            masquerade: false,
            forward: true,
            randomFully: true
        )
        #expect(
            text == """
                table inet tunneld {
                \tcomment "tunneld's masquerade and forward rules; tunneld replaces this table whole"
                \tchain forward {
                \t\ttype filter hook forward priority filter; policy accept;
                \t\tip6 saddr fd00:2::/56 accept
                \t\tip6 daddr fd00:2::/56 accept
                \t}
                }

                """
        )
    }

    @Test func everyBatchReplacesTheWholeTableInOneTransaction() {
        let table = NFTRuleset.definition(dualStack, masquerade: true, forward: true, randomFully: true)
        // Declared (a no-op when it exists), deleted, defined: one batch.
        #expect(NFTRuleset.replacing(with: table) == "table inet tunneld\ndelete table inet tunneld\n" + table)
        #expect(NFTRuleset.removal == "table inet tunneld\ndelete table inet tunneld\n")
    }
}

@Suite struct NFTablesKeeperTests {
    @Test func installAppliesOneBatchAndRepairPutsBackAChangedOrDeletedTable() throws {
        let fake = FakeNFT()
        let keeper = NFTablesKeeper(masquerade: true, forward: true, nft: fake.nft, logger: logger)
        try keeper.install(dualStack)
        let wanted = NFTRuleset.definition(dualStack, masquerade: true, forward: true, randomFully: true)
        #expect(fake.batches.withLock { $0 } == [NFTRuleset.replacing(with: wanted)])
        // nft prints it its own way: no drift.
        #expect(try keeper.repair().isEmpty)
        #expect(fake.batches.withLock { $0.count } == 1)

        // Someone flushed the forward chain.
        fake.table.withLock { $0 = $0!.replacingOccurrences(of: "\t\tip saddr 10.2.0.0/16 accept\n", with: "") }
        #expect(try keeper.repair() == ["table inet tunneld (changed)"])
        #expect(fake.table.withLock { $0 }!.contains("\t\tip saddr 10.2.0.0/16 accept\n"))
        #expect(try keeper.repair().isEmpty)

        // Someone deleted the table (nft flush ruleset).
        fake.table.withLock { $0 = nil }
        #expect(try keeper.repair() == ["table inet tunneld (deleted)"])
        #expect(fake.table.withLock { $0 } != nil)

        keeper.remove()
        #expect(fake.table.withLock { $0 } == nil)
        #expect(fake.batches.withLock { $0.last } == NFTRuleset.removal)
        // Nothing wanted any more: a repair puts nothing back.
        #expect(try keeper.repair().isEmpty)
        #expect(fake.table.withLock { $0 } == nil)
    }

    @Test func aNewSubnetReplacesTheTable() throws {
        let fake = FakeNFT()
        let keeper = NFTablesKeeper(masquerade: true, forward: false, randomFully: false, nft: fake.nft, logger: logger)
        try keeper.install(FirewallNetworks(network: network, subnet: subnet))
        try keeper.install(FirewallNetworks(network: network, subnet: IPv4Network("10.2.9.0/24")!))
        let table = try #require(fake.table.withLock { $0 })
        #expect(table.contains("ip daddr 10.2.9.0/24 return") && !table.contains("10.2.72.0/24"))
        #expect(try keeper.repair().isEmpty)
    }

    @Test func anNftFailureIsThrownWithWhatNftSaid() throws {
        let fake = FakeNFT()
        fake.failure.withLock { $0 = "Error: Could not process rule: Operation not supported" }
        let keeper = NFTablesKeeper(masquerade: true, forward: true, nft: fake.nft, logger: logger)
        let error = #expect(throws: DaemonError.self) { try keeper.install(dualStack) }
        #expect(error?.description.contains("Operation not supported") == true)
        // What to do: the modules, or iptables instead.
        #expect(error?.description.contains("modprobe nft_chain_nat nft_masq") == true, "\(String(describing: error))")
        #expect(error?.description.contains("leave EnableNFTables out") == true)
        #expect(fake.table.withLock { $0 } == nil, "nothing installed")
    }

    @Test func aKernelWithoutNfTablesIsNamedWithWhatToDo() throws {
        let fake = FakeNFT()
        // What nft 1.0.6 prints when the kernel refuses its NETLINK_NETFILTER socket.
        fake.failure.withLock { $0 = "netlink: Error: cache initialization failed: Protocol not supported" }
        let keeper = NFTablesKeeper(masquerade: true, forward: true, nft: fake.nft, logger: logger)
        let error = #expect(throws: DaemonError.self) { try keeper.install(dualStack) }
        let text = error?.description ?? ""
        #expect(text.contains("the kernel has no nf_tables: load it (modprobe nf_tables)"), "\(text)")
        #expect(text.split(separator: "\n").count == 1, "one line: \(text)")
        // Any other failure is passed on as nft said it, with no guess added.
        fake.failure.withLock { $0 = "Error: syntax error, unexpected junk" }
        let other = #expect(throws: DaemonError.self) { try keeper.install(dualStack) }
        #expect(other?.description.hasSuffix("unexpected junk") == true, "\(String(describing: other))")
    }

    @Test func withoutNftOnPathTheErrorNamesThePackage() throws {
        let empty = FileManager.default.temporaryDirectory.appendingPathComponent("no-nft-\(getpid())").path
        try FileManager.default.createDirectory(atPath: empty, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: empty) }
        let error = #expect(throws: DaemonError.self) { try NFT(for: "-ip-masq", path: empty) }
        #expect(
            error?.description
                == "-ip-masq with EnableNFTables needs the nft program, which is not on PATH (\(empty)): install the nftables package (apt-get install nftables)"
        )
    }
}

/// The generated rules against the real programs and kernel, in a scratch
/// network namespace (`ip netns add`), never the machine's own.
@Suite(
    .serialized,
    .enabled(
        if: getuid() == 0 && findProgram("nft", in: nil) != nil && IPTables.find(.ipv6) != nil,
        "needs root, nft (nftables) and ip6tables (iptables): loads rules into a scratch network namespace"
    )
)
struct FirewallRulesInTheKernelTests {
    func withNamespace(_ body: (String) throws -> Void) throws {
        let name = "tdfw-\(getpid())-\(UInt16.random(in: 0...UInt16.max))"
        _ = try ChildProcess.run("/usr/bin/env", arguments: ["ip", "netns", "add", name])
        defer { _ = try? ChildProcess.run("/usr/bin/env", arguments: ["ip", "netns", "del", name]) }
        try body(name)
    }

    func inNamespace(_ name: String, _ arguments: [String], input: String = "") throws -> String {
        let output = try ChildProcess.run(
            "/usr/bin/env",
            arguments: ["ip", "netns", "exec", name] + arguments,
            input: Array(input.utf8)
        )
        guard output.status == 0 else {
            throw DaemonError("\(arguments.joined(separator: " ")): \(String(decoding: output.stderr, as: UTF8.self))")
        }
        return String(decoding: output.stdout, as: UTF8.self)
    }

    @Test func theDualStackTableLoadsAndIsResyncedWithoutFalseDrift() throws {
        try withNamespace { name in
            let nft = NFT(run: { try inNamespace(name, ["nft"] + $0, input: $1) })
            #expect(nft.hasFullyRandom())
            let keeper = NFTablesKeeper(masquerade: true, forward: true, nft: nft, logger: logger)
            try keeper.install(dualStack)
            let listed = try inNamespace(name, ["nft", "list", "table", "inet", "tunneld"])
            #expect(listed.contains("ip6 saddr != fd00:2::/56 ip6 daddr fd00:2:0:48::/64 return"), "\(listed)")
            #expect(
                listed.contains("ip saddr 10.2.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random"),
                "\(listed)"
            )
            #expect(try keeper.repair().isEmpty)
            _ = try inNamespace(name, ["nft", "flush", "chain", "inet", "tunneld", "postrouting"])
            #expect(try keeper.repair() == ["table inet tunneld (changed)"])
            _ = try inNamespace(name, ["nft", "flush", "ruleset"])
            #expect(try keeper.repair() == ["table inet tunneld (deleted)"])
            #expect(try inNamespace(name, ["nft", "list", "table", "inet", "tunneld"]) == listed)
            keeper.remove()
            #expect(try inNamespace(name, ["nft", "list", "tables"]).isEmpty)
            // Removing again (already gone) is fine.
            keeper.remove()
        }
    }

    @Test func theIPv6ChainsLoadIntoIp6tables() throws {
        try withNamespace { name in
            let program = IPTables(run: { try inNamespace(name, ["ip6tables", "-w", "5"] + $0) })
            let v4 = IPTables(run: { try inNamespace(name, ["iptables", "-w", "5"] + $0) })
            let keeper = IPTablesKeeper(
                masquerade: true,
                forward: true,
                iptables: v4,
                ip6tables: program,
                logger: logger
            )
            try keeper.install(dualStack)
            let nat = try program(["-t", "nat", "-S", "TUNNELD-POSTRTG"])
            #expect(
                nat.contains("-A TUNNELD-POSTRTG -s fd00:2::/56 ! -d ff00::/8 -j MASQUERADE --random-fully"),
                "\(nat)"
            )
            #expect(nat.contains("-A TUNNELD-POSTRTG ! -s fd00:2::/56 -d fd00:2:0:48::/64 -j RETURN"), "\(nat)")
            #expect(try program(["-S", "FORWARD"]).contains("-j TUNNELD-FWD"))
            #expect(try keeper.repair().isEmpty)
            keeper.remove()
            #expect(!(try program(["-t", "nat", "-S"])).contains("TUNNELD"))
            #expect(!(try program(["-S"])).contains("TUNNELD"))
        }
    }
}
