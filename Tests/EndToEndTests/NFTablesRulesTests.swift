import Foundation
import Testing

/// The config's EnableNFTables: tunneld's masquerade and forward rules as its
/// own nftables table (`table inet tunneld`), through nft alone — the hosts'
/// PATH holds nft and no iptables.
@Suite(
    .serialized,
    .enabled(
        if: canRunNamespaceTests && FileManager.default.isExecutableFile(atPath: "/usr/sbin/nft"),
        "needs root, TUN and nft (Debian's nftables package): runs tunneld in network namespaces"
    )
)
struct NFTablesRulesTests {
    static let config =
        #"{"Network":"10.2.0.0/16","SubnetLen":24,"SubnetMin":"10.2.1.0","SubnetMax":"10.2.254.0","EnableNFTables":true,"Backend":{"Type":"udp"}}"#

    func hostArguments(_ lab: Lab) -> [String] { ["--store-dir", lab.storeDirectory] }

    /// A directory holding only nft, to be the daemons' whole PATH.
    func nftOnlyPath(_ lab: Lab) throws -> String {
        let directory = lab.directory.appendingPathComponent("nft-only-bin").path
        if !FileManager.default.fileExists(atPath: directory) {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            try FileManager.default.createSymbolicLink(atPath: directory + "/nft", withDestinationPath: "/usr/sbin/nft")
        }
        return directory
    }

    func table(_ lab: Lab, _ host: String) throws -> String? {
        let listed = try lab.exec(host, ["nft", "list", "table", "inet", "tunneld"], check: false)
        return listed.succeeded ? listed.output : nil
    }

