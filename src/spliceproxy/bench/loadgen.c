/* SPDX-License-Identifier: MIT
 *
 * loadgen.c - the benchmark load generator's hot loops (module
 * spliceproxy.bench._loadgen, built with cffi by _loadgen_build.py at first
 * use).  The measuring side must never be the bottleneck, so every per-byte
 * and per-message loop is here.  Each function returns >= 0 or -errno.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>

void lg_close_many(int *fds, int n);
int lg_rr_multi(int *fds, int nfds, int iters, int size, double *lat_ns);
int lg_udp_rr_multi(int *fds, int nfds, int iters, int size, int timeout_ms, double *lat_ns);
int lg_connect_rate_multi(int family, const char **ips, int *ports, int n, int count,
			  unsigned int seed, double *lat_ns);

static double now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

int lg_setns(int fd)
{
	if (setns(fd, CLONE_NEWNET) == -1)
		return -errno;
	return 0;
}

/* Write exactly len bytes (blocking fd), retrying EINTR. */
static int write_all(int fd, const char *buf, size_t len)
{
	while (len) {
		ssize_t n = write(fd, buf, len);

		if (n == -1) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		buf += n;
		len -= (size_t)n;
	}
	return 0;
}

/* Read exactly len bytes; -EPIPE on a premature EOF. */
static int read_all(int fd, char *buf, size_t len)
{
	while (len) {
		ssize_t n = read(fd, buf, len);

		if (n == -1) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			return -EPIPE;
		buf += n;
		len -= (size_t)n;
	}
	return 0;
}

/* Send total bytes, half-close, and wait for the sink's close: the transfer
 * is only complete once every byte went through the whole path. */
long long lg_bulk_send(int fd, long long total, int chunk)
{
	char *buf = malloc((size_t)chunk);
	long long sent = 0;
	char tail[256];
	int rc;

	if (!buf)
		return -ENOMEM;
	memset(buf, 'x', (size_t)chunk);
	while (sent < total) {
		size_t want = (size_t)(total - sent < chunk ? total - sent : chunk);
		ssize_t n = write(fd, buf, want);

		if (n == -1) {
			if (errno == EINTR)
				continue;
			rc = -errno;
			free(buf);
			return rc;
		}
		sent += n;
	}
	free(buf);
	if (shutdown(fd, SHUT_WR) == -1)
		return -errno;
	for (;;) {
		ssize_t n = read(fd, tail, sizeof(tail));

		if (n == -1) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			break;
	}
	return sent;
}

/* One connection's ping-pong: lg_rr_multi over a single path. */
int lg_rr(int fd, int iters, int size, double *lat_ns)
{
	return lg_rr_multi(&fd, 1, iters, size, lat_ns);
}

static int fill_addr(int family, const char *ip, int port, struct sockaddr_storage *ss,
			socklen_t *len)
{
	memset(ss, 0, sizeof(*ss));
	if (family == AF_INET) {
		struct sockaddr_in *a = (struct sockaddr_in *)ss;

		a->sin_family = AF_INET;
		a->sin_port = htons((unsigned short)port);
		if (inet_pton(AF_INET, ip, &a->sin_addr) != 1)
			return -EINVAL;
		*len = sizeof(*a);
	} else {
		struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;

		a->sin6_family = AF_INET6;
		a->sin6_port = htons((unsigned short)port);
		if (inet_pton(AF_INET6, ip, &a->sin6_addr) != 1)
			return -EINVAL;
		*len = sizeof(*a);
	}
	return 0;
}

