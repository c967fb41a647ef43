import Foundation
import NetTestSupport
import Testing

/// Where Debian's containernetworking-plugins puts bridge, host-local, ….
let standardCNIPlugins = "/usr/lib/cni"
let standardCNIPluginsInstalled = ["bridge", "host-local"].allSatisfy {
    FileManager.default.isExecutableFile(atPath: "\(standardCNIPlugins)/\($0)")
}
let cniSkipReason: Comment =
    "needs root, /dev/net/tun and the standard CNI plugins in /usr/lib/cni (apt-get install containernetworking-plugins)"

/// The tunneld-cni binary built next to tunneld (or $TUNNELD_CNI_BIN).
let tunneldCNIBinary: String = {
    if let path = ProcessInfo.processInfo.environment["TUNNELD_CNI_BIN"] { return path }
    return URL(fileURLWithPath: tunneldBinary).deletingLastPathComponent().appendingPathComponent("tunneld-cni").path
}()

/// One plugin invocation's outcome; stdout and stderr apart, as a runtime
/// reads them.
struct PluginRun {
    var status: Int32
    var stdout: String
    var stderr: String
    var json: [String: Any] {
        (try? JSONSerialization.jsonObject(with: Data(stdout.utf8))) as? [String: Any] ?? [:]
    }
}

/// A scratch CNI bin directory holding tunneld-cni under its own name and
/// as `flannel` — the install docs/CNI.md describes — searched before the
/// standard plugins.
struct CNIBin {
    let directory: String
    var searchPath: String { "\(directory):\(standardCNIPlugins)" }

    init(in parent: URL) throws {
        directory = parent.appendingPathComponent("cni-bin").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        for name in ["flannel", "tunneld-cni"] {
            try FileManager.default.createSymbolicLink(
                atPath: "\(directory)/\(name)",
                withDestinationPath: tunneldCNIBinary
            )
        }
    }

    /// Runs the plugin named `type` the way a runtime does: found by its
    /// type in CNI_PATH, the CNI_* variables in a clean environment, the
    /// network config on stdin — inside `namespace` (the host's) when given.
    func invoke(
        type: String,
        command: String,
        containerID: String = "",
        netns: String = "",
        ifName: String = "eth0",
        config: String,
        namespace: String? = nil,
        scratch: URL
    ) throws -> PluginRun {
        guard
            let plugin = searchPath.split(separator: ":").map({ "\($0)/\(type)" })
                .first(where: { FileManager.default.fileExists(atPath: $0) })
        else {
            throw LabError("no plugin \"\(type)\" in \(searchPath)")
        }
        let id = UUID().uuidString
        let input = scratch.appendingPathComponent("cni-in-\(id)").path
        let errors = scratch.appendingPathComponent("cni-err-\(id)").path
        defer { unlink(input); unlink(errors) }
        try config.write(toFile: input, atomically: true, encoding: .utf8)
        var environment = ["CNI_COMMAND=\(command)", "CNI_PATH=\(searchPath)", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
        if !containerID.isEmpty { environment += ["CNI_CONTAINERID=\(containerID)", "CNI_IFNAME=\(ifName)"] }
        if !netns.isEmpty { environment.append("CNI_NETNS=\(netns)") }
        // stderr to a file of its own, so that the output is stdout alone.
        let command =
            (namespace.map { ["ip", "netns", "exec", $0] } ?? []) + ["env", "-i"] + environment
            + ["sh", "-c", "exec \"$0\" 2>\"$1\"", plugin, errors]
        let result = try run(command, timeout: .seconds(60), check: false, input: input)
        // A plugin that hangs has no answer to judge, whatever it exits with once stopped.
        if let timeout = result.timedOut {
            throw CommandTimedOut(command: command, timeout: timeout, status: result.status, output: result.output)
        }
        return PluginRun(
            status: result.status,
            stdout: result.output,
            stderr: (try? String(contentsOfFile: errors, encoding: .utf8)) ?? ""
        )
    }
}

/// The plugin binary as a runtime meets it, without namespaces: VERSION,
/// and the errors a runtime gets for bad input.
@Suite struct CNIPluginBinaryTests {
    let scratch = FileManager.default.temporaryDirectory.appendingPathComponent("tunneld-cni-\(UUID().uuidString)")

