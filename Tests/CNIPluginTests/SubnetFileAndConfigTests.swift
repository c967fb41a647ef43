import CNIPlugin
import FlannelFiles
import Foundation
import Testing

let tunneldSubnetFile = """
    FLANNEL_NETWORK=10.2.0.0/16
    FLANNEL_SUBNET=10.2.72.1/24
    FLANNEL_MTU=1472
    FLANNEL_IPMASQ=false

    """

func object(_ text: String) throws -> [String: JSONValue] {
    guard case .object(let fields) = try JSONValue(parsing: text) else { throw CNIError(code: 0, "not an object") }
    return fields
}

@Suite struct CNISubnetFileTests {
    @Test func readsTheFileTunneldWrites() throws {
        let file = try FlannelSubnetFile(parsing: tunneldSubnetFile, path: "subnet.env")
        #expect(file.networks.map(\.text) == ["10.2.0.0/16"])
        #expect(file.subnet?.text == "10.2.72.0/24")
        #expect(file.ipv6Subnet == nil)
        #expect(file.mtu == 1472)
        #expect(file.ipMasq == false)
    }

    @Test func readsDualStackAndSeveralNetworksAsFlannelWritesThem() throws {
        let file = try FlannelSubnetFile(
            parsing: """
                FLANNEL_NETWORK=10.2.0.0/16,10.3.0.0/16,10.2.0.0/16
                FLANNEL_SUBNET=10.2.72.1/24
                FLANNEL_IPV6_NETWORK=fd00:1::/56
                FLANNEL_IPV6_SUBNET=fd00:1:0:48::1/64
                FLANNEL_MTU=1450
                FLANNEL_IPMASQ=true
                """,
            path: "subnet.env"
        )
        #expect(file.networks.map(\.text) == ["10.2.0.0/16", "10.3.0.0/16"])
        #expect(file.ipv6Networks.map(\.text) == ["fd00:1::/56"])
        #expect(file.ipv6Subnet?.text == "fd00:1:0:48::/64")
        #expect(file.ipMasq)
    }

    @Test func anIPv6OnlyFileIsComplete() throws {
        let file = try FlannelSubnetFile(
            parsing: """
                FLANNEL_IPV6_NETWORK=fd00:1::/56
                FLANNEL_IPV6_SUBNET=fd00:1:0:48::1/64
                FLANNEL_MTU=1450
                FLANNEL_IPMASQ=false
                """,
            path: "subnet.env"
        )
        #expect(file.subnet == nil)
        #expect(file.networks.isEmpty)
    }

    @Test func missingVariablesAreNamed() {
        let error = #expect(throws: CNIError.self) {
            try FlannelSubnetFile(parsing: "FLANNEL_NETWORK=10.2.0.0/16\nFLANNEL_MTU=1472\n", path: "/run/x.env")
        }
        #expect(error?.code == CNIError.invalidSubnetFile)
        #expect(error?.msg == "subnet file /run/x.env: FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET, FLANNEL_IPMASQ are missing")
    }

    @Test(arguments: [
        ("FLANNEL_MTU=big", "FLANNEL_MTU \"big\" is not an MTU"),
        ("FLANNEL_MTU=20", "FLANNEL_MTU \"20\" is not an MTU"),
        ("FLANNEL_IPMASQ=yes", "FLANNEL_IPMASQ \"yes\" is not true or false"),
        ("FLANNEL_SUBNET=10.2.72.1", "FLANNEL_SUBNET \"10.2.72.1\" is not an address/prefix"),
        ("FLANNEL_NETWORK=10.2.0.0/16,nonsense", "FLANNEL_NETWORK \"nonsense\" is not a network"),
    ])
    func malformedValuesAreNamed(line: String, message: String) {
        let name = line.split(separator: "=")[0]
        let text =
            tunneldSubnetFile.split(separator: "\n").filter { !$0.hasPrefix(name) }.joined(separator: "\n")
            + "\n\(line)\n"
        let error = #expect(throws: CNIError.self) { try FlannelSubnetFile(parsing: text, path: "s.env") }
        #expect(error?.msg.contains(message) == true, "\(String(describing: error))")
    }

    @Test func aMissingFileMeansTryAgainLater() {
        let error = #expect(throws: CNIError.self) {
            try FlannelSubnetFile.read("/nonexistent-\(UUID().uuidString)/subnet.env")
        }
        #expect(error?.code == CNIError.tryAgainLater)
        #expect(error?.msg.hasSuffix("does not exist") == true)
        #expect(error?.details.contains("subnetFile") == true)
    }

    @Test func networksAreCanonical() {
        #expect(IPNetworkText("10.2.72.9/24")?.text == "10.2.72.0/24")
        #expect(IPNetworkText("fd00:1:2:3:4::1/50")?.text == "fd00:1:2::/50")
        #expect(IPNetworkText("fd00::1/129") == nil)
        #expect(IPNetworkText("10.2.0.0") == nil)
    }
}

