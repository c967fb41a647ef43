import FlannelFiles

/// The network config a runtime hands to flannel's plugin, e.g.
/// ```
/// {"cniVersion":"1.0.0","name":"cbr0","type":"flannel",
///  "delegate":{"hairpinMode":true,"isDefaultGateway":true}}
/// ```
/// Fields are matched the way Go's encoding/json matches flannel's struct
/// (exact name, else case-insensitively); unknown fields are ignored.
public struct FlannelNetConf: Sendable {
    public static let defaultSubnetFile = "/run/flannel/subnet.env"
    public static let defaultDataDir = "/var/lib/cni/flannel"

    /// `cniVersion` as given; nil when absent (the spec then means 0.1.0).
    public var cniVersion: String?
    public var name: String?
    public var subnetFile = FlannelNetConf.defaultSubnetFile
    /// Where the delegate config of each container is saved for DEL and CHECK.
    public var dataDir = FlannelNetConf.defaultDataDir
    public var delegate: [String: JSONValue]?
    /// The top-level `ipam`, the base of the delegate's.
    public var ipam: [String: JSONValue]?
    public var runtimeConfig: [String: JSONValue]?
    /// The previous result a runtime passes on CHECK (and DEL).
    public var prevResult: JSONValue?

    /// The version the config speaks: `cniVersion`, or 0.1.0 when absent.
    public var effectiveVersion: String { cniVersion ?? "0.1.0" }

    public init(parsing bytes: [UInt8]) throws(CNIError) {
        if bytes.allSatisfy({ $0 == 0x20 || $0 == 0x0a || $0 == 0x0d || $0 == 0x09 }) {
            throw CNIError(
                code: CNIError.decodingFailure,
                "no network config on standard input",
                details: "a runtime passes the network config JSON on stdin"
            )
        }
        let root: JSONValue
        do {
            root = try JSONValue(parsing: bytes)
        } catch {
            throw CNIError(code: CNIError.decodingFailure, "network config on stdin is not JSON: \(error)")
        }
        guard case .object = root else {
            throw CNIError(
                code: CNIError.decodingFailure,
                "network config on stdin is \(root.kindName), not a JSON object"
            )
        }
        func invalid(_ msg: String) -> CNIError { CNIError(code: CNIError.invalidNetworkConfig, msg) }
        func string(_ key: String) throws(CNIError) -> String? {
            switch root.field(key) {
            case nil, .null?: return nil
            case .string(let s)?: return s
            case let other?: throw invalid("\"\(key)\" must be a string, not \(other.kindName)")
            }
        }
        func object(_ key: String) throws(CNIError) -> [String: JSONValue]? {
            switch root.field(key) {
            case nil, .null?: return nil
            case .object(let fields)?: return fields
            case let other?: throw invalid("\"\(key)\" must be an object, not \(other.kindName)")
            }
        }
        cniVersion = try string("cniVersion")
        name = try string("name")
        if let file = try string("subnetFile") {
            guard !file.isEmpty else {
                throw invalid(
                    "\"subnetFile\" is empty: leave it out for \(Self.defaultSubnetFile), or name the file tunneld writes (its -subnet-file)"
                )
            }
            subnetFile = file
        }
        if let directory = try string("dataDir") {
            guard !directory.isEmpty else {
                throw invalid("\"dataDir\" is empty: leave it out for \(Self.defaultDataDir), or name a directory")
            }
            dataDir = directory
        }
        delegate = try object("delegate")
        ipam = try object("ipam")
        runtimeConfig = try object("runtimeConfig")
        prevResult = root.field("prevResult")
    }

