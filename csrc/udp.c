/* SPDX-License-Identifier: MIT
 *
 * udp.c - UDP relay: one connected backend socket per client.
 *
 * Every client (address, port) seen on a listener gets an entry ("flow")
 * holding a socket connected to the backend, so the backend sees a distinct
 * source port per client and the kernel filters replies for us.  Replies go
 * back through the listener socket with an IP_PKTINFO/IPV6_PKTINFO cmsg whose
 * source is the address the client originally sent to, which keeps
 * multi-homed hosts and wildcard listeners answering from the right address.
 *
 * Flows live in fixed-size chunks of slots (so pointers stay valid while the
 * table grows) and are found through a per-listener chained hash keyed by the
 * client address.  A per-listener doubly linked list orders them by last
 * traffic in either direction: its head is the most recent, its tail is the
 * next to expire.
 *
 * Flows are also grouped by client address (port aside), each group with
 * its own LRU list, so that one source cannot push out the others: a new
 * flow of an address at its bound (SP_OPT_UDP_MAX_FLOWS_PER_ADDR) replaces
 * that address's own least recent flow, and when the whole table is full
 * the victim is taken from the address holding the most entries among the
 * least recently used few.  Before, 17,000 source ports from one address in
 * a second evicted an established client of another address, which then
 * reached the backend from a new port.
 *
 * All I/O is batched with recvmmsg/sendmmsg into one set of buffers per
 * engine; nothing is allocated per datagram.  Both listener and flow sockets
 * are level-triggered, and each event handles a bounded number of batches so
 * one busy socket cannot starve the others.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/socket.h>

#include "proto.h"
#include "transparent.h"

#define SP_UDP_BATCH      32       /* datagrams per recvmmsg/sendmmsg */
#define SP_UDP_ROUNDS     4        /* batches per event before yielding */
#define SP_UDP_BUF        65535    /* any UDP payload fits, even over IPv6 */
#define SP_UDP_CMSG       256      /* receive control space per datagram */
#define SP_UDP_CHUNK      256      /* flow slots per allocation */
#define SP_UDP_MAX_SLOTS  (1u << 24) /* entry slots at most */
#define SP_UDP_MIN_BUCKETS 64
#define SP_UDP_VICTIM_SCAN 32      /* LRU flows looked at for a table-full victim */

union sp_udp_addr {
	struct sockaddr sa;
	struct sockaddr_in v4;
	struct sockaddr_in6 v6;
};

enum sp_udp_dst_kind { SP_UDP_DST_NONE, SP_UDP_DST_V4, SP_UDP_DST_V6 };

struct sp_udp_src;

struct sp_udp_flow {
	int fd;                        /* connected backend socket, -1 if free */
	uint32_t slot;
	uint32_t gen;                  /* bumped on free: stale events are ignored */
	uint8_t dst_kind;              /* enum sp_udp_dst_kind */
	uint32_t hash;
	struct sp_udp_listener *ul;
	struct sp_udp_flow *hnext;     /* hash chain, or free list */
	struct sp_udp_flow *prev, *next; /* listener LRU, head = most recent */
	struct sp_udp_src *src;        /* the client address's group */
	struct sp_udp_flow *sprev, *snext; /* the group's LRU, head = most recent */
	int64_t last_ms;               /* last datagram in either direction */
	union sp_udp_addr client;
	socklen_t client_len;
	union {
		struct in_pktinfo v4;
		struct in6_pktinfo v6;
	} dst;                         /* reply source, from the client's cmsg */
};

/* The flows of one client address (any port). */
struct sp_udp_src {
	union sp_udp_addr addr;        /* port zero */
	uint32_t hash;
	uint32_t count;
	struct sp_udp_src *hnext;
	struct sp_udp_flow *head, *tail;
};

struct sp_udp_listener {
	int id;
	int fd;
	int family;
	struct sockaddr_storage backend;
	socklen_t backend_len;
	struct sp_udp_flow **buckets;
	uint32_t mask;                 /* buckets - 1 */
	uint32_t count;
	struct sp_udp_flow *head, *tail;
	struct sp_udp_src **sbuckets;  /* client addresses */
	uint32_t smask;                /* sbuckets - 1 */
	uint32_t nsrc;
	int pos;                       /* index in sp_udp_engine.ls */
};

union sp_udp_ctl {
	char buf[SP_UDP_CMSG];
	struct cmsghdr align;
};

union sp_udp_sctl {
	char buf[CMSG_SPACE(sizeof(struct in6_pktinfo))];
	struct cmsghdr align;
};

/* One set of batch buffers per engine: the loop is single-threaded and each
 * handler is done with them before it returns. */
struct sp_udp_io {
	struct mmsghdr rmsg[SP_UDP_BATCH];
	struct iovec riov[SP_UDP_BATCH];
	union sp_udp_addr rname[SP_UDP_BATCH];
	union sp_udp_ctl rctl[SP_UDP_BATCH];
	struct mmsghdr smsg[SP_UDP_BATCH];
	struct iovec siov[SP_UDP_BATCH];
	union sp_udp_sctl sctl;
	char *data;                    /* SP_UDP_BATCH * SP_UDP_BUF */
};

struct sp_udp_engine {
	struct sp_udp_flow **chunks;
	uint32_t n_chunks, cap_chunks;
	struct sp_udp_flow *free_list;
	struct sp_udp_listener **ls;
	int n_ls, cap_ls;
	uint64_t seed;
	struct sp_udp_io *io;          /* allocated with the first listener */
};

/* sp_udp_mix() - 64-bit finaliser (splitmix64) for the client-address hash */
static inline uint64_t sp_udp_mix(uint64_t h)
{
	h ^= h >> 30;
	h *= 0xbf58476d1ce4e5b9ULL;
	h ^= h >> 27;
	h *= 0x94d049bb133111ebULL;
	h ^= h >> 31;
	return h;
}

/* sp_udp_hash() - hash of a client address, seeded per engine so remote
 * peers cannot aim their source ports at one chain */
