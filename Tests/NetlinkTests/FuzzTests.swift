import CTunnel
import FuzzSupport
import Glibc
import NetBase
import Testing

@testable import Netlink

/// Replies from the kernel, hand-made and then mutated, against a slow parser and the
/// decoders of links, addresses, routes and errors.
@Suite struct NetlinkFuzzTests {
    /// Hand-made replies of every kind the daemon reads, with random contents.
    static func seedMessage(_ c: FuzzCase, sequence: UInt32) -> [UInt8] {
        switch c.int(0..<6) {
        case 0:
            var r = NetlinkRequest(type: RTM_NEWLINK, flags: NLM_F_MULTI)
            var h = ifinfomsg()
            h.ifi_index = Int32(c.int(1...100)); h.ifi_flags = c.u32()
            r.append(header: h)
            r.append(attribute: IFLA_IFNAME, string: c.pick(["eth0", "flannel.1", "tunl0", "lo", ""]))
            r.append(attribute: IFLA_MTU, uint32: UInt32(c.int(68...65535)))
            if c.bool() { r.append(attribute: IFLA_ADDRESS, bytes: c.bytes(6)) }
            if c.bool() {
                r.appendNested(attribute: IFLA_LINKINFO) {
                    $0.append(attribute: IFLA_INFO_KIND, string: c.pick(["vxlan", "veth", "tun"]))
                }
            }
            return r.encoded(sequence: sequence)
        case 1:
            var r = NetlinkRequest(type: RTM_NEWADDR, flags: NLM_F_MULTI)
            var h = ifaddrmsg()
            h.ifa_family = UInt8(AF_INET); h.ifa_prefixlen = UInt8(c.int(0...32)); h.ifa_index = UInt32(c.int(1...100))
            r.append(header: h)
            r.append(attribute: IFA_LOCAL, address: IPv4Address(c.u32()))
            r.append(attribute: IFA_ADDRESS, address: IPv4Address(c.u32()))
            if c.bool() { r.append(attribute: IFA_LABEL, string: "eth0") }
            return r.encoded(sequence: sequence)
        case 2:
            var r = NetlinkRequest(type: RTM_NEWROUTE, flags: NLM_F_MULTI)
            var h = rtmsg()
            h.rtm_family = UInt8(AF_INET); h.rtm_dst_len = UInt8(c.int(0...32)); h.rtm_table = RT.mainTable
            h.rtm_type = RT.unicast; h.rtm_flags = c.oneIn(4) ? RT.onlink : 0
            r.append(header: h)
            r.append(attribute: RT.dst, address: IPv4Address(c.u32()))
            if c.bool() { r.append(attribute: RT.table, uint32: c.oneIn(4) ? 255 : 254) }
            if c.oneIn(3) {
                var hop = rtnexthop()
                hop.rtnh_ifindex = Int32(c.int(1...10)); hop.rtnh_len = UInt16(MemoryLayout<rtnexthop>.size + 8)
                var inner = NetlinkRequest(type: 0)
                inner.append(attribute: RT.gateway, address: IPv4Address(c.u32()))
                let hopBytes = withUnsafeBytes(of: hop) { Array($0) } + Array(inner.bytes.dropFirst(16))
                r.append(attribute: RT.multipath, bytes: hopBytes)
            } else {
                r.append(attribute: RT.oif, int32: Int32(c.int(1...10)))
                if c.bool() { r.append(attribute: RT.gateway, address: IPv4Address(c.u32())) }
            }
            if c.bool() { r.append(attribute: RT.priority, uint32: UInt32(c.int(0...1000))) }
            return r.encoded(sequence: sequence)
        case 3, 4:
            var r = NetlinkRequest(type: NLMSG_ERROR, flags: c.bool() ? NLM_F_ACK_TLVS : NLM_F_ACK_TLVS | NLM_F_CAPPED)
            var e = nlmsgerr()
            e.error = c.pick([0, -1, -17, -22, Int32.min, Int32.max, Int32(truncatingIfNeeded: c.u32())])
            e.msg.nlmsg_len = UInt32(c.pick([16, 32, 0xffff_ffff, c.int(0...64)]))
            r.append(header: e)
            r.append(attribute: NLMSGERR_ATTR_MSG.rawValue, string: "Invalid argument")
            return r.encoded(sequence: sequence)
        default:
            var r = NetlinkRequest(type: NLMSG_DONE, flags: NLM_F_MULTI)
            r.append(header: c.pick([0, -1, -16, Int32.min, Int32.max]))
            return r.encoded(sequence: sequence)
        }
    }

    /// The slow model of `NetlinkMessage.parse`: byte arithmetic on the array.
    static func slowParse(_ d: [UInt8]) -> [(UInt16, UInt16, UInt32, UInt32, [UInt8])]? {
        func le(_ o: Int, _ n: Int) -> UInt64 { (0..<n).reduce(0) { $0 | UInt64(d[o + $1]) << (8 * UInt64($1)) } }
        var out: [(UInt16, UInt16, UInt32, UInt32, [UInt8])] = []
        var o = 0
        while d.count - o >= 16 {
            let length = Int(le(o, 4))
            guard length >= 16, length <= d.count - o else { return nil }
            out.append(
                (
                    UInt16(le(o + 4, 2)), UInt16(le(o + 6, 2)), UInt32(le(o + 8, 4)), UInt32(le(o + 12, 4)),
                    Array(d[(o + 16)..<(o + length)])
                )
            )
            o += (length + 3) / 4 * 4
        }
        return out
    }

