import CNIPlugin
import FlannelFiles
import Foundation
import Testing

/// Delegates as real programs (shell scripts in a scratch CNI_PATH): how
/// the plugin finds, feeds and reads them. No root needed.
@Suite struct ExecDelegateRunnerTests {
    let directory: String

    init() throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("cni-bin-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    }

    func install(_ name: String, _ script: String) throws {
        let path = "\(directory)/\(name)"
        try "#!/bin/sh\n\(script)\n".write(toFile: path, atomically: true, encoding: .utf8)
        try FileManager.default.setAttributes([.posixPermissions: 0o755], ofItemAtPath: path)
    }

    func request(path: [String]? = nil) throws -> CNIRequest {
        var env = environment("ADD")
        env["CNI_PATH"] = (path ?? ["/nonexistent", directory]).joined(separator: ":")
        env["PATH"] = "/usr/bin:/bin"
        return try #require(try CNIRequest(environment: env, stdin: []))
    }

    func runner() -> ExecDelegateRunner { ExecDelegateRunner(diagnostics: { _ in }) }

    @Test func theDelegateGetsTheCommandTheEnvironmentAndTheConfig() throws {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try install("bridge", #"printf '%s %s %s|' "$CNI_COMMAND" "$CNI_CONTAINERID" "$CNI_IFNAME"; cat"#)
        let output = try runner().run(
            type: "bridge",
            command: .del,
            config: Array("{\"a\":1}".utf8),
            request: try request()
        )
        #expect(String(decoding: output, as: UTF8.self) == "DEL c0ffee eth0|{\"a\":1}")
    }

    @Test func largeConfigsAndOutputsDoNotDeadlock() throws {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try install("bridge", "cat; head -c 300000 /dev/zero >&2")
        let config = [UInt8](repeating: UInt8(ascii: "x"), count: 500_000)
        let output = try runner().run(type: "bridge", command: .add, config: config, request: try request())
        #expect(output == config)
    }

    @Test func theDelegatesOwnCNIErrorPassesThrough() throws {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try install("bridge", #"echo '{"cniVersion":"1.0.0","code":7,"msg":"bad bridge","details":"why"}'; exit 1"#)
        let error = #expect(throws: CNIError.self) {
            try runner().run(type: "bridge", command: .add, config: [], request: try request())
        }
        #expect(error == CNIError(code: 7, "bad bridge", details: "why"))
    }

    @Test func aDelegateFailingWithoutJSONIsReportedWithItsStandardError() throws {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try install("bridge", "echo 'cannot create bridge' >&2; exit 3")
        let error = #expect(throws: CNIError.self) {
            try runner().run(type: "bridge", command: .add, config: [], request: try request())
        }
        #expect(error?.code == 999)
        #expect(error?.msg == "delegate bridge failed (exit status 3): cannot create bridge\n")
    }

    @Test func aMissingDelegateNamesTheSearchPath() throws {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let error = #expect(throws: CNIError.self) {
            try runner().run(
                type: "bridge",
                command: .add,
                config: [],
                request: try request(path: ["/nonexistent", directory])
            )
        }
        #expect(error?.msg == "failed to find plugin \"bridge\" in CNI_PATH /nonexistent:\(directory)")
        #expect(error?.details.contains("containernetworking-plugins") == true)
    }

    @Test func theFirstDirectoryInCNIPathWins() throws {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try FileManager.default.createDirectory(atPath: "\(directory)/second", withIntermediateDirectories: true)
        try install("bridge", "echo first")
        try "#!/bin/sh\necho second\n".write(toFile: "\(directory)/second/bridge", atomically: true, encoding: .utf8)
        let output = try runner().run(
            type: "bridge",
            command: .add,
            config: [],
            request: try request(path: [directory, "\(directory)/second"])
        )
        #expect(String(decoding: output, as: UTF8.self) == "first\n")
    }

    @Test func aDelegateTypeWithASlashIsRefused() throws {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let error = #expect(throws: CNIError.self) { try ExecDelegateRunner.find("../bridge", in: [directory]) }
        #expect(error?.code == CNIError.invalidNetworkConfig)
    }
}