static int connect_to(const struct sockaddr_storage *ss, socklen_t len)
{
	int one = 1;
	int fd = socket(ss->ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (fd == -1)
		return -errno;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	while (connect(fd, (const struct sockaddr *)ss, len) == -1) {
		int err = errno;

		if (err == EINTR)
			continue;
		close(fd);
		return -err;
	}
	return fd;
}

/* connect, 1-byte exchange, close over one path (see lg_connect_rate_multi). */
int lg_connect_rate(int family, const char *ip, int port, int count, double *lat_ns)
{
	return lg_connect_rate_multi(family, &ip, &port, 1, count, 1, lat_ns);
}

/*
 * The same exchanges over n paths, alternated exchange by exchange (and the
 * first path rotated each time), so every path meets the same vCPU wake-up
 * mode and the same neighbours: measured one after another, whole runs of a
 * path land in the VM's fast or slow latency mode and the ratios flip.
 * lat_ns[k * iters + i] is exchange i over fds[k].
 */
int lg_rr_multi(int *fds, int nfds, int iters, int size, double *lat_ns)
{
	char buf[65536];
	int i, j, rc;

	if (size < 1 || size > (int)sizeof(buf) || nfds < 1)
		return -EINVAL;
	memset(buf, 'p', (size_t)size);
	for (i = 0; i < iters; i++) {
		for (j = 0; j < nfds; j++) {
			int k = (i + j) % nfds;
			double t0 = now_ns();

			rc = write_all(fds[k], buf, (size_t)size);
			if (rc < 0)
				return rc;
			rc = read_all(fds[k], buf, (size_t)size);
			if (rc < 0)
				return rc;
			lat_ns[k * iters + i] = now_ns() - t0;
		}
	}
	return iters;
}

static double udp_exchange(int fd, char *buf, size_t bufsz, int size, int timeout_ms)
{
	double t0 = now_ns();
	struct pollfd p = { .fd = fd, .events = POLLIN };

	if (send(fd, buf, (size_t)size, 0) == -1 && errno != ECONNREFUSED)
		return -2;
	for (;;) {
		int left = timeout_ms - (int)((now_ns() - t0) / 1e6);
		int r;

		if (left <= 0)
			return -1;
		r = poll(&p, 1, left);
		if (r == -1 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		if (recv(fd, buf, bufsz, 0) == size)
			return now_ns() - t0;
	}
}

/* As lg_rr_multi over connected UDP sockets; a lost reply records -1. */
int lg_udp_rr_multi(int *fds, int nfds, int iters, int size, int timeout_ms, double *lat_ns)
{
	char buf[2048];
	int i, j, got = 0;

	if (size < 1 || size > (int)sizeof(buf) || nfds < 1)
		return -EINVAL;
	memset(buf, 'u', (size_t)size);
	for (i = 0; i < iters; i++) {
		for (j = 0; j < nfds; j++) {
			int k = (i + j) % nfds;
			double v = udp_exchange(fds[k], buf, sizeof(buf), size, timeout_ms);

			if (v == -2)
				return -errno;
			lat_ns[k * iters + i] = v;
			if (v >= 0)
				got++;
		}
	}
	return got;
}

/*
 * Connect, 1-byte exchange, close (the client closes first), alternated
 * connection by connection over n destinations in an order shuffled afresh
 * for every round of n (xorshift from seed); lat_ns[k * count + i].  A
 * fixed rotation, as the request/response loops use, always puts the same
 * path right after a given one, and a path after socat (a process forked per
 * connection, exiting while the next connects) paid that exit in every
 * exchange of a round: per-round rates of one path came out near 10k or
 * near 20k per second, depending on the shuffled order alone.
 * Returns the rounds completed over every destination: count, or where the
 * first failure stopped it (a churn run reports how far it got), or that
 * failure's -errno when not even the first round completed.
 */
int lg_connect_rate_multi(int family, const char **ips, int *ports, int n, int count,
			  unsigned int seed, double *lat_ns)
{
	struct sockaddr_storage ss[16];
	socklen_t len[16];
	unsigned int x = seed ? seed : 1;
	int order[16];
	char b = 'c';
	int i, j, rc;

	if (n < 1 || n > 16)
		return -EINVAL;
	for (j = 0; j < n; j++) {
		rc = fill_addr(family, ips[j], ports[j], &ss[j], &len[j]);
		if (rc < 0)
			return rc;
		order[j] = j;
	}
	for (i = 0; i < count; i++) {
		for (j = n - 1; j > 0; j--) {
			int r, t;

			x ^= x << 13;
			x ^= x >> 17;
			x ^= x << 5;
			r = (int)(x % (unsigned int)(j + 1));
			t = order[j];
			order[j] = order[r];
			order[r] = t;
		}
		for (j = 0; j < n; j++) {
			int k = order[j];
			double t0 = now_ns();
			int fd = connect_to(&ss[k], len[k]);

			if (fd < 0)
				return i ? i : fd;
			rc = write_all(fd, &b, 1);
			if (rc == 0)
				rc = read_all(fd, &b, 1);
			close(fd);
			if (rc < 0)
				return i ? i : rc;
			lat_ns[k * count + i] = now_ns() - t0;
		}
	}
	return count;
}

/* UDP ping-pong on one connected socket: lg_udp_rr_multi over a single path. */
int lg_udp_rr(int fd, int iters, int size, int timeout_ms, double *lat_ns)
{
	return lg_udp_rr_multi(&fd, 1, iters, size, timeout_ms, lat_ns);
}

/* Windowed burst: keep up to window datagrams in flight; when nothing comes
 * back for timeout_ms the outstanding ones are counted lost.  Returns the
 * number of replies. */
int lg_udp_burst(int fd, int count, int size, int window, int timeout_ms, double *elapsed_s)
{
	char buf[2048];
	int sent = 0, got = 0, inflight = 0;
	double t0 = now_ns(), last = t0;

	if (size < 1 || size > (int)sizeof(buf))
		return -EINVAL;
	memset(buf, 'b', (size_t)size);
	while (sent < count || inflight > 0) {
		while (sent < count && inflight < window) {
			if (send(fd, buf, (size_t)size, MSG_DONTWAIT) == -1) {
				if (errno == EAGAIN || errno == ENOBUFS)
					break;
				if (errno != ECONNREFUSED && errno != EINTR)
					return -errno;
			}
			sent++;
			inflight++;
		}
		for (;;) {
			ssize_t n = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);

			if (n == -1)
				break;
			got++;
			if (inflight > 0)
				inflight--;
			last = now_ns();
		}
		if (inflight >= window || sent >= count) {
			struct pollfd p = { .fd = fd, .events = POLLIN };
			int r = poll(&p, 1, 1);

			if (r == 0 && (now_ns() - last) / 1e6 > timeout_ms) {
				inflight = 0; /* the outstanding ones are lost */
				last = now_ns();
			}
		}
	}
	*elapsed_s = (now_ns() - t0) / 1e9;
	return got;
}

/* Open n connections and prove each is served with a 1-byte echo. */
int lg_open_many(int family, const char *ip, int port, int n, int *fds)
{
	struct sockaddr_storage ss;
	socklen_t len;
	char b = 'i';
	int i, rc;

	rc = fill_addr(family, ip, port, &ss, &len);
	if (rc < 0)
		return rc;
	for (i = 0; i < n; i++) {
		int fd = connect_to(&ss, len);

		if (fd < 0) {
			lg_close_many(fds, i);
			return fd;
		}
		fds[i] = fd;
	}
	for (i = 0; i < n; i++) {
		rc = write_all(fds[i], &b, 1);
		if (rc < 0)
			return i;
	}
	for (i = 0; i < n; i++) {
		struct pollfd p = { .fd = fds[i], .events = POLLIN };

		if (poll(&p, 1, 10000) != 1 || read(fds[i], &b, 1) != 1)
			return i;
	}
	return n;
}

void lg_close_many(int *fds, int n)
{
	int i;

	for (i = 0; i < n; i++)
		if (fds[i] >= 0)
			close(fds[i]);
}

enum { K_ECHO_L, K_SINK_L, K_UDP, K_ECHO, K_SINK, K_STOP };

#define TAG(kind, fd) (((unsigned long long)(kind) << 32) | (unsigned)(fd))

static int add(int ep, int kind, int fd)
{
	struct epoll_event ev = { .events = EPOLLIN, .data.u64 = TAG(kind, fd) };

	if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) == -1)
		return -errno;
	return 0;
}

