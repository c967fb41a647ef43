import Atomics
import NetBase
import Synchronization
import UDPEncap

/// The IPv6 underlay addresses of peers, each in a numbered slot, so that a
/// table entry (one atomic 64-bit word) can name an IPv6 peer: kind, port
/// and slot number, as an IPv4 peer's entry holds kind, port and address.
///
/// A slot is written once, before the first entry that names it is stored,
/// and never changes or is reused afterwards: a loop that loaded an entry
/// reads the slot's two words without a lock and can never find another
/// peer's address there. One address has one slot for the life of the
/// process (a peer that comes back, or changes port, gets its old slot), so
/// two entries name the same host exactly when their words are equal.
/// Slots are never freed; there are `capacity` of them, in an anonymous
/// mapping of which only written pages cost memory.
public final class PeerAddresses6: @unchecked Sendable {
    /// 2^20 distinct IPv6 peer addresses over the life of one daemon.
    public static let defaultCapacity = 1 << 20
    public let capacity: Int

    private let words: EntryStorage
    private let storage: UnsafeMutablePointer<UnsafeAtomic<UInt64>.Storage>
    /// The control side's index of the slots: address → slot.
    private let slots = Mutex<[UInt128: Int]>([:])

    public init(capacity: Int = PeerAddresses6.defaultCapacity) throws {
        self.capacity = capacity
        words = try EntryStorage(count: 2 * capacity, for: "IPv6 peer addresses")
        storage = words.storage
    }

    /// The slot of `address`, taken now if it has none. Control side only.
    func slot(for address: IPv6Address) throws(SubnetTableError) -> Int {
        try slots.withLock { slots throws(SubnetTableError) -> Int in
            if let slot = slots[address.value] { return slot }
            guard slots.count < capacity else { throw .tooManyIPv6Peers(capacity: capacity) }
            let slot = slots.count
            UnsafeAtomic<UInt64>(at: storage + 2 * slot).store(
                UInt64(truncatingIfNeeded: address.value >> 64),
                ordering: .relaxed
            )
            UnsafeAtomic<UInt64>(at: storage + 2 * slot + 1).store(
                UInt64(truncatingIfNeeded: address.value),
                ordering: .relaxed
            )
            slots[address.value] = slot
            return slot
        }
    }

    /// The address in `slot`, read by the data path. The entry that named
    /// the slot was stored with release ordering after the slot was
    /// written; the acquiring fence here pairs with it.
    @inline(__always)
    public func address(_ slot: Int) -> UInt128 {
        Atomics.atomicMemoryFence(ordering: Atomics.AtomicUpdateOrdering.acquiring)
        let high = UnsafeAtomic<UInt64>(at: storage + 2 * slot).load(ordering: .relaxed)
        let low = UnsafeAtomic<UInt64>(at: storage + 2 * slot + 1).load(ordering: .relaxed)
        return UInt128(high) << 64 | UInt128(low)
    }

    /// Slots in use.
    public var count: Int { slots.withLock { $0.count } }
}

/// Peers as the data path names them: a table entry, turned into the
/// socket address a send goes to, or held against the sender of a receive.
/// For a dual-stack socket an IPv4 peer is written IPv4-mapped.
public struct PeerNames: Sendable {
    public let addresses6: PeerAddresses6
    public let dualStack: Bool

    public init(addresses6: PeerAddresses6, dualStack: Bool) {
        self.addresses6 = addresses6
        self.dualStack = dualStack
    }

    /// Writes the socket address of peer entry `entry` (IPv4 or IPv6) at
    /// `name` (`SocketAddress.capacity` bytes); returns its length.
    @inline(__always)
    public func write(_ entry: UInt64, to name: UnsafeMutableRawPointer) -> socklen_t {
        if SubnetTable.isPeer6(entry) {
            return SocketAddress.writeIPv6(
                addresses6.address(SubnetTable.peerSlot(entry)),
                port: SubnetTable.peerPort(entry),
                to: name
            )
        }
        return SocketAddress.writeIPv4(
            SubnetTable.peerAddress(entry),
            port: SubnetTable.peerPort(entry),
            to: name,
            dualStack: dualStack
        )
    }
}

#if canImport(Glibc)
import Glibc
#endif
