import CTunnel
import Foundation
import Glibc
import NetBase
import NetTestSupport
import Netlink
import Testing
import TunDevice

@Suite struct TunDeviceNameTests {
    @Test(arguments: ["", "a-name-of-16-byte", "a/b", "tun 0", ".."])
    func badNamesAreRefusedBeforeTouchingTheKernel(_ name: String) {
        let error = #expect(throws: SystemError.self) { try TunDevice.create(name: name) }
        #expect(error?.errno == .invalid)
        #expect(error?.hint?.contains("1 to 15 bytes") == true)
    }
}

@Suite(.enabled(if: !isRoot, "runs only without root: checks the hint for missing privileges"))
struct TunDeviceWithoutPrivilegeTests {
    @Test func creatingWithoutPrivilegeSaysWhatIsNeeded() {
        let error = #expect(throws: SystemError.self) { try TunDevice.create(name: "tdtest0") }
        #expect(error?.errno == .accessDenied || error?.errno == .notPermitted)
        #expect(error?.description.contains("(run as root or grant CAP_NET_ADMIN)") == true)
    }
}

/// Every test creates its TUN device inside a namespace of its own.
@Suite(.enabled(if: isRoot, needsRootMessage))
struct TunDeviceTests {
    let network = IPv4Network("10.2.0.0/16")!
    let leaseBase = IPv4Address("10.2.72.0")!

