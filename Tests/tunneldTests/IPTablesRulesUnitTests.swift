import Logging
import NetBase
import Synchronization
import Testing

@testable import tunneld

/// The few iptables commands tunneld runs, on tables in memory, behaving as
/// iptables does: -N fails on an existing chain, -C/-D/-S/-F/-X fail on a
/// missing one or a missing rule, -X fails on a chain still jumped to.
final class FakeIPTables: Sendable {
    struct Failure: Error, CustomStringConvertible { var description: String }

    /// table → chain → rules (each rule as its arguments after the chain name).
    let tables = Mutex<[String: [String: [[String]]]]>([
        "nat": ["PREROUTING": [], "POSTROUTING": [], "OUTPUT": []],
        "filter": ["INPUT": [], "FORWARD": [], "OUTPUT": []],
    ])
    let commands = Mutex<[[String]]>([])
    static let builtIn: Set<String> = ["PREROUTING", "POSTROUTING", "OUTPUT", "INPUT", "FORWARD"]

    var iptables: IPTables { IPTables(run: { try self.run($0) }) }

    func rules(_ table: String, _ chain: String) -> [[String]]? { tables.withLock { $0[table]?[chain] } }
    func setRules(_ table: String, _ chain: String, _ rules: [[String]]?) {
        tables.withLock { $0[table]![chain] = rules }
    }

    func run(_ arguments: [String]) throws -> String {
        commands.withLock { $0.append(arguments) }
        var args = arguments[...]
        var table = "filter"
        if args.first == "-t" { table = args[args.startIndex + 1]; args = args.dropFirst(2) }
        guard let op = args.first, args.count >= 2 else { throw Failure(description: "bad command \(arguments)") }
        let chain = args[args.startIndex + 1]
        var rule = Array(args.dropFirst(2))
        return try tables.withLock { tables -> String in
            guard tables[table] != nil else { throw Failure(description: "no table \(table)") }
            let existing = tables[table]![chain]
            func need() throws -> [[String]] {
                guard let existing else { throw Failure(description: "No chain/target/match by that name: \(chain)") }
                return existing
            }
            switch op {
            case "-N":
                guard existing == nil else { throw Failure(description: "Chain already exists: \(chain)") }
                tables[table]![chain] = []
            case "-F":
                _ = try need()
                tables[table]![chain] = []
            case "-X":
                _ = try need()
                guard !Self.builtIn.contains(chain) else {
                    throw Failure(description: "cannot delete built-in \(chain)")
                }
                let referenced = tables[table]!.values.contains { $0.contains { $0.starts(with: ["-j", chain]) } }
                guard !referenced else { throw Failure(description: "Too many links: \(chain)") }
                tables[table]![chain] = nil
            case "-A":
                tables[table]![chain] = try need() + [rule]
            case "-I":
                var rules = try need()
                var at = 0
                if let n = rule.first.flatMap({ Int($0) }) { at = n - 1; rule.removeFirst() }
                rules.insert(rule, at: min(at, rules.count))
                tables[table]![chain] = rules
            case "-C":
                guard try need().contains(rule) else {
                    throw Failure(description: "Bad rule (does a matching rule exist in that chain?)")
                }
            case "-D":
                var rules = try need()
                guard let i = rules.firstIndex(of: rule) else { throw Failure(description: "Bad rule: \(rule)") }
                rules.remove(at: i)
                tables[table]![chain] = rules
            case "-S":
                return (["-N \(chain)"] + (try need()).map { "-A \(chain) " + $0.joined(separator: " ") })
                    .joined(separator: "\n") + "\n"
            default:
                throw Failure(description: "unexpected iptables command \(arguments)")
            }
            return ""
        }
    }
}

@Suite struct IPTablesRuleGenerationTests {
    let network = IPv4Network("10.2.0.0/16")!
    let subnet = IPv4Network("10.2.72.0/24")!
    let logger = Logger(label: "iptables-test")

