import NetBase

#if canImport(Glibc)
import Glibc
#endif

/// A network device with its IPv4 addresses, as the daemon's `--iface` and
/// `--public-ip` flags need it.
public struct Interface: Hashable, Sendable, CustomStringConvertible {
    public var name: String
    public var index: Int32
    public var mtu: Int
    /// Primary address first, in the kernel's order.
    public var addresses: [IPv4Address]

    public init(name: String, index: Int32, mtu: Int, addresses: [IPv4Address]) {
        self.name = name
        self.index = index
        self.mtu = mtu
        self.addresses = addresses
    }

    public var description: String {
        addresses.isEmpty ? name : "\(name) (\(addresses.map(\.description).joined(separator: ", ")))"
    }
}

/// Finding the underlay interface the way flanneld's `-iface` does: by name
/// or by one of its IPv4 addresses, or else the interface of the default
/// route. Each result comes with the address to use on it.
public enum InterfaceLookup {
    static let operation = "look up interface"

    /// The IPv6 address other hosts should reach `interface` at, chosen as
    /// flanneld chooses it (pkg/ip GetInterfaceIP6Addrs): deprecated
    /// addresses left out; permanent (configured) before autoconfigured,
    /// non-temporary before temporary; the kernel's order otherwise.
    /// flanneld falls back to a link-local address; tunneld does not (other
    /// hosts cannot send to a link-local address without a zone), so only
    /// global-scope addresses count. nil when the interface has none.
    public static func ipv6Address(of interface: Interface, using socket: RouteSocket) throws -> IPv6Address? {
        try preferredIPv6(socket.ipv6Addresses().filter { $0.index == interface.index })
    }

    /// The choice `ipv6Address(of:using:)` makes among one interface's addresses.
    public static func preferredIPv6(_ addresses: [InterfaceIPv6Address]) -> IPv6Address? {
        func rank(_ a: InterfaceIPv6Address) -> Int {
            (a.flags & InterfaceIPv6Address.permanent != 0 ? 0 : 2)
                + (a.flags & InterfaceIPv6Address.temporary != 0 ? 1 : 0)
        }
        let usable = addresses.enumerated().filter { _, a in
            a.address.isGlobalUnicast && a.flags & InterfaceIPv6Address.deprecated == 0
        }
        // A stable sort: the kernel's order breaks ties.
        return usable.min { x, y in
            (rank(x.element), x.offset) < (rank(y.element), y.offset)
        }?.element.address
    }

    /// Every interface in the namespace with its IPv4 addresses.
    public static func interfaces(using socket: RouteSocket) throws -> [Interface] {
        let links = try socket.links()
        let addresses = try socket.addresses()
        return links.map { link in
            Interface(
                name: link.name,
                index: link.index,
                mtu: link.mtu,
                addresses: addresses.filter { $0.index == link.index }.map(\.address)
            )
        }
    }

    /// The interface called `nameOrAddress`, or the one that has it as an
    /// IPv4 address. For a name, the address is the interface's first IPv4
    /// address; for an address, that address.
    public static func find(nameOrAddress: String, using socket: RouteSocket) throws -> (Interface, IPv4Address) {
        let wanted = nameOrAddress.trimmingWhitespace
        guard !wanted.isEmpty else {
            throw SystemError(operation, on: "\"\"", errno: .invalid, hint: "give an interface name or an IPv4 address")
        }
        let all = try interfaces(using: socket)
        if let address = IPv4Address(wanted) {
            guard let match = all.first(where: { $0.addresses.contains(address) }) else {
                throw SystemError(
                    operation,
                    on: wanted,
                    errno: Errno(EADDRNOTAVAIL),
                    hint: "no interface has address \(address); available: \(listing(all))"
                )
            }
            return (match, address)
        }
        guard let match = all.first(where: { $0.name == wanted }) else {
            throw SystemError(
                operation,
                on: wanted,
                errno: .noSuchDevice,
                hint: "no interface named \(wanted) or with address \(wanted); available: \(listing(all))"
            )
        }
        return (match, try firstAddress(of: match))
    }

    /// The first interface (in index order) whose name or one of whose IPv4
    /// addresses matches `matches`, as flanneld's `-iface-regex` does; with
    /// the matching address, or the first one for a name match. Interfaces
    /// without an IPv4 address are passed over.
    public static func first(
        matching matches: (String) -> Bool,
        using socket: RouteSocket
    ) throws -> (Interface, IPv4Address)? {
        for interface in try interfaces(using: socket).sorted(by: { $0.index < $1.index }) {
            if let address = interface.addresses.first(where: { matches($0.description) }) {
                return (interface, address)
            }
            if matches(interface.name), let address = interface.addresses.first {
                return (interface, address)
            }
        }
        return nil
    }

    /// The interface of the IPv4 default route, with the route's preferred
    /// source address if it has one on that interface, else the interface's
    /// first IPv4 address.
    public static func defaultInterface(using socket: RouteSocket) throws -> (Interface, IPv4Address) {
        guard let route = try socket.defaultRoute() else {
            throw SystemError(
                operation,
                on: "default route",
                errno: Errno(ENETUNREACH),
                hint: "there is no IPv4 default route; choose the interface with --iface"
            )
        }
        let all = try interfaces(using: socket)
        guard let match = all.first(where: { $0.index == route.outputIndex }) else {
            throw SystemError(
                operation,
                on: "default route",
                errno: .noSuchDevice,
                hint: "the default route's device (ifindex \(route.outputIndex)) has gone; available: \(listing(all))"
            )
        }
        if let source = route.source, match.addresses.contains(source) { return (match, source) }
        return (match, try firstAddress(of: match))
    }

    /// The interface the kernel's route to `destination` leaves by, with the
    /// source address that route gives (or the interface's first IPv4
    /// address), as flanneld's `-iface-can-reach` chooses it.
    public static func reaching(
        _ destination: IPv4Address,
        using socket: RouteSocket
    ) throws -> (Interface, IPv4Address) {
        let (index, source) = try socket.routeLookup(to: destination)
        let all = try interfaces(using: socket)
        guard let match = all.first(where: { $0.index == index }) else {
            throw SystemError(
                operation,
                on: "route to \(destination)",
                errno: .noSuchDevice,
                hint: "the route's device (ifindex \(index)) has gone; available: \(listing(all))"
            )
        }
        if let source, match.addresses.contains(source) { return (match, source) }
        return (match, try firstAddress(of: match))
    }

    private static func firstAddress(of interface: Interface) throws -> IPv4Address {
        guard let first = interface.addresses.first else {
            throw SystemError(
                operation,
                on: interface.name,
                errno: Errno(EADDRNOTAVAIL),
                hint: "\(interface.name) has no IPv4 address; add one or choose another interface"
            )
        }
        return first
    }

    private static func listing(_ interfaces: [Interface]) -> String {
        interfaces.isEmpty ? "none" : interfaces.map(\.description).joined(separator: ", ")
    }
}

extension String {
    var trimmingWhitespace: String {
        String(drop(while: \.isWhitespace).reversed().drop(while: \.isWhitespace).reversed())
    }
}
