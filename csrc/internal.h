/* SPDX-License-Identifier: MIT
 *
 * internal.h - what the engine's translation units share: the engine and
 * listener structures, epoll tags, counters and the event ring.
 */
#ifndef SPLICEPROXY_INTERNAL_H
#define SPLICEPROXY_INTERNAL_H

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>
#include <sys/socket.h>

#include "engine.h"

/* Epoll data is a tag: type in the top byte, an index below it. */
enum sp_tag_type {
	SP_TAG_CONTROL = 1,   /* the stop eventfd */
	SP_TAG_WATCH,         /* the front end's watched fd */
	SP_TAG_TCP_LISTENER,  /* index: listener id */
	SP_TAG_TCP_CLIENT,    /* index: connection slot, client side */
	SP_TAG_TCP_BACKEND,   /* index: connection slot, backend side */
	SP_TAG_UDP_LISTENER,  /* index: listener id */
	SP_TAG_UDP_FLOW,      /* index: owned by udp.c */
};

static inline uint64_t sp_tag(unsigned type, uint32_t index)
{
	return ((uint64_t)type << 56) | index;
}
static inline unsigned sp_tag_type(uint64_t tag) { return (unsigned)(tag >> 56); }
static inline uint32_t sp_tag_index(uint64_t tag) { return (uint32_t)tag; }

struct sp_udp_listener;   /* defined in udp.c */
struct sp_udp_engine;     /* defined in udp.c */

struct sp_listener {
	int fd;                       /* -1 when the slot is free or removed */
	int type;                     /* SOCK_STREAM or SOCK_DGRAM */
	int family;                   /* listen family (cmsg family for UDP) */
	int id;
	struct sockaddr_storage backend;
	socklen_t backend_len;
	bool paused;                  /* TCP: accept paused after EMFILE */
	bool pause_reported;          /* TCP: "paused" logged, "resumed" not yet */
	int64_t resume_at_ms;
	struct sp_udp_listener *udp;  /* UDP state, owned by udp.c */
	bool removed;                 /* sp_engine_remove(): the slot may be reused */
	uint32_t opt_own;             /* bit o: opt[o] overrides the engine's */
	int64_t opt[SP_OPT_COUNT];    /* sp_engine_set_listener_option() */
	uint64_t stats[SP_STAT_COUNT]; /* this listener's share of the counters
					* (SP_LISTENER_STATS_LIST only) */
};

#define SP_EVENT_RING 256

struct sp_conn_table;  /* defined in tcp.c */
struct sp_pipe_pool;   /* defined in pipe.c */

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

/* Counters: the loop thread is the only writer. */
static inline void sp_count(struct sp_engine *e, enum sp_stat s, uint64_t n)
{
	__atomic_store_n(&e->stats[s], e->stats[s] + n, __ATOMIC_RELAXED);
}
static inline void sp_gauge_sub(struct sp_engine *e, enum sp_stat s, uint64_t n)
{
	__atomic_store_n(&e->stats[s], e->stats[s] - n, __ATOMIC_RELAXED);
}
/* Count one system call of the given kind (also the SYSCALLS total). */
static inline void sp_sys(struct sp_engine *e, enum sp_stat kind)
{
	sp_count(e, SP_STAT_SYSCALLS, 1);
	sp_count(e, kind, 1);
}

/* Classify a per-connection errno into the error counters. */
void sp_count_error(struct sp_engine *e, int err);

/* Counters of listener id alone (the engine's totals are counted apart).
 * The loop thread is the only reader and writer.  id < 0: none. */
static inline void sp_lstat(struct sp_engine *e, int id, enum sp_stat s, int64_t n)
{
	if (id >= 0 && id < e->n_listeners)
		e->listeners[id].stats[s] += (uint64_t)n;
}
/* Option o as listener id sees it: its own value, else the engine's. */
static inline int64_t sp_lopt(const struct sp_engine *e, int id, int o)
{
	if (id >= 0 && id < e->n_listeners && (e->listeners[id].opt_own & (1u << o)))
		return e->listeners[id].opt[o];
	return e->opt[o];
}

