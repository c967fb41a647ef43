/// The Internet checksum (RFC 1071) on raw memory.
public enum Checksum {
    /// One's-complement partial sum of `count` bytes read as big-endian 16-bit words (an odd
    /// last byte is padded with a zero byte), added to `initial`; not folded.
    ///
    /// Sums 32 bytes per step as native 64-bit words with end-around carry: the one's-complement
    /// sum is the same in every lane width, and a byte swap of the folded result turns the
    /// little-endian word order into network order (RFC 1071 §2(B)).
    @inlinable
    public static func partial(_ p: UnsafeRawPointer, count: Int, initial: UInt64 = 0) -> UInt64 {
        guard count > 0 else { return initial }
        var i = 0
        // Independent carry chains: one chain would serialize on its carry.
        var a: UInt64 = 0, b: UInt64 = 0, c: UInt64 = 0, d: UInt64 = 0
        while i &+ 32 <= count {
            a = unsafe addCarry(a, p.loadUnaligned(fromByteOffset: i, as: UInt64.self))
            b = unsafe addCarry(b, p.loadUnaligned(fromByteOffset: i &+ 8, as: UInt64.self))
            c = unsafe addCarry(c, p.loadUnaligned(fromByteOffset: i &+ 16, as: UInt64.self))
            d = unsafe addCarry(d, p.loadUnaligned(fromByteOffset: i &+ 24, as: UInt64.self))
            i &+= 32
        }
        var sum = addCarry(addCarry(a, b), addCarry(c, d))
        while i &+ 8 <= count {
            sum = unsafe addCarry(sum, p.loadUnaligned(fromByteOffset: i, as: UInt64.self))
            i &+= 8
        }
        // Up to 7 bytes left, starting at an even offset: place them where a 64-bit load
        // would have put them.
        var tail: UInt64 = 0
        var shift: UInt64 = 0
        while i < count {
            let byte = unsafe UInt64(p.load(fromByteOffset: i, as: UInt8.self))
            #if _endian(little)
            tail |= byte &<< shift
            #else
            tail |= byte &<< (56 &- shift)
            #endif
            shift &+= 8
            i &+= 1
        }
        sum = addCarry(sum, tail)
        var folded = fold(sum)
        #if _endian(little)
        folded = folded.byteSwapped
        #endif
        return addCarry(initial, UInt64(folded))
    }

    /// Folds a partial sum to 16 bits (not inverted).
    @inlinable
    public static func fold(_ sum: UInt64) -> UInt16 {
        var s = (sum & 0xffff_ffff) &+ (sum &>> 32)
        s = (s & 0xffff_ffff) &+ (s &>> 32)
        s = (s & 0xffff) &+ (s &>> 16)
        s = (s & 0xffff) &+ (s &>> 16)
        s = (s & 0xffff) &+ (s &>> 16)
        return UInt16(truncatingIfNeeded: s)
    }

    /// Pseudo-header sum for IPv4 (source, destination, protocol, L4 length), not folded.
    @inlinable
    public static func pseudoHeader(source: UInt32, destination: UInt32, protocol: UInt8, length: Int) -> UInt64 {
        UInt64(source &>> 16) &+ UInt64(source & 0xffff)
            &+ UInt64(destination &>> 16) &+ UInt64(destination & 0xffff)
            &+ UInt64(`protocol`) &+ UInt64(UInt32(truncatingIfNeeded: length) & 0xffff)
            &+ UInt64(UInt32(truncatingIfNeeded: length) &>> 16)
    }

    /// Pseudo-header sum for IPv6 (RFC 8200 section 8.1: source, destination,
    /// upper-layer length, next header), not folded.
    @inlinable
    public static func pseudoHeader6(source: UInt128, destination: UInt128, nextHeader: UInt8, length: Int) -> UInt64 {
        var sum =
            UInt64(nextHeader) &+ UInt64(UInt32(truncatingIfNeeded: length) & 0xffff)
            &+ UInt64(UInt32(truncatingIfNeeded: length) &>> 16)
        for word in 0..<4 {
            let shift = UInt128(32 * word)
            sum &+= UInt64(UInt32(truncatingIfNeeded: source &>> shift))
            sum &+= UInt64(UInt32(truncatingIfNeeded: destination &>> shift))
        }
        return sum
    }

    /// The checksum to store in a header: the inverted fold of `count` bytes plus `initial`.
    @inlinable
    public static func compute(_ p: UnsafeRawPointer, count: Int, initial: UInt64 = 0) -> UInt16 {
        unsafe ~fold(partial(p, count: count, initial: initial))
    }

    @inlinable @inline(__always)
    static func addCarry(_ a: UInt64, _ b: UInt64) -> UInt64 {
        let (s, overflow) = a.addingReportingOverflow(b)
        return s &+ (overflow ? 1 : 0)
    }
}
