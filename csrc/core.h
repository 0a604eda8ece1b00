/* SPDX-License-Identifier: MIT
 *
 * core.h - the engine's ground floor: the engine and listener structures,
 * the epoll reference, counters, error classes, the event ring, epoll
 * helpers, sp_close(), the clock and the counters file.
 *
 * The floors, arrows pointing down only:
 *
 *   loop.c                      create, run, free; dispatch by reference
 *     |   protos.c              the protocol table the loop walks
 *     v
 *   tcp.c  udp.c                protocols (struct sp_proto, proto.h)
 *     |    portreuse.c          TIME_WAIT port reuse (portreuse.h)
 *     |    transparent.c        backend sockets from the client's address
 *     v
 *   mover_splice.c mover_copy.c byte movers (struct sp_mover_ops, mover.h)
 *     |    pipe.c               the pipe pool (pipe.h)
 *     v
 *   core.c listener.c           this header: shared services, listener table
 *
 * Nothing here calls a floor above it except through a table of
 * operations (struct sp_proto) it was handed.
 */
#ifndef SPLICEPROXY_CORE_H
#define SPLICEPROXY_CORE_H

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>
#include <sys/socket.h>

#include "engine.h"

/* What an epoll reference points at. */
enum sp_ref_type {
	SP_REF_NONE = 0,
	SP_REF_CONTROL,   /* the stop eventfd */
	SP_REF_WATCH,     /* the front end's watched fd */
	SP_REF_LISTENER,  /* index: listener id */
	SP_REF_FLOW,      /* index: a slot of the protocol's own table */
};

/* Bits of the generation every slot (listener, connection, UDP entry)
 * carries: a reference whose generation differs from its slot's is stale. */
#define SP_REF_GEN_BITS 24
#define SP_REF_GEN_MASK ((1u << SP_REF_GEN_BITS) - 1)

/*
 * The one type of epoll data, as passt's union epoll_ref: what kind of
 * object, which protocol owns it, which of a flow's two sockets, the slot's
 * generation when it was registered, and the slot.  Every event is checked
 * against its slot with sp_ref_current() before anything is done with it.
 */
union sp_ref {
	struct {
		uint32_t index;                 /* listener id or flow slot */
		uint32_t type : 4;              /* enum sp_ref_type */
		uint32_t proto : 3;             /* enum sp_proto_id */
		uint32_t side : 1;              /* flow: which socket (TCP: 0 client, 1 backend) */
		uint32_t gen : SP_REF_GEN_BITS; /* slot generation */
	};
	uint64_t u64;
};
_Static_assert(sizeof(union sp_ref) == sizeof(uint64_t), "an epoll reference is epoll_data's size");

/**
 * sp_ref() - build an epoll reference
 * @type:  enum sp_ref_type
 * @proto: owning protocol (enum sp_proto_id), 0 for the loop's own
 * @side:  which socket of a flow
 * @index: listener id or flow slot
 * @gen:   the slot's generation now (only its low SP_REF_GEN_BITS are kept)
 */
static inline union sp_ref sp_ref(unsigned type, unsigned proto, unsigned side, uint32_t index,
				  uint32_t gen)
{
	union sp_ref r = { .u64 = 0 };

	r.type = type & 0xf;
	r.proto = proto & 0x7;
	r.side = side & 1;
	r.gen = gen & SP_REF_GEN_MASK;
	r.index = index;
	return r;
}

/**
 * sp_ref_current() - the one stale-event check
 * @r:   reference from an epoll event
 * @gen: generation of the slot it names, now
 *
 * Return: true when the slot still holds what the reference was made for;
 * false when it was freed (and maybe reused) since, earlier in the same
 * wakeup or before.
 */
static inline bool sp_ref_current(union sp_ref r, uint32_t gen)
{
	return r.gen == (gen & SP_REF_GEN_MASK);
}

struct sp_engine;
struct sp_listener;

/*
 * The operations of one protocol, which the loop and the listener table
 * call.  A new protocol (SCTP, say) is a new file defining one of these, an
 * id and a line in protos.c's table (proto.h), and an sp_engine_add_*() of
 * its own that calls sp_listener_add(): the loop does not change.
 */
