import CNIPlugin
import FlannelFiles
import Foundation
import Synchronization
import Testing

/// A delegate that records what it was asked and answers as told.
final class RecordingRunner: DelegateRunner {
    struct Call { var type: String; var command: CNICommand; var config: String }
    let calls = Mutex<[Call]>([])
    let answer: @Sendable (CNICommand) throws(CNIError) -> [UInt8]

    init(
        answer: @escaping @Sendable (CNICommand) throws(CNIError) -> [UInt8] = { _ in
            Array(#"{"cniVersion":"1.0.0"}"#.utf8)
        }
    ) {
        self.answer = answer
    }

    func run(type: String, command: CNICommand, config: [UInt8], request: CNIRequest) throws(CNIError) -> [UInt8] {
        calls.withLock {
            $0.append(Call(type: type, command: command, config: String(decoding: config, as: UTF8.self)))
        }
        return try answer(command)
    }

    var recorded: [Call] { calls.withLock { $0 } }
}

/// A scratch directory holding a subnet file and the plugin's data dir.
struct Scratch: ~Copyable {
    let path: String
    init() throws {
        path = FileManager.default.temporaryDirectory.appendingPathComponent("cni-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        try tunneldSubnetFile.write(toFile: subnetFile, atomically: true, encoding: .utf8)
    }
    deinit { try? FileManager.default.removeItem(atPath: path) }
    var subnetFile: String { "\(path)/subnet.env" }
    var dataDir: String { "\(path)/data" }
    func config(_ extra: String = "", version: String = "1.0.0") -> [UInt8] {
        Array(
            #"{"cniVersion":"\#(version)","name":"cbr0","type":"flannel","subnetFile":"\#(subnetFile)","dataDir":"\#(dataDir)"\#(extra)}"#
                .utf8
        )
    }
}

func environment(_ command: String, container: String = "c0ffee") -> [String: String] {
    [
        "CNI_COMMAND": command, "CNI_CONTAINERID": container, "CNI_NETNS": "/run/netns/x",
        "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin:/usr/lib/cni",
    ]
}

func errorJSON(_ response: FlannelPlugin.Response) throws -> [String: JSONValue] {
    try object(String(decoding: response.stdout, as: UTF8.self))
}

@Suite struct FlannelPluginTests {
    @Test func addSavesTheDelegateConfigAndPassesTheResultThrough() throws {
        let scratch = try Scratch()
        let runner = RecordingRunner()
        let response = FlannelPlugin(runner: runner).handle(environment: environment("ADD"), stdin: scratch.config())
        #expect(response.exitStatus == 0)
        #expect(String(decoding: response.stdout, as: UTF8.self) == #"{"cniVersion":"1.0.0"}"#)
        let calls = runner.recorded
        #expect(calls.map(\.type) == ["bridge"] && calls.map(\.command) == [.add])
        let saved = try String(contentsOfFile: "\(scratch.dataDir)/c0ffee", encoding: .utf8)
        #expect(saved == calls[0].config)
        #expect(
            try object(saved)["ipam"]
                == .object(
                    try object(
                        #"{"type":"host-local","ranges":[[{"subnet":"10.2.72.0/24"}]],"routes":[{"dst":"10.2.0.0/16"}]}"#
                    )
                )
        )
        let attributes = try FileManager.default.attributesOfItem(atPath: "\(scratch.dataDir)/c0ffee")
        #expect((attributes[.posixPermissions] as? Int) == 0o600)
    }

    @Test func addWithoutASubnetFileAsksTheRuntimeToRetry() throws {
        let scratch = try Scratch()
        try FileManager.default.removeItem(atPath: scratch.subnetFile)
        let runner = RecordingRunner()
        let response = FlannelPlugin(runner: runner).handle(
            environment: environment("ADD"),
            stdin: scratch.config(version: "0.4.0")
        )
        #expect(response.exitStatus == 1)
        let error = try errorJSON(response)
        #expect(error["code"] == .number(11))
        #expect(error["cniVersion"] == .string("0.4.0"))
        #expect(error["msg"] == .string("subnet file \(scratch.subnetFile) does not exist"))
        #expect(runner.recorded.isEmpty)
    }

    @Test func delUsesTheSavedConfigEvenWhenTheSubnetFileIsGone() throws {
        let scratch = try Scratch()
        let runner = RecordingRunner()
        let plugin = FlannelPlugin(runner: runner)
        #expect(plugin.handle(environment: environment("ADD"), stdin: scratch.config()).exitStatus == 0)
        try FileManager.default.removeItem(atPath: scratch.subnetFile)
        var del = environment("DEL")
        del["CNI_NETNS"] = nil
        let response = plugin.handle(environment: del, stdin: scratch.config())
        #expect(response.exitStatus == 0, "\(String(decoding: response.stdout, as: UTF8.self))")
        #expect(runner.recorded.map(\.command) == [.add, .del])
        #expect(runner.recorded[1].config == runner.recorded[0].config)
        #expect(!FileManager.default.fileExists(atPath: "\(scratch.dataDir)/c0ffee"))
        // Again: nothing left to delete, still success, and no delegate run.
        #expect(plugin.handle(environment: del, stdin: scratch.config()).exitStatus == 0)
        #expect(runner.recorded.count == 2)
    }

