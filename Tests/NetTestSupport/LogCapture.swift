import Logging
import Synchronization

/// Log lines kept in memory, so tests can check what an operator would read:
/// each line is "<level>: <message>".
public final class LogCapture: Sendable {
    private let lines = Mutex<[String]>([])
    public init() {}
    public var all: [String] { lines.withLock { $0 } }
    public func append(_ line: String) { lines.withLock { $0.append(line) } }
    public func count(containing text: String) -> Int { all.filter { $0.contains(text) }.count }

    public var logger: Logger {
        Logger(label: "test") { _ in CaptureHandler(capture: self) }
    }

    public struct CaptureHandler: LogHandler {
        let capture: LogCapture
        public var metadata: Logger.Metadata = [:]
        public var logLevel: Logger.Level = .trace
        public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }
        public func log(event: LogEvent) {
            capture.append("\(event.level): \(event.message)")
        }
    }
}
