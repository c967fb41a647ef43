import Foundation
import Testing

/// The deployment's own steps with etcd: flannel config put with etcdctl,
/// daemons started with flanneld's command line, vxlan first, then host-gw
/// by a new config and a restart.
@Suite(
    .serialized,
    .enabled(if: canRunNamespaceTests, namespaceSkipReason),
    .enabled(if: etcdIsInstalled, etcdSkipReason)
)
struct BackendSwitchTests {
    let etcd = EtcdBackendTests()

    func putConfig(_ lab: Lab, backend: String) throws {
        let file = lab.directory.appendingPathComponent("flannel-config.json")
        try backendConfig(backend).write(to: file, atomically: true, encoding: .utf8)
        try lab.etcdctl(["put", "/docker/network/config"], input: file.path)
    }

    func routes(_ lab: Lab, host n: Int) throws -> String { try lab.hostOutput(n, ["ip", "route"]) }

    @Test func theDeploymentsVXLANToHostGatewaySwitchMovesEveryHostToPlainRoutes() throws {
        try etcd.withEtcdLab { lab in
            try putConfig(lab, backend: #"{"Type":"vxlan"}"#)
            try lab.addHost(1, command: etcd.flanneldCommand(lab, host: 1))
            try lab.addHost(2, command: etcd.flanneldCommand(lab, host: 2))
            let lease1 = try LabLease(lab, host: 1), lease2 = try LabLease(lab, host: 2)

            // Before: flannel.1 and its onlink routes; the etcd lease is flanneld's vxlan lease.
            #expect(
                try lab.waitUntil {
                    try routes(lab, host: 1).contains("\(lease2.subnet) via \(lease2.base) dev flannel.1 onlink")
                },
                "\(lab.log("h1"))"
            )
            #expect(
                try lab.waitUntil {
                    try routes(lab, host: 2).contains("\(lease1.subnet) via \(lease1.base) dev flannel.1 onlink")
                }
            )
            let mac1 = try lab.vtepMAC(1)
            #expect(
                try lab.etcdValue("/docker/network/subnets/\(lease1.key)")
                    == #"{"PublicIP":"198.18.0.1","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":""#
                    + mac1 + #""}}"#
            )
            #expect(try lab.subnetEnv(1)["FLANNEL_MTU"] == "1450")
            let before = try lab.ping(from: 1, to: 2)
            #expect(before.succeeded, "\(before.output)")

            // The switch: a new config in etcd, then each daemon restarted.
            try putConfig(lab, backend: #"{"Type":"host-gw"}"#)
            for host in ["h1", "h2"] {
                try lab.lab("stop", host)
                try lab.lab("start", host)
            }
            for host in ["h1", "h2"] {
                #expect(
                    lab.waitUntil { lab.log(host).components(separatedBy: "tunneld ready").count == 3 },
                    "\(lab.log(host))"
                )
                #expect(lab.log(host).contains("removed flannel.1, left by the vxlan backend"), "\(lab.log(host))")
            }