static uint32_t sp_udp_hash(const struct sp_udp_engine *u, const union sp_udp_addr *a)
{
	uint64_t h = u->seed;

	if (a->sa.sa_family == AF_INET6) {
		uint64_t w[2];

		memcpy(w, &a->v6.sin6_addr, sizeof(w));
		h = sp_udp_mix(h ^ w[0]);
		h = sp_udp_mix(h ^ w[1]);
		h = sp_udp_mix(h ^ ((uint64_t)a->v6.sin6_scope_id << 16) ^ a->v6.sin6_port);
	} else {
		h = sp_udp_mix(h ^ ((uint64_t)a->v4.sin_addr.s_addr << 16) ^ a->v4.sin_port);
	}
	return (uint32_t)h;
}

/* sp_udp_same() - whether two client addresses are the same (address, port) */
static bool sp_udp_same(const union sp_udp_addr *a, const union sp_udp_addr *b)
{
	if (a->sa.sa_family != b->sa.sa_family)
		return false;
	if (a->sa.sa_family == AF_INET6)
		return a->v6.sin6_port == b->v6.sin6_port &&
		       a->v6.sin6_scope_id == b->v6.sin6_scope_id &&
		       !memcmp(&a->v6.sin6_addr, &b->v6.sin6_addr, sizeof(a->v6.sin6_addr));
	return a->v4.sin_port == b->v4.sin_port &&
	       a->v4.sin_addr.s_addr == b->v4.sin_addr.s_addr;
}

/* sp_udp_src_key() - a client address with the port cleared */
static void sp_udp_src_key(union sp_udp_addr *k, const union sp_udp_addr *a)
{
	memset(k, 0, sizeof(*k));
	k->sa.sa_family = a->sa.sa_family;
	if (a->sa.sa_family == AF_INET6) {
		k->v6.sin6_addr = a->v6.sin6_addr;
		k->v6.sin6_scope_id = a->v6.sin6_scope_id;
	} else {
		k->v4.sin_addr = a->v4.sin_addr;
	}
}

/* sp_udp_src_find() - the group of a client's address, or NULL */
static struct sp_udp_src *sp_udp_src_find(const struct sp_udp_engine *u,
					  struct sp_udp_listener *ul,
					  const union sp_udp_addr *a, uint32_t *hash)
{
	union sp_udp_addr k;
	struct sp_udp_src *s;

	sp_udp_src_key(&k, a);
	*hash = sp_udp_hash(u, &k);
	for (s = ul->sbuckets[*hash & ul->smask]; s; s = s->hnext)
		if (s->hash == *hash && sp_udp_same(&s->addr, &k))
			return s;
	return NULL;
}

/* sp_udp_src_get() - the group of a client's address, created if needed;
 * NULL without memory */
static struct sp_udp_src *sp_udp_src_get(const struct sp_udp_engine *u,
					 struct sp_udp_listener *ul,
					 const union sp_udp_addr *a)
{
	uint32_t hash;
	struct sp_udp_src *s = sp_udp_src_find(u, ul, a, &hash);

	if (s)
		return s;
	s = calloc(1, sizeof(*s));
	if (!s)
		return NULL;
	sp_udp_src_key(&s->addr, a);
	s->hash = hash;
	if (ul->nsrc >= ul->smask + 1) {
		/* Keep chains short: double the buckets (or live with longer
		 * chains when that allocation fails). */
		uint32_t n = (ul->smask + 1) * 2, i;
		struct sp_udp_src **b = calloc(n, sizeof(*b));

		if (b) {
			for (i = 0; i <= ul->smask; i++) {
				struct sp_udp_src *x = ul->sbuckets[i], *next;

				for (; x; x = next) {
					next = x->hnext;
					x->hnext = b[x->hash & (n - 1)];
					b[x->hash & (n - 1)] = x;
				}
			}
			free(ul->sbuckets);
			ul->sbuckets = b;
			ul->smask = n - 1;
		}
	}
	s->hnext = ul->sbuckets[hash & ul->smask];
	ul->sbuckets[hash & ul->smask] = s;
	ul->nsrc++;
	return s;
}

static void sp_udp_src_release(struct sp_udp_listener *ul, struct sp_udp_src *s);

/* sp_udp_src_unlink() - take a flow out of its address's group, freeing
 * the group with its last flow */
static void sp_udp_src_unlink(struct sp_udp_listener *ul, struct sp_udp_flow *f)
{
	struct sp_udp_src *s = f->src;

	if (!s)
		return;
	if (f->sprev)
		f->sprev->snext = f->snext;
	else
		s->head = f->snext;
	if (f->snext)
		f->snext->sprev = f->sprev;
	else
		s->tail = f->sprev;
	f->sprev = f->snext = NULL;
	f->src = NULL;
	s->count--;
	sp_udp_src_release(ul, s);
}

/* sp_udp_src_release() - free a group that holds no flow any more */
static void sp_udp_src_release(struct sp_udp_listener *ul, struct sp_udp_src *s)
{
	struct sp_udp_src **pp;

	if (s->count)
		return;
	for (pp = &ul->sbuckets[s->hash & ul->smask]; *pp && *pp != s; pp = &(*pp)->hnext)
		;
	if (*pp)
		*pp = s->hnext;
	ul->nsrc--;
	free(s);
}

/* sp_udp_src_push() - put a flow at the most-recent end of its group */
static void sp_udp_src_push(struct sp_udp_src *s, struct sp_udp_flow *f)
{
	f->src = s;
	f->sprev = NULL;
	f->snext = s->head;
	if (s->head)
		s->head->sprev = f;
	else
		s->tail = f;
	s->head = f;
}

/* sp_udp_flow_at() - slot to flow; NULL when out of range */
static struct sp_udp_flow *sp_udp_flow_at(struct sp_udp_engine *u, uint32_t slot)
{
	if (slot / SP_UDP_CHUNK >= u->n_chunks)
		return NULL;
	return &u->chunks[slot / SP_UDP_CHUNK][slot % SP_UDP_CHUNK];
}

/* sp_udp_flow_ref() - epoll reference of a flow: slot and generation */
static union sp_ref sp_udp_flow_ref(const struct sp_udp_flow *f)
{
	return sp_ref(SP_REF_FLOW, SP_PROTO_UDP, 0, f->slot, f->gen);
}

