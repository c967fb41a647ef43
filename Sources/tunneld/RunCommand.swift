import ArgumentParser
import Backends
import Foundation
import LeaseStore
import Logging
import NetBase
import PacketRing
import ServiceLifecycle

/// `tunneld run`. Its options come in groups, as `tunneld run --help` shows
/// them: flanneld's (FlanneldOptions), the store's, observability, and
/// tunneld's own below. flanneld's are read as `options.iface` and so on
/// through dynamic member lookup.
@dynamicMemberLookup
struct Run: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Join the network: lease a subnet, write subnet.env, and carry traffic to the other hosts.",
        discussion: """
            flanneld's options keep flanneld's names and defaults; -flag=value, -flag value, \
            Go booleans (-ip-masq=true) and FLANNELD_<FLAG> variables all work. OPTIONS below \
            are tunneld's own.

            Examples:
              tunneld run -etcd-endpoints=http://10.0.0.1:2379 -iface=eth0 -ip-masq
                  flanneld's command line, unchanged (FLANNELD_* variables work too)
              tunneld run --store-dir /var/lib/tunneld --iface eth0
                  one machine, no etcd: the local store
              tunneld run -etcd-endpoints=https://10.0.0.1:2379 -etcd-cafile=ca.pem \\
                  -etcd-certfile=node.pem -etcd-keyfile=node-key.pem -healthz-port=8471
                  etcd over TLS, /healthz and /metrics on port 8471
            """
    )

    @OptionGroup(title: "flanneld's options")
    var flanneld: FlanneldOptions

    subscript<T>(dynamicMember keyPath: KeyPath<FlanneldOptions, T>) -> T { flanneld[keyPath: keyPath] }

    @OptionGroup(title: "Store: etcd (flanneld's -etcd-* flags) or tunneld's local store")
    var storeOptions: StoreOptions
    @OptionGroup(title: "Metrics and status")
    var observability: ObservabilityOptions

    // tunneld's own options.

    @Option(
        help: ArgumentHelp(
            "Backend; must agree with the config's Backend.Type (default: the config's).",
            valueName: "udp|vxlan|host-gw|wireguard"
        )
    )
    var backend: BackendType?

    @Option(help: ArgumentHelp("Name of the udp backend's TUN device.", valueName: "name"))
    var device: String = "flannel0"

    @Option(
        help: ArgumentHelp(
            "udp backend's data path: auto (the fastest this host offers), uring (io_uring; falls back to syscall where refused), syscall (batched sendmmsg/recvmmsg, no io_uring) or simple (one system call per packet, like flannel). Every tier but simple uses the kernel's offloads.",
            valueName: "auto|uring|syscall|simple"
        )
    )
    var datapath: DataPathChoice = .auto

    @Option(
        help: ArgumentHelp(
            "Packets kept in flight per direction by the udp backend's io_uring data path.",
            valueName: "n"
        )
    )
    var queueDepth: Int = 64

    @Option(
        help: ArgumentHelp(
            "Offloads of the udp backend's io_uring data path: auto (TUN TSO/checksum, UDP GSO/GRO, whatever the kernel offers) or off (one packet per system call's worth of work).",
            valueName: "auto|off"
        )
    )
    var offload: OffloadMode = .auto

    @Option(
        help: ArgumentHelp(
            "udp backend: data-path worker threads, each with its own TUN queue, socket and ring; wireguard backend: threads that seal a batch together, and as many that open one (default: online cores, at most 4; wireguard: half of them).",
            valueName: "n"
        )
    )
    var workers: Int?

    @Option(
        help: ArgumentHelp(
            "After moving packets, the udp backend's batching data paths and the wireguard backend look for more for up to this many microseconds before sleeping (yielding the CPU between looks): about half the round-trip time on a virtual machine, nothing when idle; 0 = off.",
            valueName: "µs"
        )
    )
    var busyPoll: Int = 100

    /// --workers, or one per online core up to 4.
    var effectiveWorkers: Int {
        if let workers { return workers }
        return max(1, min(4, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))))
    }

    /// --workers, or half the online cores (at most 4): the wireguard backend's
    /// sealing and opening threads each share their batches with that many − 1
    /// helpers, so the two directions together use every core. On two cores that
    /// is none: a helper then only takes the core the other direction needs
    /// (measured in docs/BENCHMARKS.md).
    var effectiveWireGuardWorkers: Int {
        if let workers { return workers }
        return max(1, min(4, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))) / 2))
    }

    @Flag(
        help:
            "udp backend: accept datagrams from any sender, as flannel does (default: only from the peer that owns the packet's source subnet)."
    )
    var acceptUnknownPeers = false

    @Flag(
        help:
            "Release the lease on exit and remove the backend's devices and routes: the host leaves the network (default: keep both, so a restart gets the same subnet and vxlan/host-gw traffic keeps flowing)."
    )
    var releaseOnExit = false

    @Option(
        help: ArgumentHelp(
            "Log level (default: info, or what -v says).",
            valueName: "trace|debug|info|notice|warning|error"
        )
    )
    var logLevel: Logger.Level?

    @Option(
        help: ArgumentHelp(
            "Log line format: text, or json (one object per line, for log shippers).",
            valueName: "text|json"
        )
    )
    var logFormat: LogFormat = .text

    var effectiveLogLevel: Logger.Level { logLevel ?? tunneld.logLevel(verbosity: flanneld.verbosity) }

    func validate() throws {
        if let workers, !(1...64).contains(workers) {
            throw ValidationError("--workers must be between 1 and 64, not \(workers)")
        }
        guard (0...10_000).contains(busyPoll) else {
            throw ValidationError("--busy-poll must be between 0 (off) and 10000 microseconds, not \(busyPoll)")
        }
        guard (1...4096).contains(queueDepth) else {
            throw ValidationError("--queue-depth must be between 1 and 4096, not \(queueDepth)")
        }
        guard !device.isEmpty, device.utf8.count < 16, !device.contains("/"), !device.contains(" ") else {
            throw ValidationError(
                "--device \(device) is not a valid interface name (1–15 characters, no '/' or spaces)"
            )
        }
    }

    func run() async throws {
        bootstrapLogging(effectiveLogLevel, format: logFormat)
        let logger = Logger(label: "tunneld")
        ObservabilityOptions.bootstrapMetrics()
        let store = try storeOptions.open()
        let daemon = Daemon(options: self, store: store, logger: logger)
        let group = ServiceGroup(
            configuration: .init(
                services: [.init(service: daemon)],
                gracefulShutdownSignals: [.sigterm, .sigint],
                logger: logger
            )
        )
        try await group.run()
    }
}
extension OffloadMode: ExpressibleByArgument {}
extension DataPathChoice: ExpressibleByArgument {}
extension BackendType: ExpressibleByArgument {}

