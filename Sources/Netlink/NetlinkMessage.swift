import CTunnel
import NetBase

#if canImport(Glibc)
import Glibc
#endif

// Netlink wire layout, for reference (all integers host byte order unless an
// attribute says otherwise):
//
//   nlmsghdr (16)  | family header (ifinfomsg, ifaddrmsg, rtmsg, ndmsg, …) | attributes
//   attribute:      len:u16 type:u16 value… padding to 4
//
// A nested attribute's value is itself a list of attributes. Messages and
// attributes are padded to 4 bytes; the length fields exclude the padding.

enum NetlinkLayout {
    static let messageHeaderSize = 16
    static let attributeHeaderSize = 4
    static func align(_ n: Int) -> Int { (n + 3) & ~3 }
}

/// A netlink request under construction: the message header, one fixed
/// family header (`ifinfomsg`, `ifaddrmsg`, `rtmsg`, `ndmsg`, …) and any
/// number of attributes, nested to any depth. Works for every rtnetlink
/// message type; `RouteSocket` fills in the length and sequence number when
/// it sends the request.
///
/// ```swift
/// var request = NetlinkRequest(type: RTM_NEWLINK, flags: NLM_F_CREATE | NLM_F_EXCL)
/// request.append(header: ifinfomsg())
/// request.append(attribute: IFLA_IFNAME, string: "flannel.1")
/// request.appendNested(attribute: IFLA_LINKINFO) { info in
///     info.append(attribute: IFLA_INFO_KIND, string: "vxlan")
///     info.appendNested(attribute: IFLA_INFO_DATA) { data in
///         data.append(attribute: IFLA_VXLAN_ID, uint32: 1)
///     }
/// }
/// ```
public struct NetlinkRequest: Sendable {
    /// The encoded message; the header's length and sequence fields are
    /// filled in by `encoded(sequence:)`.
    public private(set) var bytes: [UInt8]
    public let type: UInt16
    public private(set) var flags: UInt16

    /// `flags` are added to `NLM_F_REQUEST`, which every request carries.
    public init(type: some BinaryInteger, flags: some BinaryInteger = UInt16(0)) {
        self.type = UInt16(type)
        self.flags = UInt16(flags) | UInt16(NLM_F_REQUEST)
        bytes = [UInt8](repeating: 0, count: NetlinkLayout.messageHeaderSize)
        bytes.reserveCapacity(256)
    }

    mutating func addFlags(_ extra: UInt16) { flags |= extra }

    /// Appends the message's fixed family header, padded to 4 bytes. Call it
    /// once, before any attribute.
    public mutating func append<Header: BitwiseCopyable>(header: Header) {
        withUnsafeBytes(of: header) { bytes.append(contentsOf: $0) }
        pad()
    }

    /// Appends one attribute whose value is `value`, verbatim.
    public mutating func append(attribute type: some BinaryInteger, bytes value: some Collection<UInt8>) {
        let length = NetlinkLayout.attributeHeaderSize + value.count
        precondition(length <= Int(UInt16.max), "netlink attribute \(type) too long (\(value.count) bytes)")
        appendInteger(UInt16(length))
        appendInteger(UInt16(type))
        bytes.append(contentsOf: value)
        pad()
    }

    public mutating func append(attribute type: some BinaryInteger, uint8 value: UInt8) {
        append(attribute: type, bytes: CollectionOfOne(value))
    }

    public mutating func append(attribute type: some BinaryInteger, uint16 value: UInt16) {
        withUnsafeBytes(of: value) { append(attribute: type, bytes: $0) }
    }

    /// A 16-bit value in network byte order (UDP ports in IFLA_VXLAN_PORT and the like).
    public mutating func append(attribute type: some BinaryInteger, uint16BigEndian value: UInt16) {
        withUnsafeBytes(of: value.bigEndian) { append(attribute: type, bytes: $0) }
    }

    public mutating func append(attribute type: some BinaryInteger, uint32 value: UInt32) {
        withUnsafeBytes(of: value) { append(attribute: type, bytes: $0) }
    }

    public mutating func append(attribute type: some BinaryInteger, int32 value: Int32) {
        withUnsafeBytes(of: value) { append(attribute: type, bytes: $0) }
    }

    /// A NUL-terminated string, as the kernel expects for names and kinds.
    public mutating func append(attribute type: some BinaryInteger, string value: String) {
        append(attribute: type, bytes: Array(value.utf8) + [0])
    }