    @Test func aFailedDelKeepsTheSavedConfigAndReportsTheDelegatesError() throws {
        let scratch = try Scratch()
        let runner = RecordingRunner { command throws(CNIError) in
            if command == .del { throw CNIError(code: 5, "bridge says no", details: "d") }
            return []
        }
        let plugin = FlannelPlugin(runner: runner)
        _ = plugin.handle(environment: environment("ADD"), stdin: scratch.config())
        let response = plugin.handle(environment: environment("DEL"), stdin: scratch.config())
        #expect(response.exitStatus == 1)
        #expect(
            try errorJSON(response) == object(#"{"cniVersion":"1.0.0","code":5,"msg":"bridge says no","details":"d"}"#)
        )
        #expect(FileManager.default.fileExists(atPath: "\(scratch.dataDir)/c0ffee"))
    }

    /// A saved config that cannot be used (torn, not JSON, no delegate type) would fail
    /// every DEL the runtime retries if it stayed: DEL says what is wrong with it and what
    /// may be left behind, runs no delegate, and moves it aside with its bytes intact (the
    /// other containers' configs untouched); the next DEL succeeds as for a container that
    /// has nothing left.
    @Test(arguments: [
        ("{\"cniVersion\":\"1.0.0\",\"type\":\"bri", "not JSON"), ("not json at all", "not JSON"),
        ("[1,2]", "not a JSON object"), (#"{"cniVersion":"1.0.0","name":"cbr0"}"#, "no \"type\""),
        (#"{"type":7}"#, "\"type\" is not a string"), ("", "empty"),
    ])
    func delWithACorruptSavedConfigSaysWhyAndKeepsItAside(saved: String, why: String) throws {
        let scratch = try Scratch()
        let runner = RecordingRunner()
        let plugin = FlannelPlugin(runner: runner)
        #expect(plugin.handle(environment: environment("ADD"), stdin: scratch.config()).exitStatus == 0)
        #expect(
            plugin.handle(environment: environment("ADD", container: "beef"), stdin: scratch.config()).exitStatus == 0
        )
        let path = "\(scratch.dataDir)/c0ffee", aside = "\(scratch.dataDir)/.unreadable-c0ffee"
        let other = try String(contentsOfFile: "\(scratch.dataDir)/beef", encoding: .utf8)
        try saved.write(toFile: path, atomically: true, encoding: .utf8)

        let response = plugin.handle(environment: environment("DEL"), stdin: scratch.config())
        #expect(response.exitStatus == 1)
        let error = try errorJSON(response)
        #expect(error["code"] == .number(6))
        #expect(
            error["msg"]
                == .string("the saved delegate config \(path) is unreadable (\(why)); it was moved to \(aside)")
        )
        #expect(
            error["details"]
                == .string(
                    "the delegate's DEL did not run, so the container's veth and its host-local address (a file named for the "
                        + "address, holding the container ID, in host-local's dataDir, by default /var/lib/cni/networks/cbr0/) may "
                        + "remain: remove them by hand; the next DEL succeeds with nothing to delete"
                )
        )
        #expect(runner.recorded.map(\.command) == [.add, .add])
        #expect(!FileManager.default.fileExists(atPath: path))
        #expect(try String(contentsOfFile: aside, encoding: .utf8) == saved)
        #expect(try String(contentsOfFile: "\(scratch.dataDir)/beef", encoding: .utf8) == other)

