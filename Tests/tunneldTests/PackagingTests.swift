import Foundation
import Testing

@testable import tunneld

/// packaging/: the unit and environment files must describe a command line
/// tunneld accepts, with flanneld's place in the boot order.
@Suite struct PackagingTests {
    static let packaging = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("packaging")

    func read(_ name: String) throws -> String {
        try String(contentsOf: Self.packaging.appendingPathComponent(name), encoding: .utf8)
    }

    /// systemd's EnvironmentFile= syntax, the subset the file uses.
    func environment(_ text: String) -> [String: String] {
        var values: [String: String] = [:]
        for line in text.split(separator: "\n") where !line.hasPrefix("#") {
            let parts = line.split(separator: "=", maxSplits: 1)
            if parts.count == 2 { values[String(parts[0])] = String(parts[1]) }
        }
        return values
    }

    /// The words of `Key=` in the unit's [Service], with `$VAR` expanded into
    /// words as systemd does; `/usr/local/bin/tunneld` dropped.
    func command(_ key: String, unit: String, environment: [String: String]) throws -> [String] {
        let line = try #require(unit.split(separator: "\n").first { $0.hasPrefix(key + "=") })
        var words: [String] = []
        for word in line.dropFirst(key.count + 1).split(separator: " ") {
            if word.hasPrefix("$") {
                words += (environment[String(word.dropFirst())] ?? "").split(separator: " ").map(String.init)
            } else {
                words.append(String(word))
            }
        }
        #expect(words.first == "/usr/local/bin/tunneld")
        return Array(words.dropFirst())
    }

    @Test func theUnitRunsTunneldWithTheEnvironmentFilesSettings() throws {
        let unit = try read("tunneld.service")
        let env = environment(try read("tunneld.env"))
        for line in [
            "Type=notify", "Before=docker.service", "RequiredBy=docker.service",
            "EnvironmentFile=-/etc/default/tunneld",
        ] {
            #expect(unit.contains(line + "\n"), "tunneld.service lacks \(line)")
        }
        #expect(unit.contains("WatchdogSec="))
        let arguments = FlannelArguments.normalize(
            try command("ExecStart", unit: unit, environment: env),
            environment: env
        )
        let parsed = try Tunneld.parseAsRoot(arguments)
        let run = try #require(parsed as? Run, "ExecStart is not `tunneld run`: \(arguments)")
        #expect(run.ipMasq)
        #expect(run.storeOptions.kind == .etcd)
        #expect(run.storeOptions.etcdEndpoints == "http://127.0.0.1:2379")
        #expect(run.subnetFile == "/run/flannel/subnet.env")
    }

    @Test func dockersDropInReadsWhatTheUnitWrites() throws {
        let unit = try read("tunneld.service")
        let dropIn = try read("docker-tunneld.conf")
        let post = try command("ExecStartPost", unit: unit, environment: [:])
        let file = try #require(post.firstIndex(of: "-d").map { post[$0 + 1] })
        let name = try #require(post.firstIndex(of: "-k").map { post[$0 + 1] })
        #expect(dropIn.contains("EnvironmentFile=\(file)\n"))
        #expect(dropIn.contains("$\(name) "))
        #expect(dropIn.contains("Requires=tunneld.service"))
        // tunneld's own parser takes the unit's docker-opts command line.
        let parsed = try Tunneld.parseAsRoot(FlannelArguments.normalize(post, environment: [:]))
        let dockerOpts = try #require(parsed as? DockerOpts)
        #expect(dockerOpts.output == file && dockerOpts.combinedKey == name)
    }

    @Test func helpGroupsFlanneldsOptionsShowsDefaultsAndExamples() {
        let run = Tunneld.helpMessage(for: Run.self, columns: 200)
        let flanneld = run.range(of: "FLANNELD'S OPTIONS:")
        let own = run.range(of: "\nOPTIONS:")
        #expect(flanneld != nil && own != nil, "\(run)")
        if let flanneld, let own {
            let section = run[flanneld.upperBound..<own.lowerBound]
            for flag in ["--iface", "--subnet-file", "--ip-masq", "--iptables-forward-rules", "--healthz-port", "-v"] {
                #expect(section.contains(flag), "\(flag) is not among flanneld's options")
            }
            #expect(!section.contains("--device"))
        }
        #expect(run.contains("(default: /run/flannel/subnet.env)"))
        #expect(run.contains("Examples:"))
        let root = Tunneld.helpMessage(columns: 200)
        for subcommand in ["run", "config", "leases", "status", "docker-opts"] {
            #expect(root.contains("  \(subcommand) "), "tunneld --help lacks \(subcommand)")
        }
    }
}
