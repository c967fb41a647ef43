import Foundation
import Logging
import NetBase

/// An address family of the rules: which iptables program, which nftables
/// match keyword, which multicast range is never masqueraded.
enum IPFamily: String, Sendable, CaseIterable {
    case ipv4, ipv6

    var iptablesProgram: String { self == .ipv4 ? "iptables" : "ip6tables" }
    /// The nftables payload keyword for this family's addresses (`ip saddr …`).
    var nftKeyword: String { self == .ipv4 ? "ip" : "ip6" }
    /// Multicast leaves with the container's address, as with flanneld
    /// (its rules skip 224.0.0.0/4 and, for IPv6, ff00::/8).
    var multicast: String { self == .ipv4 ? "224.0.0.0/4" : "ff00::/8" }
}

/// Runs a rule program (iptables, ip6tables, nft) and returns what it
/// printed. A failure names the program, the arguments (not `options`, the
/// flags every call carries) and what the program said.
func runRuleProgram(
    _ path: String,
    _ arguments: [String],
    options: [String] = [],
    input: String = ""
) throws
    -> String
{
    let output: ChildOutput
    do {
        output = try ChildProcess.run(path, arguments: options + arguments, input: Array(input.utf8))
    } catch {
        throw DaemonError("cannot run \(path): \(error)")
    }
    guard output.status == 0 else {
        let text = String(decoding: output.stderr.isEmpty ? output.stdout : output.stderr, as: UTF8.self)
        throw DaemonError(
            "\((path as NSString).lastPathComponent) \(arguments.joined(separator: " ")) failed (exit \(output.status)): \(text.trimmingCharacters(in: .whitespacesAndNewlines))"
        )
    }
    return String(decoding: output.stdout, as: UTF8.self)
}

/// What the rules of one family are about: the overlay network and this
/// host's subnet in it, as the CIDR text the rule programs print.
struct FamilyNetworks: Sendable, Equatable {
    let family: IPFamily
    let network: String
    let subnet: String

    static func ipv4(network: IPv4Network, subnet: IPv4Network) -> FamilyNetworks {
        FamilyNetworks(family: .ipv4, network: network.description, subnet: subnet.description)
    }

    static func ipv6(network: IPv6Network, subnet: IPv6Network) -> FamilyNetworks {
        FamilyNetworks(family: .ipv6, network: network.description, subnet: subnet.description)
    }
}

/// The networks tunneld's rules cover: IPv4, IPv6 or both.
struct FirewallNetworks: Sendable, Equatable {
    var ipv4: FamilyNetworks?
    var ipv6: FamilyNetworks?

    init(ipv4: FamilyNetworks?, ipv6: FamilyNetworks? = nil) {
        self.ipv4 = ipv4
        self.ipv6 = ipv6
    }

    init(network: IPv4Network, subnet: IPv4Network) {
        self.init(ipv4: .ipv4(network: network, subnet: subnet))
    }

    /// IPv4 first, then IPv6: the order rules are generated in.
    var families: [FamilyNetworks] { [ipv4, ipv6].compactMap { $0 } }
}

/// tunneld's masquerade and forward rules, kept in place: iptables chains
/// (`IPTablesKeeper`) or an nftables table (`NFTablesKeeper`, the config's
/// `EnableNFTables`).
protocol FirewallKeeper: AnyObject, Sendable {
    /// "iptables" or "nftables", for the log.
    var mechanism: String { get }
    /// Masquerading with random source ports (`--random-fully`, `fully-random`).
    var randomFully: Bool { get }
    /// Where the masquerade rules live, for the log.
    var masqueradeLocation: String { get }
    /// Where the forward rules live, for the log.
    var forwardLocation: String { get }
    /// Where the resync runs its program: it may wait seconds for a lock.
    var resyncQueue: DispatchQueue { get }
    var logger: Logger { get }

    /// The rules for `networks`, installed or replaced; rules of ours that are
    /// not wanted (left by a run with other flags) are removed.
    func install(_ networks: FirewallNetworks) throws
    /// Puts back what someone removed or changed; returns what it put back.
    func repair() throws -> [String]
    /// Removes every rule of ours; what is already gone is fine.
    func remove()
}

extension FirewallKeeper {
    /// Checks every `period` until cancelled (flanneld's `-iptables-resync`),
    /// with one log line per repair.
    ///
    /// The check runs on `resyncQueue`: `iptables -w 5` may wait up to five
    /// seconds for the xtables lock (Docker holds it while it starts), and a
    /// concurrency-pool thread blocked that long on a two-core machine is half
    /// the pool — lease renewals and the peer watch would wait too.
    func keep(every period: Duration) async {
        while !Task.isCancelled {
            do { try await Task.sleep(for: period) } catch { return }
            do {
                let repaired = try await withCheckedThrowingContinuation { continuation in
                    resyncQueue.async { continuation.resume(with: Result { try self.repair() }) }
                }
                if !repaired.isEmpty {
                    logger.warning(
                        "\(mechanism): put back \(repaired.joined(separator: ", ")): someone removed or changed tunneld's rules (a Docker or firewalld restart?)"
                    )
                }
            } catch {
                logger.error("\(mechanism): could not put back tunneld's rules: \(error); trying again in \(period)")
            }
        }
    }
}

/// Finds `program` in the directories of `path` (a `PATH` value), as a
/// shell would; nil when none holds it.
func findProgram(_ program: String, in path: String?) -> String? {
    let directories = (path ?? "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .split(separator: ":").map(String.init).filter { !$0.isEmpty }
    return directories.map { "\($0)/\(program)" }.first { FileManager.default.isExecutableFile(atPath: $0) }
}
