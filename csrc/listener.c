/* SPDX-License-Identifier: MIT
 *
 * listener.c - the listener table, protocol-neutral: slots and their ids,
 * runtime removal, per-listener options and counters.  What a listener
 * does is its protocol's (l->proto), called through its table.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>

#include "core.h"

/**
 * listener_slot() - fill a listener slot for a new listener
 * @e:       engine
 * @proto:   its protocol
 * @fd:      its socket, now owned
 * @family:  listen family
 * @backend: where it relays to
 * @len:     length of @backend
 *
 * Return: the slot, or NULL without memory
 */
static struct sp_listener *listener_slot(struct sp_engine *e, const struct sp_proto *proto,
					 int fd, int family, const struct sockaddr *backend,
					 socklen_t len)
{
	struct sp_listener *l = NULL;
	uint32_t gen = 0;
	int i;

	/* A removed listener's slot first: ids stay small, and a port range
	 * coming and going does not grow the table. */
	for (i = 0; i < e->n_listeners; i++) {
		if (e->listeners[i].removed) {
			l = &e->listeners[i];
			gen = l->gen;
			break;
		}
	}
	if (!l) {
		if (e->n_listeners == e->cap_listeners) {
			int cap = e->cap_listeners ? e->cap_listeners * 2 : 4;
			struct sp_listener *n = realloc(e->listeners, sizeof(*n) * cap);

			if (!n)
				return NULL;
			e->listeners = n;
			e->cap_listeners = cap;
		}
		i = e->n_listeners++;
		l = &e->listeners[i];
	}
	memset(l, 0, sizeof(*l));
	l->fd = fd;
	l->family = family;
	l->id = i;
	l->gen = gen;
	l->proto = proto;
	memcpy(&l->backend, backend, len);
	l->backend_len = len;
	return l;
}

/**
 * check_backend() - a backend address the relay can connect to
 * @backend: address
 * @len:     its length
 *
 * Return: 0, -EINVAL or -EAFNOSUPPORT
 */
static int check_backend(const struct sockaddr *backend, socklen_t len)
{
	if (!backend)
		return -EINVAL;
	if (backend->sa_family == AF_INET && len >= sizeof(struct sockaddr_in))
		return 0;
	if (backend->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6))
		return 0;
	return -EAFNOSUPPORT;
}

/**
 * sp_listener_add() - add a listener of any protocol
 * @e:           engine
 * @proto:       its protocol, whose add() sets it up
 * @fd:          its socket, owned from now on
 * @family:      listen family
 * @backend:     where it relays to
 * @backend_len: length of @backend
 *
 * On a failure of the protocol's add() the slot is kept (ids are stable)
 * but the descriptor is given back to the caller.
 *
 * Return: the listener id, or -errno
 */
int sp_listener_add(struct sp_engine *e, const struct sp_proto *proto, int fd, int family,
		    const struct sockaddr *backend, socklen_t backend_len)
{
	struct sp_listener *l;
	int rc = check_backend(backend, backend_len);

	if (rc < 0)
		return rc;
	l = listener_slot(e, proto, fd, family, backend, backend_len);
	if (!l)
		return -ENOMEM;
	sp_fd_opened(e);
	rc = proto->add(e, l);
	if (rc < 0) {
		sp_gauge_sub(e, SP_STAT_FDS_OPEN, 1);
		l->fd = -1;
		return rc;
	}
	return l->id;
}

/**
 * sp_listener_of() - the listener an event is for, with the stale check
 * @e:   engine
 * @ref: SP_REF_LISTENER reference
 *
 * Return: the listener, or NULL when it failed, was removed or its slot was
 * given to another since the event was registered
 */
struct sp_listener *sp_listener_of(struct sp_engine *e, union sp_ref ref)
{
	struct sp_listener *l;

	if (ref.index >= (uint32_t)e->n_listeners)
		return NULL;
	l = &e->listeners[ref.index];
	if (l->fd < 0 || l->removed || !sp_ref_current(ref, l->gen))
		return NULL;
	return l;
}