struct sp_proto {
	const char *name;
	unsigned id;                  /* enum sp_proto_id (proto.h) */
	/* Once per engine, whether or not the protocol is used. */
	int (*init)(struct sp_engine *e);
	void (*free)(struct sp_engine *e);
	/* A listener was added: set up l->state and register l->fd. */
	int (*add)(struct sp_engine *e, struct sp_listener *l);
	void (*listener_event)(struct sp_engine *e, struct sp_listener *l, uint32_t events);
	/* Events of the protocol's own sockets (SP_REF_FLOW references). */
	void (*flow_event)(struct sp_engine *e, union sp_ref ref, uint32_t events);
	/* Deadlines; ms until the next one, or -1. */
	int64_t (*timer)(struct sp_engine *e);
	/* sp_engine_remove(): close everything l owns, free l->state. */
	void (*remove)(struct sp_engine *e, struct sp_listener *l);
	/* Engine teardown: free l->state (flows go with free()). */
	void (*listener_free)(struct sp_engine *e, struct sp_listener *l);
	/* The options (bit 1u << SP_OPT_*) a listener of this protocol may
	 * have of its own (sp_engine_set_listener_option()): those it reads
	 * through sp_lopt().  The rest are the engine's by nature. */
	uint32_t listener_options;
};

_Static_assert(SP_OPT_COUNT <= 32, "every option has a bit in listener_options and opt_own");

/**
 * SP_OPT_BIT() - an option's bit in listener_options and opt_own
 * @o: enum sp_option
 */
#define SP_OPT_BIT(o) (1u << (o))

/* A listener, whatever its protocol: the protocol's own state is behind
 * @state, owned by the protocol (struct sp_proto). */
struct sp_listener {
	int fd;                       /* -1 when the slot is free or removed */
	int family;                   /* listen family (cmsg family for UDP) */
	int id;
	uint32_t gen;                 /* bumped on remove: its stale events are ignored */
	const struct sp_proto *proto; /* NULL while the slot is free */
	void *state;                  /* the protocol's per-listener state */
	struct sockaddr_storage backend;
	socklen_t backend_len;
	bool removed;                 /* sp_engine_remove(): the slot may be reused */
	uint32_t opt_own;             /* bit o: opt[o] overrides the engine's */
	int64_t opt[SP_OPT_COUNT];    /* sp_engine_set_listener_option() */
	uint32_t tp_reported;         /* bit k: SP_EV_TP_* event k emitted (transparent.c) */
	uint64_t stats[SP_STAT_COUNT]; /* this listener's share of the counters
					* (SP_LISTENER_STATS_LIST only) */
};

#define SP_EVENT_RING 256

struct sp_conn_table;  /* tcp.c */
struct sp_udp_engine;  /* udp.c */
struct sp_pipe_pool;   /* pipe.c */

struct sp_engine {
	int epfd;
	int ctlfd;                    /* eventfd: sp_engine_stop() writes it */
	int watchfd;                  /* not owned */
	volatile int stop_requested;

	uint64_t stats[SP_STAT_COUNT];  /* private: decisions read them */
	int stats_fd;                 /* counters file, not owned; -1: none */
	uint64_t stats_sent[SP_STAT_COUNT]; /* values at the last write attempt */
	int64_t stats_next_ms;        /* earliest time of the next write */

	int64_t opt[SP_OPT_COUNT];

	struct sp_prefix *tp_exclude; /* transparent.c */
	int tp_n_exclude;

	struct sp_listener *listeners;
	int n_listeners;
	int cap_listeners;

	struct sp_conn_table *tcp;    /* tcp.c */
	struct sp_udp_engine *udp;    /* udp.c: flow table shared by UDP listeners */
	struct sp_pipe_pool *pipes;   /* pipe.c */

	int64_t now_ms;               /* monotonic, refreshed once per wakeup */

	struct sp_event ring[SP_EVENT_RING];
	unsigned ring_head, ring_len;
};

/**
 * sp_count() - add to a counter (or gauge); the loop thread is the only writer
 * @e: engine
 * @s: counter
 * @n: amount
 */
