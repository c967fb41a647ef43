import CTunnel
import FlannelFiles
import NetBase

#if canImport(Glibc)
import Glibc
#endif

/// Runs a delegate plugin: found by its `type` in `CNI_PATH`, given the
/// caller's environment with `CNI_COMMAND` set to `command` and `config` on
/// standard input. Returns its standard output; a failure is the delegate's
/// own CNI error when it printed one, else a `CNIError` saying what happened.
public protocol DelegateRunner: Sendable {
    func run(type: String, command: CNICommand, config: [UInt8], request: CNIRequest) throws(CNIError) -> [UInt8]
}

/// The delegate as a child process, the way libcni's `invoke` runs it.
public struct ExecDelegateRunner: DelegateRunner {
    /// Where a delegate's standard error goes (the plugin's own stderr, which
    /// the runtime logs).
    public var diagnostics: @Sendable ([UInt8]) -> Void

    public init(diagnostics: @escaping @Sendable ([UInt8]) -> Void = ExecDelegateRunner.writeToStandardError) {
        self.diagnostics = diagnostics
    }

    public static let writeToStandardError: @Sendable ([UInt8]) -> Void = { bytes in writeAll(2, bytes) }

    /// The delegate's executable: the first `CNI_PATH` directory holding a
    /// file named `type`.
    public static func find(_ type: String, in searchPath: [String]) throws(CNIError) -> String {
        guard !type.isEmpty, !type.contains("/"), type != ".", type != ".." else {
            throw CNIError(code: CNIError.invalidNetworkConfig, "delegate type \"\(type)\" is not a plugin name")
        }
        for directory in searchPath where !directory.isEmpty {
            let candidate = "\(directory)/\(type)"
            var info = stat()
            if stat(candidate, &info) == 0 && info.st_mode & S_IFMT == S_IFREG { return candidate }
        }
        throw CNIError(
            code: CNIError.delegateFailed,
            "failed to find plugin \"\(type)\" in CNI_PATH \(searchPath.joined(separator: ":"))",
            details:
                "install the standard plugins (Debian: containernetworking-plugins, in /usr/lib/cni) and include their directory in the runtime's CNI bin path"
        )
    }

    public func run(type: String, command: CNICommand, config: [UInt8], request: CNIRequest) throws(CNIError) -> [UInt8]
    {
        let executable = try Self.find(type, in: request.searchPath)
        var environment = request.environment
        environment["CNI_COMMAND"] = command.rawValue
        let output: ChildOutput
        do {
            output = try ChildProcess.run(executable, environment: environment, input: config)
        } catch {
            throw CNIError(code: CNIError.delegateFailed, "cannot run delegate \(executable): \(error)")
        }
        if output.status == 0 {
            if !output.stderr.isEmpty { diagnostics(output.stderr) }
            return output.stdout
        }
        throw Self.failure(of: type, output: output)
    }

    /// A failed delegate's error: its own CNI error JSON when it printed one
    /// (so the runtime sees bridge's code and message unchanged, as with
    /// flannel's plugin), else its standard error or exit status.
    static func failure(of type: String, output: ChildOutput) -> CNIError {
        let exit = output.status > 128 ? "killed by signal \(output.status - 128)" : "exit status \(output.status)"
        if !output.stdout.isEmpty {
            if let parsed = try? JSONValue(parsing: output.stdout),
                case .number(let code)? = parsed.field("code"), case .string(let msg)? = parsed.field("msg")
            {
                var details = ""
                if case .string(let d)? = parsed.field("details") { details = d }
                return CNIError(code: Int(code), msg, details: details)
            }
            return CNIError(
                code: CNIError.delegateFailed,
                "delegate \(type) failed (\(exit)) and its output is no CNI error: \(String(decoding: output.stdout.prefix(2048), as: UTF8.self))"
            )
        }
        if !output.stderr.isEmpty {
            return CNIError(
                code: CNIError.delegateFailed,
                "delegate \(type) failed (\(exit)): \(String(decoding: output.stderr.prefix(2048), as: UTF8.self))"
            )
        }
        return CNIError(code: CNIError.delegateFailed, "delegate \(type) failed with no error message (\(exit))")
    }
}