    @Test func masqueradeRulesAreFlanneldsInFlanneldsOrder() {
        let chain = IPTablesChain.masquerade(network: network, subnet: subnet)
        #expect(chain.table == "nat" && chain.parent == "POSTROUTING" && chain.jumpFirst)
        #expect(
            chain.rules == [
                ["-s", "10.2.0.0/16", "-d", "10.2.0.0/16", "-j", "RETURN"],
                ["-s", "10.2.0.0/16", "!", "-d", "224.0.0.0/4", "-j", "MASQUERADE", "--random-fully"],
                ["!", "-s", "10.2.0.0/16", "-d", "10.2.72.0/24", "-j", "RETURN"],
                ["!", "-s", "10.2.0.0/16", "-d", "10.2.0.0/16", "-j", "MASQUERADE", "--random-fully"],
            ]
        )
    }

    @Test func forwardRulesAcceptTheNetworkBothWaysAfterOthersRules() {
        let chain = IPTablesChain.forward(network: IPv4Network("10.244.0.0/16")!)
        #expect(chain.table == "filter" && chain.parent == "FORWARD" && !chain.jumpFirst)
        #expect(chain.rules == [["-s", "10.244.0.0/16", "-j", "ACCEPT"], ["-d", "10.244.0.0/16", "-j", "ACCEPT"]])
    }

    @Test func installPutsTheMasqueradeJumpFirstAndTheForwardJumpLastOnce() throws {
        let fake = FakeIPTables()
        // Rules of others already there (Docker's), which must stay where they are.
        fake.setRules("nat", "POSTROUTING", [["-s", "172.17.0.0/16", "!", "-o", "docker0", "-j", "MASQUERADE"]])
        fake.setRules("filter", "FORWARD", [["-j", "DOCKER-USER"]])
        let keeper = IPTablesKeeper(masquerade: true, forward: true, iptables: fake.iptables, logger: logger)
        // Twice, as on a lease change: replaced, not duplicated.
        try keeper.install(network: network, subnet: subnet)
        try keeper.install(network: network, subnet: subnet)

        let masquerade = IPTablesChain.masquerade(network: network, subnet: subnet)
        let forward = IPTablesChain.forward(network: network)
        #expect(
            fake.rules("nat", "POSTROUTING") == [
                masquerade.jump, ["-s", "172.17.0.0/16", "!", "-o", "docker0", "-j", "MASQUERADE"],
            ]
        )
        #expect(fake.rules("nat", "TUNNELD-POSTRTG") == masquerade.rules)
        #expect(fake.rules("filter", "FORWARD") == [["-j", "DOCKER-USER"], forward.jump])
        #expect(fake.rules("filter", "TUNNELD-FWD") == forward.rules)
        #expect(masquerade.jump == ["-j", "TUNNELD-POSTRTG", "-m", "comment", "--comment", "tunneld masquerade"])
    }

    @Test func aNewSubnetReplacesTheMasqueradeRules() throws {
        let fake = FakeIPTables()
        let keeper = IPTablesKeeper(masquerade: true, forward: false, iptables: fake.iptables, logger: logger)
        try keeper.install(network: network, subnet: subnet)
        let newSubnet = IPv4Network("10.2.9.0/24")!
        let moved = IPTablesChain.masquerade(network: network, subnet: newSubnet)
        try keeper.install(network: network, subnet: newSubnet)
        #expect(fake.rules("nat", "TUNNELD-POSTRTG") == moved.rules)
        #expect(fake.rules("nat", "POSTROUTING") == [moved.jump])
    }

    @Test func repairPutsBackAFlushedChainAndARemovedJumpAndNothingElse() throws {
        let fake = FakeIPTables()
        let keeper = IPTablesKeeper(masquerade: true, forward: true, iptables: fake.iptables, logger: logger)
        try keeper.install(network: network, subnet: subnet)
        #expect(try keeper.repair().isEmpty)

        // A firewall restart: FORWARD flushed (the jump gone), our nat chain flushed.
        fake.setRules("filter", "FORWARD", [])
        fake.setRules("nat", "TUNNELD-POSTRTG", [])
        let repaired = try keeper.repair()
        #expect(
            repaired == ["TUNNELD-POSTRTG (nat, jump from POSTROUTING)", "TUNNELD-FWD (filter, jump from FORWARD)"]
        )
        #expect(
            fake.rules("nat", "TUNNELD-POSTRTG") == IPTablesChain.masquerade(network: network, subnet: subnet).rules
        )
        #expect(fake.rules("nat", "POSTROUTING")?.count == 1)
        #expect(fake.rules("filter", "FORWARD") == [IPTablesChain.forward(network: network).jump])

        // Both chains deleted outright: created again.
        fake.setRules("filter", "FORWARD", [])
        fake.setRules("filter", "TUNNELD-FWD", nil)
        #expect(try keeper.repair() == ["TUNNELD-FWD (filter, jump from FORWARD)"])
        #expect(fake.rules("filter", "TUNNELD-FWD") == IPTablesChain.forward(network: network).rules)
    }

    @Test func aRunWithoutIPMasqRemovesTheMasqueradeChainAnEarlierRunLeft() throws {
        let fake = FakeIPTables()
        let earlier = IPTablesKeeper(masquerade: true, forward: true, iptables: fake.iptables, logger: logger)
        try earlier.install(network: network, subnet: subnet)
        // Killed: nothing removed. The next run has no -ip-masq.
        let next = IPTablesKeeper(masquerade: false, forward: true, iptables: fake.iptables, logger: logger)
        try next.install(network: network, subnet: subnet)
        #expect(fake.rules("nat", "TUNNELD-POSTRTG") == nil)
        #expect(fake.rules("nat", "POSTROUTING") == [])
        #expect(fake.rules("filter", "TUNNELD-FWD") == IPTablesChain.forward(network: network).rules)
        #expect(fake.rules("filter", "FORWARD")?.count == 1)
    }

    @Test func removeTakesOutOurJumpsAndChainsAndLeavesOthersRules() throws {
        let fake = FakeIPTables()
        fake.setRules("filter", "FORWARD", [["-j", "DOCKER-USER"]])
        let keeper = IPTablesKeeper(masquerade: true, forward: true, iptables: fake.iptables, logger: logger)
        try keeper.install(network: network, subnet: subnet)
        keeper.remove()
        #expect(fake.rules("nat", "TUNNELD-POSTRTG") == nil && fake.rules("filter", "TUNNELD-FWD") == nil)
        #expect(fake.rules("nat", "POSTROUTING") == [])
        #expect(fake.rules("filter", "FORWARD") == [["-j", "DOCKER-USER"]])
        // Nothing wanted any more: a repair puts nothing back.
        #expect(try keeper.repair().isEmpty)
        #expect(fake.rules("filter", "TUNNELD-FWD") == nil)
    }

    @Test func anIPTablesFailureNamesTheCommandAndIsThrown() throws {
        let keeper = IPTablesKeeper(
            masquerade: true,
            forward: false,
            iptables: IPTables(run: { arguments in
                if arguments.contains("-A") {
                    throw DaemonError(
                        "iptables \(arguments.joined(separator: " ")) failed (exit 4): Resource temporarily unavailable"
                    )
                }
                if arguments.contains("-S") || arguments.contains("-C") { throw DaemonError("no such chain") }
                return ""
            }),
            logger: logger
        )
        #expect(throws: DaemonError.self) { try keeper.install(network: network, subnet: subnet) }
    }
}

