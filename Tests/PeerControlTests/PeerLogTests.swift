import Logging
import NetTestSupport
import Testing

@testable import PeerControl

@Suite struct PeerLogTests {
    func lines(_ count: Int, for logger: Logger) -> PeerLog {
        var log = PeerLog(for: logger)
        for i in 0..<count { log.note("peer 10.2.\(i).0/24 → peer 198.18.0.\(i + 1):8285") }
        return log
    }

    @Test func aFewChangesGetALineEach() {
        let capture = LogCapture()
        var logger = capture.logger
        logger.logLevel = .info
        lines(PeerLog.perPeerLimit, for: logger).flush(to: logger)
        #expect(capture.all.count == PeerLog.perPeerLimit)
        #expect(capture.all.allSatisfy { $0.hasPrefix("info: peer 10.2.") })
    }

    /// The first list of a network with thousands of hosts: one line at
    /// info, the peers one by one only when debug is on.
    @Test func aLargeBatchIsOneLineUnlessDebugging() {
        let capture = LogCapture()
        var logger = capture.logger
        logger.logLevel = .info
        lines(60, for: logger).flush(to: logger)
        #expect(
            capture.all == [
                "info: 60 peers programmed, from peer 10.2.0.0/24 → peer 198.18.0.1:8285 to peer 10.2.59.0/24 → peer 198.18.0.60:8285 (one line per peer at --log-level debug)"
            ]
        )

        let debugging = LogCapture()
        logger = debugging.logger
        logger.logLevel = .debug
        lines(60, for: logger).flush(to: logger)
        #expect(debugging.count(containing: "info: 60 peers programmed") == 1)
        #expect(debugging.all.filter { $0.hasPrefix("debug: peer 10.2.") }.count == 60)
    }

    /// At info, a batch of 60,000 still names its first and last peer.
    @Test func aLargeBatchAtInfoKeepsOnlyWhatItLogs() {
        let capture = LogCapture()
        var logger = capture.logger
        logger.logLevel = .info
        var log = PeerLog(for: logger)
        for i in 0..<60_000 { log.note("peer \(i)") }
        log.flush(to: logger)
        #expect(
            capture.all == [
                "info: 60000 peers programmed, from peer 0 to peer 59999 (one line per peer at --log-level debug)"
            ]
        )
    }

    @Test func nothingToSayLogsNothing() {
        let capture = LogCapture()
        PeerLog(for: capture.logger).flush(to: capture.logger)
        #expect(capture.all.isEmpty)
    }
}
