import ArgumentParser
import Foundation
import LeaseStore
import NetBase

/// Where the network config and the leases live: the embedded local store
/// (one machine) or etcd (a cluster).
struct StoreOptions: ParsableArguments {
    enum Kind: String, ExpressibleByArgument, CaseIterable {
        case local, etcd
    }

    @Option(
        help: ArgumentHelp(
            "Store for config and leases: local (a state directory shared by the tunneld processes of one machine) or etcd. Default: etcd, or local when --store-dir is given.",
            valueName: "local|etcd"
        )
    )
    var store: Kind?

    @Option(help: ArgumentHelp("State directory of the local store.", valueName: "dir"))
    var storeDir: String?

    @Option(help: ArgumentHelp("etcd endpoints, comma-separated (flanneld's -etcd-endpoints).", valueName: "urls"))
    var etcdEndpoints: String = "http://127.0.0.1:4001,http://127.0.0.1:2379"

    @Option(help: ArgumentHelp("etcd key prefix of the network (flanneld's -etcd-prefix).", valueName: "prefix"))
    var etcdPrefix: String = "/coreos.com/network"

    @Option(help: ArgumentHelp("TLS key file for etcd.", valueName: "file"))
    var etcdKeyfile: String?
    @Option(help: ArgumentHelp("TLS certificate file for etcd.", valueName: "file"))
    var etcdCertfile: String?
    @Option(help: ArgumentHelp("TLS CA file for etcd.", valueName: "file"))
    var etcdCafile: String?
    @Option(help: ArgumentHelp("Username for etcd authentication.", valueName: "name"))
    var etcdUsername: String?
    @Option(help: ArgumentHelp("Password for etcd authentication.", valueName: "password"))
    var etcdPassword: String?

    @Option(
        help: ArgumentHelp(
            "How often an etcd connection in use is checked, in seconds: a gRPC keepalive ping, and on the watch a progress request. Not flanneld's.",
            valueName: "seconds"
        )
    )
    var etcdKeepaliveTime: Double = 2
    @Option(
        help: ArgumentHelp(
            "How long the answer may take, in seconds, before the member counts as gone: its connection is closed and the watch resumes on another member from its last revision. A member that vanishes without closing its connections is left within time + timeout. Not flanneld's.",
            valueName: "seconds"
        )
    )
    var etcdKeepaliveTimeout: Double = 3

    @Option(
        help: ArgumentHelp(
            "Lifetime of a new or renewed lease, in seconds (flannel: 24 h). For tests.",
            valueName: "seconds",
            visibility: .hidden
        )
    )
    var subnetLeaseTTL: Int = 24 * 3600

    var leaseTTL: Duration { .seconds(subnetLeaseTTL) }

    static let maximumLeaseTTL = 365 * 24 * 3600
    static let defaultStoreDirectory = "/var/lib/tunneld"

    var kind: Kind { store ?? (storeDir != nil ? .local : .etcd) }

    func validate() throws {
        // etcd refuses leases longer than 9,000,000,000 s; a year is
        // already far beyond any renewal schedule.
        guard (2...Self.maximumLeaseTTL).contains(subnetLeaseTTL) else {
            throw ValidationError(
                "--subnet-lease-ttl must be between 2 seconds and \(Self.maximumLeaseTTL) (one year), not \(subnetLeaseTTL)"
            )
        }
        for (flag, value) in [
            ("--etcd-keepalive-time", etcdKeepaliveTime), ("--etcd-keepalive-timeout", etcdKeepaliveTimeout),
        ]
        where !(value >= 0.1 && value <= 3600) {
            throw ValidationError("\(flag) must be between 0.1 and 3600 seconds, not \(value)")
        }
        if store == .etcd && storeDir != nil {
            throw ValidationError("--store-dir belongs to the local store; drop it or use --store local")
        }
    }

    func open() throws -> any LeaseStore {
        switch kind {
        case .local:
            return try LocalLeaseStore(directory: storeDir ?? Self.defaultStoreDirectory, leaseTTL: leaseTTL)
        case .etcd:
            return try makeEtcdStore()
        }
    }
}
