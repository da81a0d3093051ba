/* Short TCP connections for bench/peer.py: an echo server and a client that
 * opens connections at a paced rate (or as fast as it can), each sending 16
 * bytes, reading them back and closing first (so the client side keeps the
 * TIME_WAIT and the server side ends in LAST_ACK -> CLOSED).
 *
 *   conn_storm server ADDR PORT NPORTS SECONDS
 *   conn_storm client ADDR PORT NPORTS COUNT RATE CONCURRENCY SECONDS
 *
 * ADDR is IPv4 or IPv6. The server listens on PORT .. PORT+NPORTS-1, prints
 * "ready" once it does, and exits after SECONDS or on SIGTERM/SIGINT. The
 * client spreads its connections over those ports (so a 5-tuple is not
 * reused within a run while the client's TIME_WAITs hold the source ports),
 * starts connection i at i/RATE seconds (RATE 0: keep CONCURRENCY open at all
 * times), never has more than CONCURRENCY open, stops starting new ones at
 * COUNT or after SECONDS, and prints one JSON line. Both are bounded: nothing
 * runs past SECONDS (+ 1 s for the last connections to finish).
 *
 * Single-threaded, epoll, no dependencies: built by bench/peer.py with
 * `gcc -O2` into a temporary directory. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MSG_LEN 16
#define MAX_PORTS 64
#define MAX_EVENTS 256

static volatile sig_atomic_t stop_requested;

static void on_signal(int sig) { (void)sig; stop_requested = 1; }

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void die(const char *what)
{
	fprintf(stderr, "conn_storm: %s: %s\n", what, strerror(errno));
	exit(1);
}

/* ADDR:port as a sockaddr of the right family; returns its length. */
static socklen_t make_addr(const char *addr, int port, struct sockaddr_storage *ss)
{
	memset(ss, 0, sizeof(*ss));
	struct sockaddr_in *v4 = (struct sockaddr_in *)ss;
	struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)ss;
	if (inet_pton(AF_INET, addr, &v4->sin_addr) == 1) {
		v4->sin_family = AF_INET;
		v4->sin_port = htons(port);
		return sizeof(*v4);
	}
	if (inet_pton(AF_INET6, addr, &v6->sin6_addr) == 1) {
		v6->sin6_family = AF_INET6;
		v6->sin6_port = htons(port);
		return sizeof(*v6);
	}
	fprintf(stderr, "conn_storm: not an address: %s\n", addr);
	exit(2);
}

static void raise_fd_limit(void)
{
	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
}

static void epoll_add(int ep, int fd, unsigned events)
{
	struct epoll_event ev = {.events = events, .data.fd = fd};
	if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0)
		die("epoll_ctl");
}

/* ---- server ------------------------------------------------------------- */

static int is_listener(const int *ls, int n, int fd)
{
	for (int i = 0; i < n; i++)
		if (ls[i] == fd)
			return 1;
	return 0;
}

static void accept_all(int ep, int lfd, long *accepted)
{
	for (;;) {
		int c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (c < 0)
			return; /* EAGAIN, or a connection reset before it was taken */
		epoll_add(ep, c, EPOLLIN);
		(*accepted)++;
	}
}

/* Echo what came; close on EOF or error (the client closes first). */
static void serve(int fd)
{
	char buf[256];
	ssize_t n = read(fd, buf, sizeof(buf));
	if (n > 0 && write(fd, buf, n) == n)
		return;
	if (n < 0 && errno == EAGAIN)
		return;
	close(fd);
}