/* sp_udp_grow() - add one chunk of free slots; 0 or -errno */
static int sp_udp_grow(struct sp_udp_engine *u)
{
	struct sp_udp_flow *chunk;
	uint32_t base, i;

	if ((uint64_t)(u->n_chunks + 1) * SP_UDP_CHUNK > SP_UDP_MAX_SLOTS)
		return -ENOSPC;
	if (u->n_chunks == u->cap_chunks) {
		uint32_t cap = u->cap_chunks ? u->cap_chunks * 2 : 16;
		struct sp_udp_flow **c = realloc(u->chunks, cap * sizeof(*c));

		if (!c)
			return -ENOMEM;
		u->chunks = c;
		u->cap_chunks = cap;
	}
	chunk = calloc(SP_UDP_CHUNK, sizeof(*chunk));
	if (!chunk)
		return -ENOMEM;
	base = u->n_chunks * SP_UDP_CHUNK;
	/* Push in reverse so slots are handed out in ascending order. */
	for (i = SP_UDP_CHUNK; i-- > 0;) {
		chunk[i].fd = -1;
		chunk[i].slot = base + i;
		chunk[i].hnext = u->free_list;
		u->free_list = &chunk[i];
	}
	u->chunks[u->n_chunks++] = chunk;
	return 0;
}

/* sp_udp_lru_unlink() - take a flow off its listener's LRU list */
static void sp_udp_lru_unlink(struct sp_udp_listener *ul, struct sp_udp_flow *f)
{
	if (f->prev)
		f->prev->next = f->next;
	else
		ul->head = f->next;
	if (f->next)
		f->next->prev = f->prev;
	else
		ul->tail = f->prev;
	f->prev = f->next = NULL;
}

/* sp_udp_lru_push() - put a flow at the most-recent end of the LRU list */
static void sp_udp_lru_push(struct sp_udp_listener *ul, struct sp_udp_flow *f)
{
	f->prev = NULL;
	f->next = ul->head;
	if (ul->head)
		ul->head->prev = f;
	else
		ul->tail = f;
	ul->head = f;
}

/* sp_udp_touch() - note traffic on a flow: it becomes the last to expire */
static void sp_udp_touch(struct sp_engine *e, struct sp_udp_flow *f)
{
	struct sp_udp_src *s = f->src;

	f->last_ms = e->now_ms;
	if (f->ul->head != f) {
		sp_udp_lru_unlink(f->ul, f);
		sp_udp_lru_push(f->ul, f);
	}
	if (s && s->head != f) {
		/* Not the head, so it has a predecessor and the list a head. */
		f->sprev->snext = f->snext;
		if (f->snext)
			f->snext->sprev = f->sprev;
		else
			s->tail = f->sprev;
		sp_udp_src_push(s, f);
	}
}

/* sp_udp_lookup() - the flow of a client on a listener, or NULL */
static struct sp_udp_flow *sp_udp_lookup(struct sp_udp_listener *ul,
					 const union sp_udp_addr *a, uint32_t hash)
{
	struct sp_udp_flow *f;

	for (f = ul->buckets[hash & ul->mask]; f; f = f->hnext)
		if (f->hash == hash && sp_udp_same(&f->client, a))
			return f;
	return NULL;
}

/* sp_udp_hash_unlink() - remove a flow from its listener's hash chain */
static void sp_udp_hash_unlink(struct sp_udp_listener *ul, struct sp_udp_flow *f)
{
	struct sp_udp_flow **pp = &ul->buckets[f->hash & ul->mask];

	while (*pp && *pp != f)
		pp = &(*pp)->hnext;
	if (*pp)
		*pp = f->hnext;
	f->hnext = NULL;
}

/* sp_udp_rehash() - double the bucket array so chains stay short; on
 * allocation failure the table keeps working with longer chains */
static void sp_udp_rehash(struct sp_udp_listener *ul)
{
	uint32_t n = (ul->mask + 1) * 2;
	struct sp_udp_flow **b = calloc(n, sizeof(*b));
	struct sp_udp_flow *f;

	if (!b)
		return;
	for (f = ul->head; f; f = f->next) {
		f->hnext = b[f->hash & (n - 1)];
		b[f->hash & (n - 1)] = f;
	}
	free(ul->buckets);
	ul->buckets = b;
	ul->mask = n - 1;
}

/* sp_udp_flow_free() - close a flow's socket and return its slot.
 *
 * Closing the socket also drops it from the epoll set (flow sockets are never
 * duplicated), so no EPOLL_CTL_DEL is spent on it; an event already fetched
 * for it in this wakeup fails the generation check.
 */
static void sp_udp_flow_free(struct sp_engine *e, struct sp_udp_flow *f)
{
	struct sp_udp_listener *ul = f->ul;

	sp_udp_hash_unlink(ul, f);
	sp_udp_lru_unlink(ul, f);
	sp_udp_src_unlink(ul, f);
	ul->count--;
	sp_close(e, f->fd);
	f->fd = -1;
	f->ul = NULL;
	f->gen++;
	f->hnext = e->udp->free_list;
	e->udp->free_list = f;
	sp_lgauge_sub(e, ul->id, SP_STAT_UDP_FLOWS_ACTIVE, 1);
}

/* sp_udp_evict() - drop a flow of ul to make room: of the least recently
 * used few, the one whose address holds the most entries (the least recent
 * among equals), so that a flood from some addresses is paid for by them */
static bool sp_udp_evict(struct sp_engine *e, struct sp_udp_listener *ul)
{
	struct sp_udp_flow *f, *victim = ul->tail;
	int n;

	if (!victim)
		return false;
	for (f = ul->tail, n = 0; f && n < SP_UDP_VICTIM_SCAN; f = f->prev, n++)
		if (f->src && victim->src && f->src->count > victim->src->count)
			victim = f;
	sp_udp_flow_free(e, victim);
	sp_lcount(e, ul->id, SP_STAT_UDP_FLOWS_EVICTED, 1);
	sp_emit(e, SP_EV_UDP_EVICTED, 0, ul->id, 1);
	return true;
}

/* sp_udp_per_addr_max() - the bound on one address's entries on listener id */
static uint32_t sp_udp_per_addr_max(const struct sp_engine *e, int id)
{
	int64_t v = sp_lopt(e, id, SP_OPT_UDP_MAX_FLOWS_PER_ADDR);

	if (v <= 0)
		v = sp_lopt(e, id, SP_OPT_UDP_MAX_FLOWS) / 16;
	if (v < 1)
		v = 1;
	return v > UINT32_MAX ? UINT32_MAX : (uint32_t)v;
}