            // After: the same subnets, routes via the public IPs, no flannel.1 and none of its routes.
            #expect(try LabLease(lab, host: 1).subnet == lease1.subnet)
            #expect(
                try lab.waitUntil { try routes(lab, host: 1).contains("\(lease2.subnet) via 198.18.0.2 dev eth0") },
                "\(lab.log("h1"))"
            )
            #expect(
                try lab.waitUntil { try routes(lab, host: 2).contains("\(lease1.subnet) via 198.18.0.1 dev eth0") },
                "\(lab.log("h2"))"
            )
            for host in [1, 2] {
                #expect(try !routes(lab, host: host).contains("flannel.1"))
                #expect(try !lab.hostOutput(host, ["ip", "-o", "link"]).contains("flannel.1"))
            }
            #expect(
                try lab.etcdValue("/docker/network/subnets/\(lease1.key)")
                    == #"{"PublicIP":"198.18.0.1","PublicIPv6":null,"BackendType":"host-gw"}"#
            )
            #expect(try lab.subnetEnv(1)["FLANNEL_MTU"] == "1500")
            let there = try lab.ping(from: 1, to: 2)
            #expect(there.succeeded, "\(there.output)")
            let back = try lab.ping(from: 2, to: 1)
            #expect(back.succeeded, "\(back.output)")
        }
    }

    @Test func aFlanneldVXLANLeasePutWithEtcdctlBecomesANeighbourAnFDBEntryAndARoute() throws {
        try etcd.withEtcdLab { lab in
            try putConfig(lab, backend: #"{"Type":"vxlan"}"#)
            try lab.addHost(1, command: etcd.flanneldCommand(lab, host: 1))
            try lab.addHost(2, command: etcd.flanneldCommand(lab, host: 2))

            // What a flanneld vxlan host at 198.18.0.9 writes.
            let value =
                #"{"PublicIP":"198.18.0.9","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"8e:41:52:0a:93:1c"}}"#
            try lab.etcdctl(["put", "/docker/network/subnets/10.2.200.0-24", value])
            for host in [1, 2] {
                #expect(
                    try lab.waitUntil {
                        try routes(lab, host: host).contains("10.2.200.0/24 via 10.2.200.0 dev flannel.1 onlink")
                    },
                    "\(lab.log("h\(host)"))"
                )
                let neighbours = try lab.hostOutput(host, ["ip", "neigh", "show", "dev", "flannel.1"])
                #expect(neighbours.contains("10.2.200.0 lladdr 8e:41:52:0a:93:1c PERMANENT"), "\(neighbours)")
                let fdb = try lab.hostOutput(host, ["bridge", "fdb", "show", "dev", "flannel.1"])
                #expect(fdb.contains("8e:41:52:0a:93:1c dst 198.18.0.9 self permanent"), "\(fdb)")
            }

            // A lease of another backend is reported once, with what to do.
            try lab.etcdctl([
                "put", "/docker/network/subnets/10.2.201.0-24",
                #"{"PublicIP":"198.18.0.10","PublicIPv6":null,"BackendType":"host-gw"}"#,
            ])
            #expect(
                lab.waitForLog(
                    "h1",
                    containing: "peer 10.2.201.0/24 (198.18.0.10) runs the host-gw backend and this host runs vxlan"
                )
            )

            // The key goes: so do the entries.
            try lab.etcdctl(["del", "/docker/network/subnets/10.2.200.0-24"])
            for host in [1, 2] {
                #expect(
                    try lab.waitUntil { try !routes(lab, host: host).contains("10.2.200.0/24") },
                    "\(lab.log("h\(host)"))"
                )
                #expect(try !lab.hostOutput(host, ["ip", "neigh", "show", "dev", "flannel.1"]).contains("10.2.200.0"))
                #expect(
                    try !lab.hostOutput(host, ["bridge", "fdb", "show", "dev", "flannel.1"]).contains(
                        "8e:41:52:0a:93:1c"
                    )
                )
            }
            let ping = try lab.ping(from: 1, to: 2)
            #expect(ping.succeeded, "\(ping.output)")
            #expect(lab.log("h1").components(separatedBy: "10.2.201.0/24 (198.18.0.10) runs the host-gw").count == 2)
        }
    }

    @Test func aHostGatewayPeerThatIsNotDirectlyReachableGetsOneErrorAndStopsNoOther() throws {
        try etcd.withEtcdLab { lab in
            try putConfig(lab, backend: #"{"Type":"host-gw"}"#)
            try lab.addHost(1, command: etcd.flanneldCommand(lab, host: 1))
            try lab.etcdctl([
                "put", "/docker/network/subnets/10.2.200.0-24",
                #"{"PublicIP":"198.19.0.5","PublicIPv6":null,"BackendType":"host-gw"}"#,
            ])
            try lab.addHost(2, command: etcd.flanneldCommand(lab, host: 2))
            #expect(lab.waitForLog("h1", containing: "peer 10.2.200.0/24 at 198.19.0.5 is not directly reachable"))
            let ping = try lab.ping(from: 1, to: 2)
            #expect(ping.succeeded, "\(ping.output)")
            // Past a route check, still one line for that peer. The check is seen at work:
            // h2's route, removed behind tunneld's back, is put back by it.
            let peer = try LabLease(lab, host: 2).subnet
            try lab.exec("h1", ["ip", "route", "del", peer])
            #expect(
                lab.waitForLog("h1", containing: "restored route \(peer)", timeout: .seconds(30)),
                "\(lab.log("h1"))"
            )
            #expect(lab.log("h1").components(separatedBy: "10.2.200.0/24 at 198.19.0.5").count == 2, "\(lab.log("h1"))")
            #expect(try !routes(lab, host: 1).contains("10.2.200.0"))
        }
    }
}
