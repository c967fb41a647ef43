import ArgumentParser
import FlannelFiles
import Foundation
import LeaseStore
import NetBase
import Netlink

/// flannel's `mk-docker-opts.sh`: Docker daemon options from subnet.env, for
/// docker.service's `EnvironmentFile=`. Its short flags are getopts-style
/// (`-ci`, `-kNAME`), so FlannelArguments leaves this subcommand's arguments
/// alone.
struct DockerOpts: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "docker-opts",
        abstract:
            "Write Docker daemon options (--bip, --ip-masq, --mtu) from subnet.env, as flannel's mk-docker-opts.sh.",
        discussion: """
            Output (the script's format, for a systemd EnvironmentFile=):
              DOCKER_OPT_BIP="--bip=10.2.72.1/24"
              DOCKER_OPT_IPMASQ="--ip-masq=true"
              DOCKER_OPT_MTU="--mtu=1472"
              DOCKER_OPTS=" --bip=10.2.72.1/24 --ip-masq=true --mtu=1472"
            --ip-masq is the opposite of FLANNEL_IPMASQ: when tunneld masquerades (run --ip-masq), \
            Docker must not. An existing value of the combined variable in the environment is kept \
            in front, as the script does. The file is replaced atomically; on an error it is left \
            as it was.
            Example, as flanneld's unit does it: tunneld.service has
              ExecStartPost=/usr/local/bin/tunneld docker-opts -k DOCKER_NETWORK_OPTIONS -d /run/flannel/docker
            and a docker.service drop-in (After=tunneld.service) has
              EnvironmentFile=/run/flannel/docker
              ExecStart=
              ExecStart=/usr/bin/dockerd -H fd:// $DOCKER_NETWORK_OPTIONS
            """
    )

    @Option(
        name: [.customShort("f"), .customLong("subnet-file")],
        help: ArgumentHelp("The subnet file tunneld (or flanneld) writes.", valueName: "file")
    )
    var subnetFile: String = SubnetEnv.defaultPath

    @Option(
        name: [.customShort("d"), .customLong("output")],
        help: ArgumentHelp("The Docker environment file to write.", valueName: "file")
    )
    var output: String = DockerOptions.defaultPath

    @Flag(
        name: [.customShort("i"), .customLong("individual")],
        help:
            "Write each option as its own variable (DOCKER_OPT_BIP, DOCKER_OPT_IPMASQ, DOCKER_OPT_MTU). Neither -i nor -c: both."
    )
    var individual = false

    @Flag(
        name: [.customShort("c"), .customLong("combined")],
        help: "Write all options in one variable (see -k). Neither -i nor -c: both."
    )
    var combined = false

    @Option(
        name: [.customShort("k", allowingJoined: true), .customLong("combined-key")],
        help: ArgumentHelp(
            "Name of the combined variable (distributions' docker.service uses DOCKER_NETWORK_OPTIONS).",
            valueName: "name"
        )
    )
    var combinedKey: String = DockerOptions.defaultCombinedKey

    @Flag(
        name: [.customShort("m"), .customLong("no-ip-masq")],
        help: "Leave out --ip-masq (for Docker versions without it)."
    )
    var noIPMasq = false

    var options: DockerOptions {
        DockerOptions(individual: individual, combined: combined, combinedKey: combinedKey, ipMasqOption: !noIPMasq)
    }

    /// The output file's text for the subnet file's text.
    func render(subnetEnv text: String, environment: [String: String]) throws -> String {
        do {
            return try options.render(subnetEnv: text, environment: environment)
        } catch {
            throw DockerOptionsError(path: error.path ?? subnetFile, error.reason)
        }
    }

    func run() throws {
        do {
            let text = try DockerOptions.readSubnetFile(subnetFile)
            let rendered = try render(subnetEnv: text, environment: ProcessInfo.processInfo.environment)
            if let subnet = DockerOptions.subnet(subnetEnv: text) { try checkRoutes(subnet) }
            try DockerOptions.writeOutput(rendered, to: output)
        } catch {
            throw DaemonError("docker-opts: \(error)")
        }
    }

    /// The script's last check: a route to this host's own subnet through a
    /// gateway means another host claims it (a stale host-gw route, or the
    /// same lease on two hosts), and Docker's bridge would not be reached.
    private func checkRoutes(_ subnet: IPv4Network) throws {
        let routes: [Route]
        do {
            routes = try RouteSocket().routes()
        } catch {
            FileHandle.standardError.write(
                Data(
                    "tunneld docker-opts: warning: cannot read the routing table to check for a route to \(subnet): \(error)\n"
                        .utf8
                )
            )
            return
        }
        if let route = routes.first(where: { $0.destination == subnet && $0.gateway != nil }),
            let gateway = route.gateway
        {
            throw DockerOptionsError(
                path: subnetFile,
                "this host's subnet \(subnet) is already routed via \(gateway) (another host's lease, or a stale host-gw route): remove the route (ip route del \(subnet) via \(gateway)) or find which host holds \(subnet)"
            )
        }
    }
}