/* Write all of buf to a non-blocking socket, waiting for room when full. */
static int send_all_nb(int fd, const char *buf, size_t len)
{
	while (len) {
		ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);

		if (n == -1) {
			struct pollfd p = { .fd = fd, .events = POLLOUT };

			if (errno == EINTR)
				continue;
			if (errno != EAGAIN)
				return -errno;
			if (poll(&p, 1, 5000) != 1)
				return -ETIMEDOUT;
			continue;
		}
		buf += n;
		len -= (size_t)n;
	}
	return 0;
}

/* The backend servers: TCP echo, TCP sink (closes on EOF), UDP echo. */
int lg_serve(int *lfds, int *kinds, int n, int stopfd)
{
	static char buf[1 << 20];
	struct epoll_event evs[256];
	int ep = epoll_create1(EPOLL_CLOEXEC);
	int i, one = 1;

	if (ep == -1)
		return -errno;
	for (i = 0; i < n; i++)
		if (add(ep, kinds[i], lfds[i]) < 0)
			return -errno;
	if (add(ep, K_STOP, stopfd) < 0)
		return -errno;
	for (;;) {
		int k, cnt = epoll_wait(ep, evs, 256, -1);

		if (cnt == -1) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		for (k = 0; k < cnt; k++) {
			int kind = (int)(evs[k].data.u64 >> 32);
			int fd = (int)(evs[k].data.u64 & 0xffffffffu);
			ssize_t r;

			switch (kind) {
			case K_STOP:
				close(ep);
				return 0;
			case K_ECHO_L:
			case K_SINK_L:
				for (;;) {
					int c = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

					if (c == -1)
						break;
					setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
					if (add(ep, kind == K_ECHO_L ? K_ECHO : K_SINK, c) < 0)
						close(c);
				}
				break;
			case K_UDP:
				for (i = 0; i < 64; i++) {
					struct sockaddr_storage from;
					socklen_t fl = sizeof(from);

					r = recvfrom(fd, buf, 65536, MSG_DONTWAIT,
							(struct sockaddr *)&from, &fl);
					if (r == -1)
						break;
					sendto(fd, buf, (size_t)r, MSG_DONTWAIT,
						(struct sockaddr *)&from, fl);
				}
				break;
			case K_ECHO:
				r = recv(fd, buf, 65536, 0);
				if (r > 0 && send_all_nb(fd, buf, (size_t)r) == 0)
					break;
				if (r == -1 && errno == EAGAIN)
					break;
				close(fd);
				break;
			case K_SINK:
				r = recv(fd, buf, sizeof(buf), 0);
				if (r > 0 || (r == -1 && errno == EAGAIN))
					break;
				close(fd);
				break;
			}
		}
	}
}

