/* SPDX-License-Identifier: MIT
 *
 * transparent.c - SP_OPT_TRANSPARENT: a relay's backend socket bound to the
 * client's own address and port, as HAProxy's "usesrc clientip", so that
 * the container sees who connected.  IP_TRANSPARENT (IPV6_TRANSPARENT)
 * lets the socket take an address that is not the host's; the container
 * sends its replies to its gateway, the host, where the policy route the
 * front end adds (transparent.py: a mark for packets of transparent
 * sockets, a rule, a table whose default route is local) hands them to the
 * socket.
 *
 * Which clients keep their address is decided here, per client, and
 * conservatively: anything that is not plainly a remote unicast address
 * of the backend's family, outside the container networks the front end
 * names, is relayed from the host's address as without the option (a
 * fallback, counted and reported once per listener and kind).  Whether an
 * address is the host's own is asked of the kernel at that moment (a
 * plain bind() succeeds only for a local address), so that no client can
 * make the engine bind an address local to the host.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "transparent.h"

/**
 * sp_transparent_fallback() - count a client relayed from the host's address
 * @e:    engine
 * @id:   listener id
 * @kind: SP_EV_TP_* (why)
 * @err:  positive errno for SP_EV_TP_FAILED, else 0
 *
 * Counted every time; the event is emitted once per listener and kind.
 */
void sp_transparent_fallback(struct sp_engine *e, int id, int kind, int err)
{
	uint32_t bit = 1u << ((unsigned)(kind - SP_EV_TP_LOOPBACK) & 31);

	sp_lcount(e, id, SP_STAT_TRANSPARENT_FALLBACKS, 1);
	if (id < 0 || id >= e->n_listeners || (e->listeners[id].tp_reported & bit))
		return;
	e->listeners[id].tp_reported |= bit;
	sp_emit(e, kind, err, id, 1);
}

/**
 * sp_engine_set_transparent_exclude() - the container networks (engine.h)
 * @e: engine
 * @p: prefixes
 * @n: how many, at most SP_TRANSPARENT_EXCLUDE_MAX
 *
 * Return: 0, -EINVAL or -ENOMEM
 */
int sp_engine_set_transparent_exclude(struct sp_engine *e, const struct sp_prefix *p, int n)
{
	struct sp_prefix *copy = NULL;
	int i;

	if (n < 0 || n > SP_TRANSPARENT_EXCLUDE_MAX || (n && !p))
		return -EINVAL;
	for (i = 0; i < n; i++) {
		if (!(p[i].family == AF_INET && p[i].len <= 32) &&
		    !(p[i].family == AF_INET6 && p[i].len <= 128))
			return -EINVAL;
	}
	if (n) {
		copy = malloc(sizeof(*copy) * (size_t)n);
		if (!copy)
			return -ENOMEM;
		memcpy(copy, p, sizeof(*copy) * (size_t)n);
	}
	free(e->tp_exclude);
	e->tp_exclude = copy;
	e->tp_n_exclude = n;
	return 0;
}

/**
 * prefix_has() - whether addr is inside prefix p
 * @p:      prefix
 * @family: AF_INET or AF_INET6
 * @addr:   4 or 16 bytes, network order
 */
static bool prefix_has(const struct sp_prefix *p, int family, const uint8_t *addr)
{
	unsigned full = p->len / 8, rest = p->len % 8;

	if (p->family != family)
		return false;
	if (memcmp(p->addr, addr, full))
		return false;
	if (!rest)
		return true;
	return ((p->addr[full] ^ addr[full]) & (0xff00u >> rest) & 0xff) == 0;
}

/**
 * unroutable() - an address a container cannot answer through the host
 * @family: AF_INET or AF_INET6
 * @a:      4 or 16 bytes, network order
 *
 * Return: true for loopback, unspecified, link-local, multicast and
 * broadcast addresses.
 */
static bool unroutable(int family, const uint8_t *a)
{
	if (family == AF_INET)
		return a[0] == 127 || a[0] == 0 || (a[0] == 169 && a[1] == 254) || a[0] >= 224;
	return IN6_IS_ADDR_LOOPBACK((const struct in6_addr *)a) ||
	       IN6_IS_ADDR_UNSPECIFIED((const struct in6_addr *)a) ||
	       IN6_IS_ADDR_LINKLOCAL((const struct in6_addr *)a) ||
	       IN6_IS_ADDR_MULTICAST((const struct in6_addr *)a);
}

