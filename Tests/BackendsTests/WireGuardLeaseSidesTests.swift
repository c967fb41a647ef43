import Foundation
import LeaseStore
import NetBase
import NetTestSupport
import PeerControl
import Testing
import WireGuard

@testable import Backends

/// A wireguard lease as flanneld writes it: `key` in BackendData (the IPv4
/// side), `key6` in BackendV6Data (the IPv6 side); a dual-stack key when
/// `ipv6Subnet` is given, else a plain one (a host without IPv6).
func wireguardLease(
    _ subnet: String,
    _ ipv6Subnet: String?,
    _ publicIP: String,
    publicIPv6: String?,
    key: PublicKey?,
    key6: PublicKey?
) -> Lease {
    dualLease(
        subnet,
        ipv6Subnet,
        publicIP,
        publicIPv6: publicIPv6,
        type: "wireguard",
        data: key.map { .object(["PublicKey": .string($0.base64)]) },
        data6: key6.map { .object(["PublicKey": .string($0.base64)]) }
    )
}

/// Mode separate in a dual-stack network takes each side of a peer's lease
/// on its own, as flanneld's handleSubnetEvents does (per family: EnableIPv4
/// with BackendData's key on flannel-wg, EnableIPv6 — the key has an IPv6
/// subnet — with BackendV6Data's on flannel-wg-v6).
extension DualStackBackendsTests {
    /// The subnets of the peers each device's engine holds.
    func peerSubnets(_ backend: WireGuardBackend) -> [[String]] {
        backend.tunnels.map { $0.engine.tunnels(now: WireGuardClock.now(), wallNow: Date()).map(\.subnet) }
    }

    @Test func modeSeparatePeersEachSideOfALeaseOnItsOwnAsFlanneldDoes() throws {
        try withDualUnderlay(
            { _, host in
                var host = host
                let capture = LogCapture()
                host.logger = capture.logger
                let keyFile = FileManager.default.temporaryDirectory
                    .appendingPathComponent("tunneld-wgkey-\(UUID().uuidString)").path
                defer { unlink(keyFile) }
                let backend = try WireGuardBackend(host: host, keyFile: keyFile)
                #expect(backend.deviceNames == ["flannel-wg", "flannel-wg-v6"])
                // One key per host: a key seen under another subnet means that host moved.
                let keys = (5...9).map { _ in PrivateKey.generate().publicKey }

                // An IPv4-only host (e.g. flanneld before EnableIPv6): a plain key, BackendData alone.
                let ipv4Only = wireguardLease(
                    "10.2.5.0/24",
                    nil,
                    "198.18.0.5",
                    publicIPv6: nil,
                    key: keys[0],
                    key6: nil
                )
                // Dual-stack leases missing one side's key.
                let noKey6 = wireguardLease(
                    "10.2.6.0/24",
                    "fd00:10:2:6::/64",
                    "198.18.0.6",
                    publicIPv6: "fd18::6",
                    key: keys[1],
                    key6: nil
                )
                let noKey4 = wireguardLease(
                    "10.2.7.0/24",
                    "fd00:10:2:7::/64",
                    "198.18.0.7",
                    publicIPv6: "fd18::7",
                    key: nil,
                    key6: keys[2]
                )
                // An IPv6 side without a PublicIPv6 to send to.
                let noAddress6 = wireguardLease(
                    "10.2.8.0/24",
                    "fd00:10:2:8::/64",
                    "198.18.0.8",
                    publicIPv6: nil,
                    key: keys[3],
                    key6: keys[3]
                )
                let neither = wireguardLease(
                    "10.2.9.0/24",
                    "fd00:10:2:9::/64",
                    "198.18.0.9",
                    publicIPv6: "fd18::9",
                    key: nil,
                    key6: nil
                )
                // Only a lease no device can use is refused (PeerSync logs it once).
                for lease in [ipv4Only, noKey6, noKey4, noAddress6] {
                    #expect(backend.unusableReason(lease) == nil, "\(lease)")
                }
                let refused = try #require(backend.unusableReason(neither))
                #expect(
                    refused.contains("no BackendData.PublicKey") && refused.contains("no BackendV6Data.PublicKey"),
                    "\(refused)"
                )

                backend.apply([.added(ipv4Only), .added(noKey6), .added(noKey4), .added(noAddress6)])
                #expect(
                    peerSubnets(backend) == [["10.2.5.0/24", "10.2.6.0/24", "10.2.8.0/24"], ["fd00:10:2:7::/64"]]
                )
                // One line per left-out side, naming the lease and what it lacks.
                #expect(
                    capture.count(
                        containing:
                            "peer 10.2.6.0/24 (198.18.0.6): its lease has no BackendV6Data.PublicKey (a wireguard lease carries {\"PublicKey\":\"…\"} there); no peer for fd00:10:2:6::/64 on flannel-wg-v6 (its IPv4 side is set up on its own"
                    ) == 1,
                    "\(capture.all)"
                )
                #expect(
                    capture.count(
                        containing:
                            "peer 10.2.7.0/24 (198.18.0.7): its lease has no BackendData.PublicKey (a wireguard lease carries {\"PublicKey\":\"…\"} there); no peer for 10.2.7.0/24 on flannel-wg (its IPv6 side is set up on its own"
                    ) == 1,
                    "\(capture.all)"
                )
                #expect(
                    capture.count(
                        containing:
                            "peer 10.2.8.0/24 (198.18.0.8): its lease has no public address for flannel-wg-v6's underlay (PublicIPv6)"
                    ) == 1,
                    "\(capture.all)"
                )
                #expect(
                    capture.count(
                        containing:
                            "peer 10.2.5.0/24 → 198.18.0.5:51820, key \(keys[0]) on flannel-wg; its lease (10.2.5.0-24) has no IPv6 subnet: IPv4 only"
                    ) == 1,
                    "\(capture.all)"
                )
                #expect(capture.count(containing: "→ [fd18::7]:51821, key \(keys[2]) on flannel-wg-v6") == 1)
                #expect(capture.count(containing: "10.2.6.0/24 → 198.18.0.6:51820") == 1, "\(capture.all)")
                #expect(capture.count(containing: "10.2.6.0/24 and") == 0, "\(capture.all)")

                // The missing key arrives: the IPv6 side is peered; it goes again: so does the peer.
                let both = wireguardLease(
                    "10.2.6.0/24",
                    "fd00:10:2:6::/64",
                    "198.18.0.6",
                    publicIPv6: "fd18::6",
                    key: keys[1],
                    key6: keys[1]
                )
                backend.apply([.updated(old: noKey6, new: both)])
                #expect(peerSubnets(backend)[1] == ["fd00:10:2:6::/64", "fd00:10:2:7::/64"])
                backend.apply([.updated(old: both, new: noKey6)])
                #expect(peerSubnets(backend) == [["10.2.5.0/24", "10.2.6.0/24", "10.2.8.0/24"], ["fd00:10:2:7::/64"]])
                #expect(capture.count(containing: "peer 10.2.6.0/24 (198.18.0.6): its lease has no BackendV6Data") == 2)

                backend.apply([.removed(ipv4Only), .removed(noKey6), .removed(noKey4), .removed(noAddress6)])
                #expect(peerSubnets(backend) == [[], []])
            },
            backend: "wireguard"
        )
    }
}
