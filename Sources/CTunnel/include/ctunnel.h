#ifndef CTUNNEL_H
#define CTUNNEL_H
// The one C shim of tunneld: what Swift cannot import from the kernel headers.
// Everything here is prefixed ctunnel_ and is either a constant, a plain struct
// mirror, or a static inline function.
#include <features.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/eventfd.h>
#include <poll.h>
#include <sys/prctl.h>
#include <malloc.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <linux/if_tun.h>
#include <linux/virtio_net.h>
#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "ctunnel_netlink.h"

// ---- TUN ioctls (the _IOW macros do not import) ----
static const unsigned long ctunnel_TUNSETIFF = TUNSETIFF;
static const unsigned long ctunnel_TUNSETOFFLOAD = TUNSETOFFLOAD;
static const unsigned long ctunnel_TUNSETQUEUE = TUNSETQUEUE;
static const unsigned long ctunnel_TUNSETVNETHDRSZ = TUNSETVNETHDRSZ;
static const unsigned long ctunnel_TUNGETIFF = TUNGETIFF;
static const unsigned long ctunnel_TUNSETPERSIST = TUNSETPERSIST;
static const unsigned long ctunnel_SIOCGIFMTU = SIOCGIFMTU;
static const unsigned long ctunnel_SIOCGIFINDEX = SIOCGIFINDEX;

static const short ctunnel_IFF_TUN = IFF_TUN;
static const short ctunnel_IFF_NO_PI = IFF_NO_PI;
static const short ctunnel_IFF_VNET_HDR = IFF_VNET_HDR;
static const short ctunnel_IFF_MULTI_QUEUE = IFF_MULTI_QUEUE;

#ifndef TUN_F_USO4
#define TUN_F_USO4 0x20
#endif
#ifndef TUN_F_USO6
#define TUN_F_USO6 0x40
#endif
#ifndef VIRTIO_NET_HDR_GSO_UDP_L4
#define VIRTIO_NET_HDR_GSO_UDP_L4 5
#endif
static const unsigned int ctunnel_TUN_F_CSUM = TUN_F_CSUM;
static const unsigned int ctunnel_TUN_F_TSO4 = TUN_F_TSO4;
static const unsigned int ctunnel_TUN_F_TSO6 = TUN_F_TSO6;
static const unsigned int ctunnel_TUN_F_USO4 = TUN_F_USO4;
static const unsigned int ctunnel_TUN_F_USO6 = TUN_F_USO6;

// ioctls whose argument is a value, not a pointer (TUNSETOFFLOAD takes an
// unsigned long): Glibc's Swift overlay only passes an int there.
static inline int ctunnel_ioctl_value(int fd, unsigned long request, unsigned long value) {
    return ioctl(fd, request, value);
}

// ---- threads: prctl is variadic, and pthread_setname_np needs _GNU_SOURCE ----
static inline int ctunnel_set_thread_name(const char *name) { return prctl(PR_SET_NAME, name, 0, 0, 0); }

// ---- ifreq helpers: the union members are awkward from Swift ----
static inline void ctunnel_ifreq_set_name(struct ifreq *ifr, const char *name) {
    memset(ifr->ifr_name, 0, IFNAMSIZ);
    strncpy(ifr->ifr_name, name, IFNAMSIZ - 1);
}
static inline void ctunnel_ifreq_set_flags(struct ifreq *ifr, short flags) { ifr->ifr_flags = flags; }
static inline short ctunnel_ifreq_flags(const struct ifreq *ifr) { return ifr->ifr_flags; }
static inline int ctunnel_ifreq_mtu(const struct ifreq *ifr) { return ifr->ifr_mtu; }
static inline int ctunnel_ifreq_ifindex(const struct ifreq *ifr) { return ifr->ifr_ifindex; }

// ---- UDP GSO / GRO ----
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif
static const int ctunnel_SOL_UDP = SOL_UDP;
static const int ctunnel_UDP_SEGMENT = UDP_SEGMENT;
static const int ctunnel_UDP_GRO = UDP_GRO;

