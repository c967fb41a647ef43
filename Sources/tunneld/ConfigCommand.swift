import ArgumentParser
import Foundation
import LeaseStore
import PacketRing

struct Config: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Read or write the network config (flannel's config JSON).",
        subcommands: [Set.self, Get.self]
    )

    struct Set: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Validate a flannel config JSON and store it.",
            discussion: """
                Example: {"Network":"10.2.0.0/16","SubnetLen":24,"Backend":{"Type":"udp"}}
                The JSON is checked with flannel's rules and stored as given, so flanneld and \
                etcdctl read it back unchanged.
                """
        )

        @OptionGroup var storeOptions: StoreOptions

        @Argument(help: ArgumentHelp("File holding the config JSON, or - for standard input.", valueName: "file|-"))
        var file: String

        func run() async throws {
            let json: String
            if file == "-" {
                json = String(decoding: FileHandle.standardInput.readDataToEndOfFile(), as: UTF8.self)
            } else {
                guard let data = FileManager.default.contents(atPath: file) else {
                    throw DaemonError("cannot read \(file): no such file or not readable")
                }
                json = String(decoding: data, as: UTF8.self)
            }
            bootstrapLogging()
            let store = try storeOptions.open()
            do {
                let config = try await store.setNetworkConfig(json: json)
                let ipv6 =
                    config.ipv6.map {
                        ", IPv6Network \($0.network), IPv6SubnetLen \($0.subnetLen), IPv6 subnets \($0.subnetMin.address)…\($0.subnetMax.address)"
                    } ?? ""
                let ipv4 =
                    config.isIPv6Only
                    ? "IPv6-only (EnableIPv4 false)"
                    : "Network \(config.network), SubnetLen \(config.subnetLen), subnets \(config.subnetMin.address)…\(config.subnetMax.address)"
                print(
                    "stored network config in \(store.location): \(ipv4)\(ipv6), backend \(config.backend.type)"
                )
                if config.backend.knownType == nil {
                    // Valid for flannel, so stored; but no tunneld host will start on it.
                    FileHandle.standardError.write(
                        Data(
                            "warning: tunneld supports the \(BackendType.supportedNames) backends, not \"\(config.backend.type)\": tunneld run refuses this config until Backend.Type is one of them\n"
                                .utf8
                        )
                    )
                } else if config.isIPv6Only, config.backend.knownType == .vxlan {
                    FileHandle.standardError.write(
                        Data(
                            "warning: IPv6-only networks (EnableIPv4 false) run with the udp, host-gw and wireguard backends in tunneld, not yet vxlan: tunneld run refuses this config\n"
                                .utf8
                        )
                    )
                } else if let v6 = config.ipv6, config.backend.knownType == .udp,
                    v6.subnetLen - v6.network.prefixLength > SubnetTable6.maximumSubnetBits
                {
                    // Valid for flannel; the udp data path's IPv6 table is direct-indexed.
                    FileHandle.standardError.write(
                        Data(
                            "warning: \(SubnetTable6Error.tooManySubnets(network: v6.network, subnetLength: v6.subnetLen)); tunneld run refuses this config with the udp backend\n"
                                .utf8
                        )
                    )
                }
            } catch let error as NetworkConfigError {
                throw DaemonError("invalid network config: \(error)")
            }
        }
    }

    struct Get: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Print the stored network config JSON.")

        @OptionGroup var storeOptions: StoreOptions

        func run() async throws {
            bootstrapLogging()
            let store = try storeOptions.open()
            guard let json = try await store.rawNetworkConfig() else {
                throw LeaseStoreError.configNotFound(location: store.location)
            }
            print(json.hasSuffix("\n") ? String(json.dropLast()) : json)
        }
    }
}

struct Leases: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List the subnet leases of the network."
    )

    @OptionGroup var storeOptions: StoreOptions

    func run() async throws {
        bootstrapLogging()
        let store = try storeOptions.open()
        let snapshot = try await store.leases()
        // The same rule as every host's: keys it ignores are listed apart.
        var leases = snapshot.leases
        var notes: [String] = []
        if let json = try await store.rawNetworkConfig() {
            let config = try NetworkConfig(json: json)
            let sorted = LeaseRule(config).sort(snapshot)
            leases = sorted.leases
            notes = sorted.ignored.map { "ignored: \($0)" }
        } else {
            notes.append(
                "no network config in \(store.location): every key is listed, none checked against Network and SubnetLen"
            )
        }
        notes += snapshot.skipped.map { "unreadable: \($0)" }
        let formatter = ISO8601DateFormatter()
        // Dual-stack leases add two columns; an IPv4-only listing looks as it always did.
        let dualStack = leases.contains { $0.ipv6Subnet != nil }
        func column(_ text: String, _ width: Int) -> String {
            text.padding(toLength: max(width, text.count + 1), withPad: " ", startingAt: 0)
        }
        print(
            column("SUBNET", 20) + column("PUBLIC-IP", 18)
                + (dualStack ? column("IPV6-SUBNET", 26) + column("PUBLIC-IPV6", 26) : "")
                + column("BACKEND", 10) + "EXPIRES"
        )
        defer { if !notes.isEmpty { print("\n" + notes.joined(separator: "\n")) } }
        for lease in leases.sorted(by: Lease.inAddressOrder) {
            let expires = lease.expiration.map { formatter.string(from: $0) } ?? "never (reservation)"
            let ipv6 =
                dualStack
                ? column(lease.ipv6Subnet?.description ?? "-", 26)
                    + column(lease.attributes.publicIPv6?.description ?? "-", 26)
                : ""
            print(
                column(lease.ipv4Subnet?.description ?? "-", 20) + column(lease.attributes.publicIP.description, 18)
                    + ipv6
                    + column(lease.attributes.backendType ?? "udp", 10) + expires
            )
        }
    }
}