/* sp_udp_evict_any() - after EMFILE/ENFILE: free a descriptor by evicting
 * the LRU flow of ul, or of any other UDP listener if ul has none */
static bool sp_udp_evict_any(struct sp_engine *e, struct sp_udp_listener *ul)
{
	struct sp_udp_engine *u = e->udp;
	int i;

	if (sp_udp_evict(e, ul))
		return true;
	for (i = 0; i < u->n_ls; i++)
		if (sp_udp_evict(e, u->ls[i]))
			return true;
	return false;
}

/* sp_udp_backend_socket() - a nonblocking socket connected to the backend,
 * bound to the client's address with SP_OPT_TRANSPARENT (transparent.c);
 * fd or -errno */
static int sp_udp_backend_socket(struct sp_engine *e, struct sp_udp_listener *ul,
				 const union sp_udp_addr *client, socklen_t client_len)
{
	int fd = -1, rc, tp = 0;

	if (sp_lopt(e, ul->id, SP_OPT_TRANSPARENT)) {
		tp = sp_transparent_socket(e, ul->id, SOCK_DGRAM, &ul->backend,
					   (const struct sockaddr *)client, client_len, &fd);
		if (tp < 0)
			return tp;
	}
again:
	if (fd < 0) {
		sp_sys(e, SP_STAT_SYS_SOCKET);
		fd = socket(ul->backend.ss_family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
		if (fd == -1)
			return -errno;
		sp_fd_opened(e);
	}
	do {
		sp_sys(e, SP_STAT_SYS_CONNECT);
		rc = connect(fd, (const struct sockaddr *)&ul->backend, ul->backend_len);
	} while (rc == -1 && errno == EINTR);
	if (rc == -1) {
		int err = errno;

		sp_close(e, fd);
		if (tp) {
			/* From the host's address, as without the option. */
			sp_transparent_fallback(e, ul->id, SP_EV_TP_FAILED, err);
			fd = -1;
			tp = 0;
			goto again;
		}
		return -err;
	}
	if (tp)
		sp_lcount(e, ul->id, SP_STAT_UDP_FLOWS_TRANSPARENT, 1);
	return fd;
}

/* sp_udp_flow_new() - create the flow for a new client, evicting the LRU
 * entry when the listener is at its bound; NULL (event emitted) on failure */
static struct sp_udp_flow *sp_udp_flow_new(struct sp_engine *e, struct sp_udp_listener *ul,
					   const union sp_udp_addr *client, socklen_t client_len,
					   uint32_t hash)
{
	struct sp_udp_engine *u = e->udp;
	int64_t max = sp_lopt(e, ul->id, SP_OPT_UDP_MAX_FLOWS);
	uint32_t per_addr = sp_udp_per_addr_max(e, ul->id), shash;
	struct sp_udp_flow *f;
	struct sp_udp_src *src;
	int fd, rc;

	/* An address at its bound makes room among its own entries (a bound
	 * at or above the table's leaves that to the table bound). */
	while ((max <= 0 || per_addr < (uint64_t)max) &&
	       (src = sp_udp_src_find(u, ul, client, &shash)) && src->count >= per_addr) {
		sp_udp_flow_free(e, src->tail);
		sp_lcount(e, ul->id, SP_STAT_UDP_ADDR_EVICTED, 1);
		sp_emit(e, SP_EV_UDP_ADDR_EVICTED, 0, ul->id, 1);
	}
	if (max > 0)
		while (ul->count >= (uint64_t)max && sp_udp_evict(e, ul))
			;

	fd = sp_udp_backend_socket(e, ul, client, client_len);
	/* Out of descriptors: an old entry is worth less than a new client. */
	if ((fd == -EMFILE || fd == -ENFILE) && sp_udp_evict_any(e, ul)) {
		sp_lcount_error(e, ul->id, -fd);
		fd = sp_udp_backend_socket(e, ul, client, client_len);
	}
	if (fd < 0) {
		sp_lcount_error(e, ul->id, -fd);
		sp_emit(e, SP_EV_UDP_FLOW_FAILED, -fd, ul->id, 1);
		return NULL;
	}

	if (!u->free_list) {
		rc = sp_udp_grow(u);
		/* Slot space exhausted: recycle this listener's oldest entry. */
		if (rc == -ENOSPC && sp_udp_evict(e, ul))
			rc = 0;
		if (rc < 0) {
			sp_close(e, fd);
			sp_lcount_error(e, ul->id, -rc);
			sp_emit(e, SP_EV_UDP_FLOW_FAILED, -rc, ul->id, 1);
			return NULL;
		}
	}
	f = u->free_list;

	src = sp_udp_src_get(u, ul, client);
	rc = src ? sp_epoll_add(e, fd, EPOLLIN, sp_udp_flow_ref(f)) : -ENOMEM;
	if (rc < 0) {
		if (src)
			sp_udp_src_release(ul, src);  /* if made for this flow */
		sp_close(e, fd);
		sp_lcount_error(e, ul->id, -rc);
		sp_emit(e, SP_EV_UDP_FLOW_FAILED, -rc, ul->id, 1);
		return NULL;
	}
	u->free_list = f->hnext;

	f->fd = fd;
	f->ul = ul;
	f->hash = hash;
	f->client = *client;
	f->client_len = client_len;
	f->dst_kind = SP_UDP_DST_NONE;
	f->last_ms = e->now_ms;
	f->hnext = ul->buckets[hash & ul->mask];
	ul->buckets[hash & ul->mask] = f;
	sp_udp_lru_push(ul, f);
	sp_udp_src_push(src, f);
	src->count++;
	ul->count++;
	if (ul->count > ul->mask + 1)
		sp_udp_rehash(ul);

	sp_lcount(e, ul->id, SP_STAT_UDP_FLOWS_CREATED, 1);
	sp_lcount(e, ul->id, SP_STAT_UDP_FLOWS_ACTIVE, 1);
	return f;
}

/* sp_udp_set_dst() - remember where the client sent to, from the datagram's
 * PKTINFO cmsg, as the source for replies.  Without one (a socket lacking
 * IP_PKTINFO/IPV6_RECVPKTINFO) the kernel picks the source. */
static void sp_udp_set_dst(struct sp_udp_flow *f, struct msghdr *mh)
{
	struct cmsghdr *c;

	f->dst_kind = SP_UDP_DST_NONE;
	for (c = CMSG_FIRSTHDR(mh); c; c = CMSG_NXTHDR(mh, c)) {
		if (c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_PKTINFO &&
		    c->cmsg_len >= CMSG_LEN(sizeof(struct in_pktinfo))) {
			struct in_pktinfo pi;

			memcpy(&pi, CMSG_DATA(c), sizeof(pi));
			/* ipi_spec_dst is the local address the kernel would
			 * answer from: the destination for unicast, a local
			 * address of the interface for broadcast/multicast. */
			if (!pi.ipi_spec_dst.s_addr)
				continue;
			memset(&f->dst.v4, 0, sizeof(f->dst.v4));
			f->dst.v4.ipi_spec_dst = pi.ipi_spec_dst;
			f->dst_kind = SP_UDP_DST_V4;
			return;
		}
		if (c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_PKTINFO &&
		    c->cmsg_len >= CMSG_LEN(sizeof(struct in6_pktinfo))) {
			struct in6_pktinfo pi;

			memcpy(&pi, CMSG_DATA(c), sizeof(pi));
			/* A multicast destination cannot be a source. */
			if (IN6_IS_ADDR_MULTICAST(&pi.ipi6_addr) ||
			    IN6_IS_ADDR_UNSPECIFIED(&pi.ipi6_addr))
				continue;
			memset(&f->dst.v6, 0, sizeof(f->dst.v6));
			f->dst.v6.ipi6_addr = pi.ipi6_addr;
			/* A link-local source is only meaningful with its link. */
			if (IN6_IS_ADDR_LINKLOCAL(&pi.ipi6_addr))
				f->dst.v6.ipi6_ifindex = pi.ipi6_ifindex;
			f->dst_kind = SP_UDP_DST_V6;
			return;
		}
	}
}

/* sp_udp_dropped() - account n datagrams that could not be sent */
static void sp_udp_dropped(struct sp_engine *e, int kind, int err, int listener, unsigned n)
{
	if (!n)
		return;
	sp_lcount(e, listener, SP_STAT_UDP_DROPS, n);
	if (err != EAGAIN && err != EWOULDBLOCK)
		sp_lcount_error(e, listener, err);
	sp_emit(e, kind, err, listener, n);
}

/* sp_udp_sendmmsg() - send msgs[0..n) on fd, one send(2)-like call for a
 * single datagram and sendmmsg(2) for more.
 *
 * A datagram that fails with ECONNREFUSED is retried once: the error is a
 * stale ICMP port-unreachable from an earlier datagram, and docker-proxy
 * 29.5+ retries the same way so the first datagram after the backend comes
 * back is delivered.  EAGAIN/ENOBUFS drop the rest of the batch (UDP
 * semantics); other errors drop that one datagram.  Returns bytes sent and
 * sets *sent to the number of datagrams sent.
 */
static uint64_t sp_udp_sendmmsg(struct sp_engine *e, int fd, struct mmsghdr *msgs,
				unsigned n, int fail_kind, int listener, unsigned *sent)
{
	uint64_t bytes = 0;
	bool retried = false;
	unsigned i = 0, ok = 0;

	while (i < n) {
		int rc, err;

		if (n - i == 1) {
			ssize_t r;

			sp_sys(e, SP_STAT_SYS_SEND);
			r = sendmsg(fd, &msgs[i].msg_hdr, MSG_DONTWAIT | MSG_NOSIGNAL);
			if (r >= 0)
				msgs[i].msg_len = (unsigned)r;
			rc = r >= 0 ? 1 : -1;
		} else {
			sp_sys(e, SP_STAT_SYS_SENDMMSG);
			rc = sendmmsg(fd, msgs + i, n - i, MSG_DONTWAIT | MSG_NOSIGNAL);
		}
		if (rc > 0) {
			int k;

			for (k = 0; k < rc; k++)
				bytes += msgs[i + k].msg_len;
			i += rc;
			ok += rc;
			retried = false;
			continue;
		}
		err = rc == -1 ? errno : EIO;
		if (err == EINTR)
			continue;
		if (err == ECONNREFUSED && !retried) {
			retried = true;
			continue;
		}
		retried = false;
		if (err == EAGAIN || err == EWOULDBLOCK || err == ENOBUFS || err == ENOMEM) {
			sp_udp_dropped(e, fail_kind, err, listener, n - i);
			break;
		}
		sp_udp_dropped(e, fail_kind, err, listener, 1);
		i++;
	}
	*sent = ok;
	return bytes;
}

/* sp_udp_forward() - send the received datagrams [from, to) to flow f */
static void sp_udp_forward(struct sp_engine *e, struct sp_udp_flow *f,
			   unsigned from, unsigned to)
{
	struct sp_udp_io *io = e->udp->io;
	unsigned i, n = to - from, sent;
	uint64_t bytes;

	for (i = 0; i < n; i++) {
		struct msghdr *mh = &io->smsg[i].msg_hdr;

		io->siov[i].iov_base = io->riov[from + i].iov_base;
		io->siov[i].iov_len = io->rmsg[from + i].msg_len;
		memset(mh, 0, sizeof(*mh));
		mh->msg_iov = &io->siov[i];
		mh->msg_iovlen = 1;
	}
	bytes = sp_udp_sendmmsg(e, f->fd, io->smsg, n, SP_EV_UDP_SEND_FAILED, f->ul->id, &sent);
	sp_lcount(e, f->ul->id, SP_STAT_UDP_DGRAMS_C2B, sent);
	sp_lcount(e, f->ul->id, SP_STAT_UDP_BYTES_C2B, bytes);
}

/* sp_udp_prep_recv() - reset the receive batch: buffers, names, control */
static void sp_udp_prep_recv(struct sp_udp_io *io, bool names)
{
	unsigned i;

	for (i = 0; i < SP_UDP_BATCH; i++) {
		struct msghdr *mh = &io->rmsg[i].msg_hdr;

		io->riov[i].iov_base = io->data + (size_t)i * SP_UDP_BUF;
		io->riov[i].iov_len = SP_UDP_BUF;
		mh->msg_iov = &io->riov[i];
		mh->msg_iovlen = 1;
		mh->msg_flags = 0;
		if (names) {
			mh->msg_name = &io->rname[i];
			mh->msg_namelen = sizeof(io->rname[i]);
			mh->msg_control = io->rctl[i].buf;
			mh->msg_controllen = sizeof(io->rctl[i].buf);
		} else {
			mh->msg_name = NULL;
			mh->msg_namelen = 0;
			mh->msg_control = NULL;
			mh->msg_controllen = 0;
		}
	}
}

static void sp_udp_listener_free(struct sp_engine *e, struct sp_listener *l);

/* sp_udp_listener_failed() - the listener socket is unusable: drop its
 * flows, close it and tell the front end */
static void sp_udp_listener_failed(struct sp_engine *e, struct sp_listener *l, int err)
{
	sp_udp_listener_free(e, l);
	sp_epoll_del(e, l->fd);
	sp_close(e, l->fd);
	l->fd = -1;
	sp_emit(e, SP_EV_LISTENER_FAILED, err, l->id, 1);
}

/* sp_udp_client_batch() - route one received batch to the flows, creating
 * them as needed; consecutive datagrams of one client go out in one call */
static void sp_udp_client_batch(struct sp_engine *e, struct sp_udp_listener *ul, unsigned n)
{
	struct sp_udp_io *io = e->udp->io;
	struct sp_udp_flow *cur = NULL;
	unsigned i, start = 0;

	for (i = 0; i < n; i++) {
		struct msghdr *mh = &io->rmsg[i].msg_hdr;
		union sp_udp_addr *a = &io->rname[i];
		struct sp_udp_flow *f;
		uint32_t hash;

		if (mh->msg_namelen < sizeof(struct sockaddr_in) ||
		    (a->sa.sa_family != AF_INET && a->sa.sa_family != AF_INET6) ||
		    (a->sa.sa_family == AF_INET6 && mh->msg_namelen < sizeof(struct sockaddr_in6))) {
			/* No usable source address: nowhere to reply to. */
			if (cur)
				sp_udp_forward(e, cur, start, i);
			cur = NULL;
			sp_lcount(e, ul->id, SP_STAT_UDP_DROPS, 1);
			continue;
		}
		hash = sp_udp_hash(e->udp, a);
		if (cur && cur->hash == hash && sp_udp_same(&cur->client, a)) {
			sp_udp_touch(e, cur);
			continue;
		}
		/* Send what is queued before creating a flow: creation may
		 * evict, and the queued flow must not be the victim unsent. */
		if (cur)
			sp_udp_forward(e, cur, start, i);
		cur = NULL;
		f = sp_udp_lookup(ul, a, hash);
		if (!f) {
			f = sp_udp_flow_new(e, ul, a, mh->msg_namelen, hash);
			if (!f) {
				sp_lcount(e, ul->id, SP_STAT_UDP_DROPS, 1);
				continue;
			}
		}
		/* The latest datagram says where the client talks to now. */
		sp_udp_set_dst(f, mh);
		sp_udp_touch(e, f);
		cur = f;
		start = i;
	}
	if (cur)
		sp_udp_forward(e, cur, start, n);
}

/* sp_udp_fatal() - errors after which a socket cannot be used again */
static bool sp_udp_fatal(int err)
{
	return err == EBADF || err == ENOTSOCK || err == EFAULT || err == EINVAL ||
	       err == EOPNOTSUPP;
}

/* sp_udp_listener_event() - datagrams from clients: read a few batches and
 * forward them, creating entries for new clients */
static void sp_udp_listener_event(struct sp_engine *e, struct sp_listener *l, uint32_t events)
{
	struct sp_udp_listener *ul = l->state;
	struct sp_udp_io *io = e->udp->io;
	int round;

	(void)events;
	if (!ul || l->fd < 0)
		return;
	for (round = 0; round < SP_UDP_ROUNDS; round++) {
		int n;

		sp_udp_prep_recv(io, true);
		sp_sys(e, SP_STAT_SYS_RECVMMSG);
		n = recvmmsg(l->fd, io->rmsg, SP_UDP_BATCH, MSG_DONTWAIT, NULL);
		if (n == -1) {
			int err = errno;

			if (err == EINTR)
				continue;
			if (err == EAGAIN || err == EWOULDBLOCK || err == ECONNREFUSED)
				return;
			if (err == ENOBUFS || err == ENOMEM) {
				sp_lcount_error(e, l->id, err);
				return;
			}
			if (sp_udp_fatal(err)) {
				sp_udp_listener_failed(e, l, err);
				return;
			}
			/* Unexpected but not fatal: report and keep serving.
			 * LISTENER_FAILED would tell the front end the listener
			 * is gone, so this uses the keeps-going kind. */
			sp_lcount_error(e, l->id, err);
			sp_emit(e, SP_EV_ACCEPT_ERROR, err, l->id, 1);
			return;
		}
		sp_udp_client_batch(e, ul, (unsigned)n);
		if (n < SP_UDP_BATCH)
			return;
	}
}

/* sp_udp_reply_batch() - send n replies received on flow f to its client */
static void sp_udp_reply_batch(struct sp_engine *e, struct sp_udp_flow *f, unsigned n)
{
	struct sp_udp_io *io = e->udp->io;
	size_t ctl_len = 0;
	unsigned i, sent;
	uint64_t bytes;

	if (f->dst_kind == SP_UDP_DST_V4) {
		struct cmsghdr *c = &io->sctl.align;

		ctl_len = CMSG_SPACE(sizeof(struct in_pktinfo));
		memset(io->sctl.buf, 0, ctl_len);
		c->cmsg_level = IPPROTO_IP;
		c->cmsg_type = IP_PKTINFO;
		c->cmsg_len = CMSG_LEN(sizeof(struct in_pktinfo));
		memcpy(CMSG_DATA(c), &f->dst.v4, sizeof(f->dst.v4));
	} else if (f->dst_kind == SP_UDP_DST_V6) {
		struct cmsghdr *c = &io->sctl.align;

		ctl_len = CMSG_SPACE(sizeof(struct in6_pktinfo));
		memset(io->sctl.buf, 0, ctl_len);
		c->cmsg_level = IPPROTO_IPV6;
		c->cmsg_type = IPV6_PKTINFO;
		c->cmsg_len = CMSG_LEN(sizeof(struct in6_pktinfo));
		memcpy(CMSG_DATA(c), &f->dst.v6, sizeof(f->dst.v6));
	}
	for (i = 0; i < n; i++) {
		struct msghdr *mh = &io->smsg[i].msg_hdr;

		io->siov[i].iov_base = io->riov[i].iov_base;
		io->siov[i].iov_len = io->rmsg[i].msg_len;
		mh->msg_name = &f->client;
		mh->msg_namelen = f->client_len;
		mh->msg_iov = &io->siov[i];
		mh->msg_iovlen = 1;
		mh->msg_control = ctl_len ? io->sctl.buf : NULL;
		mh->msg_controllen = ctl_len;
		mh->msg_flags = 0;
	}
	bytes = sp_udp_sendmmsg(e, f->ul->fd, io->smsg, n, SP_EV_UDP_REPLY_FAILED,
				f->ul->id, &sent);
	sp_lcount(e, f->ul->id, SP_STAT_UDP_DGRAMS_B2C, sent);
	sp_lcount(e, f->ul->id, SP_STAT_UDP_BYTES_B2C, bytes);
}

/* sp_udp_flow_event() - replies from the backend on one entry's socket:
 * relay them to the client through the listener */
static void sp_udp_flow_event(struct sp_engine *e, union sp_ref ref, uint32_t events)
{
	struct sp_udp_engine *u = e->udp;
	struct sp_udp_flow *f = sp_udp_flow_at(u, ref.index);
	int round, soft = 0;

	(void)events;
	if (!f || f->fd < 0 || !sp_ref_current(ref, f->gen))
		return;   /* freed earlier in this wakeup */

	for (round = 0; round < SP_UDP_ROUNDS; round++) {
		int n;

		sp_udp_prep_recv(u->io, false);
		sp_sys(e, SP_STAT_SYS_RECVMMSG);
		n = recvmmsg(f->fd, u->io->rmsg, SP_UDP_BATCH, MSG_DONTWAIT, NULL);
		if (n == -1) {
			int err = errno;

			if (err == EINTR)
				continue;
			if (err == EAGAIN || err == EWOULDBLOCK)
				return;
			if (err == ENOBUFS || err == ENOMEM) {
				sp_lcount_error(e, f->ul->id, err);
				return;
			}
			if (sp_udp_fatal(err)) {
				sp_lcount_error(e, f->ul->id, err);
				sp_udp_flow_free(e, f);
				return;
			}
			/* ICMP errors (port or host unreachable) reported on
			 * the connected socket: reading consumed the error, the
			 * backend may come back, the entry stays. */
			if (err != ECONNREFUSED)
				sp_lcount_error(e, f->ul->id, err);
			if (++soft > 2)
				return;
			continue;
		}
		if (n == 0)
			return;
		sp_udp_touch(e, f);
		sp_udp_reply_batch(e, f, (unsigned)n);
		if (f->fd < 0 || n < SP_UDP_BATCH)
			return;
	}
}

/* sp_udp_granularity() - slack added to expiry wakeups so staggered
 * deadlines do not each cost a wakeup: timeout/8 within [10 ms, 1 s] */
static int64_t sp_udp_granularity(int64_t timeout)
{
	int64_t g = timeout / 8;

	if (g < 10)
		g = 10;
	if (g > 1000)
		g = 1000;
	return g;
}

/* sp_udp_timer() - expire entries idle in both directions for the timeout;
 * returns ms until the next check, or -1 when there is no entry */
static int64_t sp_udp_timer(struct sp_engine *e)
{
	struct sp_udp_engine *u = e->udp;
	int64_t next = -1;
	int i;

	if (!u)
		return -1;
	for (i = 0; i < u->n_ls; i++) {
		struct sp_udp_listener *ul = u->ls[i];
		int64_t timeout = sp_lopt(e, ul->id, SP_OPT_UDP_TIMEOUT_MS);

		if (timeout <= 0)
			continue;
		/* The LRU tail saw traffic least recently in either
		 * direction, so it is also the first to expire. */
		while (ul->tail && ul->tail->last_ms + timeout <= e->now_ms) {
			sp_udp_flow_free(e, ul->tail);
			sp_lcount(e, ul->id, SP_STAT_UDP_FLOWS_EXPIRED, 1);
		}
		if (ul->tail) {
			int64_t left = ul->tail->last_ms + timeout - e->now_ms +
				       sp_udp_granularity(timeout);

			if (next < 0 || left < next)
				next = left;
		}
	}
	return next;
}

/* sp_udp_io_new() - allocate the batch buffers */
static struct sp_udp_io *sp_udp_io_new(void)
{
	struct sp_udp_io *io = calloc(1, sizeof(*io));

	if (!io)
		return NULL;
	io->data = malloc((size_t)SP_UDP_BATCH * SP_UDP_BUF);
	if (!io->data) {
		free(io);
		return NULL;
	}
	return io;
}

/* sp_udp_init() - per-engine UDP state; buffers wait for the first listener
 * so TCP-only engines do not pay for them */
static int sp_udp_init(struct sp_engine *e)
{
	struct sp_udp_engine *u = calloc(1, sizeof(*u));

	if (!u)
		return -ENOMEM;
	e->udp = u;
	return 0;
}

/* sp_udp_seed() - per-engine hash seed; a weak one if getrandom fails */
static uint64_t sp_udp_seed(struct sp_engine *e)
{
	uint64_t seed;
	ssize_t r;

	do {
		sp_sys(e, SP_STAT_SYS_OTHER);
		r = getrandom(&seed, sizeof(seed), GRND_NONBLOCK);
	} while (r == -1 && errno == EINTR);
	if (r != (ssize_t)sizeof(seed))
		seed = sp_udp_mix((uint64_t)sp_now_ms() ^ (uint64_t)(uintptr_t)e);
	return seed;
}

/* sp_udp_nonblock() - make the listener nonblocking; 0 or -errno */
static int sp_udp_nonblock(struct sp_engine *e, int fd)
{
	int fl, rc;

	sp_sys(e, SP_STAT_SYS_FCNTL);
	fl = fcntl(fd, F_GETFL);
	if (fl == -1)
		return -errno;
	if (fl & O_NONBLOCK)
		return 0;
	sp_sys(e, SP_STAT_SYS_FCNTL);
	rc = fcntl(fd, F_SETFL, fl | O_NONBLOCK);
	if (rc == -1)
		return -errno;
	return 0;
}

/* sp_udp_pktinfo() - ask for the destination address of each datagram.
 *
 * dockerd and sp_open_listener() already did; doing it again is harmless.
 * A socket of another family than the -host-ip one may refuse the option;
 * the reply source is then left to the kernel, as docker-proxy does.
 */
static int sp_udp_pktinfo(struct sp_engine *e, int fd, int family)
{
	int one = 1, rc;

	sp_sys(e, SP_STAT_SYS_SETSOCKOPT);
	if (family == AF_INET6)
		rc = setsockopt(fd, IPPROTO_IPV6, IPV6_RECVPKTINFO, &one, sizeof(one));
	else
		rc = setsockopt(fd, IPPROTO_IP, IP_PKTINFO, &one, sizeof(one));
	if (rc == -1 && (errno == EBADF || errno == ENOTSOCK))
		return -errno;
	return 0;
}

/* sp_udp_listener_init() - set up a bound UDP socket as a listener and add
 * it to the epoll set; the socket itself stays owned by the listener slot */
static int sp_udp_listener_init(struct sp_engine *e, struct sp_listener *l)
{
	struct sp_udp_engine *u = e->udp;
	struct sp_udp_listener *ul;
	int rc;

	if (!u)
		return -EINVAL;
	if (l->backend_len > sizeof(ul->backend) ||
	    (l->backend.ss_family != AF_INET && l->backend.ss_family != AF_INET6))
		return -EAFNOSUPPORT;
	if (!u->io) {
		u->io = sp_udp_io_new();
		if (!u->io)
			return -ENOMEM;
		u->seed = sp_udp_seed(e);
	}
	if (u->n_ls == u->cap_ls) {
		int cap = u->cap_ls ? u->cap_ls * 2 : 4;
		struct sp_udp_listener **ls = realloc(u->ls, cap * sizeof(*ls));

		if (!ls)
			return -ENOMEM;
		u->ls = ls;
		u->cap_ls = cap;
	}

	rc = sp_udp_nonblock(e, l->fd);
	if (rc < 0)
		return rc;
	rc = sp_udp_pktinfo(e, l->fd, l->family);
	if (rc < 0)
		return rc;

	ul = calloc(1, sizeof(*ul));
	if (!ul)
		return -ENOMEM;
	ul->buckets = calloc(SP_UDP_MIN_BUCKETS, sizeof(*ul->buckets));
	if (!ul->buckets) {
		free(ul);
		return -ENOMEM;
	}
	ul->mask = SP_UDP_MIN_BUCKETS - 1;
	ul->sbuckets = calloc(SP_UDP_MIN_BUCKETS, sizeof(*ul->sbuckets));
	if (!ul->sbuckets) {
		free(ul->buckets);
		free(ul);
		return -ENOMEM;
	}
	ul->smask = SP_UDP_MIN_BUCKETS - 1;
	ul->id = l->id;
	ul->fd = l->fd;
	ul->family = l->family;
	memcpy(&ul->backend, &l->backend, l->backend_len);
	ul->backend_len = l->backend_len;

	rc = sp_epoll_add(e, l->fd, EPOLLIN,
			  sp_ref(SP_REF_LISTENER, SP_PROTO_UDP, 0, (uint32_t)l->id, l->gen));
	if (rc < 0) {
		free(ul->sbuckets);
		free(ul->buckets);
		free(ul);
		return rc;
	}
	ul->pos = u->n_ls;
	u->ls[u->n_ls++] = ul;
	l->state = ul;
	return 0;
}

/* sp_udp_listener_drop() - close a listener's flows and free its state */
static void sp_udp_listener_drop(struct sp_engine *e, struct sp_udp_listener *ul)
{
	struct sp_udp_engine *u = e->udp;
	struct sp_udp_listener *last;

	while (ul->tail)
		sp_udp_flow_free(e, ul->tail);
	last = u->ls[--u->n_ls];
	u->ls[ul->pos] = last;
	last->pos = ul->pos;
	free(ul->sbuckets);
	free(ul->buckets);
	free(ul);
}

/* sp_udp_listener_free() - close every entry of a listener (not its socket) */
static void sp_udp_listener_free(struct sp_engine *e, struct sp_listener *l)
{
	if (!l->state || !e->udp)
		return;
	sp_udp_listener_drop(e, l->state);
	l->state = NULL;
}

/* sp_udp_free() - release everything udp.c holds, closing remaining entries */
static void sp_udp_free(struct sp_engine *e)
{
	struct sp_udp_engine *u = e->udp;
	uint32_t i;

	if (!u)
		return;
	while (u->n_ls)
		sp_udp_listener_drop(e, u->ls[u->n_ls - 1]);
	for (i = 0; i < u->n_chunks; i++)
		free(u->chunks[i]);
	free(u->chunks);
	free(u->ls);
	if (u->io)
		free(u->io->data);
	free(u->io);
	free(u);
	e->udp = NULL;
}

const struct sp_proto sp_udp_proto = {
	.name = "udp",
	.id = SP_PROTO_UDP,
	.init = sp_udp_init,
	.free = sp_udp_free,
	.add = sp_udp_listener_init,
	.listener_event = sp_udp_listener_event,
	.flow_event = sp_udp_flow_event,
	.timer = sp_udp_timer,
	.remove = sp_udp_listener_free,
	.listener_free = sp_udp_listener_free,
	.listener_options = SP_OPT_BIT(SP_OPT_UDP_TIMEOUT_MS) | SP_OPT_BIT(SP_OPT_UDP_MAX_FLOWS) |
			    SP_OPT_BIT(SP_OPT_UDP_MAX_FLOWS_PER_ADDR) |
			    SP_OPT_BIT(SP_OPT_TRANSPARENT),
};

/* sp_engine_add_udp() - relay datagrams arriving on a bound socket fd
 * (engine.h); family is the socket's, for the destination cmsg.  The
 * listener id, or -errno */
int sp_engine_add_udp(struct sp_engine *e, int fd, int family, const struct sockaddr *backend,
		      socklen_t backend_len)
{
	if (backend && family != AF_INET && family != AF_INET6)
		return -EAFNOSUPPORT;
	return sp_listener_add(e, &sp_udp_proto, fd, family, backend, backend_len);
}
