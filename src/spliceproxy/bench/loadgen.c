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
#include <poll.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>

void lg_close_many(int *fds, int n);

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

int lg_rr(int fd, int iters, int size, double *lat_ns)
{
	char buf[65536];
	int i, rc;

	if (size < 1 || size > (int)sizeof(buf))
		return -EINVAL;
	memset(buf, 'p', (size_t)size);
	for (i = 0; i < iters; i++) {
		double t0 = now_ns();

		rc = write_all(fd, buf, (size_t)size);
		if (rc < 0)
			return rc;
		rc = read_all(fd, buf, (size_t)size);
		if (rc < 0)
			return rc;
		lat_ns[i] = now_ns() - t0;
	}
	return iters;
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

/* connect, 1-byte exchange, close; the client closes first. */
int lg_connect_rate(int family, const char *ip, int port, int count, double *lat_ns)
{
	struct sockaddr_storage ss;
	socklen_t len;
	char b = 'c';
	int i, rc;

	rc = fill_addr(family, ip, port, &ss, &len);
	if (rc < 0)
		return rc;
	for (i = 0; i < count; i++) {
		double t0 = now_ns();
		int fd = connect_to(&ss, len);

		if (fd < 0)
			return i ? i : fd;
		rc = write_all(fd, &b, 1);
		if (rc == 0)
			rc = read_all(fd, &b, 1);
		close(fd);
		if (rc < 0)
			return i ? i : rc;
		lat_ns[i] = now_ns() - t0;
	}
	return count;
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
 * Connect, 1-byte exchange, close, alternated connection by connection over
 * n destinations; lat_ns[k * count + i].  Returns the connections completed
 * per destination (all or the first failure's -errno).
 */
int lg_connect_rate_multi(int family, const char **ips, int *ports, int n, int count,
			double *lat_ns)
{
	struct sockaddr_storage ss[16];
	socklen_t len[16];
	char b = 'c';
	int i, j, rc;

	if (n < 1 || n > 16)
		return -EINVAL;
	for (j = 0; j < n; j++) {
		rc = fill_addr(family, ips[j], ports[j], &ss[j], &len[j]);
		if (rc < 0)
			return rc;
	}
	for (i = 0; i < count; i++) {
		for (j = 0; j < n; j++) {
			int k = (i + j) % n;
			double t0 = now_ns();
			int fd = connect_to(&ss[k], len[k]);

			if (fd < 0)
				return fd;
			rc = write_all(fd, &b, 1);
			if (rc == 0)
				rc = read_all(fd, &b, 1);
			close(fd);
			if (rc < 0)
				return rc;
			lat_ns[k * count + i] = now_ns() - t0;
		}
	}
	return count;
}

/* UDP ping-pong on a connected socket; a lost reply records -1 and moves on. */
int lg_udp_rr(int fd, int iters, int size, int timeout_ms, double *lat_ns)
{
	char buf[2048];
	int i, got = 0;

	if (size < 1 || size > (int)sizeof(buf))
		return -EINVAL;
	memset(buf, 'u', (size_t)size);
	for (i = 0; i < iters; i++) {
		double t0 = now_ns();
		struct pollfd p = { .fd = fd, .events = POLLIN };

		if (send(fd, buf, (size_t)size, 0) == -1 && errno != ECONNREFUSED)
			return -errno;
		lat_ns[i] = -1;
		for (;;) {
			int left = timeout_ms - (int)((now_ns() - t0) / 1e6);
			int r;

			if (left <= 0)
				break;
			r = poll(&p, 1, left);
			if (r == -1 && errno == EINTR)
				continue;
			if (r <= 0)
				break;
			if (recv(fd, buf, sizeof(buf), 0) == size) {
				lat_ns[i] = now_ns() - t0;
				got++;
				break;
			}
		}
	}
	return got;
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