/// The options flanneld has, with flanneld's names and defaults.
struct FlanneldOptions: ParsableArguments {
    @Option(
        help: ArgumentHelp(
            "Interface (name or IP) for traffic between hosts; may be repeated, the first that exists is used. Default: the interface of the default route.",
            valueName: "name|ip"
        )
    )
    var iface: [String] = []

    @Option(
        help: ArgumentHelp(
            "Regular expression matched against interface names and IPv4 addresses, tried after --iface; may be repeated.",
            valueName: "regex"
        )
    )
    var ifaceRegex: [String] = []

    @Option(
        help: ArgumentHelp(
            "An IPv4 address to reach: the interface (and source address) the kernel's route to it uses is the one to use, as `ip route get ADDRESS` shows; tried after --iface and --iface-regex.",
            valueName: "ip"
        )
    )
    var ifaceCanReach: String?

    @Option(help: ArgumentHelp("IP other hosts send to (default: the interface's address).", valueName: "ip"))
    var publicIP: String?

    @Option(
        name: .customLong("public-ipv6"),
        help: ArgumentHelp(
            "IPv6 address other hosts send to in a dual-stack network (default: the interface's global IPv6 address, if it has one).",
            valueName: "ipv6"
        )
    )
    var publicIPv6: String?

    @Option(help: ArgumentHelp("Where to write flannel's subnet.env.", valueName: "file"))
    var subnetFile: String = "/run/flannel/subnet.env"