@Suite struct MasqueradeRandomFullyTests {
    @Test func iptablesVersionsAreReadFromItsVersionLine() {
        func version(_ text: String) -> [Int]? { IPTables.version(from: text).map { [$0.major, $0.minor, $0.patch] } }
        #expect(version("iptables v1.8.9 (nf_tables)\n") == [1, 8, 9])
        #expect(version("iptables v1.4.21") == [1, 4, 21])
        #expect(version("iptables v1.8 (legacy)") == [1, 8, 0])
        #expect(version("something else") == nil)
        #expect(version("") == nil)
    }

    @Test func randomFullyFromIptables162On() {
        #expect(!IPTables.hasRandomFully((1, 4, 21)))
        #expect(!IPTables.hasRandomFully((1, 6, 1)))
        #expect(IPTables.hasRandomFully((1, 6, 2)))
        #expect(IPTables.hasRandomFully((1, 8, 9)))
        #expect(IPTables.hasRandomFully((2, 0, 0)))
        // A program that does not answer --version as iptables does: no --random-fully.
        #expect(!IPTables(run: { _ in "not iptables" }).hasRandomFully())
        #expect(IPTables(run: { _ in "iptables v1.8.9 (nf_tables)" }).hasRandomFully())
    }

    @Test func masqueradeRulesWithAndWithoutRandomFully() {
        let network = IPv4Network("10.2.0.0/16")!, subnet = IPv4Network("10.2.5.0/24")!
        let random = IPTablesChain.masquerade(network: network, subnet: subnet)
        #expect(random.rules.filter { $0.contains("MASQUERADE") }.allSatisfy { $0.last == "--random-fully" })
        let plain = IPTablesChain.masquerade(network: network, subnet: subnet, randomFully: false)
        #expect(plain.rules.count == random.rules.count)
        #expect(plain.rules.filter { $0.contains("MASQUERADE") }.count == 2)
        #expect(!plain.rules.joined().contains("--random-fully"))
        #expect(plain.rules[1] == ["-s", "10.2.0.0/16", "!", "-d", "224.0.0.0/4", "-j", "MASQUERADE"])
    }

    @Test func aKeeperWithoutRandomFullyReplacesRulesThatHadIt() throws {
        let fake = FakeIPTables()
        let network = IPv4Network("10.2.0.0/16")!, subnet = IPv4Network("10.2.5.0/24")!
        let logger = Logger(label: "test")
        try IPTablesKeeper(masquerade: true, forward: false, iptables: fake.iptables, logger: logger)
            .install(network: network, subnet: subnet)
        #expect(fake.rules("nat", IPTablesChain.natChain)!.joined().contains("--random-fully"))
        // The next run with -ip-masq-fully-random-disable.
        let plain = IPTablesKeeper(
            masquerade: true,
            forward: false,
            randomFully: false,
            iptables: fake.iptables,
            logger: logger
        )
        try plain.install(network: network, subnet: subnet)
        let rules = fake.rules("nat", IPTablesChain.natChain)!
        #expect(rules.count == 4 && !rules.joined().contains("--random-fully"), "\(rules)")
        #expect(try plain.repair().isEmpty)
    }
}
