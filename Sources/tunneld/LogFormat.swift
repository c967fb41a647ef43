import ArgumentParser
import FlannelFiles
import Foundation
import LeaseStore
import Logging
import NetBase

/// How log lines look: `text` for people (swift-log's stream format) or
/// `json`, one object per line, for log shippers.
enum LogFormat: String, ExpressibleByArgument, CaseIterable, Sendable {
    case text, json
}

/// Logs go to standard error, at `level`, in `format`; called once by each
/// subcommand.
func bootstrapLogging(_ level: Logger.Level = .info, format: LogFormat = .text) {
    LoggingSystem.bootstrap { label in
        switch format {
        case .text:
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        case .json:
            var handler = JSONLogHandler(label: label, write: JSONLogHandler.standardError)
            handler.logLevel = level
            return handler
        }
    }
}

/// flanneld's `-v N` (klog verbosity) as a swift-log level: 0 is info,
/// 1–9 debug, 10 and more trace.
func logLevel(verbosity: Int) -> Logger.Level {
    switch verbosity {
    case ..<1: .info
    case 1..<10: .debug
    default: .trace
    }
}

/// One JSON object per line: `time` (RFC 3339, UTC, milliseconds), `level`,
/// `logger`, `message`, then the metadata's keys (a key that would clash
/// with one of those gets a `meta.` prefix).
struct JSONLogHandler: LogHandler {
    let label: String
    let write: @Sendable (String) -> Void
    var logLevel: Logger.Level = .info
    var metadata: Logger.Metadata = [:]

    init(label: String, write: @escaping @Sendable (String) -> Void) {
        self.label = label
        self.write = write
    }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    static let standardError: @Sendable (String) -> Void = { line in
        // One write per line, so lines from different threads do not mix.
        var bytes = Array(line.utf8)
        bytes.append(10)
        writeAll(2, bytes)
    }

    func log(event: LogEvent) {
        var fields: [(String, String)] = [
            ("time", Self.quote(Self.timestamp(Date()))),
            ("level", Self.quote(event.level.rawValue)),
            ("logger", Self.quote(label)),
            ("message", Self.quote(event.message.description)),
        ]
        let reserved: Set<String> = ["time", "level", "logger", "message"]
        let merged = metadata.merging(event.metadata ?? [:]) { $1 }
        for key in merged.keys.sorted() {
            let name = reserved.contains(key) ? "meta." + key : key
            fields.append((name, Self.json(merged[key]!)))
        }
        write("{" + fields.map { Self.quote($0.0) + ":" + $0.1 }.joined(separator: ",") + "}")
    }

    static func json(_ value: Logger.Metadata.Value) -> String {
        switch value {
        case .string(let text): quote(text)
        case .stringConvertible(let item): quote(item.description)
        case .array(let items): "[" + items.map(json).joined(separator: ",") + "]"
        case .dictionary(let entries):
            "{" + entries.keys.sorted().map { quote($0) + ":" + json(entries[$0]!) }.joined(separator: ",") + "}"
        }
    }

    /// A JSON string literal, escaped as the store's JSON writer escapes.
    static func quote(_ text: String) -> String {
        var out = ""
        JSONValue.writeString(text, to: &out)
        return out
    }

    static func timestamp(_ date: Date) -> String {
        date.formatted(
            .iso8601.year().month().day().dateSeparator(.dash)
                .time(includingFractionalSeconds: true).timeSeparator(.colon).timeZone(separator: .omitted)
        )
    }
}