static inline void sp_count(struct sp_engine *e, enum sp_stat s, uint64_t n)
{
	__atomic_store_n(&e->stats[s], e->stats[s] + n, __ATOMIC_RELAXED);
}

/**
 * sp_gauge_sub() - take from a gauge
 * @e: engine
 * @s: gauge
 * @n: amount
 */
static inline void sp_gauge_sub(struct sp_engine *e, enum sp_stat s, uint64_t n)
{
	__atomic_store_n(&e->stats[s], e->stats[s] - n, __ATOMIC_RELAXED);
}

/**
 * sp_sys() - count one system call of the given kind (also the SYSCALLS total)
 * @e:    engine
 * @kind: SP_STAT_SYS_*
 */
static inline void sp_sys(struct sp_engine *e, enum sp_stat kind)
{
	sp_count(e, SP_STAT_SYSCALLS, 1);
	sp_count(e, kind, 1);
}

/**
 * sp_lstat() - add to listener id's own counter (the engine's totals apart);
 * the loop thread is the only reader and writer
 * @e:  engine
 * @id: listener id, < 0 for none
 * @s:  counter
 * @n:  amount, negative for a gauge going down
 */
static inline void sp_lstat(struct sp_engine *e, int id, enum sp_stat s, int64_t n)
{
	if (id >= 0 && id < e->n_listeners)
		e->listeners[id].stats[s] += (uint64_t)n;
}

/**
 * sp_lopt() - option o as listener id sees it: its own value, else the engine's
 * @e:  engine
 * @id: listener id
 * @o:  enum sp_option
 */
static inline int64_t sp_lopt(const struct sp_engine *e, int id, int o)
{
	if (id >= 0 && id < e->n_listeners && (e->listeners[id].opt_own & SP_OPT_BIT(o)))
		return e->listeners[id].opt[o];
	return e->opt[o];
}

/**
 * sp_lcount() - count for the engine and for listener id
 * @e:  engine
 * @id: listener id
 * @s:  counter
 * @n:  amount
 */
static inline void sp_lcount(struct sp_engine *e, int id, enum sp_stat s, uint64_t n)
{
	sp_count(e, s, n);
	sp_lstat(e, id, s, (int64_t)n);
}

/**
 * sp_lgauge_sub() - take from a gauge of the engine and of listener id
 * @e:  engine
 * @id: listener id
 * @s:  gauge
 * @n:  amount
 */
static inline void sp_lgauge_sub(struct sp_engine *e, int id, enum sp_stat s, uint64_t n)
{
	sp_gauge_sub(e, s, n);
	sp_lstat(e, id, s, -(int64_t)n);
}

/**
 * sp_fd_opened() - note a descriptor the engine now owns (FDS_OPEN gauge)
 * @e: engine
 */
static inline void sp_fd_opened(struct sp_engine *e)
{
	sp_count(e, SP_STAT_FDS_OPEN, 1);
}

/* core.c */
int sp_option_check(int option, int64_t value);
void sp_count_error(struct sp_engine *e, int err);
void sp_lcount_error(struct sp_engine *e, int id, int err);
void sp_emit(struct sp_engine *e, int kind, int err, int listener, uint64_t count);
void sp_events_forget(struct sp_engine *e, int listener);
int sp_epoll_add(struct sp_engine *e, int fd, uint32_t events, union sp_ref ref);
int sp_epoll_mod(struct sp_engine *e, int fd, uint32_t events, union sp_ref ref);
int sp_epoll_del(struct sp_engine *e, int fd);
void sp_close(struct sp_engine *e, int fd);
int64_t sp_now_ms(void);
int64_t sp_now_us(void);
int64_t sp_stats_flush(struct sp_engine *e, bool force);

/* listener.c */
int sp_listener_add(struct sp_engine *e, const struct sp_proto *proto, int fd, int family,
		    const struct sockaddr *backend, socklen_t backend_len);
struct sp_listener *sp_listener_of(struct sp_engine *e, union sp_ref ref);
void sp_listeners_free(struct sp_engine *e);

#endif
