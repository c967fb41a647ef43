import ArgumentParser
import Foundation
import Logging

@main
struct Tunneld: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tunneld",
        abstract:
            "A flannel-compatible overlay network daemon: udp (a fast userspace data path), vxlan, host-gw and wireguard (userspace) backends.",
        discussion: """
            tunneld gives every host a subnet of one cluster-wide network and carries container \
            traffic between hosts. It reads flannel's config and leases (etcd keys \
            <prefix>/config and <prefix>/subnets/…) and writes flannel's subnet.env.
            flanneld's flag spellings (-etcd-endpoints=…, -iface=…) and FLANNELD_* environment \
            variables are accepted.

            Examples:
              tunneld config set -etcd-endpoints=http://10.0.0.1:2379 flannel-config.json
              tunneld run -etcd-endpoints=http://10.0.0.1:2379 -iface=eth0 -ip-masq
              tunneld docker-opts -k DOCKER_NETWORK_OPTIONS -d /run/flannel/docker
              tunneld status            (this host, its peers, the data path)
              tunneld leases -etcd-endpoints=http://10.0.0.1:2379

            Each subcommand's --help lists its options. Docs: docs/QUICKSTART.md, \
            docs/MIGRATING.md, docs/OPERATIONS.md.
            """,
        version: tunneldVersion,
        subcommands: [Run.self, Config.self, Leases.self, Status.self, DockerOpts.self],
        defaultSubcommand: nil
    )

    static func main() async {
        // flanneld's spellings and FLANNELD_* become ordinary options first.
        let given = Array(CommandLine.arguments.dropFirst())
        if given.first == "run", let message = FlannelArguments.unsupported(given) {
            FileHandle.standardError.write(Data("Error: \(message)\n".utf8))
            Foundation.exit(64)
        }
        let arguments = FlannelArguments.normalize(given, environment: ProcessInfo.processInfo.environment)
        await main(arguments)
    }
}

extension Logger.Level: @retroactive ExpressibleByArgument {}
