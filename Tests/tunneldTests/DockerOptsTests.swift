import ArgumentParser
import FlannelFiles
import Foundation
import Testing

@testable import tunneld

/// One run of flannel's mk-docker-opts.sh, recorded by
/// Scripts/record-docker-opts-fixtures.sh (DockerOptsFixtures.swift).
struct DockerOptsFixture: CustomTestStringConvertible, Sendable {
    var name: String
    var subnetEnv: [String]
    var arguments: [String]
    var environment: [String: String]
    var exitStatus: Int32
    var output: [String]

    var testDescription: String { name }
    var subnetEnvText: String { subnetEnv.map { $0 + "\n" }.joined() }
    var outputText: String { output.map { $0 + "\n" }.joined() }
}

@Suite struct DockerOptsTests {
    /// A scratch directory, removed after `body`.
    func withDirectory<T>(_ body: (String) throws -> T) throws -> T {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent(
            "docker-opts-\(UUID().uuidString)"
        ).path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        return try body(directory)
    }

    /// Parses a command line the way `tunneld` does (normalization included).
    func parse(_ arguments: [String], environment: [String: String] = [:]) throws -> DockerOpts {
        let command = try Tunneld.parseAsRoot(
            FlannelArguments.normalize(["docker-opts"] + arguments, environment: environment)
        )
        return try #require(command as? DockerOpts)
    }

    @Test(arguments: DockerOptsFixture.recorded)
    func writesWhatMkDockerOptsWrites(_ fixture: DockerOptsFixture) throws {
        try withDirectory { directory in
            let subnetFile = directory + "/subnet.env", outputFile = directory + "/docker_opts.env"
            try fixture.subnetEnvText.write(toFile: subnetFile, atomically: true, encoding: .utf8)
            var command = try parse(fixture.arguments)
            command.subnetFile = subnetFile
            command.output = outputFile
            let result = Result {
                try command.render(subnetEnv: fixture.subnetEnvText, environment: fixture.environment)
            }
            switch result {
            case .success(let text):
                #expect(fixture.exitStatus == 0, "the script failed here, tunneld wrote:\n\(text)")
                #expect(text == fixture.outputText)
            case .failure(let error):
                #expect(fixture.exitStatus != 0, "the script succeeded here, tunneld failed: \(error)")
                #expect("\(error)".contains(subnetFile), "the error should name the file: \(error)")
            }
        }
    }

