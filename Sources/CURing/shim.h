#ifndef CURING_SHIM_H
#define CURING_SHIM_H
// <features.h> must come before <liburing.h>: liburing defines _XOPEN_SOURCE 500,
// which otherwise hides parts of fd_set from Swift's Glibc module.
#include <features.h>
#include <liburing.h>

// IOSQE_* are enum-like macros built from shifts; Swift does not import them.
static const unsigned int curing_iosqe_fixed_file = IOSQE_FIXED_FILE;
static const unsigned int curing_iosqe_io_link = IOSQE_IO_LINK;
static const unsigned int curing_iosqe_buffer_select = IOSQE_BUFFER_SELECT;
static const unsigned int curing_cqe_f_more = IORING_CQE_F_MORE;
static const unsigned int curing_cqe_f_buffer = IORING_CQE_F_BUFFER;
static const unsigned int curing_cqe_buffer_shift = IORING_CQE_BUFFER_SHIFT;


// Opcodes newer than liburing 2.3's headers (the kernel has them; the probe
// asks which the running kernel offers).
#ifndef IORING_OP_READ_MULTISHOT
#define CURING_OP_READ_MULTISHOT 49
#else
#define CURING_OP_READ_MULTISHOT IORING_OP_READ_MULTISHOT
#endif
static const int curing_op_read_multishot = CURING_OP_READ_MULTISHOT;
static const int curing_op_read = IORING_OP_READ;
static const int curing_op_recvmsg = IORING_OP_RECVMSG;
static const int curing_op_sendmsg = IORING_OP_SENDMSG;
static const int curing_op_writev = IORING_OP_WRITEV;

#endif
