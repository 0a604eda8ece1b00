/* SPDX-License-Identifier: MIT
 *
 * portreuse.c - backend ports left in TIME_WAIT.
 *
 * When the client closes first, the proxy is the side that sends the
 * backend its FIN first, so every such backend connection leaves a
 * TIME_WAIT socket holding an ephemeral port towards the one container
 * address.  After ~28k connections in a minute the range is exhausted:
 * connect() scans in vain and the rate collapses to a few hundred per
 * second (moby #47537).  Linux lets a socket explicitly bound (with
 * SO_REUSEADDR) to such a port take over the TIME_WAIT 4-tuple when TCP
 * timestamps make it safe (PAWS), so those ports are kept on a stack and
 * reused, most recent first; the TIME_WAIT sockets are then recycled
 * instead of piling up.  If reuse fails repeatedly (e.g. a backend without
 * timestamps), it is switched off for a while.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "portreuse.h"

#define PORT_POOL_MAX 65536
#define PORT_REUSE_FAILS 8
#define PORT_REUSE_BACKOFF_MS 10000
#define BIND_TRIES 4

struct sp_port_pool {
	uint16_t *ports;
	uint32_t n, cap;
	uint32_t fails;
	int64_t disabled_until;
};

/**
 * port_pool() - the pool of listener id, created on first use
 * @ps: every listener's pools
 * @id: listener id
 *
 * Return: the pool, or NULL without memory
 */
static struct sp_port_pool *port_pool(struct sp_ports *ps, int id)
{
	if (id >= ps->n) {
		struct sp_port_pool *n = realloc(ps->pool, sizeof(*n) * (id + 1));

		if (!n)
			return NULL;
		memset(n + ps->n, 0, sizeof(*n) * (id + 1 - ps->n));
		ps->pool = n;
		ps->n = id + 1;
	}
	return &ps->pool[id];
}

/**
 * sp_ports_keep() - remember the local port of a backend socket about to
 * enter TIME_WAIT
 * @e:    engine
 * @ps:   every listener's pools
 * @id:   listener id
 * @fd:   the backend socket
 * @port: its port (network order) when it was bound from the pool, else 0
 */
void sp_ports_keep(struct sp_engine *e, struct sp_ports *ps, int id, int fd, uint16_t port)
{
	struct sp_port_pool *pp = port_pool(ps, id);
	struct sockaddr_storage ss;
	socklen_t len = sizeof(ss);

	if (!pp || e->now_ms < pp->disabled_until || pp->n >= PORT_POOL_MAX)
		return;
	if (!port) {
		sp_sys(e, SP_STAT_SYS_OTHER);
		if (getsockname(fd, (struct sockaddr *)&ss, &len) == -1)
			return;
		port = ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
						: ((struct sockaddr_in *)&ss)->sin_port;
	}
	if (!port)
		return;
	if (pp->n == pp->cap) {
		uint32_t cap = pp->cap ? pp->cap * 2 : 256;
		uint16_t *n = realloc(pp->ports, sizeof(*n) * cap);

		if (!n)
			return;
		pp->ports = n;
		pp->cap = cap;
	}
	pp->ports[pp->n++] = port;
}

/**
 * sp_ports_bind() - bind a new backend socket to a kept port
 * @e:      engine
 * @ps:     every listener's pools
 * @id:     listener id
 * @fd:     the socket, with SO_REUSEADDR
 * @family: its family
 *
 * A port also held by another program's socket (no SO_REUSEADDR) cannot be
 * bound: the next one is tried on the same socket, then the kernel chooses.
 *
 * Return: the port bound (network order), or 0 for none
 */
uint16_t sp_ports_bind(struct sp_engine *e, struct sp_ports *ps, int id, int fd, int family)
{
	struct sp_port_pool *pp;
	struct sockaddr_storage local;
	socklen_t len;
	int tries;

	if (id >= ps->n || e->now_ms < ps->pool[id].disabled_until)
		return 0;
	pp = &ps->pool[id];
	memset(&local, 0, sizeof(local));
	local.ss_family = (sa_family_t)family;
	len = family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
	for (tries = 0; pp->n && tries < BIND_TRIES; tries++) {
		uint16_t p = pp->ports[--pp->n];

		if (family == AF_INET6)
			((struct sockaddr_in6 *)&local)->sin6_port = p;
		else
			((struct sockaddr_in *)&local)->sin_port = p;
		sp_sys(e, SP_STAT_SYS_BIND);
		if (bind(fd, (struct sockaddr *)&local, len) == 0)
			return p;
	}
	return 0;
}

/**
 * sp_ports_result() - how the connect from a kept port went
 * @e:   engine
 * @ps:  every listener's pools
 * @id:  listener id
 * @err: 0, or the errno of a takeover that failed (EADDRNOTAVAIL/EADDRINUSE)
 *
 * Only a failed takeover of our own TIME_WAIT counts against the pool;
 * enough of them in a row switch reuse off for a while.
 */
void sp_ports_result(struct sp_engine *e, struct sp_ports *ps, int id, int err)
{
	struct sp_port_pool *pp;

	if (id >= ps->n)
		return;
	pp = &ps->pool[id];
	if (!err) {
		pp->fails = 0;
		return;
	}
	if (++pp->fails >= PORT_REUSE_FAILS) {
		pp->disabled_until = e->now_ms + PORT_REUSE_BACKOFF_MS;
		pp->n = 0;
		pp->fails = 0;
	}
}

/**
 * sp_ports_forget() - drop the ports of a removed listener
 * @ps: every listener's pools
 * @id: listener id
 */
void sp_ports_forget(struct sp_ports *ps, int id)
{
	if (id < ps->n) {
		free(ps->pool[id].ports);
		memset(&ps->pool[id], 0, sizeof(ps->pool[id]));
	}
}

/**
 * sp_ports_free() - free every pool
 * @ps: every listener's pools
 */
void sp_ports_free(struct sp_ports *ps)
{
	int i;

	for (i = 0; i < ps->n; i++)
		free(ps->pool[i].ports);
	free(ps->pool);
	ps->pool = NULL;
	ps->n = 0;
}
