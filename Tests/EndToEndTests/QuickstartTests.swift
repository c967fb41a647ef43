import Foundation
import Testing

/// docs/QUICKSTART.md, executed: every ```sh block in order as one bash
/// script, its "Clean up" blocks afterwards whatever happened, with a
/// namespace prefix and a directory unique to this run.
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
    }

    /// The page's shell blocks, split at the "Clean up" heading.
    static func read() throws -> Page {
        let text = try String(contentsOf: repositoryRoot.appendingPathComponent("docs/QUICKSTART.md"), encoding: .utf8)
        var page = Page()
        var inCleanUp = false
        var block: [Substring]?
        for line in text.split(separator: "\n", omittingEmptySubsequences: false) {
            if block == nil, line.hasPrefix("## ") {
                inCleanUp = line.lowercased().contains("clean up")
            } else if block == nil, line == "```sh" {
                block = []
            } else if var lines = block {
                if line == "```" {
                    let code = lines.joined(separator: "\n")
                    if inCleanUp { page.cleanUp.append(code) } else { page.steps.append(code) }
                    block = nil
                } else {
                    lines.append(line)
                    block = lines
                }
            }
        }
        return page
    }

    @Test func theQuickstartPageRunsAsWritten() throws {
        let page = try Self.read()
        #expect(page.steps.count >= 8 && !page.cleanUp.isEmpty, "the page lost its blocks: \(page.steps.count) steps")
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
            _ = try? bash(page.cleanUp, strict: false, timeout: .seconds(60))
            // Whatever the page's own clean-up missed.
            for name in ["h1", "h2", "etcd", "net"] {
                _ = try? run(["ip", "netns", "del", "\(prefix)-\(name)"], check: false)
            }
            try? FileManager.default.removeItem(at: directory)
        }
        let result = try bash(page.steps, strict: true, timeout: .seconds(300))
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
        #expect(result.output.contains("FLANNEL_SUBNET=10.2."), "\(result.output)")
        #expect(result.output.contains("DOCKER_OPTS=\" --bip=10.2."), "\(result.output)")
        #expect(result.output.contains("3 packets transmitted, 3 packets received"), "\(result.output)")
        #expect(result.output.contains("198.18.0.2"), "status lists host 2 as a peer: \(result.output)")
        // The clean-up leaves no namespace behind.
        _ = try bash(page.cleanUp, strict: false, timeout: .seconds(60))
        let left = try run(["ip", "netns", "list"]).output.split(separator: "\n").filter { $0.hasPrefix(prefix) }
        #expect(left.isEmpty, "the page's clean-up left \(left)")
    }
}