        let again = plugin.handle(environment: environment("DEL"), stdin: scratch.config())
        #expect(again.exitStatus == 0, "\(String(decoding: again.stdout, as: UTF8.self))")
        #expect(runner.recorded.map(\.command) == [.add, .add])
        // The other container's DEL still runs its delegate with what ADD saved.
        #expect(
            plugin.handle(environment: environment("DEL", container: "beef"), stdin: scratch.config()).exitStatus == 0
        )
        #expect(runner.recorded.map(\.command) == [.add, .add, .del])
        #expect(runner.recorded.last?.config == other)
        #expect(try String(contentsOfFile: aside, encoding: .utf8) == saved)
    }

    /// A saved config that cannot be moved aside (here a directory is in the way, which
    /// stops root too) is left where it is, and the error says what to do instead.
    @Test func delWithACorruptSavedConfigThatCannotBeMovedSaysToRemoveIt() throws {
        let scratch = try Scratch()
        let plugin = FlannelPlugin(runner: RecordingRunner())
        #expect(plugin.handle(environment: environment("ADD"), stdin: scratch.config()).exitStatus == 0)
        let path = "\(scratch.dataDir)/c0ffee"
        try "torn".write(toFile: path, atomically: true, encoding: .utf8)
        try FileManager.default.createDirectory(
            atPath: "\(scratch.dataDir)/.unreadable-c0ffee/x",
            withIntermediateDirectories: true
        )
        let error = try errorJSON(plugin.handle(environment: environment("DEL"), stdin: scratch.config()))
        #expect(error["code"] == .number(5))
        #expect(error["details"] == .string("remove \(path) by hand; DEL then succeeds with nothing to delete"))
        #expect(try String(contentsOfFile: path, encoding: .utf8) == "torn")
    }

    @Test func checkRunsTheDelegateWithTheSavedConfigAndPrevResult() throws {
        let scratch = try Scratch()
        let runner = RecordingRunner()
        let plugin = FlannelPlugin(runner: runner)
        _ = plugin.handle(environment: environment("ADD"), stdin: scratch.config())
        let prev = #","prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.2.72.2/24"}]}"#
        let response = plugin.handle(environment: environment("CHECK"), stdin: scratch.config(prev))
        #expect(response.exitStatus == 0, "\(String(decoding: response.stdout, as: UTF8.self))")
        let check = try object(runner.recorded[1].config)
        #expect(runner.recorded[1].command == .check)
        #expect(
            check["prevResult"] == .object(try object(#"{"cniVersion":"1.0.0","ips":[{"address":"10.2.72.2/24"}]}"#))
        )
        #expect(check["ipam"] == (try object(runner.recorded[0].config))["ipam"])
    }

    @Test func checkGivesRoutesWithoutAGatewayTheGatewayTheyWereInstalledThrough() throws {
        let scratch = try Scratch()
        let runner = RecordingRunner()
        let plugin = FlannelPlugin(runner: runner)
        _ = plugin.handle(environment: environment("ADD"), stdin: scratch.config())
        let prev = """
            ,"prevResult":{"cniVersion":"1.0.0",
             "ips":[{"address":"fd00::2/64","gateway":"fd00::1"},{"address":"10.2.72.2/24","gateway":"10.2.72.1"}],
             "routes":[{"dst":"10.2.0.0/16"},{"dst":"10.9.0.0/16","gw":"10.2.72.9"},{"dst":"fd00::/56"}]}
            """
        #expect(plugin.handle(environment: environment("CHECK"), stdin: scratch.config(prev)).exitStatus == 0)
        guard case .object(let result)? = try object(runner.recorded[1].config)["prevResult"] else {
            Issue.record("no prevResult"); return
        }
        #expect(
            result["routes"]
                == .array([
                    .object(["dst": .string("10.2.0.0/16"), "gw": .string("10.2.72.1")]),
                    .object(["dst": .string("10.9.0.0/16"), "gw": .string("10.2.72.9")]),
                    .object(["dst": .string("fd00::/56"), "gw": .string("fd00::1")]),
                ])
        )
    }

    @Test func checkOfAnUnknownContainerFails() throws {
        let scratch = try Scratch()
        let response = FlannelPlugin(runner: RecordingRunner()).handle(
            environment: environment("CHECK"),
            stdin: scratch.config()
        )
        #expect(try errorJSON(response)["code"] == .number(3))
    }

    @Test func checkNoticesThatTheHostsSubnetChanged() throws {
        let scratch = try Scratch()
        let runner = RecordingRunner()
        let plugin = FlannelPlugin(runner: runner)
        _ = plugin.handle(environment: environment("ADD"), stdin: scratch.config())
        try tunneldSubnetFile.replacingOccurrences(of: "10.2.72.1/24", with: "10.2.9.1/24")
            .write(toFile: scratch.subnetFile, atomically: true, encoding: .utf8)
        let response = plugin.handle(environment: environment("CHECK"), stdin: scratch.config())
        let error = try errorJSON(response)
        #expect(error["code"] == .number(100))
        #expect(
            error["msg"]
                == .string(
                    "this host's subnet changed since the container was added: it was 10.2.72.0/24, \(scratch.subnetFile) now says 10.2.9.0/24"
                )
        )
        #expect(runner.recorded.count == 1)
    }

    @Test func checkNeedsVersion040() throws {
        let scratch = try Scratch()
        let response = FlannelPlugin(runner: RecordingRunner()).handle(
            environment: environment("CHECK"),
            stdin: scratch.config(version: "0.3.1")
        )
        let error = try errorJSON(response)
        #expect(error["code"] == .number(1))
        #expect(error["msg"] == .string("config version does not allow CHECK"))
    }

    @Test func anUnsupportedVersionIsRefused() throws {
        let scratch = try Scratch()
        let response = FlannelPlugin(runner: RecordingRunner()).handle(
            environment: environment("ADD"),
            stdin: scratch.config(version: "9.9.9")
        )
        let error = try errorJSON(response)
        #expect(error["code"] == .number(1))
        #expect(error["cniVersion"] == .string("1.0.0"))
        #expect(
            error["details"] == .string("config is \"9.9.9\", plugin supports 0.1.0, 0.2.0, 0.3.0, 0.3.1, 0.4.0, 1.0.0")
        )
    }

    @Test func versionListsTheSupportedVersions() throws {
        let response = FlannelPlugin(runner: RecordingRunner()).handle(
            environment: ["CNI_COMMAND": "VERSION"],
            stdin: Array(#"{"cniVersion":"1.0.0"}"#.utf8)
        )
        #expect(response.exitStatus == 0)
        #expect(
            try errorJSON(response)
                == object(
                    #"{"cniVersion":"1.0.0","supportedVersions":["0.1.0","0.2.0","0.3.0","0.3.1","0.4.0","1.0.0"]}"#
                )
        )
    }

    @Test func withoutACommandThePluginDescribesItself() {
        let response = FlannelPlugin(runner: RecordingRunner()).handle(environment: [:], stdin: [])
        #expect(response.exitStatus == 0 && response.stdout.isEmpty)
        #expect(response.stderr.contains("CNI protocol versions supported: 0.1.0"))
    }

    @Test(arguments: [
        (
            ["CNI_COMMAND": "ADD"],
            "required environment variables missing: CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_PATH"
        ),
        (
            ["CNI_COMMAND": "DEL", "CNI_CONTAINERID": "a"],
            "required environment variables missing: CNI_IFNAME, CNI_PATH"
        ),
        (["CNI_COMMAND": "GET"], "unknown CNI_COMMAND \"GET\""),
        (
            environment("ADD", container: "../../etc/passwd"),
            "invalid characters in CNI_CONTAINERID \"../../etc/passwd\""
        ),
        (environment("ADD").merging(["CNI_IFNAME": "a/b"]) { $1 }, "CNI_IFNAME \"a/b\" is not an interface name"),
    ])
    func badEnvironmentsAreCNIErrors(environment: [String: String], message: String) throws {
        let scratch = try Scratch()
        let runner = RecordingRunner()
        let response = FlannelPlugin(runner: runner).handle(environment: environment, stdin: scratch.config())
        #expect(response.exitStatus == 1)
        let error = try errorJSON(response)
        #expect(error["code"] == .number(4))
        #expect(error["msg"] == .string(message))
        #expect(runner.recorded.isEmpty)
    }

    @Test func badJSONIsADecodingError() throws {
        let response = FlannelPlugin(runner: RecordingRunner()).handle(
            environment: environment("ADD"),
            stdin: Array("{nope".utf8)
        )
        let error = try errorJSON(response)
        #expect(error["code"] == .number(6))
        #expect(error["cniVersion"] == .string("1.0.0"))
        guard case .string(let msg)? = error["msg"] else { Issue.record("no msg"); return }
        #expect(msg.hasPrefix("network config on stdin is not JSON: "))
    }
}