/* Count for the engine and for listener id. */
static inline void sp_lcount(struct sp_engine *e, int id, enum sp_stat s, uint64_t n)
{
	sp_count(e, s, n);
	sp_lstat(e, id, s, (int64_t)n);
}
static inline void sp_lgauge_sub(struct sp_engine *e, int id, enum sp_stat s, uint64_t n)
{
	sp_gauge_sub(e, s, n);
	sp_lstat(e, id, s, -(int64_t)n);
}
/* sp_count_error() for the engine and for listener id. */
void sp_lcount_error(struct sp_engine *e, int id, int err);

/* Queue an event for the front end; coalesces with the newest event of the
 * same kind, listener and errno. */
void sp_emit(struct sp_engine *e, int kind, int err, int listener, uint64_t count);

/* epoll helpers (counted).  Return 0 or -errno. */
int sp_epoll_add(struct sp_engine *e, int fd, uint32_t events, uint64_t tag);
int sp_epoll_mod(struct sp_engine *e, int fd, uint32_t events, uint64_t tag);
int sp_epoll_del(struct sp_engine *e, int fd);

/* close(2), counted, with the FDS_OPEN gauge kept.  Ignores fd < 0. */
void sp_close(struct sp_engine *e, int fd);
/* Note a descriptor the engine now owns (FDS_OPEN gauge). */
static inline void sp_fd_opened(struct sp_engine *e) { sp_count(e, SP_STAT_FDS_OPEN, 1); }

int64_t sp_now_ms(void);

/* Write the counters file if it is due and counters changed; returns ms
 * until a write is due, or -1 when none is pending (loop.c). */
int64_t sp_stats_flush(struct sp_engine *e, bool force);

/* tcp.c */
int sp_tcp_init(struct sp_engine *e);
void sp_tcp_free(struct sp_engine *e);
void sp_tcp_listener_event(struct sp_engine *e, struct sp_listener *l, uint32_t events);
/* Connection events (tag types SP_TAG_TCP_CLIENT/BACKEND); stale tags are ignored. */
void sp_tcp_dispatch(struct sp_engine *e, uint64_t tag, uint32_t events);
/* Socket options and O_NONBLOCK for a listener; accepted sockets inherit them. */
void sp_tcp_listener_setup(struct sp_engine *e, int fd);
/* Close every connection of listener l (reset: the mapping is gone) and
 * forget its paused state and backend port pool. */
void sp_tcp_listener_remove(struct sp_engine *e, struct sp_listener *l);
/* Timers (accept resume, idle reclaim); returns ms until the next deadline, or -1. */
int64_t sp_tcp_timer(struct sp_engine *e);

/* pipe.c: pool of kernel pipes used for splice relaying. */
struct sp_pipe {
	int rd, wr;
	size_t cap;  /* bytes it holds (its F_SETPIPE_SZ size) */
};
int sp_pipes_init(struct sp_engine *e);
void sp_pipes_free(struct sp_engine *e);
/* Take a pipe from the pool (or create one); 0 or -errno. */
int sp_pipe_get(struct sp_engine *e, struct sp_pipe *p);
/* Return an empty pipe to the pool (or close it if the pool is full). */
void sp_pipe_put(struct sp_engine *e, struct sp_pipe *p);
/* SP_OPT_PIPE_SIZE changed (before serving): size pipes anew. */
void sp_pipes_resize(struct sp_engine *e);
/* Close a pipe that may still hold data. */
void sp_pipe_drop(struct sp_engine *e, struct sp_pipe *p);

/* udp.c (udp_init/free run once per engine, whether or not UDP is used) */
int sp_udp_init(struct sp_engine *e);
void sp_udp_free(struct sp_engine *e);
int sp_udp_listener_init(struct sp_engine *e, struct sp_listener *l);
void sp_udp_listener_free(struct sp_engine *e, struct sp_listener *l);
void sp_udp_listener_event(struct sp_engine *e, struct sp_listener *l, uint32_t events);
void sp_udp_flow_event(struct sp_engine *e, uint32_t idx, uint32_t events);
/* Expiry; returns ms until the next deadline, or -1 when no flow exists. */
int64_t sp_udp_timer(struct sp_engine *e);

#endif
