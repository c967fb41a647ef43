import Foundation
import Testing

/// flanneld's later switches, tried in namespaces as a flanneld user would:
/// -ip-blackhole-route, -iface-can-reach, and vxlan's MTU and Learning keys.
@Suite(.serialized, .enabled(if: canRunNamespaceTests, namespaceSkipReason))
struct FlanneldSwitchesTests {
    func blackholeRoutes(_ lab: Lab, _ n: Int) throws -> String {
        try lab.hostOutput(n, ["ip", "-4", "route", "show", "type", "blackhole"])
    }

    @Test func blackholeRouteForTheSubnetStaysBehindTheBridgeAndComesBack() throws {
        try Lab.withLocalStore(config: seedConfig) { lab in
            try lab.addHost(1, extra: ["--store-dir", lab.storeDirectory, "-ip-blackhole-route", "-iptables-resync=1"])
            try lab.addHost(2, extra: ["--store-dir", lab.storeDirectory])
            let lease = try LabLease(lab, host: 1)
            let wanted = "blackhole \(lease.subnet) metric 4294967295"
            let routes = try blackholeRoutes(lab, 1)
            #expect(routes.contains(wanted), "\(routes)\n\(lab.log("h1"))")
            #expect(try blackholeRoutes(lab, 2).isEmpty, "without the flag there is none")
            // The container behind the host's bridge is still reached: the
            // bridge's route to the subnet wins over the blackhole.
            let there = try lab.ping(from: 2, to: 1)
            #expect(there.succeeded, "c2 → c1 with h1's blackhole route: \(there.output)")
            // An address of h1's subnet that no container has is dropped at
            // h1 (no loop back into the network): the kernel says so.
            let unused = lease.base.dropLast() + "200"
            let route = try lab.exec("h1", ["ip", "route", "get", String(unused)], check: false)
            #expect(route.succeeded, "\(route.output)")

            // Removed by someone: put back within a few resync periods.
            try lab.exec("h1", ["ip", "route", "del", "blackhole", lease.subnet, "metric", "4294967295"])
            #expect(
                try lab.waitUntil(timeout: .seconds(10)) { try blackholeRoutes(lab, 1).contains(wanted) },
                "not put back: \(lab.log("h1"))"
            )
            #expect(lab.waitForLog("h1", containing: "put back the blackhole route for \(lease.subnet)"))

            // Kept over a stop without --release-on-exit (like the lease).
            try lab.lab("stop", "h1")
            #expect(try blackholeRoutes(lab, 1).contains(wanted))
        }
    }

    @Test func blackholeRouteCatchesTheSubnetWhenNoBridgeRoutesIt() throws {
        try Lab.withLocalStore(config: seedConfig) { lab in
            try lab.addHost(1, extra: ["--store-dir", lab.storeDirectory, "-ip-blackhole-route", "--release-on-exit"])
            let lease = try LabLease(lab, host: 1)
            // Take the container's bridge address away, as a CNI setup
            // without a bridge route for the whole subnet has it.
            let bridgeRoute = try lab.hostOutput(1, ["ip", "-4", "route", "show", "proto", "kernel", lease.subnet])
            let device = try #require(
                bridgeRoute.split(separator: " ").drop { $0 != "dev" }.dropFirst().first,
                "no kernel route for \(lease.subnet): \(bridgeRoute)"
            )
            let address = lease.base.dropLast() + "1"
            try lab.exec("h1", ["ip", "addr", "del", "\(address)/24", "dev", String(device)])
            let unused = lease.base.dropLast() + "200"
            let route = try lab.exec("h1", ["ip", "route", "get", String(unused)], check: false)
            // `ip route get` answers a blackholed destination with an error.
            #expect(!route.succeeded, "\(unused) still routed: \(route.output)")
            // Leaving the network takes the route away.
            try lab.lab("stop", "h1")
            #expect(lab.log("h1").contains("removed the blackhole route for \(lease.subnet)"), "\(lab.log("h1"))")
            #expect(try blackholeRoutes(lab, 1).isEmpty)
        }
    }

    @Test func ifaceCanReachChoosesTheInterfaceOfTheRoute() throws {
        try Lab.withLocalStore(config: seedConfig) { lab in
            try lab.addHost(1, extra: ["--store-dir", lab.storeDirectory])
            // The interface named by --iface does not exist: flanneld's order
            // goes on to -iface-can-reach.
            try lab.addHost(
                2,
                iface: ["-iface=nosuch0", "-iface-can-reach=198.18.0.1"],
                extra: ["--store-dir", lab.storeDirectory]
            )
            #expect(lab.log("h2").contains("using interface eth0 (198.18.0.2"), "\(lab.log("h2"))")
            let there = try lab.ping(from: 1, to: 2)
            #expect(there.succeeded, "\(there.output)")
        }
    }

    @Test func ifaceCanReachWithoutARouteSaysSo() throws {
        try Lab.withLocalStore(config: seedConfig) { lab in
            let result = try lab.exec(
                "u",
                [
                    tunneldBinary, "run", "--store-dir", lab.storeDirectory,
                    "--subnet-file", lab.subnetFile(9), "-iface-can-reach=203.0.113.9",
                ],
                timeout: .seconds(30),
                check: false
            )
            #expect(!result.succeeded)
            #expect(
                result.output.contains("--iface-can-reach 203.0.113.9")
                    && result.output.contains("route get 203.0.113.9"),
                "\(result.output)"
            )
        }
    }

    @Test func vxlanMTUAndLearningKeys() throws {
        try Lab.withLocalStore(config: backendConfig(#"{"Type":"vxlan","MTU":1400,"Learning":true}"#)) { lab in
            for n in 1...2 {
                try lab.addHost(
                    n,
                    command: [
                        tunneldBinary, "run", "--store-dir", lab.storeDirectory, "--iface", "eth0",
                        "--subnet-file", lab.subnetFile(n),
                    ]
                )
            }
            let device = try lab.hostOutput(1, ["ip", "-d", "-o", "link", "show", "flannel.1"])
            #expect(device.contains("mtu 1350"), "\(device)")
            #expect(!device.contains("nolearning"), "\(device)")
            #expect(try lab.subnetEnv(1)["FLANNEL_MTU"] == "1350")
            let there = try lab.ping(from: 1, to: 2)
            #expect(there.succeeded, "\(there.output)")
        }
    }
}
