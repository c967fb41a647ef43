import Foundation
import NetBase
import Testing

/// Bad input at start: one clear line naming what is wrong, and no
/// half-configured host — what a failed start installed is removed.
@Suite(.serialized, .enabled(if: canRunNamespaceTests, namespaceSkipReason))
struct BadInputTests {
    static let config = #"{"Network":"10.2.0.0/16","SubnetLen":24,"Backend":{"Type":"udp"}}"#

    /// A lab with host 1's namespace on the underlay but no tunneld in it
    /// (a placeholder process writes the file add-host waits for).
    func withBareHost(_ body: (Lab) throws -> Void) throws {
        try Lab.withLocalStore(config: Self.config) { lab in
            let placeholder =
                "printf 'FLANNEL_NETWORK=10.2.0.0/16\\nFLANNEL_SUBNET=10.2.250.1/24\\nFLANNEL_MTU=1472\\nFLANNEL_IPMASQ=false\\n' > \(lab.subnetFile(1)); exec sleep 600"
            try lab.addHost(1, command: ["bash", "-c", placeholder])
            try body(lab)
        }
    }

    func start(_ lab: Lab, _ extra: [String], timeout: Duration = .seconds(30)) throws -> CommandResult {
        var options = ["--store-dir", lab.storeDirectory, "--device", "tun0"]
        if !extra.contains("--iface") { options += ["--iface", "eth0"] }
        if !extra.contains("--subnet-file") {
            options += ["--subnet-file", lab.directory.appendingPathComponent("t.env").path]
        }
        return try lab.exec("h1", [tunneldBinary, "run"] + options + extra, timeout: timeout, check: false)
    }

    /// What a start may have left: the device, the overlay route, iptables
    /// chains, leases in the store.
    func leftovers(_ lab: Lab) throws -> [String] {
        var found: [String] = []
        if try lab.exec("h1", ["ip", "link", "show", "tun0"], check: false).succeeded { found.append("device tun0") }
        let routes = try lab.exec("h1", ["ip", "route", "show", "10.2.0.0/16"]).output
        if !routes.isEmpty { found.append("route \(routes)") }
        let nat = try lab.exec("h1", ["iptables", "-t", "nat", "-S"]).output
        let filter = try lab.exec("h1", ["iptables", "-t", "filter", "-S"]).output
        for line in (nat + filter).split(separator: "\n") where line.contains("TUNNELD") {
            found.append("iptables \(line)")
        }
        let leases = try run([tunneldBinary, "leases", "--store-dir", lab.storeDirectory]).output
        if leases.contains("198.18.0.1") { found.append("lease: \(leases)") }
        return found
    }

