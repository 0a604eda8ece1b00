/* SPDX-License-Identifier: MIT
 *
 * sockets.c - opening listeners the way docker-proxy does, and the
 * descriptor limit.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stdio.h>
#include <unistd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/resource.h>
#include <sys/socket.h>

#include "internal.h"

/* The backlog Go uses: net.core.somaxconn, capped to what listen() takes. */
static int somaxconn(void)
{
	FILE *f = fopen("/proc/sys/net/core/somaxconn", "re");
	int v = 4096;

	if (f) {
		if (fscanf(f, "%d", &v) != 1 || v <= 0)
			v = 4096;
		fclose(f);
	}
	if (v > 65535)
		v = 65535;
	return v;
}

int sp_open_listener(int type, const struct sockaddr *addr, socklen_t len, const char **step)
{
	int one = 1;
	int fd, err;
	int family = addr->sa_family;

	*step = "socket";
	if (family != AF_INET && family != AF_INET6)
		return -EAFNOSUPPORT;
	if (type != SOCK_STREAM && type != SOCK_DGRAM)
		return -ESOCKTNOSUPPORT;
	fd = socket(family, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd == -1)
		return -errno;
	*step = "setsockopt";
	if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) == -1)
		goto fail;
	if (family == AF_INET6 &&
	    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one)) == -1)
		goto fail;
	if (type == SOCK_DGRAM) {
		if (family == AF_INET &&
		    setsockopt(fd, IPPROTO_IP, IP_PKTINFO, &one, sizeof(one)) == -1)
			goto fail;
		if (family == AF_INET6 &&
		    setsockopt(fd, IPPROTO_IPV6, IPV6_RECVPKTINFO, &one, sizeof(one)) == -1)
			goto fail;
	}
	*step = "bind";
	if (bind(fd, addr, len) == -1)
		goto fail;
	if (type == SOCK_STREAM) {
		*step = "listen";
		if (listen(fd, somaxconn()) == -1)
			goto fail;
	}
	*step = NULL;
	return fd;
fail:
	err = errno;
	close(fd);
	return -err;
}

int64_t sp_raise_nofile(void)
{
	struct rlimit rl;

	if (getrlimit(RLIMIT_NOFILE, &rl) == -1)
		return -errno;
	if (rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		if (setrlimit(RLIMIT_NOFILE, &rl) == -1)
			return -errno;
	}
	return rl.rlim_cur == RLIM_INFINITY ? INT64_MAX : (int64_t)rl.rlim_cur;
}
