// A feasibility probe, not part of tunneld: flannel's udp wire format (one raw
// IPv4 packet per UDP datagram, port 8285 to 8285) done in the kernel by TC
// eBPF, to measure how close a kernel data path in that format comes to the
// kernel vxlan. Built and attached by ./run; addresses come in as -D macros.
//
// encap (docker0 ingress): an IPv4 packet for the overlay outside our subnet
// gets an outer IPv4 + UDP header (GSO packets become UDP-tunnel GSO packets,
// segmented by the kernel into one inner packet per datagram) and goes to the
// underlay through bpf_redirect_neigh.
// decap (underlay ingress): UDP to 8285 from the peer, for our subnet, loses
// the outer headers and goes up the stack to the bridge.
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/udp.h>

#define SEC(x) __attribute__((section(x), used))
static long (*bpf_skb_adjust_room)(void *ctx, int len_diff, __u32 mode, __u64 flags) = (void *)50;
static long (*bpf_skb_store_bytes)(void *ctx, __u32 off, const void *from, __u32 len, __u64 flags) = (void *)9;
static long (*bpf_redirect_neigh)(__u32 ifindex, void *params, int plen, __u64 flags) = (void *)152;
static long (*bpf_redirect)(__u32 ifindex, __u64 flags) = (void *)23;

#ifndef DECAP_FLAGS
#define DECAP_FLAGS 0
#endif
#define B(a,b,c,d) ((__u32)(a) << 24 | (__u32)(b) << 16 | (__u32)(c) << 8 | (__u32)(d))

static __always_inline __u16 csum_fold32(__u32 s) { s = (s & 0xffff) + (s >> 16); s = (s & 0xffff) + (s >> 16); return (__u16)~s; }

SEC("tc/encap") int encap(struct __sk_buff *skb) {
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end || eth->h_proto != __builtin_bswap16(ETH_P_IP)) return TC_ACT_OK;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end) return TC_ACT_OK;
    __u32 dst = __builtin_bswap32(ip->daddr);
    if ((dst & 0xffff0000) != (NETWORK & 0xffff0000)) return TC_ACT_OK;   // not the overlay
    if ((dst & 0xffffff00) == (LOCAL & 0xffffff00)) return TC_ACT_OK;     // our own subnet
    if ((dst & 0xffffff00) != (PEERNET & 0xffffff00)) return TC_ACT_SHOT; // no route (probe: one peer)
    __u16 inner = __builtin_bswap16(ip->tot_len);
    if (bpf_skb_adjust_room(skb, 28, BPF_ADJ_ROOM_MAC,
                            BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP)) return TC_ACT_SHOT;
    struct { struct iphdr ip; struct udphdr udp; } __attribute__((packed)) h = {};
    __u32 outer = (__u32)inner + 28;
    if (outer > 0xffff) outer = 0xffff;
    h.ip.version = 4; h.ip.ihl = 5; h.ip.ttl = 64; h.ip.protocol = 17;
    h.ip.tot_len = __builtin_bswap16((__u16)outer);
    h.ip.frag_off = __builtin_bswap16(0x4000);
    h.ip.saddr = __builtin_bswap32(SELF); h.ip.daddr = __builtin_bswap32(PEER);
    struct iphdr copy = h.ip;
    __u16 *w = (__u16 *)&copy; __u32 s = 0;
    #pragma unroll
    for (int i = 0; i < 10; i++) s += w[i];
    h.ip.check = csum_fold32(s);
    h.udp.source = __builtin_bswap16(8285); h.udp.dest = __builtin_bswap16(8285);
    h.udp.len = __builtin_bswap16((__u16)(outer - 20));
    h.udp.check = 0;
    if (bpf_skb_store_bytes(skb, 14, &h, sizeof(h), 0)) return TC_ACT_SHOT;
    return bpf_redirect_neigh(UL_IFINDEX, 0, 0, 0);
}

SEC("tc/decap") int decap(struct __sk_buff *skb) {
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end || eth->h_proto != __builtin_bswap16(ETH_P_IP)) return TC_ACT_OK;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end || ip->protocol != 17 || ip->ihl != 5) return TC_ACT_OK;
    struct udphdr *udp = (void *)(ip + 1);
    if ((void *)(udp + 1) > end || udp->dest != __builtin_bswap16(8285)) return TC_ACT_OK;
    if (ip->saddr != __builtin_bswap32(PEER)) return TC_ACT_SHOT;   // strict sender check
    struct iphdr *in = (void *)(udp + 1);
    if ((void *)(in + 1) > end || in->version != 4) return TC_ACT_SHOT;
    if ((__builtin_bswap32(in->daddr) & 0xffffff00) != (LOCAL & 0xffffff00)) return TC_ACT_SHOT; // not for us
    if (bpf_skb_adjust_room(skb, -28, BPF_ADJ_ROOM_MAC, DECAP_FLAGS)) return TC_ACT_SHOT;
    return TC_ACT_OK;
}
char _license[] SEC("license") = "GPL";