/*
 * Starting a proxy the way dockerd does.  Go's os/exec (dockerd's
 * portmapper) creates the child with clone(CLONE_VM | CLONE_VFORK): no copy
 * of the parent's page tables, the parent thread suspended until execve.
 * The child, in system calls only, resets the signals the runtime handles,
 * sets the parent-death signal (SysProcAttr.Pdeathsig = SIGTERM), puts
 * /dev/null on 0-2 and ExtraFiles on 3 (status pipe) and 4 (listener, 28+),
 * and execs; dockerd is already in its network namespace, so there is no
 * setns (the caller enters the namespace on its own thread beforehand, off
 * the clock).  Spawning from Python with subprocess and a preexec_fn forks
 * the whole interpreter instead, which added about 3 ms to every path and
 * hid the ratio between them.
 */
struct spawn_job {
	const char *path;
	char **argv;
	char **envp;
	int src[5];	/* what goes on fds 0..nfds-1; all >= SPAWN_FD_FLOOR */
	int nfds;
	pid_t parent;
	volatile int err;	/* the child's errno when it cannot exec (shared memory) */
};

#define SPAWN_FD_FLOOR 10
#define SPAWN_STACK (64 << 10)

/* The kernel's struct sigaction for rt_sigaction: SIG_DFL is all zeroes. */
struct kernel_sigaction {
	unsigned long handler;
	unsigned long flags;
	unsigned long restorer;
	unsigned long mask;
};

/*
 * spawn_child() - the child side, on its own stack, sharing the parent's
 * memory until execve: system calls through syscall(2) only, no allocation,
 * no locks, nothing written but job->err (the parent's errno slot may be
 * touched by a failing call; the parent thread is suspended meanwhile).
 */
static int spawn_child(void *arg)
{
	struct spawn_job *job = arg;
	struct kernel_sigaction dfl = { 0 };
	unsigned long empty = 0;
	int i, sig;

	/* Every handler the parent installed would run on shared memory. */
	for (sig = 1; sig < 65; sig++)
		if (sig != SIGKILL && sig != SIGSTOP)
			syscall(SYS_rt_sigaction, sig, &dfl, NULL, sizeof(empty));
	syscall(SYS_rt_sigprocmask, SIG_SETMASK, &empty, NULL, sizeof(empty));
	if (syscall(SYS_prctl, PR_SET_PDEATHSIG, SIGTERM, 0, 0, 0) == -1)
		goto fail;
	/* As Go does: the parent may have died before the signal was armed. */
	if (syscall(SYS_getppid) != job->parent) {
		syscall(SYS_kill, syscall(SYS_getpid), SIGTERM);
		goto fail;
	}
	/* dup3 without O_CLOEXEC leaves the target inheritable; the sources sit
	 * above every target, so no target clobbers a source. */
	for (i = 0; i < job->nfds; i++)
		if (syscall(SYS_dup3, job->src[i], i, 0) == -1)
			goto fail;
	/* In Go every descriptor is close-on-exec; here a library may have left
	 * one inheritable: mark the rest so none leaks into the proxy. */
	syscall(SYS_close_range, job->nfds, ~0U, 4 /* CLOSE_RANGE_CLOEXEC */);
	syscall(SYS_execve, job->path, job->argv, job->envp);
fail:
	job->err = errno ? errno : EINVAL;
	syscall(SYS_exit, 127);
	return 127;
}