    @Test func aDeviceIsConfiguredLikeFlannel0() throws {
        try withNamespace { ns in
            let socket = try ns.socket()
            let tun = try TunDevice.create(name: "flannel0", namespacePath: ns.path)
            defer { tun.close() }
            #expect(tun.name == "flannel0")
            #expect(tun.fd.isOpen)
            try tun.configure(address: leaseBase, mtu: 1472, routes: [network], using: socket)

            let link = try ns.ip("-d", "-o", "link", "show", "flannel0")
            #expect(link.contains("mtu 1472"))
            #expect(linkFlags(link).contains("UP"))
            #expect(link.contains("tun type tun pi off vnet_hdr off persist off"))
            #expect(!link.contains("multi_queue"))
            #expect(
                try ns.ip("-o", "-4", "addr", "show", "dev", "flannel0").contains(
                    "inet 10.2.72.0/32 scope global flannel0"
                )
            )
            #expect(try ns.ip("-4", "route", "show").contains("10.2.0.0/16 dev flannel0 scope link"))

            let index = try socket.linkIndex(named: "flannel0")
            let seen = try #require(try socket.links().first { $0.index == index })
            #expect(seen.kind == "tun")
            #expect(seen.isUp && seen.mtu == 1472)
            #expect(
                try socket.addresses().contains(
                    InterfaceAddress(index: index, address: leaseBase, prefixLength: 32, label: "flannel0")
                )
            )
            #expect(try socket.routes().contains(Route(destination: network, outputIndex: index)))
            #expect(tun.routes == [Route(destination: network, outputIndex: index)])
        }
    }

    @Test func configuringTwiceIsFine() throws {
        try withNamespace { ns in
            let socket = try ns.socket()
            let tun = try TunDevice.create(name: "flannel0", namespacePath: ns.path)
            defer { tun.close() }
            try tun.configure(address: leaseBase, mtu: 1472, routes: [network], using: socket)
            try tun.configure(address: leaseBase, mtu: 1472, routes: [network], using: socket)
            #expect(try ns.ip("-o", "-4", "addr", "show", "dev", "flannel0").split(separator: "\n").count == 1)
            #expect(tun.routes.count == 1)
        }
    }

    @Test func closingTheLastQueueRemovesTheDeviceAndItsRoutes() throws {
        try withNamespace { ns in
            let socket = try ns.socket()
            let tun = try TunDevice.create(name: "flannel0", namespacePath: ns.path)
            try tun.configure(address: leaseBase, mtu: 1472, routes: [network], using: socket)
            tun.close()
            #expect(!tun.fd.isOpen)
            #expect(throws: CommandFailed.self) { try ns.ip("link", "show", "flannel0") }
            #expect(try !socket.routes().contains { $0.destination == network })
            #expect(throws: SystemError.self) { try socket.linkIndex(named: "flannel0") }
        }
    }

    @Test func removeRoutesTakesAwayOnlyTheDevicesRoutes() throws {
        try withNamespace { ns in
            let socket = try ns.socket()
            let tun = try TunDevice.create(name: "flannel0", namespacePath: ns.path)
            defer { tun.close() }
            try tun.configure(
                address: leaseBase,
                mtu: 1472,
                routes: [network, IPv4Network("10.9.0.0/16")!],
                using: socket
            )
            try ns.ip("route", "add", "10.3.0.0/16", "dev", "flannel0")
            try tun.removeRoutes(using: socket)
            try tun.removeRoutes(using: socket)
            let routes = try ns.ip("-4", "route", "show")
            #expect(!routes.contains("10.2.0.0/16"))
            #expect(!routes.contains("10.9.0.0/16"))
            #expect(routes.contains("10.3.0.0/16 dev flannel0"))
            #expect(tun.routes.isEmpty)
        }
    }

    /// IFF_NO_PI: what the TUN reads is the IPv4 packet itself, nothing before it.
    @Test func aPacketRoutedIntoTheDeviceIsReadAsABareIPv4Packet() throws {
        try withNamespace { ns in
            let socket = try ns.socket()
            let tun = try TunDevice.create(name: "flannel0", namespacePath: ns.path)
            defer { tun.close() }
            try tun.configure(address: leaseBase, mtu: 1472, routes: [network], using: socket)

            let payload = Array("hello through the tunnel".utf8)
            try NetworkNamespace.run(inNamespaceAt: ns.path) {
                let udp = Glibc.socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
                guard udp >= 0 else { throw SystemError("socket", on: "udp", errno: .current) }
                defer { close(udp) }
                var to = sockaddr_in()
                to.sin_family = sa_family_t(AF_INET)
                to.sin_port = UInt16(9999).bigEndian
                to.sin_addr.s_addr = IPv4Address("10.2.5.5")!.networkOrder
                let sent = withUnsafePointer(to: &to) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                        sendto(udp, payload, payload.count, 0, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                    }
                }
                guard sent == payload.count else { throw SystemError("sendto", on: "10.2.5.5:9999", errno: .current) }
            }

            // Other packets (IPv6 router solicitations and the like) may come first.
            var packet: [UInt8]?
            for _ in 0..<20 where packet == nil {
                var poller = pollfd(fd: tun.fd.rawValue, events: Int16(POLLIN), revents: 0)
                guard poll(&poller, 1, 2000) == 1 else { break }
                var buffer = [UInt8](repeating: 0, count: 2048)
                let n = read(tun.fd.rawValue, &buffer, buffer.count)
                guard n > 0 else { continue }
                let candidate = Array(buffer[..<n])
                if candidate.count >= 20, candidate[0] >> 4 == 4, Array(candidate[16..<20]) == [10, 2, 5, 5] {
                    packet = candidate
                }
            }
            let ip = try #require(packet)
            #expect(ip[0] == 0x45)
            #expect(ip[9] == 17)  // UDP
            #expect(Array(ip[12..<16]) == [10, 2, 72, 0])  // the TUN's address is the source
            #expect(Array(ip[(20 + 8)...]) == payload)
        }
    }

    @Test func aDeviceInUseIsReportedAsSuch() throws {
        try withNamespace { ns in
            let tun = try TunDevice.create(name: "flannel0", namespacePath: ns.path)
            defer { tun.close() }
            let error = #expect(throws: SystemError.self) {
                try TunDevice.create(name: "flannel0", namespacePath: ns.path)
            }
            #expect(error?.errno == .busy)
            #expect(error?.description.hasPrefix("TUNSETIFF on flannel0 failed") == true)
            #expect(error?.hint?.contains("in use by another process") == true)
        }
    }

    @Test func aNameTakenByAnotherKindOfDeviceIsReported() throws {
        try withNamespace { ns in
            try ns.ip("link", "add", "flannel0", "type", "veth", "peer", "name", "peer0")
            let error = #expect(throws: SystemError.self) {
                try TunDevice.create(name: "flannel0", namespacePath: ns.path)
            }
            #expect(error?.errno == .invalid)
            #expect(error?.hint?.contains("ip link del flannel0") == true)
        }
    }

    @Test func aMultiQueueDeviceGetsOneDescriptorPerQueue() throws {
        try withNamespace { ns in
            let tun = try TunDevice.create(name: "flannel0", multiQueue: true, namespacePath: ns.path)
            defer { tun.close() }
            let second = try tun.addQueue()
            let third = try tun.addQueue()
            #expect(Set(tun.queues.map(\.rawValue)).count == 3)
            #expect(second.isOpen && third.isOpen)
            #expect(try ns.ip("-d", "-o", "link", "show", "flannel0").contains("multi_queue numqueues 3"))
            // The device lives while any queue is open.
            tun.fd.close()
            #expect(try ns.ip("-o", "link", "show", "flannel0").contains("flannel0"))
        }
    }

    @Test func aSingleQueueDeviceRefusesMoreQueues() throws {
        try withNamespace { ns in
            let tun = try TunDevice.create(name: "flannel0", namespacePath: ns.path)
            defer { tun.close() }
            let error = #expect(throws: SystemError.self) { try tun.addQueue() }
            #expect(error?.hint?.contains("multiQueue: true") == true)
        }
    }

    @Test func offloadsAreAcceptedWithVirtioHeadersAndUnknownOnesRefused() throws {
        try withNamespace { ns in
            let tun = try TunDevice.create(name: "flannel0", vnetHeader: true, namespacePath: ns.path)
            defer { tun.close() }
            #expect(try ns.ip("-d", "-o", "link", "show", "flannel0").contains("vnet_hdr on"))
            try tun.setOffload(ctunnel_TUN_F_CSUM | ctunnel_TUN_F_TSO4 | ctunnel_TUN_F_TSO6)
            let error = #expect(throws: SystemError.self) { try tun.setOffload(0x8000_0000) }
            #expect(error?.errno == .invalid)
            #expect(error?.operation == "TUNSETOFFLOAD 0x80000000")
        }
    }

    @Test func aDeviceCreatedInANamespaceStaysOutOfTheHost() throws {
        try withNamespace { ns in
            let tun = try TunDevice.create(name: "tdtest\(getpid() % 100_000)", namespacePath: ns.path)
            defer { tun.close() }
            #expect(try ns.ip("-o", "link").contains(tun.name))
            #expect(try !command(["ip", "-o", "link"]).contains(tun.name))
        }
    }
}
