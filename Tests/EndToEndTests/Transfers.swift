import Foundation
import NetBase
import Testing

/// Sends random bytes over TCP from one container to another and compares
/// SHA-256 digests of what was sent and what arrived.
func transfer(_ lab: Lab, from: Int, to: Int, megabytes: Int) throws {
    try transfer(lab, from: from, to: to, bytes: megabytes << 20)
}

/// `mss`: the client asks for this TCP maximum segment size (TCP_MAXSEG),
/// so its super-packets hold that many more, smaller segments.
/// `ipv6`: between the containers' IPv6 addresses (a dual-stack lab).
/// `pace`: the client sends `chunk` bytes, then sleeps `seconds`, and so on
/// (a transfer that lasts, at a bounded rate).
func transfer(
    _ lab: Lab,
    from: Int,
    to: Int,
    bytes: Int,
    port: Int = 5201,
    mss: Int? = nil,
    ipv6: Bool = false,
    pace: (chunk: Int, seconds: Double)? = nil
) throws {
    let source = lab.directory.appendingPathComponent("payload-\(bytes).bin").path
    let received = lab.directory.appendingPathComponent("received-\(bytes).bin").path
    try run(["bash", "-c", "head -c \(bytes) /dev/urandom > \(source)"])
    let target = try ipv6 ? lab.containerIPv6(to) : lab.containerIP(to)
    let family = ipv6 ? "socket.AF_INET6" : "socket.AF_INET"
    let any = ipv6 ? "::" : "0.0.0.0"
    let serverScript = """
        import socket,sys
        s=socket.socket(\(family)); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)
        s.bind(('\(any)',int(sys.argv[2]))); s.listen(1); s.settimeout(60)
        c,_=s.accept(); c.settimeout(60)
        with open(sys.argv[1],'wb') as f:
            while True:
                b=c.recv(1<<16)
                if not b: break
                f.write(b)
        """
    let client = """
        import socket,sys,time
        mss=int(sys.argv[4])
        for i in range(100):
            try:
                s=socket.socket(\(family)); s.settimeout(60)
                if mss: s.setsockopt(socket.IPPROTO_TCP,socket.TCP_MAXSEG,mss)
                s.connect((sys.argv[1],int(sys.argv[3]))); break
            except OSError: time.sleep(0.1)
        with open(sys.argv[2],'rb') as f: data=f.read()
        chunk,pause=int(sys.argv[5]),float(sys.argv[6])
        if chunk:
            for i in range(0,len(data),chunk):
                s.sendall(data[i:i+chunk]); time.sleep(pause)
        else:
            s.sendall(data)
        s.shutdown(socket.SHUT_WR); s.recv(1); s.close()
        """
    let server = try spawn(
        [
            "ip", "netns", "exec", lab.namespace("c\(to)"), "python3", "-c", serverScript, received,
            "\(port)",
        ],
        output: lab.directory.appendingPathComponent("transfer-server.log").path
    )
    defer { server.terminate() }
    try lab.exec(
        "c\(from)",
        [
            "python3", "-c", client, target, source, "\(port)", "\(mss ?? 0)", "\(pace?.chunk ?? 0)",
            "\(pace?.seconds ?? 0)",
        ],
        timeout: .seconds(90)
    )
    #expect(server.wait(timeout: .seconds(30)) == 0, "the receiving side did not finish cleanly")
    let sent = try run(["sha256sum", source]).output.prefix(64)
    let got = try run(["sha256sum", received]).output.prefix(64)
    #expect(sent == got, "the \(bytes)-byte transfer from c\(from) to c\(to) arrived changed or incomplete")
    try? FileManager.default.removeItem(atPath: source)
    try? FileManager.default.removeItem(atPath: received)
}

/// Sends one UDP datagram of each size from container `from` to an echo
/// server in container `to` and checks that each comes back byte-identical
/// (a lost datagram is sent again, at most 5 times). Sizes past the MTU are
/// fragmented by the sender and carried as fragments.
func udpEcho(_ lab: Lab, from: Int, to: Int, sizes: [Int], port: Int = 5301, ipv6: Bool = false) throws {
    let target = try ipv6 ? lab.containerIPv6(to) : lab.containerIP(to)
    let family = ipv6 ? "socket.AF_INET6" : "socket.AF_INET"
    let echo = """
        import socket,sys
        s=socket.socket(\(family),socket.SOCK_DGRAM); s.bind(('\(ipv6 ? "::" : "0.0.0.0")',int(sys.argv[1]))); s.settimeout(60)
        while True:
            b,peer=s.recvfrom(70000)
            if b==b'stop': break
            s.sendto(b,peer)
        """
    let client = """
        import os,socket,sys
        target,port=sys.argv[1],int(sys.argv[2])
        s=socket.socket(\(family),socket.SOCK_DGRAM); s.settimeout(1)
        bad=[]
        for size in map(int,sys.argv[3:]):
            data=os.urandom(size)
            for attempt in range(5):
                s.sendto(data,(target,port))
                try:
                    back=s.recv(70000)
                except socket.timeout:
                    continue
                if back==data: break
                bad.append('%d:changed' % size); break
            else:
                bad.append('%d:lost' % size)
        s.sendto(b'stop',(target,port))
        print('bad', ' '.join(bad)) if bad else print('all echoed')
        """
    let server = try spawn(
        ["ip", "netns", "exec", lab.namespace("c\(to)"), "python3", "-c", echo, "\(port)"],
        output: lab.directory.appendingPathComponent("echo-server.log").path
    )
    defer { server.terminate() }
    usleep(300_000)
    let result = try lab.exec(
        "c\(from)",
        ["python3", "-c", client, target, "\(port)"] + sizes.map(String.init),
        timeout: .seconds(120)
    )
    #expect(result.output.contains("all echoed"), "UDP from c\(from) to c\(to): \(result.output)")
}