    @Test func versionAnswersUnderBothNames() throws {
        defer { try? FileManager.default.removeItem(at: scratch) }
        let bin = try CNIBin(in: scratch)
        for type in ["flannel", "tunneld-cni"] {
            let answer = try bin.invoke(
                type: type,
                command: "VERSION",
                config: #"{"cniVersion":"1.0.0"}"#,
                scratch: scratch
            )
            #expect(answer.status == 0, "\(answer)")
            #expect(
                answer.json["supportedVersions"] as? [String] == ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0"]
            )
        }
    }

    @Test func missingVariablesAreACNIError() throws {
        defer { try? FileManager.default.removeItem(at: scratch) }
        let bin = try CNIBin(in: scratch)
        let answer = try bin.invoke(
            type: "flannel",
            command: "ADD",
            config: #"{"cniVersion":"1.0.0","name":"n"}"#,
            scratch: scratch
        )
        #expect(answer.status == 1)
        #expect(answer.json["code"] as? Int == 4)
        #expect(answer.json["cniVersion"] as? String == "1.0.0")
        #expect(
            answer.json["msg"] as? String
                == "required environment variables missing: CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME"
        )
    }

    @Test func aMissingSubnetFileIsTryAgainLater() throws {
        defer { try? FileManager.default.removeItem(at: scratch) }
        let bin = try CNIBin(in: scratch)
        let missing = scratch.appendingPathComponent("no-subnet.env").path
        let answer = try bin.invoke(
            type: "flannel",
            command: "ADD",
            containerID: "x1",
            netns: "/run/netns/none",
            config: #"{"cniVersion":"1.0.0","name":"n","subnetFile":"\#(missing)"}"#,
            scratch: scratch
        )
        #expect(answer.status == 1)
        #expect(answer.json["code"] as? Int == 11)
        #expect(answer.json["msg"] as? String == "subnet file \(missing) does not exist")
    }
}

