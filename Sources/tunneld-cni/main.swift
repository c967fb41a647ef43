import CNIPlugin
import NetBase

#if canImport(Glibc)
import Glibc
#endif

// flannel's CNI plugin for tunneld. A container runtime runs it with the
// CNI_* environment and the network config on stdin; install it as
// "flannel" in the runtime's CNI bin directory (docs/CNI.md).

var environment: [String: String] = [:]
var entry = environ
while let pointer = entry.pointee {
    let text = String(cString: pointer)
    if let equals = text.firstIndex(of: "=") {
        environment[String(text[..<equals])] = String(text[text.index(after: equals)...])
    }
    entry += 1
}

let arguments = CommandLine.arguments
let invokedAs = arguments.first.map { String($0.split(separator: "/").last ?? "") } ?? "tunneld-cni"
if arguments.count > 1, ["-h", "--help", "help", "--version", "-version"].contains(arguments[1]) {
    writeAll(2, Array(FlannelPlugin.about.utf8))
    exit(0)
}
// Standard input is read only for a command: run by hand without one, the
// plugin prints what it is instead of waiting for input.
let hasCommand = !(environment["CNI_COMMAND"] ?? "").isEmpty
let response = FlannelPlugin(invokedAs: invokedAs)
    .handle(environment: environment, stdin: hasCommand ? ((try? readToEnd(0).get()) ?? []) : [])
writeAll(1, response.stdout)
writeAll(2, Array(response.stderr.utf8))
exit(response.exitStatus)
