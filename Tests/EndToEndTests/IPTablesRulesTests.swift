import Foundation
import Testing

/// flanneld's -iptables-forward-rules and -iptables-resync: tunneld's FORWARD
/// rules let container traffic through hosts whose FORWARD policy is DROP
/// (as Docker leaves it), and come back when someone flushes them.
@Suite(.serialized, .enabled(if: canRunNamespaceTests, namespaceSkipReason))
struct IPTablesRulesTests {
    func hostArguments(_ lab: Lab) -> [String] { ["--store-dir", lab.storeDirectory] }

    @discardableResult
    func iptables(_ lab: Lab, _ host: String, _ arguments: [String], check: Bool = true) throws -> CommandResult {
        try lab.exec(host, ["iptables", "-w", "5"] + arguments, check: check)
    }

    /// Waits (bounded) until `condition` holds.
    func eventually(_ timeout: Duration = .seconds(15), _ condition: () throws -> Bool) rethrows -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if try condition() { return true }
            usleep(200_000)
        }
        return try condition()
    }

    func forwardRulesInPlace(_ lab: Lab, _ host: String) throws -> Bool {
        let chain = try iptables(lab, host, ["-S", "TUNNELD-FWD"], check: false)
        let forward = try iptables(lab, host, ["-S", "FORWARD"]).output
        return chain.succeeded
            && chain.output.contains("-A TUNNELD-FWD -s 10.2.0.0/16 -j ACCEPT")
            && chain.output.contains("-A TUNNELD-FWD -d 10.2.0.0/16 -j ACCEPT")
            && forward.contains("-j TUNNELD-FWD")
    }

    func masqueradeInPlace(_ lab: Lab, _ host: String) throws -> Bool {
        let chain = try iptables(lab, host, ["-t", "nat", "-S", "TUNNELD-POSTRTG"], check: false)
        let postrouting = try iptables(lab, host, ["-t", "nat", "-S", "POSTROUTING"]).output
        return chain.succeeded && chain.output.contains("MASQUERADE --random-fully")
            && postrouting.contains("-j TUNNELD-POSTRTG")
    }

    @Test func forwardRulesLetTrafficThroughADropPolicyAndComeBackWhenFlushed() throws {
        try Lab.withLocalStore(config: seedConfig) { lab in
            try lab.addHost(1, extra: hostArguments(lab) + ["-iptables-resync=1"])
            try lab.addHost(2, extra: hostArguments(lab) + ["-iptables-resync", "1", "-ip-masq"])
            let h1Rules = try iptables(lab, "h1", ["-S"]).output
            #expect(try forwardRulesInPlace(lab, "h1"), "\(h1Rules)")
            #expect(try forwardRulesInPlace(lab, "h2"))
            // Forward rules do not depend on -ip-masq, nor masquerading on them.
            #expect(!(try masqueradeInPlace(lab, "h1")))
            #expect(try masqueradeInPlace(lab, "h2"))

            // What Docker does to a fresh host: FORWARD policy DROP.
            for host in ["h1", "h2"] { try iptables(lab, host, ["-P", "FORWARD", "DROP"]) }
            let through = try lab.ping(from: 1, to: 2)
            #expect(through.succeeded, "with the FORWARD policy DROP: \(through.output)")

            // Flushed by hand (FORWARD and the chains): back within a few resync periods.
            try iptables(lab, "h1", ["-F", "FORWARD"])
            try iptables(lab, "h2", ["-F", "TUNNELD-FWD"])
            try iptables(lab, "h2", ["-t", "nat", "-F", "POSTROUTING"])
            #expect(try eventually { try forwardRulesInPlace(lab, "h1") }, "h1's forward rules were not put back")
            let h2Back = try eventually {
                let forward = try forwardRulesInPlace(lab, "h2")
                return try forward && masqueradeInPlace(lab, "h2")
            }
            #expect(h2Back, "h2's rules were not put back")
            #expect(lab.waitForLog("h1", containing: "iptables: put back TUNNELD-FWD"), "\(lab.log("h1"))")
            // Deleted altogether (jump and chain), as a firewall reload does.
            try iptables(lab, "h1", ["-F"])
            try iptables(lab, "h1", ["-X", "TUNNELD-FWD"])
            #expect(try eventually { try forwardRulesInPlace(lab, "h1") }, "h1's deleted chain was not put back")
            // One jump each, however often it was put back.
            let jumps =
                try iptables(lab, "h1", ["-S", "FORWARD"]).output.components(separatedBy: "-j TUNNELD-FWD").count - 1
            #expect(jumps == 1)
            let again = try lab.ping(from: 2, to: 1)
            #expect(again.succeeded, "after the rules were put back: \(again.output)")

            // Removed on exit.
            try lab.lab("stop", "h2")
            #expect(!(try iptables(lab, "h2", ["-S", "TUNNELD-FWD"], check: false).succeeded))
            #expect(!(try iptables(lab, "h2", ["-S", "FORWARD"]).output.contains("TUNNELD")))
            #expect(!(try iptables(lab, "h2", ["-t", "nat", "-S"]).output.contains("TUNNELD")))
        }
    }

    @Test func forwardRulesOffInstallsNothing() throws {
        try Lab.withLocalStore(config: seedConfig) { lab in
            try lab.addHost(1, extra: hostArguments(lab) + ["-iptables-forward-rules=false"])
            let rules = try iptables(lab, "h1", ["-S"]).output + (try iptables(lab, "h1", ["-t", "nat", "-S"]).output)
            #expect(!rules.contains("TUNNELD"), "\(rules)")
            #expect(lab.log("h1").contains("tunneld ready"))
            #expect(!lab.log("h1").contains("forwarding traffic from and to"))
        }
    }
}
