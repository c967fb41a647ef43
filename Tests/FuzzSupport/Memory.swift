#if canImport(Glibc)
import Glibc
#endif

/// Memory whose neighbours are inaccessible pages: a read or write even one byte outside
/// the region faults at once, without a sanitizer. The region either ends exactly at the
/// guard page after it (catches overruns, the common case) or starts exactly at the end of
/// the guard page before it (catches underruns).
public final class GuardedBuffer {
    public let base: UnsafeMutableRawPointer
    public let count: Int
    private let mapping: UnsafeMutableRawPointer
    private let mappingLength: Int

    public static let pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))

    public init(count: Int, atEnd: Bool = true) {
        precondition(count >= 0)
        let page = Self.pageSize
        let dataPages = max(1, (count + page - 1) / page)
        mappingLength = (dataPages + 2) * page
        guard let m = mmap(nil, mappingLength, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
            m != MAP_FAILED
        else { fatalError("GuardedBuffer: mmap of \(mappingLength) bytes failed") }
        mapping = m
        mprotect(m, page, PROT_NONE)
        mprotect(m + (dataPages + 1) * page, page, PROT_NONE)
        base = atEnd ? m + (dataPages + 1) * page - count : m + page
        self.count = count
    }

    public convenience init(_ bytes: [UInt8], capacity: Int? = nil, atEnd: Bool = true) {
        self.init(count: max(capacity ?? bytes.count, bytes.count), atEnd: atEnd)
        bytes.withUnsafeBytes { if $0.count > 0 { base.copyMemory(from: $0.baseAddress!, byteCount: $0.count) } }
    }

    public var bytes: [UInt8] { self.bytes(count) }
    public func bytes(_ n: Int) -> [UInt8] { Array(UnsafeRawBufferPointer(start: base, count: min(n, count))) }

    /// Whether [p, p + length) lies inside the region.
    public func contains(_ p: UnsafeRawPointer?, length: Int) -> Bool {
        guard let p, length >= 0 else { return length == 0 }
        let start = UnsafeRawPointer(base)
        return p >= start && p + length <= start + count
    }

    deinit { munmap(mapping, mappingLength) }
}

/// Slow, obviously-right packet checks (arrays, one byte pair at a time), the model the
/// fast code is held against.
public enum Slow {
    /// RFC 1071 sum folded to 16 bits (not inverted); 0xFFFF over data that includes a
    /// correct checksum.
    public static func sum(_ bytes: ArraySlice<UInt8>, initial: UInt32 = 0) -> UInt16 {
        var sum = initial
        while sum > 0xffff { sum = (sum & 0xffff) + (sum >> 16) }
        var i = bytes.startIndex
        while i < bytes.endIndex {
            let high = UInt32(bytes[i])
            let low = i + 1 < bytes.endIndex ? UInt32(bytes[i + 1]) : 0
            sum += high << 8 | low
            sum = (sum & 0xffff) + (sum >> 16)
            i += 2
        }
        return UInt16(sum)
    }

    public static func be16(_ b: [UInt8], _ o: Int) -> UInt16 { UInt16(b[o]) << 8 | UInt16(b[o + 1]) }
    public static func be32(_ b: [UInt8], _ o: Int) -> UInt32 { UInt32(be16(b, o)) << 16 | UInt32(be16(b, o + 2)) }
    public static func put16(_ b: inout [UInt8], _ o: Int, _ v: UInt16) {
        b[o] = UInt8(v >> 8); b[o + 1] = UInt8(v & 0xff)
    }
    public static func put32(_ b: inout [UInt8], _ o: Int, _ v: UInt32) {
        put16(&b, o, UInt16(v >> 16)); put16(&b, o + 2, UInt16(v & 0xffff))
    }

    public enum Defect: Error, Equatable { case tooShort, notIPv4, badHeaderLength, badTotalLength, badChecksum }

    /// IPv4 validation straight from RFC 791, on an array.
    public static func validateIPv4(_ b: [UInt8]) -> Result<Int, Defect> {
        guard b.count >= 20 else { return .failure(.tooShort) }
        guard b[0] >> 4 == 4 else { return .failure(.notIPv4) }
        let ihl = Int(b[0] & 0x0f) * 4
        guard ihl >= 20, ihl <= b.count else { return .failure(.badHeaderLength) }
        let total = Int(be16(b, 2))
        guard total >= ihl, total <= b.count else { return .failure(.badTotalLength) }
        guard sum(b[0..<ihl]) == 0xffff else { return .failure(.badChecksum) }
        return .success(total)
    }

    /// Sets the header checksum of the IPv4 header at the start of `b`.
    public static func fixIPv4Checksum(_ b: inout [UInt8]) {
        let ihl = Int(b[0] & 0x0f) * 4
        put16(&b, 10, 0)
        put16(&b, 10, ~sum(b[0..<ihl]))
    }

    /// Whether the complete packet `b` (length = its total length) has a correct TCP or UDP
    /// checksum (a UDP checksum of 0 means none).
    public static func transportChecksumValid(_ b: [UInt8]) -> Bool {
        let ihl = Int(b[0] & 0x0f) * 4
        guard b.count >= ihl else { return false }
        if b[9] == 17, b.count >= ihl + 8, be16(b, ihl + 6) == 0 { return true }
        let words = stride(from: 12, to: 20, by: 2).map { UInt32(be16(b, $0)) }
        let pseudo = words.reduce(0, +) + UInt32(b[9]) + UInt32(b.count - ihl)
        return sum(b[ihl...], initial: pseudo) == 0xffff
    }

    /// An IPv4 packet with a correct header checksum.
    public static func ipv4(
        source: UInt32,
        destination: UInt32,
        proto: UInt8 = 17,
        ttl: UInt8 = 64,
        flagsAndOffset: UInt16 = 0x4000,
        id: UInt16 = 0x1234,
        tos: UInt8 = 0,
        options: [UInt8] = [],
        payload: [UInt8] = []
    ) -> [UInt8] {
        precondition(options.count % 4 == 0 && options.count <= 40)
        let ihl = 20 + options.count
        var b = [UInt8](repeating: 0, count: ihl) + payload
        b[0] = 0x40 | UInt8(ihl / 4)
        b[1] = tos
        put16(&b, 2, UInt16(truncatingIfNeeded: b.count))
        put16(&b, 4, id)
        put16(&b, 6, flagsAndOffset)
        b[8] = ttl
        b[9] = proto
        put32(&b, 12, source)
        put32(&b, 16, destination)
        b.replaceSubrange(20..<ihl, with: options)
        fixIPv4Checksum(&b)
        return b
    }
}