/// The subnet file tunneld writes for an IPv6-only network (no IPv4
/// lines, as flanneld writes it) gives the delegate one IPv6 range.
@Suite struct IPv6OnlyPluginTests {
    @Test func anIPv6OnlySubnetFileGivesAnIPv6RangeOnly() throws {
        let scratch = try Scratch()
        // SubnetEnv(network: nil, subnet: nil, …).text, as tunneld writes it.
        try
            "FLANNEL_IPV6_NETWORK=fd00:10:244::/48\nFLANNEL_IPV6_SUBNET=fd00:10:244:48::1/64\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n"
            .write(toFile: scratch.subnetFile, atomically: true, encoding: .utf8)
        let runner = RecordingRunner()
        let response = FlannelPlugin(runner: runner).handle(environment: environment("ADD"), stdin: scratch.config())
        #expect(response.exitStatus == 0, "\(String(decoding: response.stdout, as: UTF8.self))")
        let config = try #require(runner.recorded.first?.config)
        let ipam = try object(config)["ipam"]
        #expect(
            ipam
                == .object(
                    try object(
                        #"{"type":"host-local","ranges":[[{"subnet":"fd00:10:244:48::/64"}]],"routes":[{"dst":"fd00:10:244::/48"}]}"#
                    )
                ),
            "\(config)"
        )
        #expect(try object(config)["mtu"] == .number(1472))
    }
}