/// Containers attached by the plugin on two hosts running tunneld, invoked
/// exactly as a runtime invokes it, reaching each other through tunneld.
@Suite(.serialized, .enabled(if: canRunNamespaceTests && standardCNIPluginsInstalled, cniSkipReason))
struct CNIEndToEndTests {
    @Test func containersAttachedByThePluginReachEachOtherAndAreReleased() throws {
        try Lab.withLocalStore(config: seedConfig) { lab in
            let directory = lab.directory
            // Host 1 runs tunneld as flanneld's first command line does (no
            // -ip-masq), so the bridge masquerades; host 2 with -ip-masq, so it does not.
            for n in 1...2 {
                let command =
                    [
                        tunneldBinary, "run", "--backend", "udp", "--iface", "eth0", "--subnet-file", lab.subnetFile(n),
                        "--device", "tun0", "--store-dir", lab.storeDirectory,
                    ] + (n == 2 ? ["-ip-masq"] : [])
                try lab.lab(["add-host", "\(n)", "--no-container", "--"] + command, timeout: .seconds(90))
            }
            let bin = try CNIBin(in: directory)
            func config(host n: Int, type: String, extra: String = "") -> String {
                """
                {"cniVersion":"1.0.0","name":"tunneld-test","type":"\(type)","subnetFile":"\(lab.subnetFile(n))",
                 "dataDir":"\(directory.path)/cni-data-h\(n)","ipam":{"dataDir":"\(directory.path)/ipam-h\(n)"}\(extra)}
                """
            }
            // Host 1's runtime knows the plugin as flannel, host 2's as tunneld-cni.
            let types = [1: "flannel", 2: "tunneld-cni"]
            func invoke(_ command: String, host n: Int, extra: String = "") throws -> PluginRun {
                try bin.invoke(
                    type: types[n]!,
                    command: command,
                    containerID: "ctr\(n)-\(lab.name)",
                    netns: "/run/netns/\(lab.namespace("c\(n)"))",
                    config: config(host: n, type: types[n]!, extra: extra),
                    namespace: lab.namespace("h\(n)"),
                    scratch: directory
                )
            }

            // ADD: each container gets an address from its host's subnet.
            var results: [Int: String] = [:]
            for n in 1...2 {
                try run(["ip", "netns", "add", lab.namespace("c\(n)")])
                try lab.exec("c\(n)", ["ip", "link", "set", "lo", "up"])
                let added = try invoke("ADD", host: n)
                #expect(added.status == 0, "ADD on host \(n): \(added)")
                results[n] = added.stdout
                let ips = added.json["ips"] as? [[String: Any]] ?? []
                let address = try #require(ips.first?["address"] as? String, "ADD result: \(added.stdout)")
                let subnet = try #require(try lab.subnetEnv(n)["FLANNEL_SUBNET"])  // e.g. 10.2.72.1/24
                let prefix = subnet.split(separator: ".").prefix(3).joined(separator: ".") + "."
                #expect(address.hasPrefix(prefix) && address.hasSuffix("/24"), "\(address) is not in \(subnet)")
                let ip = String(address.split(separator: "/")[0])
                try "\(ip)\n".write(to: directory.appendingPathComponent("c\(n).ip"), atomically: true, encoding: .utf8)
                let link = try lab.exec("c\(n)", ["ip", "-o", "addr", "show", "dev", "eth0"]).output
                #expect(link.contains("inet \(address)"), "\(link)")
                #expect(try lab.exec("c\(n)", ["ip", "link", "show", "dev", "eth0"]).output.contains("mtu 1472"))
                #expect(FileManager.default.fileExists(atPath: "\(directory.path)/ipam-h\(n)/tunneld-test/\(ip)"))
                #expect(FileManager.default.fileExists(atPath: "\(directory.path)/cni-data-h\(n)/ctr\(n)-\(lab.name)"))
            }

            // Container to container across the hosts, both ways.
            let there = try lab.ping(from: 1, to: 2)
            #expect(there.succeeded, "\(there.output)")
            let back = try lab.ping(from: 2, to: 1)
            #expect(back.succeeded, "\(back.output)")

            // ipMasq is the opposite of FLANNEL_IPMASQ: the bridge plugin's
            // masquerade chain on host 1 only.
            let nat1 = try lab.exec("h1", ["iptables", "-t", "nat", "-S", "POSTROUTING"]).output
            let nat2 = try lab.exec("h2", ["iptables", "-t", "nat", "-S", "POSTROUTING"]).output
            #expect(nat1.contains("-j CNI-"), "\(nat1)")
            #expect(!nat2.contains("-j CNI-"), "\(nat2)")

            // CHECK against the result the runtime kept from ADD.
            for n in 1...2 {
                let checked = try invoke("CHECK", host: n, extra: ",\"prevResult\":\(results[n]!)")
                #expect(checked.status == 0, "CHECK on host \(n): \(checked)")
            }

            // DEL removes the interface and releases the address; again is fine.
            let ip1 = try lab.containerIP(1)
            let deleted = try invoke("DEL", host: 1)
            #expect(deleted.status == 0, "\(deleted)")
            #expect(try lab.exec("c1", ["ip", "link", "show", "dev", "eth0"], check: false).status != 0)
            #expect(!FileManager.default.fileExists(atPath: "\(directory.path)/ipam-h1/tunneld-test/\(ip1)"))
            #expect(!FileManager.default.fileExists(atPath: "\(directory.path)/cni-data-h1/ctr1-\(lab.name)"))
            let natAfter = try lab.exec("h1", ["iptables", "-t", "nat", "-S", "POSTROUTING"]).output
            #expect(!natAfter.contains("-j CNI-"), "bridge's masquerade rule outlived DEL: \(natAfter)")
            let again = try invoke("DEL", host: 1)
            #expect(again.status == 0, "\(again)")

            // DEL after the subnet file is gone still works, from the saved config.
            try FileManager.default.removeItem(atPath: lab.subnetFile(2))
            let ip2 = try lab.containerIP(2)
            let deleted2 = try invoke("DEL", host: 2)
            #expect(deleted2.status == 0, "\(deleted2)")
            #expect(try lab.exec("c2", ["ip", "link", "show", "dev", "eth0"], check: false).status != 0)
            #expect(!FileManager.default.fileExists(atPath: "\(directory.path)/ipam-h2/tunneld-test/\(ip2)"))
            // …while ADD without it asks the runtime to retry.
            let retry = try invoke("ADD", host: 2)
            #expect(retry.status == 1 && retry.json["code"] as? Int == 11, "\(retry)")
        }
    }
}

