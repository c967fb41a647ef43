import Foundation
import NetBase
import NetTestSupport
import Netlink
import Testing

@Suite(.enabled(if: isRoot, needsRootMessage))
struct InterfaceLookupTests {
    /// eth0 (198.18.0.1/24 and 198.18.0.5/24, default route) and eth1 (no IPv4 address).
    @discardableResult
    func withUnderlay<T>(_ body: (TestNamespace, RouteSocket) throws -> T) throws -> T {
        try withNamespace { ns in
            try ns.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
            try ns.ip("addr", "add", "198.18.0.1/24", "dev", "eth0")
            try ns.ip("addr", "add", "198.18.0.5/24", "dev", "eth0")
            try ns.ip("link", "set", "eth0", "mtu", "1400", "up")
            try ns.ip("link", "set", "eth1", "up")
            return try body(ns, try ns.socket())
        }
    }

    @Test func anInterfaceIsFoundByNameWithItsFirstAddress() throws {
        try withUnderlay { _, socket in
            let (interface, address) = try InterfaceLookup.find(nameOrAddress: "eth0", using: socket)
            #expect(interface.name == "eth0")
            #expect(interface.index == (try socket.linkIndex(named: "eth0")))
            #expect(interface.mtu == 1400)
            #expect(interface.addresses == [IPv4Address("198.18.0.1")!, IPv4Address("198.18.0.5")!])
            #expect(address == IPv4Address("198.18.0.1"))
        }
    }

    @Test func anInterfaceIsFoundByAnyOfItsAddresses() throws {
        try withUnderlay { _, socket in
            let (interface, address) = try InterfaceLookup.find(nameOrAddress: "198.18.0.5", using: socket)
            #expect(interface.name == "eth0")
            #expect(address == IPv4Address("198.18.0.5"))
        }
    }

    @Test func anUnknownNameListsTheInterfacesThereAre() throws {
        try withUnderlay { _, socket in
            let error = #expect(throws: SystemError.self) {
                try InterfaceLookup.find(nameOrAddress: "eth9", using: socket)
            }
            #expect(error?.errno == .noSuchDevice)
            let hint = try #require(error?.hint)
            #expect(hint.hasPrefix("no interface named eth9 or with address eth9; available: lo, "))
            #expect(hint.contains("eth0 (198.18.0.1, 198.18.0.5)"))
            #expect(hint.contains("eth1"))
        }
    }

    @Test func anUnknownAddressListsTheInterfacesThereAre() throws {
        try withUnderlay { _, socket in
            let error = #expect(throws: SystemError.self) {
                try InterfaceLookup.find(nameOrAddress: "198.18.9.9", using: socket)
            }
            #expect(error?.errno == Errno(EADDRNOTAVAIL))
            #expect(error?.hint?.hasPrefix("no interface has address 198.18.9.9; available: lo, ") == true)
            #expect(error?.hint?.contains("eth0 (198.18.0.1, 198.18.0.5)") == true)
        }
    }

    @Test func anInterfaceWithoutIPv4AddressIsAnErrorThatSaysSo() throws {
        try withUnderlay { _, socket in
            let error = #expect(throws: SystemError.self) {
                try InterfaceLookup.find(nameOrAddress: "eth1", using: socket)
            }
            #expect(error?.object == "eth1")
            #expect(error?.hint?.contains("eth1 has no IPv4 address") == true)
        }
    }

    @Test func anEmptyNameIsRefused() throws {
        try withUnderlay { _, socket in
            #expect(throws: SystemError.self) { try InterfaceLookup.find(nameOrAddress: "  ", using: socket) }
        }
    }

    @Test func theDefaultInterfaceIsTheDefaultRoutesDevice() throws {
        try withUnderlay { ns, socket in
            let missing = #expect(throws: SystemError.self) { try InterfaceLookup.defaultInterface(using: socket) }
            #expect(missing?.hint?.contains("no IPv4 default route") == true)

            try ns.ip("route", "add", "default", "via", "198.18.0.254", "dev", "eth0")
            var (interface, address) = try InterfaceLookup.defaultInterface(using: socket)
            #expect(interface.name == "eth0")
            #expect(address == IPv4Address("198.18.0.1"))

            // A preferred source on the route wins over the first address.
            try ns.ip("route", "replace", "default", "via", "198.18.0.254", "dev", "eth0", "src", "198.18.0.5")
            (interface, address) = try InterfaceLookup.defaultInterface(using: socket)
            #expect(address == IPv4Address("198.18.0.5"))
        }
    }
}

