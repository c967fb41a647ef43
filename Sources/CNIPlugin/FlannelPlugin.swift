import FlannelFiles

/// flannel's CNI plugin ("type": "flannel"): a meta-plugin that reads the
/// host's subnet file and delegates the real work — by default to the
/// standard `bridge` plugin with `host-local` IPAM over the host's subnet.
///
/// ADD assembles the delegate config (see `FlannelNetConf.delegateConfig`),
/// saves it under the container's ID and runs the delegate; DEL runs the
/// delegate with the saved config, so it works after subnet.env changed or
/// disappeared, and succeeds when there is nothing to delete; CHECK runs
/// the delegate's CHECK with the saved config and the runtime's prevResult.
public struct FlannelPlugin: Sendable {
    /// The CNI versions this plugin accepts: those of the standard plugins
    /// it delegates to (Debian's containernetworking-plugins 1.1).
    public static let supportedVersions = ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0"]
    public static let currentVersion = "1.0.0"

    public var runner: any DelegateRunner
    /// Plugin types that are this program, which a delegate must not name.
    public var selfNames: Set<String>

    public init(runner: any DelegateRunner = ExecDelegateRunner(), invokedAs: String = "tunneld-cni") {
        self.runner = runner
        selfNames = ["flannel", "tunneld-cni", invokedAs]
    }

    /// What to print and how to exit.
    public struct Response: Sendable, Equatable {
        public var stdout: [UInt8]
        /// Text for standard error (help when run by hand).
        public var stderr: String
        public var exitStatus: Int32
    }

    public static var about: String {
        """
        tunneld-cni: flannel's CNI plugin for tunneld. Install it as "flannel" in the runtime's CNI \
        bin directory; it reads the subnet file tunneld writes (/run/flannel/subnet.env) and \
        delegates to the bridge plugin with host-local IPAM. See docs/CNI.md.
        CNI protocol versions supported: \(supportedVersions.joined(separator: ", "))

        """
    }

    /// Handles one invocation: the process environment and standard input.
    public func handle(environment: [String: String], stdin: [UInt8]) -> Response {
        do throws(CNIError) {
            guard let request = try CNIRequest(environment: environment, stdin: stdin) else {
                return Response(stdout: [], stderr: Self.about, exitStatus: 0)
            }
            let output = try handle(request)
            return Response(stdout: output, stderr: "", exitStatus: 0)
        } catch {
            return Response(
                stdout: Array((error.json(cniVersion: Self.errorVersion(stdin)) + "\n").utf8),
                stderr: "",
                exitStatus: 1
            )
        }
    }

    func handle(_ request: CNIRequest) throws(CNIError) -> [UInt8] {
        if request.command == .version {
            let versions = JSONValue.array(Self.supportedVersions.map { .string($0) })
            return Array(
                JSONValue.object(["cniVersion": .string(Self.currentVersion), "supportedVersions": versions])
                    .compactText.utf8
            )
        }
        let conf = try FlannelNetConf(parsing: request.stdin)
        try Self.checkVersion(conf.effectiveVersion, for: request.command)
        switch request.command {
        case .add: return try add(request, conf)
        case .del: return try del(request, conf)
        case .check: return try check(request, conf)
        case .version: return []
        }
    }

    func add(_ request: CNIRequest, _ conf: FlannelNetConf) throws(CNIError) -> [UInt8] {
        let subnet = try FlannelSubnetFile.read(conf.subnetFile)
        let delegate = try conf.delegateConfig(for: subnet, selfNames: selfNames)
        let bytes = Array(JSONValue.object(delegate).compactText.utf8)
        // Saved before the delegate runs: if ADD fails half-way the runtime
        // calls DEL, which needs it to undo what the delegate did.
        try DelegateStore(directory: conf.dataDir).save(bytes, for: request.containerID)
        return try runner.run(type: Self.type(of: delegate), command: .add, config: bytes, request: request)
    }

    func del(_ request: CNIRequest, _ conf: FlannelNetConf) throws(CNIError) -> [UInt8] {
        let store = DelegateStore(directory: conf.dataDir)
        // Nothing saved: ADD never ran or DEL already did; the spec asks DEL
        // to succeed when what it would remove is gone.
        guard let bytes = try store.load(for: request.containerID) else { return [] }
        let type: String
        switch Self.delegateType(saved: bytes) {
        case .success(let found): type = found
        case .failure(let why):
            // Nothing can be run with it, and kept in place it would fail every DEL the
            // runtime retries; moved aside, its bytes stay for whoever looks into it.
            let path = store.path(for: request.containerID)
            let aside = try store.setAside(for: request.containerID)
            throw CNIError(
                code: CNIError.decodingFailure,
                "the saved delegate config \(path) is unreadable (\(why)); it was moved to \(aside)",
                details: "the delegate's DEL did not run, so the container's veth and its host-local address (a file "
                    + "named for the address, holding the container ID, in host-local's dataDir, by default "
                    + "/var/lib/cni/networks/\(conf.name ?? "<network name>")/) may remain: remove them by hand; the next DEL succeeds with nothing to delete"
            )
        }
        let output = try runner.run(type: type, command: .del, config: bytes, request: request)
        try store.remove(for: request.containerID)
        return output
    }

    /// The `type` of a saved delegate config, or what is wrong with it.
    static func delegateType(saved bytes: [UInt8]) -> Result<String, SavedConfigDefect> {
        guard let saved = try? JSONValue(parsing: bytes) else {
            return .failure(SavedConfigDefect(bytes.isEmpty ? "empty" : "not JSON"))
        }
        guard case .object(let fields) = saved else { return .failure(SavedConfigDefect("not a JSON object")) }
        guard case .string(let type)? = fields["type"] else {
            return .failure(SavedConfigDefect(fields["type"] == nil ? "no \"type\"" : "\"type\" is not a string"))
        }
        return .success(type)
    }