    /// An IPv4 address: 4 bytes in network byte order.
    public mutating func append(attribute type: some BinaryInteger, address value: IPv4Address) {
        append(attribute: type, bytes: value.bytes)
    }

    /// An IPv6 address: 16 bytes in network byte order.
    public mutating func append(attribute type: some BinaryInteger, address value: IPv6Address) {
        append(attribute: type, bytes: value.bytes)
    }

    /// An attribute with no value (a flag).
    public mutating func append(flag type: some BinaryInteger) {
        append(attribute: type, bytes: EmptyCollection())
    }

    /// Appends a nested attribute whose value is the attributes `body` appends.
    /// `markNested` sets NLA_F_NESTED in the type, which some newer kernel
    /// policies require and older rtnetlink attributes (IFLA_LINKINFO) do not.
    public mutating func appendNested(
        attribute type: some BinaryInteger,
        markNested: Bool = false,
        _ body: (inout NetlinkRequest) throws -> Void
    ) rethrows {
        let start = bytes.count
        appendInteger(UInt16(0))
        appendInteger(markNested ? UInt16(type) | ctunnel_NLA_F_NESTED : UInt16(type))
        try body(&self)
        let length = bytes.count - start
        precondition(length <= Int(UInt16.max), "nested netlink attribute \(type) too long (\(length) bytes)")
        store(UInt16(length), at: start)
    }

    /// The message as sent: total length and sequence number filled in,
    /// port id 0 (the kernel fills in the sender's).
    public func encoded(sequence: UInt32) -> [UInt8] {
        var message = bytes
        let length = UInt32(message.count)
        message.withUnsafeMutableBytes { raw in
            raw.storeBytes(of: length, toByteOffset: 0, as: UInt32.self)
            raw.storeBytes(of: type, toByteOffset: 4, as: UInt16.self)
            raw.storeBytes(of: flags, toByteOffset: 6, as: UInt16.self)
            raw.storeBytes(of: sequence, toByteOffset: 8, as: UInt32.self)
            raw.storeBytes(of: UInt32(0), toByteOffset: 12, as: UInt32.self)
        }
        return message
    }

    private mutating func appendInteger<T: FixedWidthInteger>(_ value: T) {
        withUnsafeBytes(of: value) { bytes.append(contentsOf: $0) }
    }

    private mutating func store(_ value: UInt16, at offset: Int) {
        bytes.withUnsafeMutableBytes { $0.storeBytes(of: value, toByteOffset: offset, as: UInt16.self) }
    }

    private mutating func pad() {
        let padded = NetlinkLayout.align(bytes.count)
        if padded > bytes.count { bytes.append(contentsOf: repeatElement(0, count: padded - bytes.count)) }
    }
}

/// One netlink message as received.
public struct NetlinkMessage: Sendable {
    public let type: UInt16
    public let flags: UInt16
    public let sequence: UInt32
    public let portID: UInt32
    /// Everything after the 16-byte message header: the family header and
    /// the attributes.
    public let payload: [UInt8]

    /// The fixed family header at the start of the payload, or nil when the
    /// payload is too short to hold one.
    public func header<Header: BitwiseCopyable>(_: Header.Type) -> Header? {
        guard payload.count >= MemoryLayout<Header>.size else { return nil }
        return payload.withUnsafeBytes { $0.loadUnaligned(as: Header.self) }
    }

    /// The attributes that follow a family header of type `Header`.
    public func attributes<Header: BitwiseCopyable>(after _: Header.Type) -> NetlinkAttributes {
        let start = NetlinkLayout.align(MemoryLayout<Header>.size)
        guard start <= payload.count else { return NetlinkAttributes(parsing: []) }
        return NetlinkAttributes(parsing: payload[start...])
    }