/// Sends 20 UDP datagrams of 1000 bytes in one UDP_SEGMENT send from container
/// `from` to `to`, where a listener checks that every one arrives whole and
/// unchanged (a burst is sent again, at most 5 times, until one arrives whole).
func udpBurst(_ lab: Lab, from: Int, to: Int, port: Int = 5351, ipv6: Bool = false) throws {
    let target = try ipv6 ? lab.containerIPv6(to) : lab.containerIP(to)
    let family = ipv6 ? "socket.AF_INET6" : "socket.AF_INET"
    let listener = """
        import socket,sys,struct
        s=socket.socket(\(family),socket.SOCK_DGRAM); s.bind(('\(ipv6 ? "::" : "0.0.0.0")',int(sys.argv[1]))); s.settimeout(20)
        seen={}
        while True:
            b,peer=s.recvfrom(70000)
            burst,i=struct.unpack('!II',b[:8])
            ok=len(b)==1000 and b[8:]==bytes([(burst*31+i) & 0xff])*992
            seen.setdefault(burst,set())
            if ok: seen[burst].add(i)
            if len(seen[burst])==20:
                s.sendto(b'whole %d' % burst,peer); break
        """
    let sender = """
        import socket,sys,struct,time
        s=socket.socket(\(family),socket.SOCK_DGRAM); s.settimeout(1)
        s.setsockopt(17,103,1000)
        for burst in range(5):
            data=b''.join(struct.pack('!II',burst,i)+bytes([(burst*31+i) & 0xff])*992 for i in range(20))
            s.sendto(data,(sys.argv[1],int(sys.argv[2])))
            try:
                print(s.recv(100).decode()); sys.exit(0)
            except socket.timeout:
                pass
        print('no burst arrived whole')
        """
    let server = try spawn(
        ["ip", "netns", "exec", lab.namespace("c\(to)"), "python3", "-c", listener, "\(port)"],
        output: lab.directory.appendingPathComponent("burst-server.log").path
    )
    defer { server.terminate() }
    usleep(300_000)
    let result = try lab.exec("c\(from)", ["python3", "-c", sender, target, "\(port)"], timeout: .seconds(60))
    #expect(result.output.contains("whole"), "UDP burst from c\(from) to c\(to): \(result.output)")
}

/// The transfers that exercise every offload between hosts 1 and 2: TCP of
/// 1 byte, around the MSS (1432 with MTU 1472) and the MTU, one super-packet
/// and many, both ways; a tiny MSS whose super-packets hold more segments
/// than one read may be split into (nothing may stall); UDP echoes of every
/// size around the MTU and above; a UDP burst. Each checks its bytes.
///
/// `ipv6`: the same between the containers' IPv6 addresses, with the sizes
/// around IPv6's MSS (1412) and largest unfragmented datagram (1424).
func offloadWorkout(_ lab: Lab, ipv6: Bool = false) throws {
    let tcpSizes =
        ipv6
        ? [1, 1411, 1412, 1413, 1472, 2824, 2825, 65_536, 1 << 20, 20 << 20]
        : [1, 1431, 1432, 1433, 1472, 2864, 2865, 65_536, 1 << 20, 20 << 20]
    for (i, bytes) in tcpSizes.enumerated() {
        try transfer(lab, from: 1, to: 2, bytes: bytes, port: 5201 + i, ipv6: ipv6)
    }
    try transfer(lab, from: 2, to: 1, bytes: 3 << 20, ipv6: ipv6)
    try transfer(lab, from: 1, to: 2, bytes: 2 << 20, port: 5221, mss: 100, ipv6: ipv6)
    let udpSizes =
        ipv6 ? [1, 100, 1423, 1424, 1425, 4_000, 20_000, 65_000] : [1, 100, 1443, 1444, 1445, 4_000, 20_000, 65_000]
    try udpEcho(lab, from: 1, to: 2, sizes: udpSizes, ipv6: ipv6)
    try udpBurst(lab, from: 1, to: 2, ipv6: ipv6)
}

/// The stopped daemons' counters say the bulk went through the offload path
/// — super-packets split on the sending host, segments coalesced on the
/// receiving one — with no offload refused and no send or write failing.
func expectTheBulkWentThroughTheOffloads(sender: [String: UInt64], receiver: [String: UInt64]) {
    #expect(sender["tun_super_packets_read", default: 0] > 0, "\(sender)")
    #expect(sender["gso_sends", default: 0] > 0, "\(sender)")
    #expect(receiver["gro_receives", default: 0] > 0, "\(receiver)")
    #expect(receiver["segments_coalesced", default: 0] > 0, "\(receiver)")
    #expect(receiver["tun_super_packets_written", default: 0] > 0, "\(receiver)")
    #expect(sender["dropped_bad_offload", default: 0] == 0, "\(sender)")
    #expect(sender["udp_send_errors", default: 0] == 0, "\(sender)")
    #expect(receiver["tun_write_errors", default: 0] == 0, "\(receiver)")
}