/// A dual-stack subnet.env, as flanneld (and tunneld) write it, through the
/// plugin and Debian's bridge and host-local: the container gets an address
/// of each family from the host's two subnets, and routes to both networks.
@Suite(.serialized, .enabled(if: isRoot && standardCNIPluginsInstalled, cniSkipReason))
struct CNIDualStackTests {
    @Test func aDualStackSubnetFileGivesTheContainerBothFamilies() throws {
        let scratch = FileManager.default.temporaryDirectory.appendingPathComponent("tunneld-cni6-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: scratch, withIntermediateDirectories: true)
        let tag = String(UUID().uuidString.prefix(8)).lowercased()
        let host = "tcni6h-\(tag)", container = "tcni6c-\(tag)"
        try run(["ip", "netns", "add", host])
        defer {
            _ = try? run(["ip", "netns", "del", container], check: false)
            _ = try? run(["ip", "netns", "del", host], check: false)
            try? FileManager.default.removeItem(at: scratch)
        }
        try run(["ip", "netns", "add", container])
        try run(["ip", "netns", "exec", container, "ip", "link", "set", "lo", "up"])
        let subnetFile = scratch.appendingPathComponent("subnet.env").path
        try """
        FLANNEL_NETWORK=10.2.0.0/16
        FLANNEL_SUBNET=10.2.72.1/24
        FLANNEL_IPV6_NETWORK=fd00:10:244::/48
        FLANNEL_IPV6_SUBNET=fd00:10:244:48::1/64
        FLANNEL_MTU=1450
        FLANNEL_IPMASQ=true

        """.write(toFile: subnetFile, atomically: true, encoding: .utf8)
        let bin = try CNIBin(in: scratch)
        let config = """
            {"cniVersion":"1.0.0","name":"dual","type":"flannel","subnetFile":"\(subnetFile)",
             "dataDir":"\(scratch.path)/cni-data","ipam":{"dataDir":"\(scratch.path)/ipam"}}
            """
        func invoke(_ command: String) throws -> PluginRun {
            try bin.invoke(
                type: "flannel",
                command: command,
                containerID: "ctr-\(tag)",
                netns: "/run/netns/\(container)",
                config: config,
                namespace: host,
                scratch: scratch
            )
        }
        let added = try invoke("ADD")
        #expect(added.status == 0, "\(added)")
        let addresses = (added.json["ips"] as? [[String: Any]] ?? []).compactMap { $0["address"] as? String }
        #expect(addresses.count == 2, "\(added.stdout)")
        #expect(addresses.contains { $0.hasPrefix("10.2.72.") && $0.hasSuffix("/24") }, "\(addresses)")
        #expect(addresses.contains { $0.hasPrefix("fd00:10:244:48::") && $0.hasSuffix("/64") }, "\(addresses)")

        let inside = try run(["ip", "netns", "exec", container, "ip", "-o", "addr", "show", "dev", "eth0"]).output
        #expect(inside.contains("inet 10.2.72."), "\(inside)")
        #expect(inside.contains("inet6 fd00:10:244:48::"), "\(inside)")
        let routes6 = try run(["ip", "netns", "exec", container, "ip", "-6", "route"]).output
        #expect(routes6.contains("fd00:10:244::/48 via fd00:10:244:48::1"), "\(routes6)")
        let routes4 = try run(["ip", "netns", "exec", container, "ip", "route"]).output
        #expect(routes4.contains("10.2.0.0/16 via 10.2.72.1"), "\(routes4)")
        // The bridge is the gateway of both families.
        let bridge = try run(["ip", "netns", "exec", host, "ip", "-o", "addr", "show", "dev", "cni0"]).output
        #expect(bridge.contains("inet 10.2.72.1/24") && bridge.contains("inet6 fd00:10:244:48::1/64"), "\(bridge)")

        let deleted = try invoke("DEL")
        #expect(deleted.status == 0, "\(deleted)")
        #expect(
            try run(["ip", "netns", "exec", container, "ip", "link", "show", "dev", "eth0"], check: false).status != 0
        )
    }
}

