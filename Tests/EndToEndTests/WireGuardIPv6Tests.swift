import Foundation
import Testing

/// The wireguard backend with IPv6, laid out as flanneld lays it out by
/// `Mode`: two tunneld hosts in a dual-stack network (separate: flannel-wg
/// and flannel-wg-v6 on ListenPortV6 over the IPv6 underlay; auto: both
/// families on flannel-wg), and an IPv6-only network over the IPv6 underlay
/// (fd18::/64 inside the lab's namespaces).
extension WireGuardBackendTests {
    static func dualStackConfig(mode: String?) -> String {
        let mode = mode.map { #","Mode":"\#($0)""# } ?? ""
        return
            #"{"Network":"10.2.0.0/16","SubnetLen":24,"EnableIPv6":true,"IPv6Network":"fd00:10:2::/48","Backend":{"Type":"wireguard"\#(mode)}}"#
    }

    static let ipv6OnlyConfig =
        #"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:2::/48","Backend":{"Type":"wireguard"}}"#

    /// The stored lease of host N under flanneld's key.
    func leaseValue(_ lab: Lab, _ n: Int, ipv4: Bool) throws -> String {
        let v6 = try LabLease6(lab, host: n).subnet.replacingOccurrences(of: "/", with: "-")
        let v4 = ipv4 ? try subnet(lab, n).replacingOccurrences(of: "/", with: "-") : "0.0.0.0-0"
        return try #require(try lab.etcdValue("/docker/network/subnets/\(v4)&\(v6)"))
    }

    /// The daemons stopped: what they counted, without a drop, and the devices gone.
    func expectCleanStop(_ lab: Lab, devices: [String]) throws {
        try lab.lab("stop", "h1")
        try lab.lab("stop", "h2")
        for n in [1, 2] {
            let log = lab.log("h\(n)")
            #expect(log.contains("wg_packets_opened="), "\(log)")
            // The kernel's MLD reports (to ff02::16) have no peer and are counted apart; nothing else drops.
            let stopped = log.split(separator: "\n").filter { $0.contains("WireGuard data path stopped") }
            #expect(stopped.count == 1, "\(log)")
            let drops = stopped.joined().split(separator: " ").filter { $0.hasPrefix("wg_dropped_") }
            #expect(drops.allSatisfy { $0.hasPrefix("wg_dropped_multicast=") }, "\(drops)")
            for device in devices { #expect(log.contains("removed device \(device)"), "\(log)") }
        }
    }

    @Test func modeSeparateCarriesIPv6OnFlannelWgV6OverTheIPv6Underlay() throws {
        try withLab(config: Self.dualStackConfig(mode: nil)) { lab in
            try addTunneld(lab, 1, ipv6: true)
            try addTunneld(lab, 2, ipv6: true)
            let v6 = [try LabLease6(lab, host: 1), try LabLease6(lab, host: 2)]
            let subnet2 = try subnet(lab, 2)
            let key1 = try publicKey(ofKeyFile: keyFile(lab, 1))

            // flanneld's dual-stack lease: the one key in BackendData and BackendV6Data.
            #expect(
                try leaseValue(lab, 1, ipv4: true)
                    == #"{"PublicIP":"198.18.0.1","PublicIPv6":"fd18::1","BackendType":"wireguard","BackendData":{"PublicKey":"\#(key1)"},"BackendV6Data":{"PublicKey":"\#(key1)"}}"#
            )
            // flannel-wg-v6: the IPv6 subnet's address /128, the IPv6 network's route;
            // flannel-wg keeps IPv4 only.
            let addresses = try lab.hostOutput(1, ["ip", "-6", "addr", "show", "dev", "flannel-wg-v6"])
            #expect(addresses.contains("inet6 \(v6[0].base)/128"), "\(addresses)")
            let route6 = try lab.hostOutput(1, ["ip", "-6", "route", "show", "fd00:10:2::/48"])
            #expect(route6.contains("dev flannel-wg-v6"), "\(route6)")
            let route = try lab.hostOutput(1, ["ip", "route", "show", "10.2.0.0/16"])
            #expect(route.contains("dev flannel-wg "), "\(route)")
            #expect(try lab.hostOutput(1, ["ip", "link", "show", "flannel-wg-v6"]).contains("mtu 1420"))
            // Two sockets, as flanneld's two devices: 51820 on IPv4, 51821 on IPv6.
            let sockets = try lab.hostOutput(1, ["ss", "-ulnH"])
            #expect(sockets.contains("0.0.0.0:51820") && sockets.contains("[::]:51821"), "\(sockets)")

            let subnet1 = try subnet(lab, 1)
            // Each host has the other's peers before the first packet (none is dropped for want of one).
            #expect(
                lab.waitForLog("h1", containing: "peer \(v6[1].subnet) → [fd18::2]:51821"),
                "\(lab.log("h1"))"
            )
            #expect(lab.waitForLog("h1", containing: "peer \(subnet2) → 198.18.0.2:51820"), "\(lab.log("h1"))")
            #expect(lab.waitForLog("h2", containing: "peer \(v6[0].subnet) → [fd18::1]:51821"), "\(lab.log("h2"))")
            #expect(lab.waitForLog("h2", containing: "peer \(subnet1) → 198.18.0.1:51820"), "\(lab.log("h2"))")
            for (from, to) in [(1, 2), (2, 1)] {
                let ping = try lab.ping(from: from, to: to)
                #expect(ping.succeeded, "\(ping.output)")
                let ping6 = try lab.ping6(from: from, to: to)
                #expect(ping6.succeeded, "\(ping6.output)")
            }
            try transfer(lab, from: 1, to: 2, bytes: 20 << 20, ipv6: true)
            try transfer(lab, from: 2, to: 1, bytes: 20 << 20, ipv6: true)

            // Two tunnels in `tunneld status`: one per device, the IPv6 one at [fd18::2]:51821.
            let socket = lab.directory.appendingPathComponent("h1.sock").path
            let status = try lab.exec("h1", [tunneldBinary, "status", "--control-socket", socket]).output
            #expect(status.contains("tunnels: 2"), "\(status)")
            let line6 = status.split(separator: "\n").first { $0.contains(v6[1].subnet) }.map(String.init) ?? ""
            #expect(line6.contains("[fd18::2]:51821") && line6.contains("MiB received"), "\(status)")
            try expectCleanStop(lab, devices: ["flannel-wg", "flannel-wg-v6"])
        }
    }