/// The IPv6 address flanneld would pick on an interface (pkg/ip
/// GetInterfaceIP6Addrs), minus its link-local fallback.
@Suite struct PreferredIPv6Tests {
    func address(_ text: String, flags: UInt32 = 0) -> InterfaceIPv6Address {
        InterfaceIPv6Address(index: 2, address: IPv6Address(text)!, prefixLength: 64, flags: flags)
    }

    @Test func permanentGlobalWinsOverAutoconfiguredTemporaryAndLinkLocal() {
        let permanent = InterfaceIPv6Address.permanent
        let chosen = InterfaceLookup.preferredIPv6([
            address("fe80::1", flags: permanent),
            address("2001:db8::aaaa", flags: InterfaceIPv6Address.temporary),
            address("2001:db8::bbbb"),
            address("2001:db8::cccc", flags: permanent),
        ])
        #expect(chosen == IPv6Address("2001:db8::cccc"))
        #expect(
            InterfaceLookup.preferredIPv6([
                address("2001:db8::aaaa", flags: InterfaceIPv6Address.temporary),
                address("2001:db8::bbbb"),
            ]) == IPv6Address("2001:db8::bbbb")
        )
    }

    @Test func deprecatedLinkLocalAndLoopbackAreNeverChosen() {
        #expect(
            InterfaceLookup.preferredIPv6([
                address("2001:db8::1", flags: InterfaceIPv6Address.deprecated | InterfaceIPv6Address.permanent),
                address("fe80::1"), address("::1"),
            ]) == nil
        )
        // Ties keep the kernel's order.
        #expect(InterfaceLookup.preferredIPv6([address("fd00::2"), address("fd00::1")]) == IPv6Address("fd00::2"))
    }
}

@Suite(.enabled(if: isRoot, needsRootMessage))
struct InterfaceIPv6LookupTests {
    @Test func theInterfacesGlobalNonDeprecatedIPv6AddressIsFound() throws {
        try withNamespace { ns in
            try ns.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
            try ns.ip("link", "set", "eth0", "up")
            try ns.ip("link", "set", "eth1", "up")
            // Deprecated (preferred lifetime 0) first: passed over.
            try ns.ip("-6", "addr", "add", "2001:db8::9/64", "dev", "eth0", "nodad", "preferred_lft", "0")
            try ns.ip("-6", "addr", "add", "2001:db8::5/64", "dev", "eth0", "nodad")
            try ns.ip("-6", "addr", "add", "fe80::77/64", "dev", "eth1", "nodad")
            let socket = try ns.socket()
            let all = try socket.ipv6Addresses()
            #expect(
                all.contains {
                    $0.address == IPv6Address("2001:db8::9") && $0.flags & InterfaceIPv6Address.deprecated != 0
                }
            )
            let interfaces = try InterfaceLookup.interfaces(using: socket)
            let eth0 = try #require(interfaces.first { $0.name == "eth0" })
            let eth1 = try #require(interfaces.first { $0.name == "eth1" })
            #expect(try InterfaceLookup.ipv6Address(of: eth0, using: socket) == IPv6Address("2001:db8::5"))
            // Only link-local: nothing other hosts can send to.
            #expect(try InterfaceLookup.ipv6Address(of: eth1, using: socket) == nil)
        }
    }
}