static int fd_above(int fd)
{
	int hi = fcntl(fd, F_DUPFD_CLOEXEC, SPAWN_FD_FLOOR);

	return hi == -1 ? -errno : hi;
}

/*
 * lg_spawn() - start path (argv, envp) as dockerd starts a proxy and wait
 * for its status like dockerd: one read of up to 2 bytes on the pipe's read
 * end, and unless that is "0\n" the rest up to EOF.
 * @listen_fd: put on fd 4 (-1: no fd 4)
 * @timeout_ms: for the status
 * @status, @cap, @status_len: what was read (-1: timed out, 0: EOF at once)
 * @ready_ns: from the call until the first status read returned
 *
 * Returns the child's pid (the caller reaps it) or -errno when it could not
 * be started (a failed execve is reaped here).
 */
int lg_spawn(const char *path, char **argv, char **envp, int listen_fd, int timeout_ms,
	     char *status, int cap, int *status_len, double *ready_ns)
{
	double t0 = now_ns();
	struct spawn_job job = { .path = path, .argv = argv, .envp = envp, .err = 0 };
	int pfd[2] = { -1, -1 }, own[5] = { -1, -1, -1, -1, -1 };
	sigset_t all, old;
	int i, rc, got = 0;
	char *stack;
	pid_t pid;

	*status_len = -1;
	*ready_ns = -1;
	if (cap < 2)
		return -EINVAL;
	if (pipe2(pfd, O_CLOEXEC) == -1)
		return -errno;
	/* os/exec: stdin is os.DevNull read-only, stdout and stderr share one
	 * write-only open of it. */
	own[0] = open("/dev/null", O_RDONLY | O_CLOEXEC);
	own[1] = open("/dev/null", O_WRONLY | O_CLOEXEC);
	if (own[0] == -1 || own[1] == -1) {
		rc = -errno;
		goto out;
	}
	{
		int from[5] = { own[0], own[1], own[1], pfd[1], listen_fd };

		job.nfds = listen_fd >= 0 ? 5 : 4;
		for (i = 0; i < job.nfds; i++) {
			rc = i == 2 ? job.src[1] : fd_above(from[i]);
			if (rc < 0) {
				while (i-- > 0)
					if (i != 2)
						close(job.src[i]);
				goto out;
			}
			job.src[i] = rc;
		}
		close(own[0]);
		close(own[1]);
		own[0] = job.src[0];
		own[1] = job.src[1];
		if (listen_fd >= 0)
			own[4] = job.src[4];
		close(pfd[1]);
		pfd[1] = job.src[3];
	}
	stack = mmap(NULL, SPAWN_STACK, PROT_READ | PROT_WRITE,
		     MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
	if (stack == MAP_FAILED) {
		rc = -errno;
		goto out;
	}
	job.parent = getpid();
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	pid = clone(spawn_child, stack + SPAWN_STACK, CLONE_VM | CLONE_VFORK | SIGCHLD, &job);
	rc = pid == -1 ? -errno : 0;
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	munmap(stack, SPAWN_STACK);
	if (rc < 0)
		goto out;
	if (job.err) {
		while (waitpid(pid, NULL, 0) == -1 && errno == EINTR)
			;
		rc = -job.err;
		goto out;
	}
	/* The parent keeps only the read end, as dockerd closes its write end. */
	for (i = 0; i < 5; i++)
		if (own[i] >= 0) {
			close(own[i]);
			own[i] = -1;
		}
	close(pfd[1]);
	pfd[1] = -1;
	for (;;) {
		struct pollfd p = { .fd = pfd[0], .events = POLLIN };
		int left = timeout_ms - (int)((now_ns() - t0) / 1e6);
		ssize_t n;

		if (left <= 0)
			break;
		rc = poll(&p, 1, left);
		if (rc == -1 && errno == EINTR)
			continue;
		if (rc != 1)
			break;
		n = read(pfd[0], status + got, (size_t)(got ? cap - got : 2));
		if (n == -1 && errno == EINTR)
			continue;
		if (!got)
			*ready_ns = now_ns() - t0;
		if (n <= 0) {
			*status_len = got;
			break;
		}
		got += (int)n;
		*status_len = got;
		if ((got == 2 && status[0] == '0' && status[1] == '\n') || got == cap)
			break;
	}
	rc = pid;
out:
	for (i = 0; i < 5; i++)
		if (own[i] >= 0)
			close(own[i]);
	if (pfd[0] >= 0)
		close(pfd[0]);
	if (pfd[1] >= 0)
		close(pfd[1]);
	return rc;
}
