import LeaseStore
import Testing

@Suite struct BackendTypeTests {
    @Test func theConfigsBackendTypeNamesOneOfTunneldsBackendsOrNone() throws {
        for (json, expected) in [
            (#"{"Network":"10.2.0.0/16"}"#, BackendType.udp),
            (#"{"Network":"10.2.0.0/16","Backend":{"Type":"VXLAN"}}"#, .vxlan),
            (#"{"Network":"10.2.0.0/16","Backend":{"Type":"host-gw"}}"#, .hostGW),
        ] {
            #expect(try NetworkConfig(json: json).backend.knownType == expected, "\(json)")
        }
        // Valid for flannel (so stored), but no tunneld backend.
        let wireguard = try NetworkConfig(json: #"{"Network":"10.2.0.0/16","Backend":{"Type":"wireguard"}}"#)
        #expect(wireguard.backend.knownType == nil)
        #expect(
            BackendType.unsupported(wireguard.backend.type)
                == #"backend "wireguard" is not supported by tunneld (udp, vxlan and host-gw are); set Backend.Type to one of them"#
        )
    }

    @Test func theNamesAreFlannels() {
        #expect(BackendType.allCases.map(\.rawValue) == ["udp", "vxlan", "host-gw"])
        #expect(BackendType.supportedNames == "udp, vxlan and host-gw")
    }
}
