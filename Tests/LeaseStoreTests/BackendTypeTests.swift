import LeaseStore
import Testing

@Suite struct BackendTypeTests {
    @Test func theConfigsBackendTypeNamesOneOfTunneldsBackendsOrNone() throws {
        for (json, expected) in [
            (#"{"Network":"10.2.0.0/16"}"#, BackendType.udp),
            (#"{"Network":"10.2.0.0/16","Backend":{"Type":"VXLAN"}}"#, .vxlan),
            (#"{"Network":"10.2.0.0/16","Backend":{"Type":"host-gw"}}"#, .hostGW),
            (#"{"Network":"10.2.0.0/16","Backend":{"Type":"WireGuard"}}"#, .wireguard),
        ] {
            #expect(try NetworkConfig(json: json).backend.knownType == expected, "\(json)")
        }
        // Valid for flannel (so stored), but no tunneld backend.
        let ipsec = try NetworkConfig(json: #"{"Network":"10.2.0.0/16","Backend":{"Type":"ipsec"}}"#)
        #expect(ipsec.backend.knownType == nil)
        #expect(
            BackendType.unsupported(ipsec.backend.type)
                == #"backend "ipsec" is not supported by tunneld (udp, vxlan, host-gw and wireguard are); set Backend.Type to one of them"#
        )
    }

    @Test func theNamesAreFlannels() {
        #expect(BackendType.allCases.map(\.rawValue) == ["udp", "vxlan", "host-gw", "wireguard"])
        #expect(BackendType.supportedNames == "udp, vxlan, host-gw and wireguard")
    }
}