    /// Splits one received datagram into its messages. A length field that
    /// points outside the datagram ends the parse with an error, so a
    /// malformed reply can never be read past its end.
    static func parse(datagram: [UInt8]) -> Result<[NetlinkMessage], Errno> {
        var messages: [NetlinkMessage] = []
        var offset = 0
        while datagram.count - offset >= NetlinkLayout.messageHeaderSize {
            let (length, type, flags, sequence, portID) = datagram.withUnsafeBytes { raw in
                (
                    Int(raw.loadUnaligned(fromByteOffset: offset, as: UInt32.self)),
                    raw.loadUnaligned(fromByteOffset: offset + 4, as: UInt16.self),
                    raw.loadUnaligned(fromByteOffset: offset + 6, as: UInt16.self),
                    raw.loadUnaligned(fromByteOffset: offset + 8, as: UInt32.self),
                    raw.loadUnaligned(fromByteOffset: offset + 12, as: UInt32.self)
                )
            }
            guard length >= NetlinkLayout.messageHeaderSize, length <= datagram.count - offset else {
                return .failure(Errno(EBADMSG))
            }
            let payload = Array(datagram[(offset + NetlinkLayout.messageHeaderSize)..<(offset + length)])
            messages.append(
                NetlinkMessage(type: type, flags: flags, sequence: sequence, portID: portID, payload: payload)
            )
            offset += NetlinkLayout.align(length)
        }
        return .success(messages)
    }
}

/// One attribute as received: its type (NLA_F_NESTED and NLA_F_NET_BYTEORDER
/// stripped) and its value without padding.
public struct NetlinkAttribute: Sendable {
    public let type: UInt16
    public let value: [UInt8]

    public var uint8: UInt8? { value.count >= 1 ? value[0] : nil }
    public var uint16: UInt16? { load(UInt16.self) }
    public var uint32: UInt32? { load(UInt32.self) }
    public var int32: Int32? { load(Int32.self) }
    public var uint16BigEndian: UInt16? { load(UInt16.self).map { UInt16(bigEndian: $0) } }
    /// The value up to its first NUL byte.
    public var string: String? {
        let end = value.firstIndex(of: 0) ?? value.endIndex
        return String(decoding: value[..<end], as: UTF8.self)
    }
    /// A 4-byte IPv4 address in network byte order.
    public var address: IPv4Address? {
        value.count == 4 ? IPv4Address(value[0], value[1], value[2], value[3]) : nil
    }
    /// A 16-byte IPv6 address in network byte order.
    public var ipv6Address: IPv6Address? { value.count == 16 ? IPv6Address(bytes: value) : nil }
    /// The value parsed as a list of attributes.
    public var nested: NetlinkAttributes { NetlinkAttributes(parsing: value[...]) }

    private func load<T: FixedWidthInteger>(_: T.Type) -> T? {
        guard value.count >= MemoryLayout<T>.size else { return nil }
        return value.withUnsafeBytes { $0.loadUnaligned(as: T.self) }
    }
}

/// The attributes of a message (or of a nested attribute), in order.
/// Parsing stops at the first attribute whose length does not fit.
public struct NetlinkAttributes: Sendable, RandomAccessCollection {
    public let elements: [NetlinkAttribute]

    public init(parsing bytes: ArraySlice<UInt8>) {
        var elements: [NetlinkAttribute] = []
        var offset = bytes.startIndex
        while bytes.endIndex - offset >= NetlinkLayout.attributeHeaderSize {
            let (length, rawType) = bytes.withUnsafeBytes { raw in
                (
                    Int(raw.loadUnaligned(fromByteOffset: offset - bytes.startIndex, as: UInt16.self)),
                    raw.loadUnaligned(fromByteOffset: offset - bytes.startIndex + 2, as: UInt16.self)
                )
            }
            guard length >= NetlinkLayout.attributeHeaderSize, length <= bytes.endIndex - offset else { break }
            let value = Array(bytes[(offset + NetlinkLayout.attributeHeaderSize)..<(offset + length)])
            elements.append(NetlinkAttribute(type: rawType & ctunnel_NLA_TYPE_MASK, value: value))
            offset += NetlinkLayout.align(length)
        }
        self.elements = elements
    }

    public var startIndex: Int { elements.startIndex }
    public var endIndex: Int { elements.endIndex }
    public subscript(position: Int) -> NetlinkAttribute { elements[position] }

    /// The first attribute of `type`.
    public subscript(type type: some BinaryInteger) -> NetlinkAttribute? {
        guard let wanted = UInt16(exactly: type) else { return nil }
        return elements.first { $0.type == wanted }
    }
}

extension IPv4Address {
    /// The address's 4 bytes in network byte order.
    var bytes: [UInt8] {
        [UInt8(value >> 24), UInt8(value >> 16 & 0xff), UInt8(value >> 8 & 0xff), UInt8(value & 0xff)]
    }
}
