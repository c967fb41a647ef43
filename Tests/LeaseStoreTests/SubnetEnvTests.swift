import FlannelFiles
import Foundation
import NetBase
import Testing

@testable import LeaseStore

@Suite struct SubnetEnvTests {
    let env = SubnetEnv(network: net("10.2.0.0/16"), subnet: net("10.2.72.0/24"), mtu: 1472, ipMasq: false)

    @Test func textIsFlannelsInFlannelsOrder() {
        #expect(
            env.text == """
                FLANNEL_NETWORK=10.2.0.0/16
                FLANNEL_SUBNET=10.2.72.1/24
                FLANNEL_MTU=1472
                FLANNEL_IPMASQ=false

                """
        )
    }

    @Test func writtenFileReadsBackAndLeavesNoTemporaryFiles() async throws {
        try await withTemporaryDirectory { dir in
            let path = dir + "/run/flannel/subnet.env"
            try env.write(to: path)
            #expect(readText(path) == env.text)
            let back = try SubnetEnv.read(from: path).get()
            #expect(back == env)
            let previous = try SubnetEnv.previousSubnet(at: path).get()
            #expect(previous == net("10.2.72.0/24"))
            var changed = env
            changed.ipMasq = true
            try changed.write(to: path)
            let again = try SubnetEnv.read(from: path).get()
            #expect(again == changed)
            #expect(try FileManager.default.contentsOfDirectory(atPath: dir + "/run/flannel") == ["subnet.env"])
        }
    }

    @Test func missingFileIsNotAnError() async throws {
        try await withTemporaryDirectory { dir in
            let env: SubnetEnv?? = try? SubnetEnv.read(from: dir + "/none.env").get()
            #expect(env == .some(nil))
            let previous: IPv4Network?? = try? SubnetEnv.previousSubnet(at: dir + "/none.env").get()
            #expect(previous == .some(nil))
        }
    }

    @Test func flannelWrittenDualStackFileGivesThePreviousSubnet() throws {
        let text = """
            FLANNEL_NETWORK=10.244.0.0/16
            FLANNEL_SUBNET=10.244.3.1/24
            FLANNEL_IPV6_NETWORK=fd00:10:244::/56
            FLANNEL_IPV6_SUBNET=fd00:10:244:3::1/64
            FLANNEL_MTU=1450
            FLANNEL_IPMASQ=true
            """
        let parsed = try SubnetEnv(parsing: text)
        #expect(parsed.subnet == net("10.244.3.0/24"))
        #expect(parsed.mtu == 1450 && parsed.ipMasq)
    }

    @Test(arguments: [
        ("FLANNEL_SUBNET=10.2.72.1\n", "FLANNEL_SUBNET \"10.2.72.1\" is not an address/prefix"),
        ("FLANNEL_NETWORK=10.2.0.0/16\n", "FLANNEL_SUBNET is missing"),
        ("\u{0}\u{1}binary", "FLANNEL_SUBNET is missing"),
    ])
    func malformedFileGivesAReasonNotACrash(_ text: String, _ reason: String) async throws {
        try await withTemporaryDirectory { dir in
            let path = dir + "/subnet.env"
            try writeText(path, text)
            guard case .failure(let error) = SubnetEnv.previousSubnet(at: path) else {
                Issue.record("malformed file accepted")
                return
            }
            #expect(error.description.hasPrefix("subnet file \(path): \(reason)"), "\(error)")
            guard case .failure = SubnetEnv.read(from: path) else {
                Issue.record("malformed file accepted")
                return
            }
        }
    }

    @Test func unwritablePathIsASystemErrorNamingTheFile() {
        let e = #expect(throws: SystemError.self) { try env.write(to: "/proc/version/subnet.env") }
        #expect(e?.description.contains("/proc/version") == true)
    }
}
