/* LD_PRELOAD shim for bench/peer.py: every netlink socket that the process
 * binds gets a receive buffer of $PEER_NETLINK_RCVBUF bytes (SO_RCVBUFFORCE,
 * root only; the kernel doubles it).
 *
 * Why: conntrack-tools 1.4.7 applies `conntrack -E -b SIZE` to its first
 * netlink socket (fd 3, no multicast groups), while the events arrive on the
 * second (fd 4, bound to the event groups), which keeps net.core.rmem_default.
 * `strace -e setsockopt,bind conntrack -E -b 33554432` shows it. The bench
 * measures `-b` as a user runs it, and beside it conntrack -E with a buffer
 * that is really that large, set by this shim on the socket that receives.
 * net.core.rmem_default cannot do it: it is read-only in a network namespace
 * other than the first, and the machine's own setting is not the bench's to
 * change.
 *
 * Built by bench/peer.py: gcc -O2 -shared -fPIC -o rcvbuf_shim.so rcvbuf_shim.c -ldl */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <sys/socket.h>

int bind(int fd, const struct sockaddr *addr, socklen_t len)
{
	static int (*real_bind)(int, const struct sockaddr *, socklen_t);
	if (!real_bind)
		real_bind = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "bind");
	int rc = real_bind(fd, addr, len);
	const char *want = getenv("PEER_NETLINK_RCVBUF");
	if (rc == 0 && want && addr && addr->sa_family == AF_NETLINK) {
		int size = atoi(want);
		setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof(size));
	}
	return rc;
}