    /// The delegate's config for ADD, assembled as flannel's plugin does:
    /// the user's `delegate` object, with defaults filled in only where it
    /// says nothing — `type` bridge, `ipMasq` the opposite of FLANNEL_IPMASQ
    /// (masquerade here only when the daemon does not), `mtu` FLANNEL_MTU,
    /// `isGateway` true for bridge — and `name`, `cniVersion` and `ipam`
    /// always set by the plugin. `selfNames` are the types that would run
    /// this plugin again.
    public func delegateConfig(
        for subnet: FlannelSubnetFile,
        selfNames: Set<String>
    ) throws(CNIError) -> [String: JSONValue] {
        func invalid(_ msg: String) -> CNIError { CNIError(code: CNIError.invalidNetworkConfig, msg) }
        guard let name, !name.isEmpty else {
            throw invalid(
                "the network config has no \"name\"; CNI requires one (host-local keeps its addresses under it)"
            )
        }
        var config = delegate ?? [:]
        if let type = config["type"] {
            guard case .string(let typeName) = type else {
                throw invalid("\"delegate\" must have a string \"type\" (e.g. \"bridge\"), not \(type.kindName)")
            }
            if selfNames.contains(typeName) {
                throw invalid(
                    "\"delegate\" type \"\(typeName)\" is this plugin itself; delegate to bridge (the default), ipvlan or macvlan"
                )
            }
        }
        if config["name"] != nil {
            throw invalid("\"delegate\" must not have a \"name\": the plugin sets it to the network's name")
        }
        if config["ipam"] != nil {
            throw invalid(
                "\"delegate\" must not have an \"ipam\": the plugin builds it from the subnet file (put IPAM options in the top-level \"ipam\")"
            )
        }
        if let runtimeConfig { config["runtimeConfig"] = .object(runtimeConfig) }
        config["name"] = .string(name)
        if config["type"] == nil { config["type"] = .string("bridge") }
        if config["ipMasq"] == nil { config["ipMasq"] = .bool(!subnet.ipMasq) }
        if config["mtu"] == nil { config["mtu"] = .number(Double(subnet.mtu)) }
        if config["type"] == .string("bridge") && config["isGateway"] == nil { config["isGateway"] = .bool(true) }
        if let cniVersion { config["cniVersion"] = .string(cniVersion) }
        config["ipam"] = .object(try delegateIPAM(for: subnet))
        return config
    }

    /// The top-level `ipam` (type host-local unless it names another) with
    /// `ranges` replaced by this host's subnets and the networks appended to
    /// its `routes`.
    func delegateIPAM(for subnet: FlannelSubnetFile) throws(CNIError) -> [String: JSONValue] {
        var ipam = self.ipam ?? [:]
        if ipam["type"] == nil { ipam["type"] = .string("host-local") }
        var ranges: [JSONValue] = []
        for network in [subnet.subnet, subnet.ipv6Subnet].compactMap({ $0 }) {
            ranges.append(.array([.object(["subnet": .string(network.text)])]))
        }
        ipam["ranges"] = .array(ranges)
        var routes = try Self.checkedRoutes(ipam["routes"])
        for network in subnet.networks + subnet.ipv6Networks {
            routes.append(.object(["dst": .string(network.text)]))
        }
        ipam["routes"] = .array(routes)
        return ipam
    }

    /// The user's `ipam.routes`, each an object with a network `dst` and an
    /// optional `gw`, as CNI's route type demands.
    static func checkedRoutes(_ value: JSONValue?) throws(CNIError) -> [JSONValue] {
        func invalid(_ msg: String) -> CNIError { CNIError(code: CNIError.invalidNetworkConfig, msg) }
        guard let value, value != .null else { return [] }
        guard case .array(let routes) = value else {
            throw invalid("\"ipam.routes\" must be an array of {\"dst\": …}, not \(value.kindName)")
        }
        for (i, route) in routes.enumerated() {
            guard case .string(let dst)? = route.field("dst"), IPNetworkText(dst) != nil else {
                throw invalid(
                    "\"ipam.routes\"[\(i)] needs a \"dst\" network such as 10.3.0.0/16, not \(route.compactText)"
                )
            }
            if let gw = route.field("gw"), gw != .null {
                guard case .string(let address) = gw,
                    IPNetworkText("\(address)/32") != nil || IPNetworkText("\(address)/128") != nil
                else {
                    throw invalid("\"ipam.routes\"[\(i)].gw must be an IP address, not \(gw.compactText)")
                }
            }
        }
        return routes
    }
}
