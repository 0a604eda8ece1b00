/* SPDX-License-Identifier: MIT
 *
 * faultshim.c - make chosen system calls of a process fail on purpose.
 *
 * An LD_PRELOAD library for the fault tests: it wraps the calls the engine
 * relays with and makes a deterministic share of them fail with a chosen
 * errno, without calling the kernel (so a failed accept4() leaves the
 * connection in the backlog, a failed recvmmsg() leaves the datagrams
 * queued, a failed splice() moves nothing).
 *
 *   FAULTSHIM="rule,rule,..."   rule = point:ERRNO:every[:after=N][:max=K]
 *
 * fails every `every`-th call of `point` (counted once the shim is armed),
 * skipping the first N calls and stopping after K failures.  Points:
 * splice (any), splice_in (socket -> pipe), splice_out (pipe -> socket),
 * accept4, socket, connect, recvmmsg, sendmmsg, sendmsg, send, pipe2,
 * epoll_add and epoll_mod (epoll_ctl with EPOLL_CTL_ADD / EPOLL_CTL_MOD),
 * setpipe (fcntl with F_SETPIPE_SZ).
 * ERRNO is a name (ENOMEM, ENOBUFS, EMFILE, ...) or a number.
 *
 * The shim arms itself when the process writes "0\n" to fd 3, the status
 * pipe a proxy reports readiness on, so that interpreter start-up and
 * listener creation never see a fault.  FAULTSHIM_ARM=now arms at once.
 *
 *   FAULTSHIM_STATE=path   an existing file of at least FAULTSHIM_STATE_SIZE
 *                          bytes, mapped shared:
 *     u64 stop       written by the test: nonzero turns every fault off
 *     u64 armed      written here: 1 once armed
 *     u64 calls[P]   calls of each point since arming
 *     u64 faults[P]  faults injected per point
 *
 * The engine's loop is single-threaded; counters are updated atomically
 * anyway.  A malformed FAULTSHIM is reported on stderr and the process exits
 * with status 97.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>

enum point {
	P_SPLICE, P_SPLICE_IN, P_SPLICE_OUT, P_ACCEPT4, P_SOCKET, P_CONNECT,
	P_RECVMMSG, P_SENDMMSG, P_SENDMSG, P_SEND, P_PIPE2, P_EPOLL_ADD, P_EPOLL_MOD,
	P_SETPIPE, P_COUNT
};

static const char *const point_names[P_COUNT] = {
	"splice", "splice_in", "splice_out", "accept4", "socket", "connect",
	"recvmmsg", "sendmmsg", "sendmsg", "send", "pipe2", "epoll_add", "epoll_mod",
	"setpipe",
};

#define MAX_RULES 32
#define FAULTSHIM_STATE_SIZE 4096

struct rule {
	int point;
	int err;
	uint64_t every, after, max;
	uint64_t seen, fired;
};

struct state {
	uint64_t stop;
	uint64_t armed;
	uint64_t calls[P_COUNT];
	uint64_t faults[P_COUNT];
};

static struct rule rules[MAX_RULES];
static int n_rules;
static bool armed;
static struct state local_state;
static struct state *st = &local_state;

static ssize_t (*real_splice)(int, loff_t *, int, loff_t *, size_t, unsigned int);
static int (*real_accept4)(int, struct sockaddr *, socklen_t *, int);
static int (*real_socket)(int, int, int);
static int (*real_connect)(int, const struct sockaddr *, socklen_t);
static int (*real_recvmmsg)(int, struct mmsghdr *, unsigned int, int, struct timespec *);
static int (*real_sendmmsg)(int, struct mmsghdr *, unsigned int, int);
static ssize_t (*real_sendmsg)(int, const struct msghdr *, int);
static ssize_t (*real_send)(int, const void *, size_t, int);
static int (*real_pipe2)(int *, int);
static int (*real_epoll_ctl)(int, int, int, struct epoll_event *);
static ssize_t (*real_write)(int, const void *, size_t);
static int (*real_fcntl)(int, int, ...);

/* resolve() - the next definition of a symbol (libc's); dies if missing */
static void *resolve(const char *name)
{
	void *p = dlsym(RTLD_NEXT, name);

	if (!p) {
		fprintf(stderr, "faultshim: cannot resolve %s\n", name);
		_exit(97);
	}
	return p;
}

/* Resolved on first use: another library's constructor may call first. */
#define LOAD(fn) do { if (!real_##fn) real_##fn = resolve(#fn); } while (0)

