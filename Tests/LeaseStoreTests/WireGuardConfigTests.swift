import Testing

@testable import LeaseStore

@Suite struct WireGuardConfigTests {
    func backend(_ fields: String) throws -> BackendConfig {
        try NetworkConfig(json: #"{"Network":"10.2.0.0/16","Backend":{"Type":"wireguard"\#(fields)}}"#).backend
    }

    @Test func defaultsAreFlannels() throws {
        let b = try backend("")
        #expect(b.knownType == .wireguard)
        #expect(b.port == 51820)
        #expect(b.wireguard == WireGuardConfig())
        #expect(b.wireguard?.listenPortV6 == 51821)
        #expect(b.wireguard?.mode == .separate)
        #expect(b.wireguard?.persistentKeepaliveInterval == 0)
        #expect(b.wireguard?.psk == nil)
        #expect(b.wireguard?.deviceMTU(interfaceMTU: 1500) == 1420)
    }

    @Test func keysMatchInAnyCase() throws {
        let psk = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
        let b = try backend(
            #", "listenport": 51999, "psk": "\#(psk)", "persistentKEEPALIVEinterval": 25, "MODE": "auto", "mtu": 9000"#
        )
        #expect(b.port == 51999)
        #expect(
            b.wireguard
                == WireGuardConfig(listenPort: 51999, psk: psk, persistentKeepaliveInterval: 25, mode: .auto, mtu: 9000)
        )
        #expect(b.wireguard?.deviceMTU(interfaceMTU: 1500) == 8920)
    }

    @Test(arguments: [
        (#", "ListenPort": 0"#, "Backend.ListenPort 0 is not valid: use a UDP port 1…65535 (default 51820)"),
        (#", "ListenPort": 70000"#, "Backend.ListenPort 70000 is not valid: use a UDP port 1…65535 (default 51820)"),
        (#", "ListenPortV6": "x""#, #"Backend.ListenPortV6 "x" is not valid: use a UDP port 1…65535 (default 51821)"#),
        (
            #", "PSK": "c2hvcnQ=""#,
            "Backend.PSK (8 characters, not base64 of 32 bytes) is not valid: use a pre-shared key as `wg genpsk` prints it (44 characters of base64), or leave PSK out"
        ),
        (
            #", "PSK": 5"#,
            "Backend.PSK 5 is not valid: use a pre-shared key as `wg genpsk` prints it (base64 of 32 bytes), or leave PSK out"
        ),
        (
            #", "Mode": "tunnel""#,
            #"Backend.Mode "tunnel" is not valid: use one of separate, auto, ipv4, ipv6"#
        ),
        (
            #", "Mode": "IPv6""#,
            #"Backend.Mode "IPv6" is not valid: use one of separate, auto, ipv4, ipv6"#
        ),
        (
            #", "PersistentKeepaliveInterval": -1"#,
            "Backend.PersistentKeepaliveInterval -1 is not valid: use a whole number of seconds 0…65535 (0, the default: no keepalives)"
        ),
        (
            #", "MTU": 100"#,
            "Backend.MTU 100 is not valid: use a whole number 148…65535, the MTU of the path between hosts (the wireguard device gets 80 less), or leave it out for the interface's MTU"
        ),
    ])
    func badValuesAreRefusedWithWhatToUse(_ fields: String, _ message: String) {
        #expect(throws: NetworkConfigError.self) { try backend(fields) }
        do {
            _ = try backend(fields)
        } catch {
            #expect("\(error)" == message)
        }
    }

    @Test func everyModeOfFlannelIsRead() throws {
        for mode in WireGuardConfig.Mode.allCases {
            #expect(try backend(#", "Mode": "\#(mode.rawValue)""#).wireguard?.mode == mode)
        }
        #expect(try backend(#", "ListenPortV6": 51999"#).wireguard?.listenPortV6 == 51999)
    }

    @Test func aBadPSKIsNotEchoed() {
        let secretish = "notbase64butsecret!!notbase64butsecret!!abc="
        do {
            _ = try backend(#", "PSK": "\#(secretish)""#)
            Issue.record("accepted a PSK that is not base64")
        } catch {
            #expect(!"\(error)".contains(secretish))
        }
    }
}