// ---- sendmmsg / recvmmsg: struct mmsghdr and both calls are declared only
// under _GNU_SOURCE, which the Glibc module does not set. The mirror has the
// kernel's layout; the raw system calls are the same calls.
struct ctunnel_mmsghdr {
    struct msghdr msg_hdr;
    unsigned int msg_len;
};
static inline int ctunnel_sendmmsg(int fd, struct ctunnel_mmsghdr *vector, unsigned int count, int flags) {
    return (int)syscall(SYS_sendmmsg, fd, vector, count, flags);
}
static inline int ctunnel_recvmmsg(int fd, struct ctunnel_mmsghdr *vector, unsigned int count, int flags) {
    return (int)syscall(SYS_recvmmsg, fd, vector, count, flags, (void *)0);
}

// ---- CMSG_* (macros) ----
static inline struct cmsghdr *ctunnel_cmsg_firsthdr(struct msghdr *m) { return CMSG_FIRSTHDR(m); }
static inline struct cmsghdr *ctunnel_cmsg_nxthdr(struct msghdr *m, struct cmsghdr *c) { return CMSG_NXTHDR(m, c); }
static inline unsigned char *ctunnel_cmsg_data(struct cmsghdr *c) { return CMSG_DATA(c); }
static inline size_t ctunnel_cmsg_space(size_t len) { return CMSG_SPACE(len); }
static inline size_t ctunnel_cmsg_len(size_t len) { return CMSG_LEN(len); }

// ---- virtio_net_hdr (the 10-byte header before each packet with IFF_VNET_HDR) ----
typedef struct virtio_net_hdr ctunnel_virtio_net_hdr;
static const uint8_t ctunnel_VIRTIO_NET_HDR_F_NEEDS_CSUM = VIRTIO_NET_HDR_F_NEEDS_CSUM;
static const uint8_t ctunnel_VIRTIO_NET_HDR_GSO_NONE = VIRTIO_NET_HDR_GSO_NONE;
static const uint8_t ctunnel_VIRTIO_NET_HDR_GSO_TCPV4 = VIRTIO_NET_HDR_GSO_TCPV4;
static const uint8_t ctunnel_VIRTIO_NET_HDR_GSO_TCPV6 = VIRTIO_NET_HDR_GSO_TCPV6;
static const uint8_t ctunnel_VIRTIO_NET_HDR_GSO_UDP_L4 = VIRTIO_NET_HDR_GSO_UDP_L4;

// ---- pipe2 is declared only under _GNU_SOURCE; the raw syscall is the same call.
// A pipe whose ends are close-on-exec from the start, so that a child spawned
// by another thread meanwhile cannot inherit them (and hold EOF back).
static inline int ctunnel_pipe_cloexec(int fds[2]) { return (int)syscall(SYS_pipe2, fds, O_CLOEXEC); }
/* Gives free heap pages back to the kernel (glibc keeps them otherwise). */
static inline int ctunnel_malloc_trim(void) { return malloc_trim(0); }
/* Fixed thresholds: blocks of at least `mmap_bytes` get their own mapping,
   returned to the kernel when freed (glibc otherwise raises the threshold
   after the first large free, and later large blocks fragment the heap). */
static inline void ctunnel_malloc_thresholds(int mmap_bytes) {
    mallopt(M_MMAP_THRESHOLD, mmap_bytes);
    mallopt(M_TRIM_THRESHOLD, 2 * mmap_bytes);
}

/* Starts `path` (argv, envp) with standard input, output and error from fds[0..2], no
   other descriptor, every signal at its default and none blocked, and `pdeathsig` sent to
   it when this process ends (see ctunnel.c). Returns 0 and the child's pid, or an errno:
   the exec's own when the program could not be run. */
int ctunnel_spawn_with_parent_death_signal(const char *path, char *const argv[], char *const envp[],
                                           const int fds[3], int pdeathsig, pid_t *pid);

_Static_assert(sizeof(struct virtio_net_hdr) == 10, "virtio_net_hdr is 10 bytes");
_Static_assert(sizeof(struct sockaddr_in) == 16, "sockaddr_in is 16 bytes");
_Static_assert(sizeof(struct ctunnel_mmsghdr) == 64, "mmsghdr is 64 bytes on 64-bit Linux");

#endif
