/// Why a packet could not be segmented; every case means "count it and drop the packet".
public enum OffloadError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The IPv4/TCP/UDP headers do not parse or their lengths contradict each other or the buffer.
    case malformed
    /// The GSO type is not TCPv4 or UDP L4 (or unknown).
    case unsupportedGSOType
    /// `checksumStart`/`checksumOffset` point outside the packet or not at the L4 checksum.
    case badChecksumPosition
    /// The output buffer is too small for the segments.
    case doesNotFit
    /// The packet would need more segments than allowed.
    case tooManySegments

    public var description: String {
        switch self {
        case .malformed: "malformed packet: IPv4/L4 headers do not parse or lengths are inconsistent"
        case .unsupportedGSOType: "unsupported GSO type (only TCPv4 and UDP L4 are segmented)"
        case .badChecksumPosition: "checksum start/offset outside the packet or not at the L4 checksum"
        case .doesNotFit: "segments do not fit in the output buffer (give it more room)"
        case .tooManySegments: "packet needs more segments than the batch allows"
        }
    }
}
