import Testing

@testable import PacketRing

#if canImport(Glibc)
import Glibc
#endif

/// Which tier `--datapath` gets on hosts with each io_uring feature set.
@Suite struct DataPathTierChoiceTests {
    static let full = URingFeatures(available: true, multishotRead: true, multishotReceive: true, bufferRings: true)
    static let noMultishotRead = URingFeatures(
        available: true,
        multishotRead: false,
        multishotReceive: true,
        bufferRings: true,
        problem: "no multishot read"
    )
    static let noMultishotReceive = URingFeatures(
        available: true,
        multishotRead: false,
        multishotReceive: false,
        bufferRings: true,
        problem: "no multishot recvmsg"
    )
    static let refused = URingFeatures(
        available: false,
        multishotRead: false,
        multishotReceive: false,
        bufferRings: false,
        problem: "io_uring_queue_init failed: Operation not permitted"
    )

    @Test func autoTakesIOURingWithMultishotReadAndSaysNothing() {
        let (tier, note) = DataPathTier.choose(.auto, features: Self.full)
        #expect(tier == .uring && note == nil)
    }

    @Test func withoutMultishotReadAutoTakesSystemCallsAndUringTakesTheSingleRead() {
        let auto = DataPathTier.choose(.auto, features: Self.noMultishotRead)
        #expect(auto.tier == .syscall)
        #expect(auto.note?.contains("--datapath uring") == true, "\(auto.note ?? "")")
        let uring = DataPathTier.choose(.uring, features: Self.noMultishotRead)
        #expect(uring.tier == .uringSingleRead)
        #expect(uring.note?.contains("no multishot read") == true)
    }

    @Test func refusedOrOldIOURingFallsBackToSystemCallsWithTheReason() {
        for features in [Self.refused, Self.noMultishotReceive] {
            for choice in [DataPathChoice.auto, .uring] {
                let (tier, note) = DataPathTier.choose(choice, features: features)
                #expect(tier == .syscall)
                #expect(note?.contains(features.problem!) == true, "\(note ?? "")")
            }
        }
    }

    @Test func syscallAndSimpleAreTakenAsAskedWithoutProbing() {
        var probed = false
        func probe() -> URingFeatures { probed = true; return Self.full }
        #expect(DataPathTier.choose(.syscall, features: probe()).tier == .syscall)
        #expect(DataPathTier.choose(.simple, features: probe()).tier == .simple)
        #expect(!probed)
        #expect(!DataPathTier.simple.batches && DataPathTier.syscall.batches)
    }

    @Test func theProbeOverrideTakesMultishotReadAway() {
        // The real probe on this kernel, then the same with the test override.
        let real = URingFeatures.probe()
        setenv(URingFeatures.noMultishotReadVariable, "1", 1)
        defer { unsetenv(URingFeatures.noMultishotReadVariable) }
        let overridden = URingFeatures.probe()
        #expect(!overridden.multishotRead)
        #expect(overridden.available == real.available && overridden.bufferRings == real.bufferRings)
    }
}
