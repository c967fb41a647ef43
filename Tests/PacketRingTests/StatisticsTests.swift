import Testing

@testable import PacketRing

@Suite struct StatisticsTests {
    /// Each batch lands in the class of its size (powers of two, the last
    /// open-ended), and the completions add up to the mean batch size.
    @Test func batchesAreCountedBySizeClass() {
        let statistics = Statistics()
        let sizes = [1, 2, 3, 4, 7, 8, 15, 16, 31, 32, 63, 64, 65, 1000, 0]
        for n in sizes { statistics.addBatch(completions: n) }
        statistics.publish()
        let expected: [(DataPathCounter, UInt64)] = [
            (.batchesOf1, 2), (.batchesOf2to3, 2), (.batchesOf4to7, 2),
            (.batchesOf8to15, 2), (.batchesOf16to31, 2), (.batchesOf32to63, 2),
            (.batchesOf64Plus, 3),
        ]
        for (counter, count) in expected { #expect(statistics[counter] == count, "\(counter)") }
        #expect(statistics[.batches] == UInt64(sizes.count))
        #expect(statistics[.batchCompletions] == UInt64(sizes.map { max($0, 1) }.reduce(0, +)))
        #expect(DataPathCounter.batchSizeClasses.map(\.counter) == expected.map(\.0))
    }
}