static void die(const char *what, const char *text)
{
	fprintf(stderr, "faultshim: %s: %s\n", what, text);
	_exit(97);
}

static const struct {
	const char *name;
	int value;
} errno_names[] = {
	{ "ENOMEM", ENOMEM }, { "ENOBUFS", ENOBUFS }, { "EMFILE", EMFILE },
	{ "ENFILE", ENFILE }, { "EAGAIN", EAGAIN }, { "EINTR", EINTR },
	{ "EIO", EIO }, { "ECONNRESET", ECONNRESET }, { "EPIPE", EPIPE },
	{ "ECONNREFUSED", ECONNREFUSED }, { "ENETUNREACH", ENETUNREACH },
	{ "EHOSTUNREACH", EHOSTUNREACH }, { "EADDRNOTAVAIL", EADDRNOTAVAIL },
	{ "ECONNABORTED", ECONNABORTED }, { "EPERM", EPERM },
};

static int parse_errno(const char *s)
{
	size_t i;
	char *end;
	long v;

	for (i = 0; i < sizeof(errno_names) / sizeof(errno_names[0]); i++)
		if (!strcmp(s, errno_names[i].name))
			return errno_names[i].value;
	v = strtol(s, &end, 10);
	if (*s && !*end && v > 0 && v < 4096)
		return (int)v;
	die("unknown errno", s);
	return 0;
}

static uint64_t parse_count(const char *s, const char *what)
{
	char *end;
	unsigned long long v;

	errno = 0;
	v = strtoull(s, &end, 10);
	if (!*s || *end || errno || *s == '-')
		die(what, s);
	return v;
}

/* parse_rule() - "point:ERRNO:every[:after=N][:max=K]" (modified in place) */
static void parse_rule(char *text)
{
	struct rule *r;
	char *field, *save = NULL;
	int i, n = 0;

	if (n_rules == MAX_RULES)
		die("too many rules", text);
	r = &rules[n_rules];
	memset(r, 0, sizeof(*r));
	r->point = -1;
	for (field = strtok_r(text, ":", &save); field; field = strtok_r(NULL, ":", &save), n++) {
		if (n == 0) {
			for (i = 0; i < P_COUNT; i++)
				if (!strcmp(field, point_names[i]))
					r->point = i;
			if (r->point < 0)
				die("unknown point", field);
		} else if (n == 1) {
			r->err = parse_errno(field);
		} else if (n == 2) {
			r->every = parse_count(field, "bad period");
			if (!r->every)
				die("bad period", field);
		} else if (!strncmp(field, "after=", 6)) {
			r->after = parse_count(field + 6, "bad after=");
		} else if (!strncmp(field, "max=", 4)) {
			r->max = parse_count(field + 4, "bad max=");
		} else {
			die("unknown option", field);
		}
	}
	if (n < 3)
		die("incomplete rule (point:ERRNO:every)", text);
	n_rules++;
}