    @Test func shortFlagsSurviveFlanneldNormalization() throws {
        // FLANNELD_SUBNET_FILE belongs to `run`; it must not reach docker-opts.
        let command = try parse(
            ["-f", "x", "-d", "y", "-k", "DOCKER_NETWORK_OPTIONS"],
            environment: ["FLANNELD_SUBNET_FILE": "/elsewhere", "FLANNELD_IP_MASQ": "true"]
        )
        #expect(command.subnetFile == "x" && command.output == "y")
        #expect(command.combinedKey == "DOCKER_NETWORK_OPTIONS")
        #expect(command.options.individual && command.options.combined && command.options.ipMasqOption)
        #expect(
            FlannelArguments.normalize(["docker-opts", "-ci", "-m"], environment: ["FLANNELD_IFACE": "eth0"])
                == ["docker-opts", "-ci", "-m"]
        )
        let joined = try parse(["-ci", "-m", "-kNET_OPTS"])
        #expect(joined.options == .init(individual: true, combined: true, combinedKey: "NET_OPTS", ipMasqOption: false))
        let defaults = try parse([])
        #expect(defaults.subnetFile == "/run/flannel/subnet.env" && defaults.output == "/run/docker_opts.env")
        // `run` still gets flanneld's treatment.
        #expect(FlannelArguments.normalize(["run", "-iface=eth0"], environment: [:]) == ["run", "--iface=eth0"])
    }

    @Test func writesTheFileAtomicallyWithTheScriptsMode() throws {
        try withDirectory { directory in
            let subnetFile = directory + "/subnet.env", outputFile = directory + "/run/docker_opts.env"
            try "FLANNEL_NETWORK=10.2.0.0/16\nFLANNEL_SUBNET=10.2.72.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n"
                .write(toFile: subnetFile, atomically: true, encoding: .utf8)
            try parse(["-f", subnetFile, "-d", outputFile, "-c", "-k", "DOCKER_NETWORK_OPTIONS"]).run()
            let text = try String(contentsOfFile: outputFile, encoding: .utf8)
            #expect(text == "DOCKER_NETWORK_OPTIONS=\" --bip=10.2.72.1/24 --ip-masq=false --mtu=1472\"\n")
            let mode = try #require(FileManager.default.attributesOfItem(atPath: outputFile)[.posixPermissions] as? Int)
            #expect(mode & 0o644 == 0o644 && mode & 0o133 == 0)
            // Nothing but the output is left in its directory (no temporary file).
            #expect(try FileManager.default.contentsOfDirectory(atPath: directory + "/run") == ["docker_opts.env"])
        }
    }

    /// Bad input: an error naming the file and the variable, and the output
    /// file untouched (here: an earlier good one stays).
    @Test(
        arguments: [
            ("missing", nil, "does not exist"),
            ("no subnet", "FLANNEL_NETWORK=10.2.0.0/16\nFLANNEL_MTU=1472\n", "FLANNEL_SUBNET is missing"),
            ("no MTU", "FLANNEL_SUBNET=10.2.72.1/24\nFLANNEL_IPMASQ=false\n", "FLANNEL_MTU is missing"),
            ("empty MTU", "FLANNEL_SUBNET=10.2.72.1/24\nFLANNEL_MTU=\n", "FLANNEL_MTU is empty"),
            (
                "bad subnet", "FLANNEL_SUBNET=10.2.72.1\nFLANNEL_MTU=1472\n",
                "FLANNEL_SUBNET \"10.2.72.1\" is not an address/prefix"
            ),
            (
                "bad subnet octet", "FLANNEL_SUBNET=10.2.300.1/24\nFLANNEL_MTU=1472\n",
                "FLANNEL_SUBNET \"10.2.300.1/24\""
            ),
            ("bad MTU", "FLANNEL_SUBNET=10.2.72.1/24\nFLANNEL_MTU=lots\n", "FLANNEL_MTU \"lots\" is not an MTU"),
            ("tiny MTU", "FLANNEL_SUBNET=10.2.72.1/24\nFLANNEL_MTU=20\n", "FLANNEL_MTU \"20\" is not an MTU"),
            (
                "bad masq", "FLANNEL_SUBNET=10.2.72.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=on\n",
                "FLANNEL_IPMASQ \"on\" is neither true nor false"
            ),
        ] as [(String, String?, String)]
    )
    func badInputFailsWithoutTouchingTheOutput(_ name: String, _ subnetEnv: String?, _ message: String) throws {
        try withDirectory { directory in
            let subnetFile = directory + "/subnet.env", outputFile = directory + "/docker_opts.env"
            if let subnetEnv { try subnetEnv.write(toFile: subnetFile, atomically: true, encoding: .utf8) }
            try "DOCKER_OPTS=\"earlier\"\n".write(toFile: outputFile, atomically: true, encoding: .utf8)
            let command = try parse(["-f", subnetFile, "-d", outputFile])
            let error = try #require(throws: (any Error).self) { try command.run() }
            #expect("\(error)".contains(subnetFile), "\(error)")
            #expect("\(error)".contains(message), "\(error)")
            #expect(try String(contentsOfFile: outputFile, encoding: .utf8) == "DOCKER_OPTS=\"earlier\"\n")
            #expect(
                try FileManager.default.contentsOfDirectory(atPath: directory).sorted()
                    == (subnetEnv == nil ? ["docker_opts.env"] : ["docker_opts.env", "subnet.env"])
            )
        }
    }

    @Test func aCombinedKeyThatIsNoVariableNameIsRefused() throws {
        try withDirectory { directory in
            let subnetFile = directory + "/subnet.env", outputFile = directory + "/docker_opts.env"
            try "FLANNEL_SUBNET=10.2.72.1/24\nFLANNEL_MTU=1472\n".write(
                toFile: subnetFile,
                atomically: true,
                encoding: .utf8
            )
            let error = try #require(throws: (any Error).self) {
                try parse(["-f", subnetFile, "-d", outputFile, "-k", "DOCKER-OPTS"]).run()
            }
            #expect("\(error)".contains("-k \"DOCKER-OPTS\" is not a shell variable name"), "\(error)")
            #expect(!FileManager.default.fileExists(atPath: outputFile))
        }
    }

    @Test func anUnwritableOutputIsNamed() throws {
        try withDirectory { directory in
            let subnetFile = directory + "/subnet.env"
            try "FLANNEL_SUBNET=10.2.72.1/24\nFLANNEL_MTU=1472\n".write(
                toFile: subnetFile,
                atomically: true,
                encoding: .utf8
            )
            // A regular file where the output's directory should be.
            try "x".write(toFile: directory + "/blocker", atomically: true, encoding: .utf8)
            let error = try #require(throws: (any Error).self) {
                try parse(["-f", subnetFile, "-d", directory + "/blocker/docker_opts.env"]).run()
            }
            #expect("\(error)".contains(directory + "/blocker"), "\(error)")
        }
    }
}

