import Dispatch
import Foundation
import Synchronization
import WireGuard

/// Helper threads that share a batch's cryptography with the thread that
/// owns the batch (wireguard-go's parallel crypto, kept in order by
/// construction): the batch is cut into chunks of slots, the owner seals or
/// opens the first and each helper one other, and the owner sends or writes
/// the batch, in order, once all are done. Each chunk has its own libcrypto
/// context. With no helpers everything runs on the owner's thread.
final class CryptoWorkers: @unchecked Sendable {
    let helpers: Int
    /// One per chunk: chunk 0's is the owner's.
    let ciphers: [CipherContext]
    private let go: [DispatchSemaphore]
    private let done = DispatchSemaphore(value: 0)
    private let stopped = Atomic<Bool>(false)
    /// The chunk's work, set by `run` before the helpers are woken and cleared
    /// after they all signalled (the semaphores order these accesses).
    private var job: ((Int) -> Void)?

    /// Batches smaller than this many messages per chunk are not cut: waking
    /// a helper costs more than the chunk's crypto.
    static let minimumChunk = 8

    init(helpers: Int, name: String) {
        self.helpers = max(0, helpers)
        ciphers = (0...max(0, helpers)).map { _ in CipherContext() }
        go = (0..<max(0, helpers)).map { _ in DispatchSemaphore(value: 0) }
        for h in 0..<self.helpers {
            let thread = Thread { [self] in
                while true {
                    go[h].wait()
                    if stopped.load(ordering: .acquiring) { return }
                    job?(h + 1)
                    done.signal()
                }
            }
            thread.name = "\(name)-\(h + 1)"
            thread.start()
        }
    }

    /// How many chunks a batch of `count` messages is cut into.
    func chunks(for count: Int) -> Int { max(1, min(helpers + 1, count / Self.minimumChunk)) }

    /// The slots of chunk `chunk` of `chunks` over `count` slots.
    static func range(_ chunk: Int, of chunks: Int, count: Int) -> Range<Int> {
        (count * chunk / chunks)..<(count * (chunk + 1) / chunks)
    }

    /// Runs `work(c)` for every chunk c in 0..<chunks, chunk 0 on the calling
    /// thread, and returns once all have run. Only the owning thread calls this.
    func run(chunks: Int, _ work: (Int) -> Void) {
        let chunks = min(chunks, helpers + 1)
        guard chunks > 1 else {
            work(0)
            return
        }
        withoutActuallyEscaping(work) { work in
            job = work
            for h in 0..<(chunks - 1) { go[h].signal() }
            work(0)
            for _ in 0..<(chunks - 1) { done.wait() }
            job = nil
        }
    }

    /// Lets the helper threads end. Called by the owning thread once it no
    /// longer calls `run`.
    func stop() {
        stopped.store(true, ordering: .releasing)
        for semaphore in go { semaphore.signal() }
    }

    deinit {
        for cipher in ciphers { cipher.wipe() }
    }
}