/**
 * sp_listeners_free() - engine teardown: every listener's state and socket
 * @e: engine
 */
void sp_listeners_free(struct sp_engine *e)
{
	int i;

	for (i = 0; i < e->n_listeners; i++) {
		struct sp_listener *l = &e->listeners[i];

		if (l->proto && !l->removed)
			l->proto->listener_free(e, l);
		sp_close(e, l->fd);
		l->fd = -1;
	}
	free(e->listeners);
	e->listeners = NULL;
}

/**
 * sp_engine_remove() - remove listener id at runtime (engine.h)
 * @e:  engine
 * @id: listener id
 *
 * Return: 0, or -ENOENT for an unknown id
 */
int sp_engine_remove(struct sp_engine *e, int id)
{
	struct sp_listener *l;

	if (id < 0 || id >= e->n_listeners || e->listeners[id].removed)
		return -ENOENT;
	l = &e->listeners[id];
	l->proto->remove(e, l);
	if (l->fd >= 0) {
		/* Explicitly: the stub holds a duplicate of this socket, so
		 * close() alone would leave it in the epoll set. */
		sp_epoll_del(e, l->fd);
		sp_close(e, l->fd);
		l->fd = -1;
	}
	/* Its queued events would be read as those of the next listener that
	 * gets this id. */
	sp_events_forget(e, id);
	l->removed = true;
	l->gen++;
	return 0;
}

static const enum sp_stat listener_stats[] = {
#define SP_LSTAT_ENTRY(name) SP_STAT_##name,
	SP_LISTENER_STATS_LIST(SP_LSTAT_ENTRY)
#undef SP_LSTAT_ENTRY
};

/**
 * sp_stat_per_listener() - whether counter i is one a listener keeps (engine.h)
 * @i: enum sp_stat
 */
int sp_stat_per_listener(int i)
{
	size_t k;

	for (k = 0; k < sizeof(listener_stats) / sizeof(listener_stats[0]); k++)
		if ((int)listener_stats[k] == i)
			return 1;
	return 0;
}

/**
 * sp_engine_set_listener_option() - listener id's own value of an option (engine.h)
 * @e:      engine
 * @id:     listener id
 * @option: one its protocol declares (struct sp_proto, listener_options)
 * @value:  its value, checked as the engine's own would be
 *
 * Which options a listener may own is its protocol's to say, not this
 * table's: a protocol reads them through sp_lopt() where it would read the
 * engine's.
 *
 * Return: 0, -EINVAL (a bad value), -EOPNOTSUPP (an option its protocol
 * keeps engine-wide) or -ENOENT
 */
int sp_engine_set_listener_option(struct sp_engine *e, int id, int option, int64_t value)
{
	struct sp_listener *l;
	int rc;

	if (id < 0 || id >= e->n_listeners || e->listeners[id].removed)
		return -ENOENT;
	l = &e->listeners[id];
	rc = sp_option_check(option, value);
	if (rc < 0)
		return rc;
	if (!(l->proto->listener_options & SP_OPT_BIT(option)))
		return -EOPNOTSUPP;
	l->opt[option] = value;
	l->opt_own |= SP_OPT_BIT(option);
	return 0;
}

/**
 * sp_engine_listener_stats() - copy listener id's counters (engine.h)
 * @e:   engine
 * @id:  listener id
 * @out: SP_STAT_COUNT values
 *
 * Return: 0 or -ENOENT
 */
int sp_engine_listener_stats(const struct sp_engine *e, int id, uint64_t *out)
{
	const struct sp_listener *l;
	size_t k;

	if (id < 0 || id >= e->n_listeners || e->listeners[id].removed)
		return -ENOENT;
	l = &e->listeners[id];
	memset(out, 0, sizeof(uint64_t) * SP_STAT_COUNT);
	for (k = 0; k < sizeof(listener_stats) / sizeof(listener_stats[0]); k++)
		out[listener_stats[k]] = l->stats[listener_stats[k]];
	return 0;
}