    struct SavedConfigDefect: Error, CustomStringConvertible {
        var description: String
        init(_ description: String) { self.description = description }
    }

    func check(_ request: CNIRequest, _ conf: FlannelNetConf) throws(CNIError) -> [UInt8] {
        let store = DelegateStore(directory: conf.dataDir)
        guard let bytes = try store.load(for: request.containerID) else {
            throw CNIError(
                code: CNIError.unknownContainer,
                "container \(request.containerID) has no attachment on this network",
                details:
                    "no saved delegate config at \(store.path(for: request.containerID)): ADD did not run here, or DEL removed it"
            )
        }
        guard let saved = try? JSONValue(parsing: bytes), case .object(var delegate) = saved,
            case .string(let type)? = delegate["type"]
        else {
            throw CNIError(
                code: CNIError.decodingFailure,
                "the saved delegate config \(store.path(for: request.containerID)) is not a plugin config"
            )
        }
        try Self.checkSubnetUnchanged(delegate, subnetFile: conf.subnetFile)
        // The delegate checks against the result the runtime kept from ADD,
        // in the version the runtime speaks now.
        if let cniVersion = conf.cniVersion { delegate["cniVersion"] = .string(cniVersion) }
        if let prevResult = conf.prevResult { delegate["prevResult"] = Self.routesWithGateways(prevResult) }
        if let runtimeConfig = conf.runtimeConfig { delegate["runtimeConfig"] = .object(runtimeConfig) }
        return try runner.run(
            type: type,
            command: .check,
            config: Array(JSONValue.object(delegate).compactText.utf8),
            request: request
        )
    }

    /// If the daemon now holds a different subnet than at ADD, the
    /// container's address is no longer routed to this host: say so. (A
    /// missing subnet file is not an error here: the daemon may be restarting.)
    static func checkSubnetUnchanged(_ delegate: [String: JSONValue], subnetFile: String) throws(CNIError) {
        guard let current = try? FlannelSubnetFile.read(subnetFile),
            case .object(let ipam)? = delegate["ipam"], case .array(let ranges)? = ipam["ranges"]
        else { return }
        let saved = ranges.compactMap { range -> String? in
            guard case .array(let items) = range, case .string(let subnet)? = items.first?.field("subnet") else {
                return nil
            }
            return subnet
        }
        let now = [current.subnet, current.ipv6Subnet].compactMap { $0?.text }
        if saved != now {
            throw CNIError(
                code: CNIError.invalidSubnetFile,
                "this host's subnet changed since the container was added: it was \(saved.joined(separator: ", ")), \(subnetFile) now says \(now.joined(separator: ", "))",
                details: "the container's address is no longer routed to this host; recreate the container"
            )
        }
    }

    /// The result with each route that names no `gw` given the gateway it
    /// was installed through: the first gateway of its address family among
    /// the result's `ips`, as the standard plugins' IPAM code installs it.
    /// bridge's CHECK before plugins 1.3 (containernetworking/plugins#887)
    /// looked for a route without a gateway and so failed for every route
    /// flannel's config produces; with the gateway filled in, old and new
    /// plugins both find the route that is really there.
    static func routesWithGateways(_ result: JSONValue) -> JSONValue {
        guard case .object(var fields) = result, case .array(let routes)? = fields["routes"],
            case .array(let ips)? = fields["ips"]
        else { return result }
        func gateway(ipv6: Bool) -> JSONValue? {
            for ip in ips {
                guard case .string(let address)? = ip.field("address"), case .string(let gw)? = ip.field("gateway"),
                    let network = IPNetworkText(address), network.isIPv6 == ipv6
                else { continue }
                return .string(gw)
            }
            return nil
        }
        fields["routes"] = .array(
            routes.map { route in
                guard case .object(var route) = route, route["gw"] == nil || route["gw"] == .null,
                    case .string(let dst)? = route["dst"], let network = IPNetworkText(dst),
                    let gw = gateway(ipv6: network.isIPv6)
                else { return route }
                route["gw"] = gw
                return .object(route)
            }
        )
        return .object(fields)
    }

    static func type(of delegate: [String: JSONValue]) -> String {
        if case .string(let type)? = delegate["type"] { return type }
        return "bridge"
    }

    /// The config's version must be one this plugin speaks; CHECK exists
    /// from 0.4.0 on.
    static func checkVersion(_ version: String, for command: CNICommand) throws(CNIError) {
        guard supportedVersions.contains(version) else {
            throw CNIError(
                code: CNIError.incompatibleVersion,
                "incompatible CNI versions",
                details: "config is \"\(version)\", plugin supports \(supportedVersions.joined(separator: ", "))"
            )
        }
        if command == .check && !versionAtLeast(version, "0.4.0") {
            throw CNIError(
                code: CNIError.incompatibleVersion,
                "config version does not allow CHECK",
                details: "CHECK needs cniVersion 0.4.0 or later; the config says \(version)"
            )
        }
    }

    static func versionAtLeast(_ version: String, _ minimum: String) -> Bool {
        let a = version.split(separator: ".").map { Int($0) ?? 0 }
        let b = minimum.split(separator: ".").map { Int($0) ?? 0 }
        return a.lexicographicallyPrecedes(b) == false
    }

    /// The version an error is reported in: the config's, when it names
    /// one this plugin speaks.
    static func errorVersion(_ stdin: [UInt8]) -> String {
        if let root = try? JSONValue(parsing: stdin), case .string(let version)? = root.field("cniVersion"),
            supportedVersions.contains(version)
        {
            return version
        }
        return currentVersion
    }
}