/// tunneld's addition to mk-docker-opts.sh (which has no IPv6 options): a
/// dual-stack subnet file gives Docker `--ipv6 --fixed-cidr-v6=<subnet>`.
@Suite struct DockerOptsIPv6Tests {
    static let dualStack = """
        FLANNEL_NETWORK=10.2.0.0/16
        FLANNEL_SUBNET=10.2.72.1/24
        FLANNEL_IPV6_NETWORK=fd00:10:244::/48
        FLANNEL_IPV6_SUBNET=fd00:10:244:48::1/64
        FLANNEL_MTU=1450
        FLANNEL_IPMASQ=true

        """

    @Test func dualStackSubnetFileAddsIPv6OptionsInNameOrder() throws {
        let text = try DockerOptions().render(subnetEnv: Self.dualStack)
        #expect(
            text == """
                DOCKER_OPT_BIP="--bip=10.2.72.1/24"
                DOCKER_OPT_FIXED_CIDR_V6="--fixed-cidr-v6=fd00:10:244:48::/64"
                DOCKER_OPT_IPMASQ="--ip-masq=false"
                DOCKER_OPT_IPV6="--ipv6"
                DOCKER_OPT_MTU="--mtu=1450"
                DOCKER_OPTS=" --bip=10.2.72.1/24 --fixed-cidr-v6=fd00:10:244:48::/64 --ip-masq=false --ipv6 --mtu=1450"

                """
        )
    }

    @Test func malformedIPv6SubnetIsAnError() {
        let bad = Self.dualStack.replacingOccurrences(of: "fd00:10:244:48::1/64", with: "fd00:10:244:48::1")
        let e = #expect(throws: DockerOptionsError.self) { try DockerOptions().render(subnetEnv: bad) }
        #expect(e?.reason.contains("FLANNEL_IPV6_SUBNET \"fd00:10:244:48::1\" is not an address/prefix") == true)
    }

    /// An IPv6-only network's file, as flanneld writes it (no IPv4 lines):
    /// no --bip (Docker keeps its own IPv4 bridge), the IPv6 options.
    @Test func ipv6OnlySubnetFileGivesNoBIP() throws {
        let file = """
            FLANNEL_IPV6_NETWORK=fd00:10:244::/48
            FLANNEL_IPV6_SUBNET=fd00:10:244:48::1/64
            FLANNEL_MTU=1472
            FLANNEL_IPMASQ=true

            """
        let text = try DockerOptions().render(subnetEnv: file)
        #expect(
            text == """
                DOCKER_OPT_FIXED_CIDR_V6="--fixed-cidr-v6=fd00:10:244:48::/64"
                DOCKER_OPT_IPMASQ="--ip-masq=false"
                DOCKER_OPT_IPV6="--ipv6"
                DOCKER_OPT_MTU="--mtu=1472"
                DOCKER_OPTS=" --fixed-cidr-v6=fd00:10:244:48::/64 --ip-masq=false --ipv6 --mtu=1472"

                """
        )
        #expect(DockerOptions.subnet(subnetEnv: file) == nil)
    }
}