@Suite struct CNINetworkConfigTests {
    let subnet = try! FlannelSubnetFile(parsing: tunneldSubnetFile, path: "subnet.env")
    let selfNames: Set<String> = ["flannel", "tunneld-cni"]

    func conf(_ text: String) throws -> FlannelNetConf { try FlannelNetConf(parsing: Array(text.utf8)) }

    @Test func defaultsAreFlannels() throws {
        let c = try conf(#"{"cniVersion":"1.0.0","name":"cbr0","type":"flannel"}"#)
        #expect(c.subnetFile == "/run/flannel/subnet.env")
        #expect(c.dataDir == "/var/lib/cni/flannel")
        #expect(c.effectiveVersion == "1.0.0")
        #expect(try conf(#"{"name":"x"}"#).effectiveVersion == "0.1.0")
    }

    @Test func theDelegateIsBridgeWithHostLocalOverTheSubnet() throws {
        let c = try conf(#"{"cniVersion":"1.0.0","name":"cbr0","type":"flannel"}"#)
        let delegate = try c.delegateConfig(for: subnet, selfNames: selfNames)
        #expect(
            JSONValue.object(delegate)
                == .object(
                    try object(
                        """
                        {"cniVersion":"1.0.0","name":"cbr0","type":"bridge","isGateway":true,"ipMasq":true,"mtu":1472,
                         "ipam":{"type":"host-local","ranges":[[{"subnet":"10.2.72.0/24"}]],"routes":[{"dst":"10.2.0.0/16"}]}}
                        """
                    )
                )
        )
    }

    @Test func ipMasqIsTheOppositeOfTheDaemons() throws {
        var masquerading = subnet
        masquerading.ipMasq = true
        let delegate = try conf(#"{"name":"n"}"#).delegateConfig(for: masquerading, selfNames: selfNames)
        #expect(delegate["ipMasq"] == .bool(false))
        #expect(delegate["cniVersion"] == nil)
    }

    @Test func theUsersDelegateIsKeptAndOnlyCompleted() throws {
        let c = try conf(
            """
            {"cniVersion":"0.4.0","name":"cbr0","type":"flannel",
             "subnetFile":"/tmp/s.env","dataDir":"/tmp/d",
             "delegate":{"hairpinMode":true,"isDefaultGateway":true,"ipMasq":true,"mtu":1400,"isGateway":false},
             "runtimeConfig":{"portMappings":[]}}
            """
        )
        #expect(c.subnetFile == "/tmp/s.env" && c.dataDir == "/tmp/d")
        var masquerading = subnet
        masquerading.ipMasq = true
        let delegate = try c.delegateConfig(for: masquerading, selfNames: selfNames)
        #expect(delegate["hairpinMode"] == .bool(true))
        #expect(delegate["isDefaultGateway"] == .bool(true))
        #expect(delegate["ipMasq"] == .bool(true))
        #expect(delegate["mtu"] == .number(1400))
        #expect(delegate["isGateway"] == .bool(false))
        #expect(delegate["runtimeConfig"] == .object(["portMappings": .array([])]))
        #expect(delegate["cniVersion"] == .string("0.4.0"))
    }

    @Test func anotherDelegateTypeGetsNoBridgeOptions() throws {
        let delegate = try conf(#"{"name":"n","delegate":{"type":"ipvlan","master":"eth0"}}"#)
            .delegateConfig(for: subnet, selfNames: selfNames)
        #expect(delegate["type"] == .string("ipvlan"))
        #expect(delegate["isGateway"] == nil)
        #expect(delegate["master"] == .string("eth0"))
    }

    @Test func theTopLevelIPAMIsTheBaseOfTheDelegates() throws {
        let delegate = try conf(
            """
            {"name":"n","ipam":{"dataDir":"/tmp/ipam","routes":[{"dst":"0.0.0.0/0"}],"ranges":[[{"subnet":"1.2.3.0/24"}]]}}
            """
        ).delegateConfig(for: subnet, selfNames: selfNames)
        #expect(
            delegate["ipam"]
                == .object(
                    try object(
                        """
                        {"type":"host-local","dataDir":"/tmp/ipam","ranges":[[{"subnet":"10.2.72.0/24"}]],
                         "routes":[{"dst":"0.0.0.0/0"},{"dst":"10.2.0.0/16"}]}
                        """
                    )
                )
        )
    }

    @Test func dualStackGivesTwoRangesAndRoutes() throws {
        let file = try FlannelSubnetFile(
            parsing: tunneldSubnetFile + "FLANNEL_IPV6_NETWORK=fd00::/56\nFLANNEL_IPV6_SUBNET=fd00:0:0:1::1/64\n",
            path: "s"
        )
        let delegate = try conf(#"{"name":"n"}"#).delegateConfig(for: file, selfNames: selfNames)
        guard case .object(let ipam)? = delegate["ipam"] else { Issue.record("no ipam"); return }
        #expect(
            ipam["ranges"]
                == .array([
                    .array([.object(["subnet": .string("10.2.72.0/24")])]),
                    .array([.object(["subnet": .string("fd00:0:0:1::/64")])]),
                ])
        )
        #expect(
            ipam["routes"]
                == .array([.object(["dst": .string("10.2.0.0/16")]), .object(["dst": .string("fd00::/56")])])
        )
    }

    @Test(arguments: [
        (#"{"name":"n","delegate":{"name":"x"}}"#, "must not have a \"name\""),
        (#"{"name":"n","delegate":{"ipam":{}}}"#, "must not have an \"ipam\""),
        (#"{"name":"n","delegate":{"type":7}}"#, "string \"type\""),
        (#"{"name":"n","delegate":{"type":"flannel"}}"#, "is this plugin itself"),
        (#"{"type":"flannel"}"#, "has no \"name\""),
        (#"{"name":"n","ipam":{"routes":[{"gw":"10.0.0.1"}]}}"#, "needs a \"dst\" network"),
        (#"{"name":"n","ipam":{"routes":[{"dst":"10.9.0.0/16","gw":"x"}]}}"#, "gw must be an IP address"),
    ])
    func badDelegatesAreRefused(text: String, message: String) throws {
        let error = #expect(throws: CNIError.self) { try conf(text).delegateConfig(for: subnet, selfNames: selfNames) }
        #expect(error?.code == CNIError.invalidNetworkConfig)
        #expect(error?.msg.contains(message) == true, "\(String(describing: error))")
    }

    @Test(arguments: [
        ("", CNIError.decodingFailure, "no network config on standard input"),
        (#"{"name":"n",}"#, CNIError.decodingFailure, "is not JSON"),
        ("[1]", CNIError.decodingFailure, "not a JSON object"),
        (#"{"name":"n","subnetFile":5}"#, CNIError.invalidNetworkConfig, "\"subnetFile\" must be a string"),
        (#"{"name":"n","subnetFile":""}"#, CNIError.invalidNetworkConfig, "\"subnetFile\" is empty"),
        (#"{"name":"n","delegate":"bridge"}"#, CNIError.invalidNetworkConfig, "\"delegate\" must be an object"),
    ])
    func badConfigsAreRefused(text: String, code: Int, message: String) {
        let error = #expect(throws: CNIError.self) { try conf(text) }
        #expect(error?.code == code)
        #expect(error?.msg.contains(message) == true, "\(String(describing: error))")
    }
}