/**
 * sp_transparent_socket() - a backend socket bound to the client's address
 * @e:          engine
 * @id:         listener id
 * @type:       SOCK_STREAM or SOCK_DGRAM
 * @backend:    the listener's backend (its family is the socket's)
 * @client:     the client's address and port
 * @client_len: its length
 * @fd:         set to the socket on success, else -1
 *
 * The socket is nonblocking, close-on-exec, transparent and bound to the
 * client's address and port (SO_REUSEADDR for TCP, so that a TIME_WAIT of
 * an earlier connection from that port does not stand in the way); the
 * caller connects it.
 *
 * Return: 1 with *fd set; 0 when this client is relayed from the host's
 * address (counted, reported); -errno when no socket could be made.
 */
int sp_transparent_socket(struct sp_engine *e, int id, int type,
			  const struct sockaddr_storage *backend,
			  const struct sockaddr *client, socklen_t client_len, int *fd)
{
	struct sockaddr_storage probe;
	int family = backend->ss_family, s, one = 1, rc, err;
	const uint8_t *addr;

	*fd = -1;
	if (client->sa_family != family || client_len > sizeof(probe)) {
		sp_transparent_fallback(e, id, SP_EV_TP_FAMILY, 0);
		return 0;
	}
	if (family == AF_INET) {
		addr = (const uint8_t *)&((const struct sockaddr_in *)client)->sin_addr;
	} else {
		const struct in6_addr *a6 = &((const struct sockaddr_in6 *)client)->sin6_addr;

		if (IN6_IS_ADDR_V4MAPPED(a6)) {
			sp_transparent_fallback(e, id, SP_EV_TP_FAMILY, 0);
			return 0;
		}
		addr = (const uint8_t *)a6;
	}
	if (unroutable(family, addr)) {
		sp_transparent_fallback(e, id, SP_EV_TP_LOOPBACK, 0);
		return 0;
	}
	for (rc = 0; rc < e->tp_n_exclude; rc++) {
		if (prefix_has(&e->tp_exclude[rc], family, addr)) {
			sp_transparent_fallback(e, id, SP_EV_TP_NETWORK, 0);
			return 0;
		}
	}

	sp_sys(e, SP_STAT_SYS_SOCKET);
	s = socket(family, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (s == -1)
		return -errno;
	sp_fd_opened(e);
	/* Local to the host?  Without IP_TRANSPARENT (and with the default
	 * ip_nonlocal_bind of 0), only a local address can be bound. */
	memset(&probe, 0, sizeof(probe));
	memcpy(&probe, client, client_len);
	if (family == AF_INET) {
		((struct sockaddr_in *)&probe)->sin_port = 0;
	} else {
		((struct sockaddr_in6 *)&probe)->sin6_port = 0;
		((struct sockaddr_in6 *)&probe)->sin6_flowinfo = 0;
		((struct sockaddr_in6 *)&probe)->sin6_scope_id = 0;
	}
	sp_sys(e, SP_STAT_SYS_BIND);
	rc = bind(s, (struct sockaddr *)&probe, client_len);
	if (rc == 0 || errno != EADDRNOTAVAIL) {
		err = rc == 0 ? 0 : errno;
		sp_close(e, s);
		sp_transparent_fallback(e, id, rc == 0 ? SP_EV_TP_LOCAL : SP_EV_TP_FAILED, err);
		return 0;
	}
	sp_sys(e, SP_STAT_SYS_SETSOCKOPT);
	if (family == AF_INET)
		rc = setsockopt(s, SOL_IP, IP_TRANSPARENT, &one, sizeof(one));
	else
		rc = setsockopt(s, SOL_IPV6, IPV6_TRANSPARENT, &one, sizeof(one));
	if (rc == 0 && type == SOCK_STREAM) {
		sp_sys(e, SP_STAT_SYS_SETSOCKOPT);
		rc = setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	}
	if (rc == 0) {
		if (family == AF_INET6) {
			((struct sockaddr_in6 *)&probe)->sin6_port =
				((const struct sockaddr_in6 *)client)->sin6_port;
		} else {
			((struct sockaddr_in *)&probe)->sin_port =
				((const struct sockaddr_in *)client)->sin_port;
		}
		sp_sys(e, SP_STAT_SYS_BIND);
		rc = bind(s, (struct sockaddr *)&probe, client_len);
	}
	if (rc == -1) {
		err = errno;
		sp_close(e, s);
		sp_transparent_fallback(e, id, SP_EV_TP_FAILED, err);
		return 0;
	}
	*fd = s;
	return 1;
}
