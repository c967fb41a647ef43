/// Why a packet could not be segmented; every case means "count it and drop the packet".
public enum OffloadError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The IP/TCP/UDP headers do not parse, their lengths contradict each other or the buffer, or
    /// the IP version does not match the GSO type.
    case malformed
    /// The GSO type is not TCPv4, TCPv6 or UDP L4 (or unknown).
    case unsupportedGSOType
    /// `checksumStart`/`checksumOffset` point outside the packet or not at the L4 checksum.
    case badChecksumPosition
    /// The output buffer is too small for the segments.
    case doesNotFit
    /// The packet would need more segments than allowed.
    case tooManySegments

    public var description: String {
        switch self {
        case .malformed:
            "malformed packet: IP/L4 headers do not parse, lengths are inconsistent, or the IP version does not match the GSO type"
        case .unsupportedGSOType: "unsupported GSO type (only TCPv4, TCPv6 and UDP L4 are segmented)"
        case .badChecksumPosition: "checksum start/offset outside the packet or not at the L4 checksum"
        case .doesNotFit: "segments do not fit in the output buffer (give it more room)"
        case .tooManySegments: "packet needs more segments than the batch allows"
        }
    }
}