    static func slowAttributes(_ b: [UInt8]) -> [(UInt16, [UInt8])] {
        var out: [(UInt16, [UInt8])] = []
        var o = 0
        while b.count - o >= 4 {
            let length = Int(b[o]) | Int(b[o + 1]) << 8
            guard length >= 4, length <= b.count - o else { break }
            out.append(((UInt16(b[o + 2]) | UInt16(b[o + 3]) << 8) & 0x3fff, Array(b[(o + 4)..<(o + length)])))
            o += (length + 3) / 4 * 4
        }
        return out
    }

    @Test func repliesOfAnyBytesParseAsTheSlowModelParsesThem() {
        let report = fuzz("repliesOfAnyBytesParseAsTheSlowModelParsesThem", seed: 0x4F_0001, iterations: 6000) {
            c,
            count in
            var datagram: [UInt8] = []
            for i in 0..<c.int(1...4) { datagram += Self.seedMessage(c, sequence: UInt32(i)) }
            if c.oneIn(6) { datagram = c.bytes(c.int(0...80)) }
            if !c.oneIn(4) { c.mutate(&datagram) }
            let parsed = NetlinkMessage.parse(datagram: datagram)
            guard let model = Self.slowParse(datagram) else {
                c.expect((try? parsed.get()) == nil, "accepted a datagram whose lengths run past its end")
                count("refused")
                return
            }
            guard case .success(let messages) = parsed else { c.fail("refused, the model accepts"); return }
            c.expect(messages.count == model.count, "\(messages.count) messages, the model \(model.count)")
            for (m, s) in zip(messages, model) {
                c.expect(
                    m.type == s.0 && m.flags == s.1 && m.sequence == s.2 && m.portID == s.3 && m.payload == s.4,
                    "message fields"
                )
                for headerSize in [0, 16, 12, 20] {  // none, ifinfomsg, rtmsg/ndmsg, nlmsgerr-ish
                    let start = (headerSize + 3) / 4 * 4
                    let attributes = NetlinkAttributes(parsing: start <= m.payload.count ? m.payload[start...] : [])
                    let slow = start <= m.payload.count ? Self.slowAttributes(Array(m.payload[start...])) : []
                    c.expect(
                        attributes.map(\.type) == slow.map(\.0) && attributes.map(\.value) == slow.map(\.1),
                        "attributes"
                    )
                }
                // The decoders take whatever arrives without trapping, and what they
                // return is safe to use.
                if let link = Link(message: m) { _ = link.description; count("link") }
                if let address = InterfaceAddress(message: m) {
                    c.expect(address.prefixLength <= 32, "address with prefix /\(address.prefixLength)")
                    if address.prefixLength <= 32 { _ = address.network }
                    count("address")
                }
                if let route = Route(mainTableMessage: m) { _ = route.description; count("route") }
                if m.type == UInt16(NLMSG_ERROR) {
                    let failure = NetlinkFailure(errorMessage: m)
                    c.expect(failure.errno.rawValue >= 0, "negative errno \(failure.errno.rawValue)")
                    count("error")
                }
                if m.type == UInt16(NLMSG_DONE) {
                    _ = NetlinkFailure.doneCode(m)
                    count("done")
                }
            }
            count("parsed")
        }
        report.expectReached("route", atLeast: 100)
        report.expectReached("error", atLeast: 100)
    }

    /// Found by repliesOfAnyBytesParseAsTheSlowModelParsesThem: an error or done message
    /// carrying INT32_MIN as its code trapped negating it.
    @Test func errorCodesThatCannotBeNegatedAreAProtocolError() throws {
        for code in [Int32.min, 5, Int32.max] {
            var r = NetlinkRequest(type: NLMSG_ERROR)
            var e = nlmsgerr()
            e.error = code
            r.append(header: e)
            let message = try NetlinkMessage.parse(datagram: r.encoded(sequence: 1)).get()[0]
            #expect(NetlinkFailure(errorMessage: message).errno == Errno(EPROTO))
            var done = NetlinkRequest(type: NLMSG_DONE)
            done.append(header: code)
            let doneMessage = try NetlinkMessage.parse(datagram: done.encoded(sequence: 1)).get()[0]
            #expect(NetlinkFailure.doneCode(doneMessage) == (code < 0 ? Errno(EPROTO) : nil))
        }
        var r = NetlinkRequest(type: NLMSG_ERROR)
        var e = nlmsgerr()
        e.error = -EEXIST
        r.append(header: e)
        #expect(
            NetlinkFailure(errorMessage: try NetlinkMessage.parse(datagram: r.encoded(sequence: 1)).get()[0]).errno
                == Errno(EEXIST)
        )
    }

    /// Found by the same run: an address reply with a prefix length above 32 was accepted,
    /// and asking for its network trapped.
    @Test func addressRepliesWithAnImpossiblePrefixAreSkipped() throws {
        var r = NetlinkRequest(type: RTM_NEWADDR)
        var h = ifaddrmsg()
        h.ifa_family = UInt8(AF_INET); h.ifa_prefixlen = 33; h.ifa_index = 2
        r.append(header: h)
        r.append(attribute: IFA_LOCAL, address: IPv4Address("10.0.0.1")!)
        let message = try NetlinkMessage.parse(datagram: r.encoded(sequence: 1)).get()[0]
        #expect(InterfaceAddress(message: message) == nil)
    }
}
