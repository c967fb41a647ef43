import NetBase

#if canImport(Glibc)
import Glibc
#endif

/// Runs a loop on a thread of its own and reports its end to async code.
public final class DataPathThread: Sendable {
    public let loop: any DataPathLoop
    private let finished: AsyncThrowingStream<Void, any Error>
    private let continuation: AsyncThrowingStream<Void, any Error>.Continuation

    public init(loop: any DataPathLoop, name: String) {
        self.loop = loop
        (finished, continuation) = AsyncThrowingStream.makeStream()
        let continuation = self.continuation
        let thread = ThreadStart { [loop] in
            do {
                try loop.run()
                continuation.finish()
            } catch {
                continuation.finish(throwing: error)
            }
        }
        thread.start(name: name)
    }

    /// Waits until the loop returns; rethrows its error.
    public func wait() async throws {
        for try await _ in finished {}
    }

    public func stop() { loop.stop() }
}
