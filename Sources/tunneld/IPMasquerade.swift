import Foundation
import NetBase

/// flanneld's `-ip-masq`: traffic from the overlay network to anywhere
/// outside it leaves with the host's address; traffic within the network
/// keeps its container addresses. The rules live in chains of tunneld's own
/// (TUNNELD-POSTRTG in nat, TUNNELD-FWD in filter) with one jump each from
/// POSTROUTING and FORWARD, so they are replaced and removed as a whole.
///
/// The rules are flanneld's (N = Network, S = this host's subnet):
///   -s N -d N -j RETURN
///   -s N ! -d 224.0.0.0/4 -j MASQUERADE --random-fully
///   ! -s N -d S -j RETURN
///   ! -s N -d N -j MASQUERADE --random-fully
///   (filter) -s N -j ACCEPT; -d N -j ACCEPT
/// iptables is run as a program, as flanneld does through go-iptables.
struct IPMasquerade {
    static let natChain = "TUNNELD-POSTRTG"
    static let filterChain = "TUNNELD-FWD"
    static let comment = "tunneld masquerade"

    let iptables: String

    init() throws {
        guard let path = ["/usr/sbin/iptables", "/sbin/iptables", "/usr/bin/iptables"]
            .first(where: { FileManager.default.isExecutableFile(atPath: $0) }) else {
            throw DaemonError("--ip-masq needs the iptables program, which is not installed (apt-get install iptables)")
        }
        iptables = path
    }

    /// Installs (or replaces) the rules for `network` and our `subnet`.
    func install(network: IPv4Network, subnet: IPv4Network) throws {
        let n = network.description, s = subnet.description
        try ensureChain(table: "nat", chain: Self.natChain, from: "POSTROUTING")
        try ensureChain(table: "filter", chain: Self.filterChain, from: "FORWARD")
        let nat: [[String]] = [
            ["-s", n, "-d", n, "-j", "RETURN"],
            ["-s", n, "!", "-d", "224.0.0.0/4", "-j", "MASQUERADE", "--random-fully"],
            ["!", "-s", n, "-d", s, "-j", "RETURN"],
            ["!", "-s", n, "-d", n, "-j", "MASQUERADE", "--random-fully"],
        ]
        try iptables(["-t", "nat", "-F", Self.natChain])
        for rule in nat { try iptables(["-t", "nat", "-A", Self.natChain] + rule) }
        try iptables(["-t", "filter", "-F", Self.filterChain])
        try iptables(["-t", "filter", "-A", Self.filterChain, "-s", n, "-j", "ACCEPT"])
        try iptables(["-t", "filter", "-A", Self.filterChain, "-d", n, "-j", "ACCEPT"])
    }

    /// Removes the jumps and the chains; what is already gone is fine.
    func remove() throws {
        for (table, chain, parent) in [("nat", Self.natChain, "POSTROUTING"), ("filter", Self.filterChain, "FORWARD")] {
            while (try? iptables(["-t", table, "-D", parent, "-j", chain, "-m", "comment", "--comment", Self.comment])) != nil {}
            _ = try? iptables(["-t", table, "-F", chain])
            _ = try? iptables(["-t", table, "-X", chain])
        }
    }

    private func ensureChain(table: String, chain: String, from parent: String) throws {
        if (try? iptables(["-t", table, "-S", chain])) == nil {
            try iptables(["-t", table, "-N", chain])
        }
        let jump = ["-j", chain, "-m", "comment", "--comment", Self.comment]
        if (try? iptables(["-t", table, "-C", parent] + jump)) == nil {
            // First, as flanneld does, so that no earlier rule masquerades
            // traffic that must keep its container address.
            try iptables(["-t", table, "-I", parent, "1"] + jump)
        }
    }

    @discardableResult
    private func iptables(_ arguments: [String]) throws -> String {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: iptables)
        process.arguments = ["-w", "5"] + arguments
        let output = Pipe()
        process.standardOutput = output
        process.standardError = output
        try process.run()
        let text = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        guard process.terminationStatus == 0 else {
            throw DaemonError("iptables \(arguments.joined(separator: " ")) failed (exit \(process.terminationStatus)): \(text.trimmingCharacters(in: .whitespacesAndNewlines))")
        }
        return text
    }
}
