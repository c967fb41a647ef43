import ArgumentParser
import FlannelFiles
import Foundation
import LeaseStore
import NetBase
import Observability

struct Status: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract:
            "Show this host's network, lease, peers and data path: from the running daemon, or from the store when none runs.",
        discussion: """
            The running daemon is asked over its control socket (--control-socket, as given to \
            `tunneld run`). When no daemon answers there, the config and leases are read from the \
            store (the same store options as `tunneld leases`); this host's lease is the one \
            --subnet-file names. --json prints the same report for scripts.
            """
    )

    @OptionGroup var storeOptions: StoreOptions

    @Option(help: ArgumentHelp("The running daemon's control socket.", valueName: "path"))
    var controlSocket: String = ObservabilityOptions.defaultControlSocket

    @Option(
        help: ArgumentHelp(
            "subnet.env naming this host's subnet, for reading the store when no daemon runs.",
            valueName: "file"
        )
    )
    var subnetFile: String = "/run/flannel/subnet.env"

    @Flag(help: "Print JSON instead of a table.")
    var json = false

    func run() async throws {
        bootstrapLogging(.error)
        let report: StatusReport
        let body: [UInt8]
        do {
            body = try ControlClient.get("/status", socket: controlSocket)
        } catch {
            guard case .notRunning(let socket, let reason) = error else { throw DaemonError("\(error)") }
            let why = "no tunneld answers on \(socket) (\(reason))"
            do {
                report = try await fromStore(why: why)
            } catch {
                throw DaemonError(
                    """
                    tunneld is not running here: \(why). Start it with `tunneld run`, or give --control-socket of the one that runs.
                    The store could not be read either: \(error). Check \(storeHint()).
                    """
                )
            }
            return print(report, json: json)
        }
        do {
            report = try StatusReport.decode(json: body)
        } catch {
            throw DaemonError(
                "the daemon on \(controlSocket) sent a status this tunneld cannot read (\(error)); is it another version? Run that version's `tunneld status`, or restart the daemon"
            )
        }
        print(report, json: json)
    }

    private func print(_ report: StatusReport, json: Bool) {
        if json {
            FileHandle.standardOutput.write(Data(report.json()))
        } else {
            FileHandle.standardOutput.write(Data(report.table().utf8))
        }
    }

    private func storeHint() -> String {
        switch storeOptions.kind {
        case .etcd:
            "--etcd-endpoints (now \(storeOptions.etcdEndpoints)) and --etcd-prefix (now \(storeOptions.etcdPrefix))"
        case .local: "--store-dir (now \(storeOptions.storeDir ?? StoreOptions.defaultStoreDirectory))"
        }
    }

    /// The config and leases as the store holds them; ours is the one the
    /// subnet file names.
    private func fromStore(why: String) async throws -> StatusReport {
        let store = try storeOptions.open()
        let config = try await store.networkConfig()
        let listed = try await store.leases()
        // The leases as every host sees them (`LeaseRule`); the rest are notes.
        let sorted = LeaseRule(config).sort(listed)
        let snapshot = LeaseSnapshot(leases: sorted.leases, revision: listed.revision, skipped: listed.skipped)
        var notes = ["\(why); read from the store instead: no data-path counters"]
        notes += sorted.ignored.map { "ignored: \($0)" }
        var ours: LeaseSubnet?
        let previous =
            config.isIPv6Only
            ? SubnetEnv.previousIPv6Subnet(at: subnetFile).map { $0.map(LeaseSubnet.ipv6) }
            : SubnetEnv.previousSubnet(at: subnetFile).map { $0.map(LeaseSubnet.ipv4) }
        switch previous {
        case .success(let subnet?): ours = subnet
        case .success(nil): notes.append("no \(subnetFile): which lease is this host's is unknown (give --subnet-file)")
        case .failure(let error): notes.append("\(error): which lease is this host's is unknown")
        }
        let own = ours.flatMap { subnet in snapshot.leases.first { $0.primarySubnet == subnet } }
        if let ours, own == nil {
            notes.append("\(subnetFile) names \(ours), but the store holds no lease for it (expired or released)")
        }
        notes += snapshot.skipped.map { "skipped: \($0)" }
        return StatusReport(
            source: .store,
            version: tunneldVersion,
            store: store.location,
            network: .init(config),
            node: own.map {
                .init(
                    subnet: $0.primarySubnet.description,
                    publicIP: $0.attributes.publicIP.description,
                    leaseExpires: $0.expiration,
                    leaseRevision: $0.revision
                )
            },
            backend: nil,
            peers: snapshot.leases.filter { $0.primarySubnet != ours }.sorted(by: Lease.inAddressOrder)
                .map { StatusReport.Peer($0, lastChange: nil) },
            notes: notes
        )
    }
}
