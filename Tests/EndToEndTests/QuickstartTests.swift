import Foundation
import Testing

/// docs/QUICKSTART.md, executed: every ```sh block in order as one bash
/// script, its "Clean up" blocks afterwards whatever happened, with a
/// namespace prefix and a directory unique to this run; then its dual-stack
/// variant the same way (the variant's first block in place of the config
/// put, the others after the containers' ping).
@Suite(
    .serialized,
    .enabled(if: canRunNamespaceTests, namespaceSkipReason),
    .enabled(if: etcdIsInstalled, etcdSkipReason),
    .enabled(if: DockerTools.canRun, DockerTools.skipReason)
)
struct QuickstartTests {
    struct Page {
        var steps: [String] = []
        var cleanUp: [String] = []
        /// The "Variant: dual stack" section's blocks.
        var variant: [String] = []

        /// The walk with the dual-stack variant's changes.
        func dualStack() throws -> [String] {
            guard variant.count >= 2 else { throw LabError("the dual-stack variant lost its blocks: \(variant)") }
            guard let config = steps.firstIndex(where: { $0.contains("put /coreos.com/network/config") }),
                let ping = steps.firstIndex(where: { $0.contains("ping -c 3") }), config < ping
            else {
                throw LabError("the page has no config put before a ping for the variant to change")
            }
            var walk = steps
            walk[config] = variant[0]
            walk.insert(contentsOf: variant.dropFirst(), at: ping + 1)
            return walk
        }
    }

    enum Section { case steps, cleanUp, variant }

    /// The page's shell blocks, split at the "Clean up" and "Variant" headings.
    static func read() throws -> Page {
        let text = try String(contentsOf: repositoryRoot.appendingPathComponent("docs/QUICKSTART.md"), encoding: .utf8)
        var page = Page()
        var section = Section.steps
        var block: [Substring]?
        for line in text.split(separator: "\n", omittingEmptySubsequences: false) {
            if block == nil, line.hasPrefix("## ") {
                let heading = line.lowercased()
                section =
                    heading.contains("clean up")
                    ? .cleanUp : heading.contains("variant: dual stack") ? .variant : .steps
            } else if block == nil, line == "```sh" {
                block = []
            } else if var lines = block {
                if line == "```" {
                    let code = lines.joined(separator: "\n")
                    switch section {
                    case .steps: page.steps.append(code)
                    case .cleanUp: page.cleanUp.append(code)
                    case .variant: page.variant.append(code)
                    }
                    block = nil
                } else {
                    lines.append(line)
                    block = lines
                }
            }
        }
        return page
    }

    /// Runs `steps` as one strict bash script, then the page's clean-up
    /// (whatever happened), and checks that it left no namespace; returns
    /// the script's output after expecting it to have succeeded.
    func walk(_ steps: [String], cleanUp: [String]) throws -> CommandResult {
        let prefix = "qs\(getpid() % 100_000)\(String(UInt16.random(in: 0...UInt16.max), radix: 16))"
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("tunneld-quickstart-\(prefix)")
        // Debian's docker client first: it matches Debian's dockerd.
        let environment = [
            "P=\(prefix)", "W=\(directory.path)", "TUNNELD=\(tunneldBinary)",
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/sbin:/usr/local/bin",
        ]
        func bash(_ blocks: [String], strict: Bool, timeout: Duration) throws -> CommandResult {
            let script = (strict ? "set -euxo pipefail\n" : "set -x\n") + blocks.joined(separator: "\n")
            return try run(["env"] + environment + ["bash", "-c", script], timeout: timeout, check: false)
        }
        defer {
            _ = try? bash(cleanUp, strict: false, timeout: .seconds(60))
            // Whatever the page's own clean-up missed.
            for name in ["h1", "h2", "etcd", "net"] {
                _ = try? run(["ip", "netns", "del", "\(prefix)-\(name)"], check: false)
            }
            try? FileManager.default.removeItem(at: directory)
        }
        let result = try bash(steps, strict: true, timeout: .seconds(300))
        if !result.succeeded {
            for log in ["h1.log", "h2.log", "etcd.log", "d1.log", "d2.log"] {
                let text = (try? String(contentsOf: directory.appendingPathComponent(log), encoding: .utf8)) ?? ""
                print("---- \(log) ----\n" + text.split(separator: "\n").suffix(15).joined(separator: "\n"))
            }
        }
        #expect(
            result.succeeded,
            "a QUICKSTART.md command failed:\n\(result.output.split(separator: "\n").suffix(40).joined(separator: "\n"))"
        )
        // The clean-up leaves no namespace behind.
        _ = try bash(cleanUp, strict: false, timeout: .seconds(60))
        let left = try run(["ip", "netns", "list"]).output.split(separator: "\n").filter { $0.hasPrefix(prefix) }
        #expect(left.isEmpty, "the page's clean-up left \(left)")
        return result
    }

    @Test func theQuickstartPageRunsAsWritten() throws {
        let page = try Self.read()
        #expect(page.steps.count >= 8 && !page.cleanUp.isEmpty, "the page lost its blocks: \(page.steps.count) steps")
        let result = try walk(page.steps, cleanUp: page.cleanUp)
        #expect(result.output.contains("FLANNEL_SUBNET=10.2."), "\(result.output)")
        #expect(result.output.contains("DOCKER_OPTS=\" --bip=10.2."), "\(result.output)")
        #expect(result.output.contains("3 packets transmitted, 3 packets received"), "\(result.output)")
        #expect(result.output.contains("198.18.0.2"), "status lists host 2 as a peer: \(result.output)")
    }

    /// The "Variant: dual stack" section: the walk with its config, and
    /// containers that reach each other over IPv6 too.
    @Test func theDualStackVariantRunsAsWritten() throws {
        let page = try Self.read()
        let result = try walk(try page.dualStack(), cleanUp: page.cleanUp)
        let output = result.output
        #expect(output.contains("FLANNEL_IPV6_NETWORK=fd00:10:2::/48"), "\(output)")
        #expect(output.contains("FLANNEL_IPV6_SUBNET=fd00:10:2:"), "\(output)")
        #expect(output.contains("&fd00:10:2:"), "the leases' keys are dual-stack: \(output)")
        #expect(output.contains("--fixed-cidr-v6=fd00:10:2:") && output.contains("--ipv6"), "\(output)")
        #expect(output.contains("container c2 on host 2 is also fd00:10:2:"), "\(output)")
        let pings = output.split(separator: "\n").filter { $0.contains("packets transmitted") }
        #expect(pings.count == 2 && pings.allSatisfy { $0.contains("3 packets received") }, "\(pings)")
    }
}