    func eventually(_ timeout: Duration = .seconds(15), _ condition: () throws -> Bool) rethrows -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if try condition() { return true }
            usleep(200_000)
        }
        return try condition()
    }

    @Test func theTableMasqueradesIsPutBackWhenFlushedAndGoesOnExitWithoutIptables() throws {
        try Lab.withLocalStore(config: Self.config) { lab in
            let path = try nftOnlyPath(lab)
            try lab.addHost(
                1,
                extra: hostArguments(lab) + ["-ip-masq", "-iptables-resync=1"],
                prefix: ["env", "PATH=\(path)"]
            )
            try lab.addHost(2, extra: hostArguments(lab) + ["-iptables-resync=1"], prefix: ["env", "PATH=\(path)"])
            #expect(
                lab.log("h1").contains("nftables table inet tunneld, chain postrouting, fully-random"),
                "\(lab.log("h1"))"
            )

            let h1 = try #require(try table(lab, "h1"))
            let subnet1 = try #require(try lab.subnetEnv(1)["FLANNEL_SUBNET"]).replacingOccurrences(
                of: ".1/24",
                with: ".0/24"
            )
            #expect(h1.contains("ip saddr 10.2.0.0/16 ip daddr 10.2.0.0/16 return"), "\(h1)")
            #expect(h1.contains("ip saddr != 10.2.0.0/16 ip daddr \(subnet1) return"), "\(h1)")
            #expect(h1.contains("ip saddr 10.2.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random"), "\(h1)")
            #expect(h1.contains("ip saddr 10.2.0.0/16 accept") && h1.contains("ip daddr 10.2.0.0/16 accept"), "\(h1)")
            // Forward rules without -ip-masq; no nat chain.
            let h2 = try #require(try table(lab, "h2"))
            #expect(h2.contains("chain forward") && !h2.contains("chain postrouting"), "\(h2)")
            // Nothing through iptables.
            let iptablesRules = try lab.exec("h1", ["iptables-save"]).output
            #expect(!iptablesRules.contains("TUNNELD"), "\(iptablesRules)")

            // To a host outside the overlay, container 1 appears as host 1;
            // to another container, as itself.
            let c1 = try lab.containerIP(1)
            let outside = try UDPBackendTests().sourceSeen(lab, listener: "h2", at: "198.18.0.2", sender: "c1")
            #expect(outside == "198.18.0.1", "traffic leaving the network should be masqueraded, seen from \(outside)")
            let inside = try UDPBackendTests().sourceSeen(lab, listener: "c2", at: try lab.containerIP(2), sender: "c1")
            #expect(inside == c1, "traffic within the network must keep its container address, seen from \(inside)")

            // Drift: a chain flushed, then the table deleted; back within a
            // few resync periods, the same as installed.
            try lab.exec("h1", ["nft", "flush", "chain", "inet", "tunneld", "postrouting"])
            #expect(try eventually { try table(lab, "h1") == h1 }, "h1's flushed chain was not put back")
            #expect(
                lab.waitForLog("h1", containing: "nftables: put back table inet tunneld (changed)"),
                "\(lab.log("h1"))"
            )
            try lab.exec("h1", ["nft", "delete", "table", "inet", "tunneld"])
            #expect(try eventually { try table(lab, "h1") == h1 }, "h1's deleted table was not put back")
            #expect(
                lab.waitForLog("h1", containing: "nftables: put back table inet tunneld (deleted)"),
                "\(lab.log("h1"))"
            )
            let again = try UDPBackendTests().sourceSeen(lab, listener: "h2", at: "198.18.0.2", sender: "c1")
            #expect(again == "198.18.0.1", "after the table was put back, seen from \(again)")

            // Removed on exit.
            try lab.lab("stop", "h1")
            #expect(try table(lab, "h1") == nil)
            #expect(lab.log("h1").contains("removed tunneld's nftables rules"))
        }
    }

    @Test func withoutNftTheStartFailsNamingThePackageAndInstallsNothing() throws {
        try Lab.withLocalStore(config: Self.config) { lab in
            try lab.addHost(1, extra: hostArguments(lab) + ["-iptables-forward-rules=false"])
            let empty = lab.directory.appendingPathComponent("empty-bin").path
            try FileManager.default.createDirectory(atPath: empty, withIntermediateDirectories: true)
            let result = try lab.exec(
                "h1",
                [
                    "env", "PATH=\(empty)", tunneldBinary, "run", "--store-dir", lab.storeDirectory,
                    "--iface", "eth0", "--device", "tun9", "--ip-masq",
                    "--subnet-file", lab.directory.appendingPathComponent("t.env").path,
                ],
                timeout: .seconds(30),
                check: false
            )
            #expect(!result.succeeded)
            #expect(
                result.output.contains(
                    "needs the nft program, which is not on PATH (\(empty)): install the nftables package (apt-get install nftables)"
                ),
                "\(result.output)"
            )
            #expect(try lab.exec("h1", ["ip", "link", "show", "tun9"], check: false).succeeded == false)
            #expect(try table(lab, "h1") == nil)
        }
    }

    @Test func anIptablesRunRemovesTheTableANftablesRunLeft() throws {
        try Lab.withLocalStore(config: Self.config) { lab in
            try lab.addHost(1, extra: hostArguments(lab) + ["-ip-masq"])
            #expect(try table(lab, "h1") != nil)
            // Killed: the table stays. The next run has no EnableNFTables.
            try lab.signal("h1", SIGKILL)
            usleep(500_000)
            #expect(try table(lab, "h1") != nil)
            let configFile = lab.directory.appendingPathComponent("iptables-config.json")
            try seedConfig.write(to: configFile, atomically: true, encoding: .utf8)
            try run([tunneldBinary, "config", "set", "--store-dir", lab.storeDirectory, configFile.path])
            let second = lab.directory.appendingPathComponent("second.log").path
            let daemon = try spawn(
                [
                    "ip", "netns", "exec", lab.namespace("h1"), tunneldBinary, "run", "--store-dir", lab.storeDirectory,
                    "--iface", "eth0", "--device", "tun1", "--ip-masq",
                    "--subnet-file", lab.directory.appendingPathComponent("second.env").path,
                ],
                output: second
            )
            defer { daemon.terminate() }
            #expect(
                try eventually(.seconds(30)) {
                    (try? String(contentsOfFile: second, encoding: .utf8))?.contains("tunneld ready") == true
                },
                "\((try? String(contentsOfFile: second, encoding: .utf8)) ?? "")"
            )
            let log = (try? String(contentsOfFile: second, encoding: .utf8)) ?? ""
            #expect(
                log.contains("removed nftables table inet tunneld, left by an earlier run with EnableNFTables"),
                "\(log)"
            )
            #expect(try table(lab, "h1") == nil)
            #expect(try lab.exec("h1", ["iptables", "-t", "nat", "-S", "TUNNELD-POSTRTG"], check: false).succeeded)
        }
    }

    @Test func anNftablesRunNamesTheChainsAnIptablesRunLeftAndLeavesThem() throws {
        try Lab.withLocalStore(config: seedConfig) { lab in
            try lab.addHost(1, extra: hostArguments(lab) + ["-ip-masq"])
            // Killed: its chains stay. The next run has EnableNFTables.
            try lab.signal("h1", SIGKILL)
            usleep(500_000)
            let configFile = lab.directory.appendingPathComponent("nftables-config.json")
            try Self.config.write(to: configFile, atomically: true, encoding: .utf8)
            try run([tunneldBinary, "config", "set", "--store-dir", lab.storeDirectory, configFile.path])
            let second = lab.directory.appendingPathComponent("second.log").path
            let daemon = try spawn(
                [
                    "ip", "netns", "exec", lab.namespace("h1"), "env", "PATH=\(try nftOnlyPath(lab))",
                    tunneldBinary, "run", "--store-dir", lab.storeDirectory,
                    "--iface", "eth0", "--device", "tun1", "--ip-masq",
                    "--subnet-file", lab.directory.appendingPathComponent("second.env").path,
                ],
                output: second
            )
            defer { daemon.terminate() }
            func log() -> String { (try? String(contentsOfFile: second, encoding: .utf8)) ?? "" }
            #expect(eventually(.seconds(30)) { log().contains("tunneld ready") }, "\(log())")
            #expect(
                log().contains(
                    "iptables chains TUNNELD-POSTRTG, TUNNELD-FWD of an earlier run without EnableNFTables are still there"
                ),
                "\(log())"
            )
            #expect(try table(lab, "h1") != nil)
            #expect(try lab.exec("h1", ["iptables", "-t", "nat", "-S", "TUNNELD-POSTRTG"], check: false).succeeded)
        }
    }
}
