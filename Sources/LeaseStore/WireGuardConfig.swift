import FlannelFiles
import Foundation

/// The wireguard backend's keys of the `Backend` object, with flanneld's
/// names and defaults (pkg/backend/wireguard): `ListenPort` (51820),
/// `ListenPortV6` (51821), `PSK`, `PersistentKeepaliveInterval` (seconds,
/// 0: none), `Mode` (separate, auto, ipv4 or ipv6) and, as for vxlan, `MTU`
/// to count from instead of the interface's. Field names match in any case.
public struct WireGuardConfig: Sendable, Equatable {
    /// How flanneld lays out the tunnels when IPv6 is enabled: `separate`
    /// (the default), a device per family — flannel-wg on `ListenPort` to
    /// the peers' PublicIP, flannel-wg-v6 on `ListenPortV6` to their
    /// PublicIPv6; `auto`, `ipv4`, `ipv6`, one device flannel-wg on
    /// `ListenPort` for both families, to the peers' PublicIP, PublicIPv6 or
    /// whichever flanneld's rule picks (auto). With IPv4 only, separate,
    /// auto and ipv4 all mean one device, flannel-wg, to the peers' PublicIP.
    public enum Mode: String, Sendable, CaseIterable {
        case separate, auto, ipv4, ipv6
    }

    public var listenPort: UInt16
    public var listenPortV6: UInt16
    /// The pre-shared key as given (base64 of 32 bytes), or nil.
    public var psk: String?
    /// Seconds; 0 sends no keepalives of its own.
    public var persistentKeepaliveInterval: Int
    public var mode: Mode
    /// The MTU to count from instead of the interface's (the device gets
    /// `overhead` less); nil: the interface's.
    public var mtu: Int?

    public static let defaultListenPort: UInt16 = 51820
    public static let defaultListenPortV6: UInt16 = 51821
    /// flannel's wireguard overhead constant: an IPv6 header (40) leaves
    /// room for either family, UDP (8), WireGuard's type, index and counter
    /// (16) and the tag (16).
    public static let overhead = 80
    /// The lowest MTU to count from: the device must carry a 68-byte packet.
    public static let lowestMTU = 68 + overhead

    public init(
        listenPort: UInt16 = defaultListenPort,
        listenPortV6: UInt16 = defaultListenPortV6,
        psk: String? = nil,
        persistentKeepaliveInterval: Int = 0,
        mode: Mode = .separate,
        mtu: Int? = nil
    ) {
        self.listenPort = listenPort
        self.listenPortV6 = listenPortV6
        self.psk = psk
        self.persistentKeepaliveInterval = persistentKeepaliveInterval
        self.mode = mode
        self.mtu = mtu
    }

    /// Reads and checks the keys of a `Backend` object of type wireguard.
    init(_ backend: JSONValue) throws(NetworkConfigError) {
        self.init()
        for (name, defaultPort) in [("ListenPort", Self.defaultListenPort), ("ListenPortV6", Self.defaultListenPortV6)]
        {
            let port = try NetworkConfig.wholeNumber(
                backend,
                name,
                prefix: "Backend.",
                range: 1...65535,
                expected: "a UDP port 1…65535 (default \(defaultPort))"
            )
            guard let port else { continue }
            if name == "ListenPort" { listenPort = UInt16(port) } else { listenPortV6 = UInt16(port) }
        }
        if let value = NetworkConfig.present(backend.field("PSK")) {
            guard case .string(let text) = value, !text.isEmpty else {
                throw .invalidValue(
                    field: "Backend.PSK",
                    value: value.compactText,
                    expected: "a pre-shared key as `wg genpsk` prints it (base64 of 32 bytes), or leave PSK out"
                )
            }
            guard let bytes = Data(base64Encoded: text), bytes.count == 32 else {
                // The key is a secret: say how long it is, not what it is.
                throw .invalidValue(
                    field: "Backend.PSK",
                    value: "(\(text.count) characters, not base64 of 32 bytes)",
                    expected: "a pre-shared key as `wg genpsk` prints it (44 characters of base64), or leave PSK out"
                )
            }
            psk = text
        }
        persistentKeepaliveInterval =
            try NetworkConfig.wholeNumber(
                backend,
                "PersistentKeepaliveInterval",
                prefix: "Backend.",
                range: 0...65535,
                expected: "a whole number of seconds 0…65535 (0, the default: no keepalives)"
            ) ?? 0
        if let value = NetworkConfig.present(backend.field("Mode")) {
            let names = Mode.allCases.map(\.rawValue).joined(separator: ", ")
            guard case .string(let text) = value, let mode = Mode(rawValue: text) else {
                throw .invalidValue(field: "Backend.Mode", value: value.compactText, expected: "one of \(names)")
            }
            self.mode = mode
        }
        mtu = try NetworkConfig.wholeNumber(
            backend,
            "MTU",
            prefix: "Backend.",
            range: Self.lowestMTU...65535,
            expected: "a whole number \(Self.lowestMTU)…65535, the MTU of the path between hosts "
                + "(the wireguard device gets \(Self.overhead) less), or leave it out for the interface's MTU"
        )
    }

    /// The device's MTU on an interface of `interfaceMTU`.
    public func deviceMTU(interfaceMTU: Int) -> Int { (mtu ?? interfaceMTU) - Self.overhead }
}