    @Option(help: ArgumentHelp("Renew the lease this many minutes before it expires (1–1439).", valueName: "minutes"))
    var subnetLeaseRenewMargin: Int = 60

    @Flag(
        help:
            "Masquerade traffic from the overlay network to the outside, as flanneld's -ip-masq (needs iptables, or nft with the config's EnableNFTables)."
    )
    var ipMasq = false

    @Flag(
        help:
            "Masquerade without --random-fully (nftables: fully-random); by default it is used where iptables has it (1.6.2 and later) or nft and the kernel take it, as flanneld does."
    )
    var ipMasqFullyRandomDisable = false

    @Flag(
        help:
            "Add a blackhole route for this host's subnet, so that packets to its unused addresses are dropped here instead of sent back into the network (flanneld's -ip-blackhole-route; for CNI setups without a bridge route for the whole subnet). It has the lowest priority: a bridge's route to the subnet wins."
    )
    var ipBlackholeRoute = false

    @Flag(
        inversion: .prefixedNo,
        help:
            "Accept forwarded traffic from and to the overlay network in iptables' FORWARD chain (or tunneld's nftables table with EnableNFTables), as flanneld's -iptables-forward-rules (needed where the FORWARD policy is DROP, as Docker sets it; -iptables-forward-rules=false or --no-iptables-forward-rules: off)."
    )
    var iptablesForwardRules = true

    @Option(
        help: ArgumentHelp(
            "Check tunneld's iptables rules (or nftables table) this often and put back what someone removed or changed (flanneld's -iptables-resync).",
            valueName: "seconds"
        )
    )
    var iptablesResync: Int = 5

    @Option(help: ArgumentHelp("Address the health endpoint listens on.", valueName: "ip"))
    var healthzIP: String = "0.0.0.0"

    @Option(
        help: ArgumentHelp(
            "Port of the health endpoint (GET /healthz answers 200 while running); 0 = off.",
            valueName: "port"
        )
    )
    var healthzPort: Int = 0

    @Option(
        name: [.customShort("v"), .customLong("v")],
        help: ArgumentHelp(
            "flanneld's verbosity: 0 = info, 1–9 = debug, 10 and more = trace; --log-level wins.",
            valueName: "n"
        )
    )
    var verbosity: Int = 0

    func validate() throws {
        guard (1...1439).contains(subnetLeaseRenewMargin) else {
            throw ValidationError(
                "--subnet-lease-renew-margin must be between 1 and 1439 minutes, not \(subnetLeaseRenewMargin)"
            )
        }
        for pattern in ifaceRegex {
            do { _ = try Regex(pattern) } catch {
                throw ValidationError("--iface-regex \(pattern) is not a valid regular expression: \(error)")
            }
        }
        guard (1...3600).contains(iptablesResync) else {
            throw ValidationError("--iptables-resync must be between 1 and 3600 seconds, not \(iptablesResync)")
        }
        guard (0...65535).contains(healthzPort) else {
            throw ValidationError("--healthz-port must be between 0 (off) and 65535, not \(healthzPort)")
        }
        if IPv4Address(healthzIP) == nil {
            throw ValidationError("--healthz-ip \(healthzIP) is not an IPv4 address (expected a.b.c.d)")
        }
        if let ifaceCanReach, IPv4Address(ifaceCanReach) == nil {
            throw ValidationError(
                "--iface-can-reach \(ifaceCanReach) is not an IPv4 address (expected a.b.c.d: an address the interface to use has a route to)"
            )
        }
        if let publicIP, IPv4Address(publicIP) == nil {
            throw ValidationError("--public-ip \(publicIP) is not an IPv4 address (expected a.b.c.d)")
        }
        if let publicIPv6, IPv6Address(publicIPv6) == nil {
            throw ValidationError(
                "--public-ipv6 \(publicIPv6) is not an IPv6 address (expected e.g. 2001:db8::10, without /len)"
            )
        }
        guard verbosity >= 0 else {
            throw ValidationError("-v must be 0 or more, not \(verbosity)")
        }
    }
}