/// Pods across hosts in a dual-stack or IPv6-only network: the network in
/// etcd, fresh hosts (forwarding off) with an IPv6 underlay address,
/// tunneld on each, and the plugin (as a runtime invokes it, with Debian's
/// bridge and host-local) giving each pod an address of each of the
/// network's families from its host's subnet.env; the pods ping each other
/// over IPv6 (and IPv4 in a dual-stack network) through each kernel/udp
/// backend (udp and host-gw for IPv6 only, as tunneld runs it).
@Suite(
    .serialized,
    .enabled(if: canRunNamespaceTests && standardCNIPluginsInstalled, cniSkipReason),
    .enabled(if: etcdIsInstalled, etcdSkipReason)
)
struct CNIDualStackEndToEndTests {
    @Test(arguments: [
        ("udp", LabFamilies.dualStack), ("vxlan", .dualStack), ("host-gw", .dualStack), ("udp", .ipv6Only),
        ("host-gw", .ipv6Only),
    ])
    func podsOnTwoHostsGetTheNetworksFamiliesAndPing6(backend: String, families: LabFamilies) throws {
        let etcd = EtcdBackendTests()
        try etcd.withEtcdLab { lab in
            try lab.putNetworkConfig(families, backend: #"{"Type":"\#(backend)"}"#)
            for n in 1...2 {
                // Fresh hosts: forwarding off until the bridge plugin makes a gateway.
                try lab.lab(
                    ["add-bare-host", "\(n)", "--ipv6", "--"] + etcd.flanneldCommand(lab, host: n),
                    timeout: .seconds(90)
                )
            }
            let directory = lab.directory
            let bin = try CNIBin(in: directory)
            // kube-flannel's net-conf: the pods' default route is the bridge.
            // Without it, a host-gw pod cannot answer the other host's pods:
            // that host has no -ip-masq, so its bridge masquerades them with its
            // underlay address (as with flanneld), for which the pod has no route.
            func invoke(_ command: String, host n: Int) throws -> PluginRun {
                try bin.invoke(
                    type: "flannel",
                    command: command,
                    containerID: "pod\(n)-\(lab.name)",
                    netns: "/run/netns/\(lab.namespace("c\(n)"))",
                    config: """
                        {"cniVersion":"1.0.0","name":"dual","type":"flannel","subnetFile":"\(lab.subnetFile(n))",
                         "dataDir":"\(directory.path)/cni-data-h\(n)","ipam":{"dataDir":"\(directory.path)/ipam-h\(n)"},
                         "delegate":{"hairpinMode":true,"isDefaultGateway":true}}
                        """,
                    namespace: lab.namespace("h\(n)"),
                    scratch: directory
                )
            }
            for n in 1...2 {
                let v6 = try LabLease6(lab, host: n)
                try run(["ip", "netns", "add", lab.namespace("c\(n)")])
                try lab.exec("c\(n)", ["ip", "link", "set", "lo", "up"])
                let added = try invoke("ADD", host: n)
                #expect(added.status == 0, "ADD on host \(n): \(added)")
                let addresses = (added.json["ips"] as? [[String: Any]] ?? []).compactMap { $0["address"] as? String }
                let address6 = try #require(addresses.first { $0.contains(":") }, "\(added.stdout)")
                #expect(address6.hasPrefix(v6.base) && address6.hasSuffix("/64"), "\(address6) is not in \(v6.subnet)")
                var files = [("c\(n).ip6", address6)]
                if families == .dualStack {
                    files.append(("c\(n).ip", try #require(addresses.first { !$0.contains(":") }, "\(added.stdout)")))
                } else {
                    #expect(addresses == [address6], "an IPv6-only pod has no IPv4 address: \(added.stdout)")
                }
                // Where Lab.ping and Lab.ping6 look for the pods' addresses.
                for (file, address) in files {
                    try "\(address.split(separator: "/")[0])\n".write(
                        to: directory.appendingPathComponent(file),
                        atomically: true,
                        encoding: .utf8
                    )
                }
                let routes6 = try lab.exec("c\(n)", ["ip", "-6", "route"]).output
                #expect(routes6.contains("fd00:10:2::/48 via \(v6.base)1"), "\(routes6)")
                // The bridge plugin turned forwarding on for its gateways, of each family it has.
                let sysctls =
                    families == .dualStack
                    ? ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"] : ["net.ipv6.conf.all.forwarding"]
                for sysctl in sysctls {
                    let value = try lab.exec("h\(n)", ["sysctl", "-n", sysctl]).output
                    #expect(value.hasPrefix("1"), "\(sysctl) on host \(n) after ADD: \(value)")
                }
            }
            for (from, to) in [(1, 2), (2, 1)] {
                let ping6 = try lab.ping6(from: from, to: to)
                #expect(ping6.succeeded, "pod \(from) → pod \(to) over IPv6: \(ping6.output)")
                if families == .dualStack {
                    let ping = try lab.ping(from: from, to: to)
                    #expect(ping.succeeded, "pod \(from) → pod \(to): \(ping.output)")
                }
            }
            for n in 1...2 {
                let deleted = try invoke("DEL", host: n)
                #expect(deleted.status == 0, "DEL on host \(n): \(deleted)")
            }
        }
    }
}
