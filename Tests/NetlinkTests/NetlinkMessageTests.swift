import CTunnel
import Glibc
import NetBase
import NetTestSupport
import Testing

@testable import Netlink

@Suite struct NetlinkMessageTests {
    @Test func requestEncodesHeaderAttributesAndNestingWithPadding() {
        var request = NetlinkRequest(type: RTM_NEWLINK, flags: NLM_F_CREATE)
        var header = ifinfomsg()
        header.ifi_index = 7
        request.append(header: header)
        request.append(attribute: IFLA_IFNAME, string: "ab")  // 4 + 3 bytes, padded to 8
        request.appendNested(attribute: IFLA_LINKINFO) { info in
            info.append(attribute: IFLA_INFO_KIND, string: "vxlan")  // 4 + 6, padded to 12
        }
        let bytes = request.encoded(sequence: 0x0102_0304)

        #expect(bytes.count == 16 + 16 + 8 + 16)
        func u16(_ at: Int) -> Int { Int(bytes[at]) | Int(bytes[at + 1]) << 8 }
        func u32(_ at: Int) -> Int { u16(at) | u16(at + 2) << 16 }
        #expect(u32(0) == bytes.count)
        #expect(u16(4) == RTM_NEWLINK)
        #expect(u16(6) == Int(NLM_F_REQUEST | NLM_F_CREATE))
        #expect(u32(8) == 0x0102_0304)
        #expect(u32(16 + 4) == 7)  // ifi_index
        // IFLA_IFNAME: length 7 (no padding counted), "ab\0", one pad byte.
        #expect(u16(32) == 7 && u16(34) == IFLA_IFNAME)
        #expect(Array(bytes[36..<40]) == [0x61, 0x62, 0, 0])
        // IFLA_LINKINFO: length 16 covers the padded inner attribute.
        #expect(u16(40) == 16 && u16(42) == IFLA_LINKINFO)
        #expect(u16(44) == 10 && u16(46) == IFLA_INFO_KIND)
        #expect(Array(bytes[48..<56]) == Array("vxlan".utf8) + [0, 0, 0])
    }

    @Test func nestedFlagIsSetOnlyWhenAskedAndStrippedWhenRead() {
        var request = NetlinkRequest(type: RTM_NEWLINK)
        request.appendNested(attribute: 5, markNested: true) { $0.append(attribute: 1, uint32: 9) }
        let parsed = NetlinkMessage.parse(datagram: request.encoded(sequence: 1))
        let message = try! parsed.get()[0]
        let encodedType = UInt16(message.payload[2]) | UInt16(message.payload[3]) << 8
        #expect(encodedType == 5 | ctunnel_NLA_F_NESTED)
        let attributes = NetlinkAttributes(parsing: message.payload[...])
        #expect(attributes[type: 5]?.nested[type: 1]?.uint32 == 9)
    }

    /// The parser is checked against the builder with random attribute trees.
    @Test func randomAttributesSurviveARoundTrip() throws {
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<200 {
            let flat = (0..<Int.random(in: 0...12, using: &generator)).map { _ in
                (
                    type: UInt16.random(in: 1...200, using: &generator),
                    value: (0..<Int.random(in: 0...23, using: &generator)).map { _ in
                        UInt8.random(in: 0...255, using: &generator)
                    }
                )
            }
            let nested = (0..<Int.random(in: 0...5, using: &generator)).map { _ in
                (
                    type: UInt16.random(in: 1...200, using: &generator),
                    value: [UInt8.random(in: 0...255, using: &generator)]
                )
            }
            var request = NetlinkRequest(type: RTM_NEWROUTE)
            request.append(header: rtmsg())
            for attribute in flat { request.append(attribute: attribute.type, bytes: attribute.value) }
            request.appendNested(attribute: 300) { inner in
                for attribute in nested { inner.append(attribute: attribute.type, bytes: attribute.value) }
            }
            // Two messages in one datagram, as in a dump.
            let datagram = request.encoded(sequence: 1) + request.encoded(sequence: 2)
            let messages = try NetlinkMessage.parse(datagram: datagram).get()
            #expect(messages.map(\.sequence) == [1, 2])
            for message in messages {
                let attributes = message.attributes(after: rtmsg.self)
                #expect(attributes.count == flat.count + 1)
                for (got, want) in zip(attributes, flat) {
                    #expect(got.type == want.type)
                    #expect(got.value == want.value)
                }
                let inner = try #require(attributes.last).nested
                #expect(inner.map(\.type) == nested.map(\.type))
                #expect(inner.map(\.value) == nested.map(\.value))
            }
        }
    }

    @Test func aMessageLongerThanItsDatagramIsRejected() {
        var bytes = NetlinkRequest(type: RTM_NEWLINK).encoded(sequence: 1)
        bytes[0] = 200
        #expect(throws: Errno(EBADMSG)) { try NetlinkMessage.parse(datagram: bytes).get() }
    }

    @Test func anAttributeLongerThanItsMessageEndsTheParse() {
        // One good attribute, then one whose length runs past the end.
        let bytes: [UInt8] = [8, 0, 1, 0, 1, 2, 3, 4, 40, 0, 2, 0, 9, 9]
        let attributes = NetlinkAttributes(parsing: bytes[...])
        #expect(attributes.count == 1)
        #expect(attributes[type: 1]?.uint32 == 0x0403_0201)
        #expect(attributes[type: 2] == nil)
    }

    @Test func addressesAndBigEndianValuesAreInNetworkOrder() throws {
        var request = NetlinkRequest(type: RTM_NEWADDR)
        request.append(attribute: IFA_LOCAL, address: IPv4Address("10.2.72.1")!)
        request.append(attribute: 9, uint16BigEndian: 8472)
        let message = try NetlinkMessage.parse(datagram: request.encoded(sequence: 1)).get()[0]
        #expect(Array(message.payload[4..<8]) == [10, 2, 72, 1])
        #expect(Array(message.payload[12..<14]) == [0x21, 0x18])
        let attributes = NetlinkAttributes(parsing: message.payload[...])
        #expect(attributes[type: IFA_LOCAL]?.address == IPv4Address("10.2.72.1"))
        #expect(attributes[type: 9]?.uint16BigEndian == 8472)
    }

    @Test func routesDescribeThemselvesLikeIp() {
        let route = Route(
            destination: IPv4Network("10.2.5.0/24")!,
            outputIndex: 4,
            gateway: IPv4Address("10.2.5.0"),
            onlink: true,
            metric: 0
        )
        #expect(route.description(device: "flannel.1") == "10.2.5.0/24 via 10.2.5.0 dev flannel.1 onlink")
        #expect(route.metric == nil)  // 0 is how the kernel reports "no metric"
        let fallback = Route(
            destination: IPv4Network("0.0.0.0/0")!,
            outputIndex: 2,
            source: IPv4Address("198.18.0.1"),
            metric: 100
        )
        #expect(fallback.description(device: "eth0") == "default dev eth0 src 198.18.0.1 metric 100")
    }
}