static int run_server(const char *addr, int port, int nports, double seconds)
{
	int ep = epoll_create1(EPOLL_CLOEXEC), ls[MAX_PORTS], one = 1;
	if (ep < 0)
		die("epoll_create1");
	for (int i = 0; i < nports; i++) {
		struct sockaddr_storage ss;
		socklen_t len = make_addr(addr, port + i, &ss);
		ls[i] = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
		if (ls[i] < 0)
			die("socket");
		setsockopt(ls[i], SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (bind(ls[i], (struct sockaddr *)&ss, len) < 0)
			die("bind");
		if (listen(ls[i], 4096) < 0)
			die("listen");
		epoll_add(ep, ls[i], EPOLLIN);
	}
	printf("ready\n");
	fflush(stdout);
	long accepted = 0;
	double deadline = now_s() + seconds;
	struct epoll_event evs[MAX_EVENTS];
	while (!stop_requested && now_s() < deadline) {
		int n = epoll_wait(ep, evs, MAX_EVENTS, 100);
		for (int i = 0; i < n; i++) {
			int fd = evs[i].data.fd;
			if (is_listener(ls, nports, fd))
				accept_all(ep, fd, &accepted);
			else
				serve(fd);
		}
	}
	printf("{\"accepted\": %ld}\n", accepted);
	return 0;
}

/* ---- client ------------------------------------------------------------- */

struct client {
	int ep, nports, port;
	const char *addr;
	long started, done, errors, open;
	int first_errno;
	char *sent; /* per fd: the request was written */
};

static void fail_conn(struct client *c, int fd, int err)
{
	if (!c->first_errno)
		c->first_errno = err;
	c->errors++;
	c->open--;
	close(fd);
}

static void start_one(struct client *c)
{
	struct sockaddr_storage ss;
	socklen_t len = make_addr(c->addr, c->port + (int)(c->started % c->nports), &ss);
	int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	c->started++;
	if (fd < 0) {
		if (!c->first_errno)
			c->first_errno = errno;
		c->errors++;
		return;
	}
	c->open++;
	c->sent[fd] = 0;
	if (connect(fd, (struct sockaddr *)&ss, len) < 0 && errno != EINPROGRESS) {
		fail_conn(c, fd, errno);
		return;
	}
	epoll_add(c->ep, fd, EPOLLOUT | EPOLLIN);
}

static void on_ready(struct client *c, int fd, unsigned events)
{
	char buf[MSG_LEN];
	if (!c->sent[fd]) {
		int err = 0;
		socklen_t elen = sizeof(err);
		getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen);
		if (err || (events & (EPOLLERR | EPOLLHUP))) {
			fail_conn(c, fd, err ? err : ECONNRESET);
			return;
		}
		memset(buf, 0x42, sizeof(buf));
		if (write(fd, buf, sizeof(buf)) != sizeof(buf)) {
			fail_conn(c, fd, errno);
			return;
		}
		c->sent[fd] = 1;
		struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
		epoll_ctl(c->ep, EPOLL_CTL_MOD, fd, &ev);
		return;
	}
	/* The echo is 16 bytes on a loopback-like link: it comes in one read. */
	ssize_t n = read(fd, buf, sizeof(buf));
	if (n < 0 && errno == EAGAIN)
		return;
	if (n != sizeof(buf)) {
		fail_conn(c, fd, n < 0 ? errno : EPIPE);
		return;
	}
	c->done++;
	c->open--;
	close(fd);
}

static int run_client(const char *addr, int port, int nports, long count, double rate,
		      long conc, double seconds)
{
	struct client c = {.nports = nports, .port = port, .addr = addr};
	struct rlimit rl;
	getrlimit(RLIMIT_NOFILE, &rl);
	if ((rlim_t)conc + 16 > rl.rlim_cur)
		conc = (long)rl.rlim_cur - 16;
	c.sent = calloc(rl.rlim_cur, 1);
	c.ep = epoll_create1(EPOLL_CLOEXEC);
	if (!c.sent || c.ep < 0)
		die("setup");
	struct epoll_event evs[MAX_EVENTS];
	double t0 = now_s(), stop_at = t0 + seconds, last_done = t0;
	while (!stop_requested) {
		double t = now_s();
		int starting = t < stop_at && c.started < count;
		if (!starting && c.open == 0)
			break;
		if (!starting && t > stop_at + 1.0)
			break; /* the stragglers are counted as unfinished */
		/* Paced: every connection due by now (at most CONCURRENCY open). */
		while (starting && c.started < count && c.open < conc &&
		       (rate <= 0 || c.started < (long)((t - t0) * rate) + 1))
			start_one(&c);
		long done_before = c.done;
		int n = epoll_wait(c.ep, evs, MAX_EVENTS, rate > 0 ? 1 : 10);
		for (int i = 0; i < n; i++)
			on_ready(&c, evs[i].data.fd, evs[i].events);
		if (c.done != done_before)
			last_done = now_s();
	}
	printf("{\"started\": %ld, \"done\": %ld, \"errors\": %ld, \"unfinished\": %ld, "
	       "\"first_error\": \"%s\", \"seconds\": %.6f}\n",
	       c.started, c.done, c.errors, c.open,
	       c.first_errno ? strerror(c.first_errno) : "", last_done - t0);
	return 0;
}

int main(int argc, char **argv)
{
	signal(SIGTERM, on_signal);
	signal(SIGINT, on_signal);
	signal(SIGPIPE, SIG_IGN);
	raise_fd_limit();
	if (argc == 6 && !strcmp(argv[1], "server")) {
		int nports = atoi(argv[4]);
		if (nports < 1 || nports > MAX_PORTS)
			return 2;
		return run_server(argv[2], atoi(argv[3]), nports, atof(argv[5]));
	}
	if (argc == 9 && !strcmp(argv[1], "client")) {
		int nports = atoi(argv[4]);
		if (nports < 1 || nports > MAX_PORTS)
			return 2;
		return run_client(argv[2], atoi(argv[3]), nports, atol(argv[5]), atof(argv[6]),
				  atol(argv[7]), atof(argv[8]));
	}
	fprintf(stderr, "usage: conn_storm server ADDR PORT NPORTS SECONDS\n"
			"       conn_storm client ADDR PORT NPORTS COUNT RATE CONCURRENCY SECONDS\n");
	return 2;
}