    @Test func modeAutoCarriesBothFamiliesOnFlannelWg() throws {
        try withLab(config: Self.dualStackConfig(mode: "auto")) { lab in
            try addTunneld(lab, 1, ipv6: true)
            try addTunneld(lab, 2, ipv6: true)
            let v6 = [try LabLease6(lab, host: 1), try LabLease6(lab, host: 2)]
            let subnet1 = try subnet(lab, 1), subnet2 = try subnet(lab, 2)
            // One device with both addresses and both routes; no flannel-wg-v6.
            let addresses = try lab.hostOutput(1, ["ip", "addr", "show", "dev", "flannel-wg"])
            #expect(
                addresses.contains("inet \(subnet1.replacingOccurrences(of: ".0/24", with: ".0/32"))"),
                "\(addresses)"
            )
            #expect(addresses.contains("inet6 \(v6[0].base)/128"), "\(addresses)")
            let route6 = try lab.hostOutput(1, ["ip", "-6", "route", "show", "fd00:10:2::/48"])
            #expect(route6.contains("dev flannel-wg "), "\(route6)")
            #expect(!(try lab.hostOutput(1, ["ip", "link"]).contains("flannel-wg-v6")))
            // One peer with both subnets; 198.18.0.2 is not private, so auto takes IPv4 as flanneld does.
            #expect(
                lab.waitForLog("h1", containing: "peer \(subnet2) and \(v6[1].subnet) → 198.18.0.2:51820"),
                "\(lab.log("h1"))"
            )
            #expect(
                lab.waitForLog("h2", containing: "peer \(subnet1) and \(v6[0].subnet) → 198.18.0.1:51820"),
                "\(lab.log("h2"))"
            )
            for (from, to) in [(1, 2), (2, 1)] {
                let ping = try lab.ping(from: from, to: to)
                #expect(ping.succeeded, "\(ping.output)")
                let ping6 = try lab.ping6(from: from, to: to)
                #expect(ping6.succeeded, "\(ping6.output)")
            }
            try transfer(lab, from: 1, to: 2, bytes: 20 << 20, ipv6: true)
            try transfer(lab, from: 2, to: 1, megabytes: 5)
            try expectCleanStop(lab, devices: ["flannel-wg"])
        }
    }

    @Test func modeIPv6CarriesBothFamiliesOverTheIPv6Underlay() throws {
        try withLab(config: Self.dualStackConfig(mode: "ipv6")) { lab in
            try addTunneld(lab, 1, ipv6: true)
            try addTunneld(lab, 2, ipv6: true)
            let v6 = [try LabLease6(lab, host: 1), try LabLease6(lab, host: 2)]
            let subnet1 = try subnet(lab, 1), subnet2 = try subnet(lab, 2)
            #expect(
                lab.waitForLog("h1", containing: "peer \(subnet2) and \(v6[1].subnet) → [fd18::2]:51820"),
                "\(lab.log("h1"))"
            )
            #expect(
                lab.waitForLog("h2", containing: "peer \(subnet1) and \(v6[0].subnet) → [fd18::1]:51820"),
                "\(lab.log("h2"))"
            )
            let sockets = try lab.hostOutput(1, ["ss", "-ulnH"])
            #expect(sockets.contains("[::]:51820") && !sockets.contains("0.0.0.0:51820"), "\(sockets)")
            for (from, to) in [(1, 2), (2, 1)] {
                let ping = try lab.ping(from: from, to: to)
                #expect(ping.succeeded, "\(ping.output)")
                let ping6 = try lab.ping6(from: from, to: to)
                #expect(ping6.succeeded, "\(ping6.output)")
            }
            try transfer(lab, from: 1, to: 2, megabytes: 5)
            try expectCleanStop(lab, devices: ["flannel-wg"])
        }
    }

    @Test func anIPv6OnlyNetworkRunsOnFlannelWgV6OverTheIPv6Underlay() throws {
        try withLab(config: Self.ipv6OnlyConfig) { lab in
            try addTunneld(lab, 1, ipv6: true)
            try addTunneld(lab, 2, ipv6: true)
            let v6 = [try LabLease6(lab, host: 1), try LabLease6(lab, host: 2)]
            let key1 = try publicKey(ofKeyFile: keyFile(lab, 1))
            // flanneld's IPv6-only lease: BackendV6Data only.
            #expect(
                try leaseValue(lab, 1, ipv4: false)
                    == #"{"PublicIP":"198.18.0.1","PublicIPv6":"fd18::1","BackendType":"wireguard","BackendV6Data":{"PublicKey":"\#(key1)"}}"#
            )
            // flannel-wg-v6 alone, IPv6 only; no IPv4 socket, no IPv4 address or route.
            let links = try lab.hostOutput(1, ["ip", "link"])
            #expect(links.contains("flannel-wg-v6") && !links.contains("flannel-wg:"), "\(links)")
            let v4 = try lab.hostOutput(1, ["ip", "-4", "addr", "show", "dev", "flannel-wg-v6"])
            #expect(!v4.contains("inet "), "\(v4)")
            let sockets = try lab.hostOutput(1, ["ss", "-ulnH"])
            #expect(sockets.contains("[::]:51821") && !sockets.contains(":51820"), "\(sockets)")
            #expect(
                lab.waitForLog("h1", containing: "peer \(v6[1].subnet) → [fd18::2]:51821"),
                "\(lab.log("h1"))"
            )
            #expect(lab.waitForLog("h2", containing: "peer \(v6[0].subnet) → [fd18::1]:51821"), "\(lab.log("h2"))")
            for (from, to) in [(1, 2), (2, 1)] {
                let ping6 = try lab.ping6(from: from, to: to)
                #expect(ping6.succeeded, "\(ping6.output)")
            }
            try transfer(lab, from: 1, to: 2, bytes: 20 << 20, ipv6: true)
            try transfer(lab, from: 2, to: 1, bytes: 5 << 20, ipv6: true)
            try expectCleanStop(lab, devices: ["flannel-wg-v6"])
        }
    }
}
