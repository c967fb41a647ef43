#ifndef CTUNNEL_NETLINK_H
#define CTUNNEL_NETLINK_H
// rtnetlink message layout. The structs and the enum constants (RTM_*, IFLA_*,
// IFA_*, RTA_*, NDA_*) import into Swift as they are; what follows are the
// macros that do not.
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/if_link.h>
#include <linux/if_addr.h>
#include <linux/neighbour.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

static inline unsigned int ctunnel_nlmsg_align(unsigned int len) { return NLMSG_ALIGN(len); }
static inline unsigned int ctunnel_nlmsg_hdrlen(void) { return NLMSG_HDRLEN; }
static inline unsigned int ctunnel_rta_align(unsigned int len) { return RTA_ALIGN(len); }
static inline unsigned int ctunnel_rta_length(unsigned int len) { return RTA_LENGTH(len); }

// NLA_TYPE_MASK is an expression macro; attribute types carry NLA_F_NESTED and
// NLA_F_NET_BYTEORDER in their top bits, which readers must strip.
static const unsigned short ctunnel_NLA_TYPE_MASK = (unsigned short)NLA_TYPE_MASK;
static const unsigned short ctunnel_NLA_F_NESTED = NLA_F_NESTED;
static const unsigned short ctunnel_NLA_F_NET_BYTEORDER = NLA_F_NET_BYTEORDER;

// setns(2) is declared only under _GNU_SOURCE, which the Glibc module does not
// set; the raw syscall is the same call. Joins the network namespace `fd`
// refers to, for the calling thread only.
#ifndef CLONE_NEWNET
#define CLONE_NEWNET 0x40000000
#endif
static inline int ctunnel_setns_net(int fd) { return (int)syscall(SYS_setns, fd, CLONE_NEWNET); }

// The Swift message builder and parser rely on these layouts.
_Static_assert(sizeof(struct nlmsghdr) == 16, "nlmsghdr is 16 bytes");
_Static_assert(sizeof(struct rtattr) == 4, "rtattr is 4 bytes");
_Static_assert(sizeof(struct nlattr) == 4, "nlattr is 4 bytes");
_Static_assert(sizeof(struct nlmsgerr) == 20, "nlmsgerr is 20 bytes");
_Static_assert(sizeof(struct ifinfomsg) == 16, "ifinfomsg is 16 bytes");
_Static_assert(sizeof(struct ifaddrmsg) == 8, "ifaddrmsg is 8 bytes");
_Static_assert(sizeof(struct rtmsg) == 12, "rtmsg is 12 bytes");
_Static_assert(sizeof(struct ndmsg) == 12, "ndmsg is 12 bytes");
_Static_assert(sizeof(struct rtnexthop) == 8, "rtnexthop is 8 bytes");
_Static_assert(sizeof(struct sockaddr_nl) == 12, "sockaddr_nl is 12 bytes");

#endif
