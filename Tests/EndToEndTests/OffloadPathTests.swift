import Foundation
import NetBase
import Testing

/// The udp backend with its offloads (TUN TSO/checksum, UDP GSO/GRO) carrying
/// real traffic between containers, next to hosts without them.
@Suite(.serialized, .enabled(if: canRunNamespaceTests, namespaceSkipReason))
struct OffloadPathTests {
    func withLab(_ body: (Lab) throws -> Void) throws {
        try Lab.withLocalStore(config: seedConfig, body)
    }

    /// Hosts 1 and 2 with default options, and a ping between their containers.
    func addTwoHostsThatReachEachOther(_ lab: Lab) throws {
        let store = ["--store-dir", lab.storeDirectory]
        try lab.addHost(1, extra: store)
        try lab.addHost(2, extra: store)
        let ping = try lab.ping(from: 1, to: 2)
        #expect(ping.succeeded, "\(ping.output)")
    }

    func counters(_ lab: Lab, _ process: String) -> [String: UInt64] { lab.dataPathCounters(process) }

    @Test func transfersOfEverySizeArriveIntactWithOffloads() throws {
        try withLab { lab in
            let store = ["--store-dir", lab.storeDirectory]
            try lab.addHost(1, extra: store)
            try lab.addHost(2, extra: store)
            for host in ["h1", "h2"] {
                #expect(
                    lab.log(host).contains("offloads: tun-vnet-hdr+udp-gso+udp-gro"),
                    "\(host) should use every offload this kernel has: \(lab.log(host))"
                )
            }
            let ping = try lab.ping(from: 1, to: 2)
            #expect(ping.succeeded, "\(ping.output)")
            try offloadWorkout(lab)

            try lab.lab("stop", "h1")
            try lab.lab("stop", "h2")
            let sender = counters(lab, "h1"), receiver = counters(lab, "h2")
            expectTheBulkWentThroughTheOffloads(sender: sender, receiver: receiver)
            #expect(receiver["dropped_spoofed_source", default: 0] == 0, "\(receiver)")
        }
    }

    /// Busy polling after traffic must not become polling without it, in
    /// any tier.
    @Test(arguments: [TierLaunch.uring, .syscallRefused, .uringSingleRead])
    func anIdleDaemonUsesNoCPU(tier: TierLaunch) throws {
        try withLab { lab in
            let store = ["--store-dir", lab.storeDirectory]
            try lab.addHost(1, tier: tier, extra: store)
            try lab.addHost(2, tier: tier, extra: store)
            #expect(lab.log("h1").contains(tier.logLine), "\(lab.log("h1"))")
            let ping = try lab.ping(from: 1, to: 2)
            #expect(ping.succeeded, "\(ping.output)")
            sleep(1)
            let before = try lab.cpuSeconds("h1")
            sleep(3)
            let used = try lab.cpuSeconds("h1") - before
            #expect(used < 0.15, "an idle tunneld used \(used) s of CPU in 3 s")
        }
    }

    @Test func hostsWithAndWithoutOffloadsAndTheSimpleLoopInteroperate() throws {
        try withLab { lab in
            let store = ["--store-dir", lab.storeDirectory]
            try lab.addHost(1, extra: store)
            try lab.addHost(2, extra: store + ["--offload", "off"])
            try lab.addHost(3, extra: store + ["--datapath", "simple"])
            #expect(lab.log("h2").contains("offloads: off (--offload off)"))
            #expect(lab.log("h3").contains("simple data path"))
            for (a, b) in [(1, 2), (2, 1), (1, 3), (3, 1), (2, 3)] {
                let ping = try lab.ping(from: a, to: b)
                #expect(ping.succeeded, "ping c\(a) → c\(b): \(ping.output)")
            }
            var port = 5201
            for (a, b) in [(1, 2), (2, 1), (1, 3), (3, 1)] {
                try transfer(lab, from: a, to: b, bytes: 5 << 20, port: port)
                port += 1
            }
            try udpEcho(lab, from: 3, to: 1, sizes: [1, 1444, 1445, 30_000])
            try udpEcho(lab, from: 2, to: 1, sizes: [1, 1444, 1445, 30_000], port: 5302)
            try lab.lab("stop", "h1")
            // h1 split its super-packets for hosts that take one packet per
            // datagram, and those hosts' datagrams reached it through GRO.
            let c1 = counters(lab, "h1")
            #expect(c1["segments_made", default: 0] > 0, "\(c1)")
            #expect(c1["dropped_bad_offload", default: 0] == 0, "\(c1)")
        }
    }

    /// Traffic sent in bulk (UDP with UDP_SEGMENT, TCP with TSO) whose
    /// destination has no peer, or whose TTL runs out in the tunnel, comes
    /// back as ICMP errors to the sending container.
    @Test func segmentedTrafficGetsICMPErrors() throws {
        try withLab { lab in
            try addTwoHostsThatReachEachOther(lab)
            // A UDP super-packet (UDP_SEGMENT in the container: 20 datagrams
            // of 1000 bytes in one send), with a TTL or to a place that the
            // tunnel cannot carry it to; the sender reads the ICMP error from
            // its error queue (IP_RECVERR).
            let probe = """
                import socket,struct,sys,time
                IP_RECVERR=11
                target,ttl=sys.argv[1],int(sys.argv[2])
                s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)
                s.setsockopt(socket.SOL_IP,IP_RECVERR,1)
                s.setsockopt(socket.SOL_IP,socket.IP_TTL,ttl)
                s.setsockopt(17,103,1000)
                for attempt in range(10):
                    try:
                        s.sendto(b'x'*20000,(target,9))
                    except OSError:
                        pass  # an earlier error reported by the send; it is queued too
                    time.sleep(0.3)
                    try:
                        _,anc,_,_=s.recvmsg(100,512,socket.MSG_ERRQUEUE|socket.MSG_DONTWAIT)
                    except OSError:
                        continue
                    for level,kind,data in anc:
                        if level==socket.SOL_IP and kind==IP_RECVERR:
                            errno_,origin,icmp_type,icmp_code=struct.unpack('IBBB',data[:7])
                            print('icmp',icmp_type,icmp_code); sys.exit(0)
                print('no icmp error')
                """
            // TTL 2: the host's forwarding leaves 1, so the tunnel may not send it on.
            let expired = try lab.exec("c1", ["python3", "-c", probe, try lab.containerIP(2), "2"], check: false)
            #expect(expired.output.contains("icmp 11 0"), "\(expired.output)")
            let unreachable = try lab.exec("c1", ["python3", "-c", probe, "10.2.200.9", "64"], check: false)
            #expect(unreachable.output.contains("icmp 3 0"), "\(unreachable.output)")
            // TCP: the connection is made with a normal TTL, then the sender
            // drops it to 2 and writes 200 KB, which leaves the container as
            // TSO super-packets; the tunnel answers the first one it cannot
            // carry with "time exceeded".
            let server = try spawn(
                [
                    "ip", "netns", "exec", lab.namespace("c2"), "python3", "-c",
                    """
                    import socket
                    s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)
                    s.bind(('0.0.0.0',5401)); s.listen(1); s.settimeout(30)
                    c,_=s.accept(); c.settimeout(30)
                    while c.recv(65536): pass
                    """,
                ],
                output: lab.directory.appendingPathComponent("ttl-server.log").path
            )
            defer { server.terminate() }
            let tcpProbe = """
                import socket,struct,sys,time
                IP_RECVERR=11
                for i in range(50):
                    try:
                        s=socket.create_connection((sys.argv[1],5401),timeout=5); break
                    except OSError: time.sleep(0.1)
                s.setsockopt(socket.SOL_IP,IP_RECVERR,1)
                s.setsockopt(socket.SOL_IP,socket.IP_TTL,2)
                s.setblocking(False)
                try:
                    s.send(b'y'*200000)
                except OSError:
                    pass
                # ICMP "time exceeded" is a soft error for a TCP connection:
                # with IP_RECVERR it becomes the socket's error (EHOSTUNREACH).
                for attempt in range(30):
                    time.sleep(0.1)
                    err=s.getsockopt(socket.SOL_SOCKET,socket.SO_ERROR)
                    if err: print('socket error',err); sys.exit(0)
                print('no icmp error')
                """
            let tcpExpired = try lab.exec("c1", ["python3", "-c", tcpProbe, try lab.containerIP(2)], check: false)
            #expect(tcpExpired.output.contains("socket error 113"), "\(tcpExpired.output)")

            try lab.lab("stop", "h1")
            let c1 = counters(lab, "h1")
            #expect(c1["icmp_time_exceeded_sent", default: 0] > 0, "\(c1)")
            #expect(c1["icmp_unreachable_sent", default: 0] > 0, "\(c1)")
            // The TCP ones came to the daemon as super-packets (TSO on the TUN).
            #expect(c1["tun_super_packets_read", default: 0] > 0, "\(c1)")
        }
    }
}
