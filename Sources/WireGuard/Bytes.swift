import CWireGuardCrypto

/// 32 bytes held inline (keys, hashes, chaining keys): no heap allocation,
/// so the handshake and the keypairs keep their secrets in storage they own
/// and can wipe.
public struct Bytes32: Sendable {
    var storage: (UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0)

    public static let count = 32
    public static let zero = Bytes32()

    public init() {}

    /// Exactly 32 bytes, or nil.
    public init?(_ bytes: some Collection<UInt8>) {
        guard bytes.count == 32 else { return nil }
        withUnsafeMutableBytes { target in
            for (i, byte) in bytes.enumerated() { target[i] = byte }
        }
    }

    /// The first 32 bytes of `raw` (which must hold at least 32).
    init(copying raw: UnsafeRawBufferPointer) {
        precondition(raw.count >= 32)
        withUnsafeMutableBytes { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: raw[0..<32])) }
    }

    public func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try Swift.withUnsafeBytes(of: storage, body)
    }

    mutating func withUnsafeMutableBytes<R>(_ body: (UnsafeMutableRawBufferPointer) throws -> R) rethrows -> R {
        try Swift.withUnsafeMutableBytes(of: &storage, body)
    }

    public var bytes: [UInt8] { withUnsafeBytes { Array($0) } }

    var isZero: Bool { storage.0 | storage.1 | storage.2 | storage.3 == 0 }

    /// Zeroes the bytes through a call the compiler cannot drop.
    mutating func wipe() {
        withUnsafeMutableBytes { cwg_wipe($0.baseAddress, 32) }
    }

    /// Constant-time comparison, for secrets and MACs.
    func constantTimeEquals(_ other: Bytes32) -> Bool {
        withUnsafeBytes { a in other.withUnsafeBytes { b in cwg_equal(a.baseAddress, b.baseAddress, 32) == 1 } }
    }
}

extension Bytes32: Hashable {
    public static func == (a: Bytes32, b: Bytes32) -> Bool {
        a.storage.0 == b.storage.0 && a.storage.1 == b.storage.1 && a.storage.2 == b.storage.2
            && a.storage.3 == b.storage.3
    }

    public func hash(into hasher: inout Hasher) {
        hasher.combine(storage.0)
        hasher.combine(storage.1)
        hasher.combine(storage.2)
        hasher.combine(storage.3)
    }
}

/// 16 bytes inline: MACs, cookies, IPv6 addresses.
public struct Bytes16: Sendable, Hashable {
    var high: UInt64 = 0
    var low: UInt64 = 0

    public static let zero = Bytes16()

    public init() {}

    public init?(_ bytes: some Collection<UInt8>) {
        guard bytes.count == 16 else { return nil }
        withUnsafeMutableBytes { target in
            for (i, byte) in bytes.enumerated() { target[i] = byte }
        }
    }

    /// The first 16 bytes at `raw` (an IPv6 address from a socket address).
    public init(copying raw: UnsafeRawBufferPointer) {
        precondition(raw.count >= 16)
        withUnsafeMutableBytes { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: raw[0..<16])) }
    }

    public func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try Swift.withUnsafeBytes(of: (high, low), body)
    }

    mutating func withUnsafeMutableBytes<R>(_ body: (UnsafeMutableRawBufferPointer) throws -> R) rethrows -> R {
        var pair = (high, low)
        defer { (high, low) = pair }
        return try Swift.withUnsafeMutableBytes(of: &pair, body)
    }

    public var bytes: [UInt8] { withUnsafeBytes { Array($0) } }
    var isZero: Bool { high | low == 0 }

    mutating func wipe() {
        withUnsafeMutableBytes { cwg_wipe($0.baseAddress, 16) }
    }

    /// Constant-time comparison with the 16 bytes at `raw`.
    func constantTimeEquals(_ raw: UnsafeRawBufferPointer) -> Bool {
        precondition(raw.count >= 16)
        return withUnsafeBytes { cwg_equal($0.baseAddress, raw.baseAddress, 16) == 1 }
    }
}

extension UnsafeRawBufferPointer {
    /// A little-endian integer at `offset`, read without alignment.
    @inline(__always)
    func littleEndian<T: FixedWidthInteger>(at offset: Int, as: T.Type) -> T {
        T(littleEndian: loadUnaligned(fromByteOffset: offset, as: T.self))
    }
}

extension UnsafeMutableRawBufferPointer {
    @inline(__always)
    func storeLittleEndian<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        storeBytes(of: value.littleEndian, toByteOffset: offset, as: T.self)
    }
}