    @Test func aStartThatFailsHalfWayRemovesDeviceRoutesChainsAndItsFreshLease() throws {
        try withBareHost { lab in
            // The health port is taken: found only after the device and the
            // lease are in place (the listener opens before the rules and the
            // peer list, so that /readyz can say 503 meanwhile).
            let holder = try spawn(
                [
                    "ip", "netns", "exec", lab.namespace("h1"), "python3", "-c",
                    "import socket,time; s=socket.socket(); s.bind(('0.0.0.0', 8471)); s.listen(); time.sleep(60)",
                ],
                output: lab.directory.appendingPathComponent("holder.log").path
            )
            defer { holder.terminate() }
            #expect(try lab.waitUntil { try lab.exec("h1", ["ss", "-ltnH", "sport = :8471"]).output.contains("8471") })
            let result = try start(lab, ["--ip-masq", "--healthz-port", "8471"])
            #expect(!result.succeeded)
            #expect(
                result.output.contains("healthz 0.0.0.0:8471") && result.output.contains("Address already in use"),
                "\(result.output)"
            )
            #expect(result.output.contains("removing what was set up"), "\(result.output)")
            #expect(result.output.contains("released the lease"), "\(result.output)")
            #expect(try leftovers(lab) == [], "a failed start left these behind")
        }
    }

    @Test func badOptionsAndPlacesAreRefusedBeforeAnythingIsInstalled() throws {
        try withBareHost { lab in
            let cases: [([String], String)] = [
                (
                    ["--subnet-file", "/proc/no-such-dir/subnet.env"],
                    "the subnet file /proc/no-such-dir/subnet.env cannot be written"
                ),
                (["--iface", "eth9"], "no interface named eth9"),
                (["--subnet-lease-ttl", "999999999999999999"], "--subnet-lease-ttl must be between 2 seconds and"),
                (["--healthz-port", "70000"], "--healthz-port must be between 0 (off) and 65535"),
                (["--workers", "0"], "--workers must be between 1 and 64"),
                (["--public-ip", "1.2.3"], "--public-ip 1.2.3 is not an IPv4 address"),
                (["--backend", "ipip"], "ipip"),
                (["--device", "a-name-far-too-long"], "is not a valid interface name"),
            ]
            for (options, message) in cases {
                let result = try start(lab, options)
                #expect(!result.succeeded, "\(options) started")
                #expect(result.output.contains(message), "\(options): \(result.output)")
                // One line of error, not a backtrace.
                #expect(
                    !result.output.contains("Fatal error") && !result.output.contains("Backtrace"),
                    "\(options): \(result.output)"
                )
                #expect(try leftovers(lab) == [], "\(options) left things behind")
            }
        }
    }

    @Test func aConfigForABackendTunneldLacksIsStoredWithAWarningAndRefusedByRun() throws {
        try withBareHost { lab in
            let file = lab.directory.appendingPathComponent("ipip.json")
            try #"{"Network":"10.2.0.0/16","Backend":{"Type":"ipip"}}"#.write(
                to: file,
                atomically: true,
                encoding: .utf8
            )
            let set = try run([tunneldBinary, "config", "set", "--store-dir", lab.storeDirectory, file.path])
            #expect(
                set.output.contains("tunneld run refuses this config until Backend.Type is one of them"),
                "\(set.output)"
            )
            let result = try start(lab, [], timeout: .seconds(20))
            #expect(!result.succeeded)
            #expect(result.output.contains("backend \"ipip\" is not supported by tunneld"), "\(result.output)")
            #expect(try leftovers(lab) == [])
        }
    }

    /// The wireguard backend's Mode ipv6 carries the tunnels over the IPv6
    /// underlay: in a network without IPv6, `run` stops with a line naming
    /// the mode and what to do, before anything is leased or installed.
    @Test func aWireGuardModeIPv6WithoutIPv6IsRefusedByRunNamingTheMode() throws {
        try withBareHost { lab in
            let file = lab.directory.appendingPathComponent("wireguard-ipv6-mode.json")
            try #"{"Network":"10.2.0.0/16","Backend":{"Type":"wireguard","Mode":"ipv6"}}"#
                .write(to: file, atomically: true, encoding: .utf8)
            _ = try run([tunneldBinary, "config", "set", "--store-dir", lab.storeDirectory, file.path])
            let result = try start(lab, [], timeout: .seconds(20))
            #expect(!result.succeeded)
            #expect(
                result.output.contains(
                    "Backend.Mode is ipv6 (tunnels over the IPv6 underlay), but the network config has no IPv6"
                ),
                "\(result.output)"
            )
            #expect(try leftovers(lab) == [])
        }
    }

    /// The udp data path's IPv6 table is direct-indexed: a dual-stack udp
    /// config whose IPv6 network holds more than 2^24 subnets is stored (it
    /// is valid for flannel) with a warning, and `run` stops with a line
    /// naming the limit before anything is leased or installed.
    @Test func aDualStackUDPConfigBeyondTheIPv6TableIsRefusedByRunNamingTheLimit() throws {
        try withBareHost { lab in
            let file = lab.directory.appendingPathComponent("dual-udp.json")
            try #"{"Network":"10.2.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/32","Backend":{"Type":"udp"}}"#
                .write(to: file, atomically: true, encoding: .utf8)
            let set = try run([tunneldBinary, "config", "set", "--store-dir", lab.storeDirectory, file.path])
            let limit =
                "IPv6Network fd00::/32 holds 2^32 subnets of /64, more than the udp backend's table takes (2^24)"
            #expect(set.output.contains("warning: \(limit)"), "\(set.output)")
            let result = try start(lab, ["--public-ipv6", "2001:db8::1"], timeout: .seconds(20))
            #expect(!result.succeeded)
            #expect(result.output.contains(limit), "\(result.output)")
            #expect(
                !result.output.contains("Fatal error") && !result.output.contains("Backtrace"),
                "\(result.output)"
            )
            #expect(try leftovers(lab) == [])
            let bad = try start(lab, ["--public-ipv6", "2001:db8::1/64"])
            #expect(
                !bad.succeeded && bad.output.contains("--public-ipv6 2001:db8::1/64 is not an IPv6 address"),
                "\(bad.output)"
            )
        }
    }

    /// A config with neither family (EnableIPv4 false without EnableIPv6)
    /// is refused by `config set` with one line saying what to set, and an
    /// IPv6-only vxlan config is stored with a warning and refused by `run`.
    @Test func aConfigWithNoAddressFamilyIsRefusedAndIPv6OnlyVXLANNamesTheBackends() throws {
        try withBareHost { lab in
            let file = lab.directory.appendingPathComponent("no-family.json")
            try #"{"Network":"10.2.0.0/16","EnableIPv4":false,"Backend":{"Type":"udp"}}"#
                .write(to: file, atomically: true, encoding: .utf8)
            let set = try run(
                [tunneldBinary, "config", "set", "--store-dir", lab.storeDirectory, file.path],
                check: false
            )
            #expect(!set.succeeded)
            #expect(
                set.output.contains("EnableIPv4 and EnableIPv6 are both false, so the network has no addresses"),
                "\(set.output)"
            )
            #expect(set.output.contains("set EnableIPv6 to true"), "\(set.output)")

            let vxlan = lab.directory.appendingPathComponent("v6only-vxlan.json")
            try #"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:2::/48","Backend":{"Type":"vxlan"}}"#
                .write(to: vxlan, atomically: true, encoding: .utf8)
            let stored = try run([tunneldBinary, "config", "set", "--store-dir", lab.storeDirectory, vxlan.path])
            #expect(stored.output.contains("IPv6-only (EnableIPv4 false)"), "\(stored.output)")
            #expect(stored.output.contains("warning: IPv6-only networks"), "\(stored.output)")
            let result = try start(lab, ["--public-ipv6", "2001:db8::1"], timeout: .seconds(20))
            #expect(!result.succeeded)
            #expect(result.output.contains("use the udp, host-gw or wireguard backend"), "\(result.output)")
            #expect(try leftovers(lab) == [])
        }
    }

    /// IPv6 keys that cannot make a network: `config set` refuses each with
    /// one line naming the key and what to use, storing nothing; written
    /// past it (as `etcdctl put` would), `run` says the same, and how to fix
    /// it, while it waits for a config it can use, with nothing leased or
    /// installed meanwhile.
    @Test(arguments: [
        (
            #""IPv6Network":"fd00::/125""#,
            "IPv6Network is too small. Minimum useful network prefix is /124 (IPv6Network is fd00::/125): use a network of /124 or larger"
        ),
        (
            #""IPv6Network":"fd00:10:2::/48","IPv6SubnetMin":"fd00:10:3::""#,
            "IPv6SubnetMin fd00:10:3:: is not in the range of the IPv6Network fd00:10:2::/48: use an address from fd00:10:2:: to"
        ),
        (
            #""IPv6SubnetLen":64"#,
            "EnableIPv6 is true, so IPv6Network must be a network such as \"fd00:10:244::/48\" (or set EnableIPv6 to false)"
        ),
    ])
    func anIPv6NetworkThatCannotBeIsRefusedInOneLineAndNothingIsInstalled(keys: String, message: String) throws {
        try withBareHost { lab in
            let json = #"{"Network":"10.2.0.0/16","EnableIPv6":true,"# + keys + #","Backend":{"Type":"host-gw"}}"#
            let file = lab.directory.appendingPathComponent("bad-ipv6.json")
            try json.write(to: file, atomically: true, encoding: .utf8)
            let set = try run(
                [tunneldBinary, "config", "set", "--store-dir", lab.storeDirectory, file.path],
                check: false
            )
            #expect(!set.succeeded)
            let lines = set.output.split(separator: "\n").filter { !$0.isEmpty }
            #expect(lines.count == 1 && set.output.contains(message), "\(set.output)")
            let stored = try run([tunneldBinary, "config", "get", "--store-dir", lab.storeDirectory]).output
            #expect(stored.contains(#""Network":"10.2.0.0/16""#) && !stored.contains("EnableIPv6"), "\(stored)")

            let good = try String(contentsOfFile: lab.storeDirectory + "/config.json", encoding: .utf8)
            try json.write(toFile: lab.storeDirectory + "/config.json", atomically: true, encoding: .utf8)
            let result = try start(lab, ["--public-ipv6", "fd18::1"], timeout: .seconds(4))
            #expect(
                result.output.contains("is invalid: ") && result.output.contains(message)
                    && result.output.contains("fix it with `tunneld config set`; retrying"),
                "\(result.output)"
            )
            // `tunneld leases` (in leftovers) reads the config too: the good one back first.
            try good.write(toFile: lab.storeDirectory + "/config.json", atomically: true, encoding: .utf8)
            #expect(try leftovers(lab) == [])
        }
    }

    /// A dual-stack or IPv6-only host-gw network routes each host's IPv6
    /// subnet to that host's own IPv6 address: a host whose interface has
    /// none is told so, and what to do, before anything is installed.
    @Test(arguments: [LabFamilies.dualStack, .ipv6Only])
    func aHostWithoutAnIPv6AddressIsToldWhatToDo(families: LabFamilies) throws {
        try withBareHost { lab in
            let file = lab.directory.appendingPathComponent("v6-host-gw.json")
            try #"{\#(families.configKeys),"Backend":{"Type":"host-gw"}}"#
                .write(to: file, atomically: true, encoding: .utf8)
            try run([tunneldBinary, "config", "set", "--store-dir", lab.storeDirectory, file.path])
            let result = try start(lab, ["--ip-masq"], timeout: .seconds(20))
            #expect(!result.succeeded)
            let kind = families == .dualStack ? "dual-stack" : "IPv6-only"
            #expect(
                result.output.contains(
                    "the network is \(kind) (EnableIPv6) and the host-gw backend routes IPv6 to each host's own IPv6 address, but eth0 has no global IPv6 address: add one, choose another interface with -iface, or give -public-ipv6"
                ),
                "\(result.output)"
            )
            #expect(try leftovers(lab) == [])
            let nat6 = try lab.exec("h1", ["ip6tables", "-t", "nat", "-S"]).output
            #expect(!nat6.contains("TUNNELD"), "\(nat6)")
        }
    }
}