static void map_state(const char *path)
{
	int fd = open(path, O_RDWR | O_CLOEXEC);
	void *p;

	if (fd == -1)
		die("cannot open FAULTSHIM_STATE", path);
	p = mmap(NULL, FAULTSHIM_STATE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	close(fd);
	if (p == MAP_FAILED)
		die("cannot map FAULTSHIM_STATE", path);
	st = p;
}

__attribute__((constructor)) static void faultshim_init(void)
{
	const char *spec = getenv("FAULTSHIM");
	const char *path = getenv("FAULTSHIM_STATE");
	const char *arm = getenv("FAULTSHIM_ARM");
	char *copy, *item, *save = NULL;

	_Static_assert(sizeof(struct state) <= FAULTSHIM_STATE_SIZE, "state too large");
	if (spec && *spec) {
		copy = strdup(spec);
		if (!copy)
			die("out of memory", spec);
		for (item = strtok_r(copy, ",", &save); item; item = strtok_r(NULL, ",", &save))
			parse_rule(item);
		free(copy);
	}
	if (path && *path)
		map_state(path);
	if (arm && !strcmp(arm, "now")) {
		armed = true;
		__atomic_store_n(&st->armed, 1, __ATOMIC_RELAXED);
	}
}

static void bump(uint64_t *p)
{
	__atomic_add_fetch(p, 1, __ATOMIC_RELAXED);
}

/* should_fail() - count a call of point p; 0 to go ahead, or the errno to
 * fail it with */
static int should_fail(int p)
{
	int i, err = 0;

	if (!armed)
		return 0;
	bump(&st->calls[p]);
	for (i = 0; i < n_rules; i++) {
		struct rule *r = &rules[i];

		if (r->point != p)
			continue;
		r->seen++;
		if (err || r->seen <= r->after || (r->max && r->fired >= r->max))
			continue;
		if ((r->seen - r->after) % r->every)
			continue;
		if (__atomic_load_n(&st->stop, __ATOMIC_RELAXED))
			continue;
		r->fired++;
		err = r->err;
	}
	if (err)
		bump(&st->faults[p]);
	return err;
}

static bool is_pipe(int fd)
{
	struct stat sb;

	return fstat(fd, &sb) == 0 && S_ISFIFO(sb.st_mode);
}

ssize_t write(int fd, const void *buf, size_t count)
{
	if (!armed && fd == 3 && count >= 2 && !memcmp(buf, "0\n", 2)) {
		armed = true;
		__atomic_store_n(&st->armed, 1, __ATOMIC_RELAXED);
	}
	LOAD(write);
	return real_write(fd, buf, count);
}

ssize_t splice(int fd_in, loff_t *off_in, int fd_out, loff_t *off_out, size_t len,
	       unsigned int flags)
{
	int err = 0;

	if (armed) {
		int side = is_pipe(fd_in) ? P_SPLICE_OUT : P_SPLICE_IN;
		int e1 = should_fail(P_SPLICE);
		int e2 = should_fail(side);

		err = e1 ? e1 : e2;
	}
	if (err) {
		errno = err;
		return -1;
	}
	LOAD(splice);
	return real_splice(fd_in, off_in, fd_out, off_out, len, flags);
}

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
	int err = should_fail(P_ACCEPT4);

	if (err) {
		errno = err;
		return -1;
	}
	LOAD(accept4);
	return real_accept4(fd, addr, len, flags);
}

int socket(int domain, int type, int protocol)
{
	int err = should_fail(P_SOCKET);

	if (err) {
		errno = err;
		return -1;
	}
	LOAD(socket);
	return real_socket(domain, type, protocol);
}

int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
	int err = should_fail(P_CONNECT);

	if (err) {
		errno = err;
		return -1;
	}
	LOAD(connect);
	return real_connect(fd, addr, len);
}

int recvmmsg(int fd, struct mmsghdr *msgs, unsigned int n, int flags, struct timespec *timeout)
{
	int err = should_fail(P_RECVMMSG);

	if (err) {
		errno = err;
		return -1;
	}
	LOAD(recvmmsg);
	return real_recvmmsg(fd, msgs, n, flags, timeout);
}

int sendmmsg(int fd, struct mmsghdr *msgs, unsigned int n, int flags)
{
	int err = should_fail(P_SENDMMSG);

	if (err) {
		errno = err;
		return -1;
	}
	LOAD(sendmmsg);
	return real_sendmmsg(fd, msgs, n, flags);
}

ssize_t sendmsg(int fd, const struct msghdr *msg, int flags)
{
	int err = should_fail(P_SENDMSG);

	if (err) {
		errno = err;
		return -1;
	}
	LOAD(sendmsg);
	return real_sendmsg(fd, msg, flags);
}

ssize_t send(int fd, const void *buf, size_t len, int flags)
{
	int err = should_fail(P_SEND);

	if (err) {
		errno = err;
		return -1;
	}
	LOAD(send);
	return real_send(fd, buf, len, flags);
}

int pipe2(int fds[2], int flags)
{
	int err = should_fail(P_PIPE2);

	if (err) {
		errno = err;
		return -1;
	}
	LOAD(pipe2);
	return real_pipe2(fds, flags);
}

int epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev)
{
	int err = 0;

	if (op == EPOLL_CTL_ADD)
		err = should_fail(P_EPOLL_ADD);
	else if (op == EPOLL_CTL_MOD)
		err = should_fail(P_EPOLL_MOD);
	if (err) {
		errno = err;
		return -1;
	}
	LOAD(epoll_ctl);
	return real_epoll_ctl(epfd, op, fd, ev);
}

/* fcntl() - only F_SETPIPE_SZ can be failed; every argument of the other
 * commands is an int or a pointer, passed on in one word. */
int fcntl(int fd, int cmd, ...)
{
	va_list ap;
	void *arg;

	va_start(ap, cmd);
	arg = va_arg(ap, void *);
	va_end(ap);
	if (cmd == F_SETPIPE_SZ) {
		int err = should_fail(P_SETPIPE);

		if (err) {
			errno = err;
			return -1;
		}
	}
	LOAD(fcntl);
	return real_fcntl(fd, cmd, arg);
}
