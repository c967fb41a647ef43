#ifndef CTUNNEL_NETLINK_H
#define CTUNNEL_NETLINK_H
// rtnetlink message layout (NLMSG_*, RTA_* macros do not import).
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/if_link.h>
#include <linux/if_addr.h>

static inline unsigned int ctunnel_nlmsg_align(unsigned int len) { return NLMSG_ALIGN(len); }
static inline unsigned int ctunnel_nlmsg_hdrlen(void) { return NLMSG_HDRLEN; }
static inline unsigned int ctunnel_rta_align(unsigned int len) { return RTA_ALIGN(len); }
static inline unsigned int ctunnel_rta_length(unsigned int len) { return RTA_LENGTH(len); }

#endif
