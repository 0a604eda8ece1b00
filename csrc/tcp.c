/* SPDX-License-Identifier: MIT
 *
 * tcp.c - the TCP relay's connection state machine: accept, nonblocking
 * backend connect, FIN and RST in each direction, half-close, delivering
 * what a broken side sent before passing its reset on, reclaiming idle and
 * abandoned pairs, and connections starved of pipes.  How bytes move is the
 * connection's mover's (mover.h: splice through a pooled pipe, or
 * read/write); backend ports in TIME_WAIT are reused by portreuse.c.
 *
 * A listener may have its own copy mode, buffer and pipe size, idle and
 * connect timeouts (listener_options below): each is read through sp_lopt()
 * where the engine's would be, the mover and sizes once, when a connection
 * is accepted, so that a connection keeps what it started with.
 *
 * Both sockets of a connection are registered once, edge-triggered, for
 * input and output; the events only set readiness hints and the pump finds
 * out the truth from the system calls.  Nothing is read from a side unless
 * the pipe of that direction has room, so a slow peer holds at most one pipe
 * of data per direction (backpressure through the kernel's own windows).
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
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <linux/sockios.h>

#include "mover.h"
#include "portreuse.h"
#include "proto.h"
#include "transparent.h"

#define CONN_CHUNK 1024          /* connections per allocation chunk */
#define ACCEPT_BATCH 64          /* accepts per listener wakeup (fairness) */
#define KEEPALIVE_S 15           /* Go's default keepalive idle and interval; the
				  * probe count is left at the kernel's default (9,
				  * which is also Go's) */
/* Descriptors kept free for the front end and for a new connection's
 * backend socket and pipes: accepting pauses when fewer remain. */
#define FD_HEADROOM 16
#define SOCK_EVENTS (EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET)
/* A side reset with data the proxy already acknowledged: the other side gets
 * that data, then the reset, if it takes the data within this long. */
#define RESET_LINGER_MS 5000
#define DRAIN_POLL_MS 5          /* checking that the survivor's peer has it all */

enum conn_state { CONN_FREE = 0, CONN_CONNECTING, CONN_OPEN };

/* The two sides of a connection, as indexes (sidei): side[SIDE_CLIENT] is
 * the accepted socket, side[SIDE_BACKEND] the one we connect; dir[sidei]
 * carries the bytes read from side sidei to the other side. */
enum { SIDE_CLIENT = 0, SIDE_BACKEND = 1, SIDES = 2 };

/* One socket of a connection and its readiness hints from edge-triggered
 * events. */
struct sp_side {
	int fd;
	bool rd, wr;
};

struct sp_conn {
	struct sp_side side[SIDES];
	struct sp_dir dir[SIDES];  /* dir[sidei]: from side sidei to the other */
	const struct sp_mover_ops *mover; /* its listener's SP_OPT_COPY_MODE at accept */
	uint32_t gen;          /* slot generation, checked against epoll references */
	uint32_t next;         /* free list / half-closed list links */
	uint32_t prev;
	int listener;
	uint8_t state;
	bool in_halfclosed;
	bool want_pipe;        /* a pump found no pipe to be had */
	bool fin_first;        /* we sent the backend FIN before it sent one:
				* our backend socket ends in TIME_WAIT */
	uint16_t bport;        /* backend local port (network order) if we chose it */
	bool starved;          /* queued on the starved list for a retry */
	bool broken;           /* broken_side failed: the other side gets what
				* was received from it first */
	uint8_t broken_side;
	bool draining;         /* all of it written: waiting for the peer's ACKs */
	int64_t linger_until;  /* broken: reset anyway at this time */
	int64_t last_ms;       /* last progress, for the idle reclaim */
};

#define NIL UINT32_MAX

/* The bytes counter of each direction. */
static const enum sp_stat dir_bytes[SIDES] = {
	[SIDE_CLIENT] = SP_STAT_BYTES_C2B,
	[SIDE_BACKEND] = SP_STAT_BYTES_B2C,
};

/**
 * otheri() - the index of the other side
 * @sidei: SIDE_CLIENT or SIDE_BACKEND
 */
static inline unsigned otheri(unsigned sidei)
{
	return !sidei;
}

/* A TCP listener's own state (l->state). */
struct sp_tcp_listener {
	bool paused;                  /* accept paused after EMFILE */
	bool for_room;                /* paused for lack of descriptors, which a
				       * reclaimable pair makes up for */
	bool pause_reported;          /* "paused" logged, "resumed" not yet */
	int64_t resume_at_ms;
};

/**
 * tl() - the TCP state of listener l
 * @l: a TCP listener
 */
static inline struct sp_tcp_listener *tl(const struct sp_listener *l)
{
	return l->state;
}

/* A slot and the generation it had: stale once the slot is recycled. */
struct conn_ref {
	uint32_t idx, gen;
};

/* Backend connects of one timeout value, oldest first.  Connects start in
 * time order, so with one value per FIFO each FIFO is in deadline order and
 * only its head is looked at; listeners may each have their own value
 * (SP_OPT_CONNECT_TIMEOUT_MS), but a handful of distinct values is usual. */
struct connect_queue {
	int64_t timeout;
	struct conn_ref *ring;
	uint32_t head, len, cap;
};

struct sp_conn_table {
	struct sp_conn **chunks;
	uint32_t n_chunks;
	uint32_t free_head;
	uint32_t half_head;     /* half-closed connections, for the idle reclaim
				 * and to make room for new clients */
	uint32_t n_half;
	int64_t next_idle_scan; /* -1: no half-closed pair has a timeout */
	struct connect_queue *cq;     /* backend connects, by their timeout */
	uint32_t n_cq;
	uint32_t n_connecting;        /* entries in all of them */
	struct conn_ref *dying;       /* broken connections delivering what is left */
	uint32_t n_dying, cap_dying;
	int paused_listeners;
	struct sp_ports ports;  /* per listener id: backend ports in TIME_WAIT */
	uint32_t *starved;      /* connections waiting for a pipe */
	uint32_t n_starved, cap_starved;
	int64_t starved_retry_ms;
};

/**
 * conn_at() - slot to connection
 * @t:   the table
 * @idx: slot
 *
 * Return: the connection, or NULL out of range
 */
static struct sp_conn *conn_at(struct sp_conn_table *t, uint32_t idx)
{
	uint32_t chunk = idx / CONN_CHUNK;

	if (chunk >= t->n_chunks)
		return NULL;
	return &t->chunks[chunk][idx % CONN_CHUNK];
}

/**
 * sock_ref() - the epoll reference of one socket of connection idx
 * @idx:   slot
 * @gen:   its generation
 * @sidei: which socket
 */
static union sp_ref sock_ref(uint32_t idx, uint32_t gen, unsigned sidei)
{
	return sp_ref(SP_REF_FLOW, SP_PROTO_TCP, sidei, idx, gen);
}

/**
 * listener_ref() - the epoll reference of a TCP listener
 * @l: listener
 */
static union sp_ref listener_ref(const struct sp_listener *l)
{
	return sp_ref(SP_REF_LISTENER, SP_PROTO_TCP, 0, (uint32_t)l->id, l->gen);
}

/**
 * tcp_init() - the connection table, once per engine
 * @e: engine
 *
 * Return: 0 or -ENOMEM
 */
static int tcp_init(struct sp_engine *e)
{
	struct sp_conn_table *t = calloc(1, sizeof(*t));

	if (!t)
		return -ENOMEM;
	t->free_head = NIL;
	t->half_head = NIL;
	t->next_idle_scan = -1;
	e->tcp = t;
	return 0;
}

/**
 * table_grow() - add a chunk of slots to the free list
 *
 * Grow the table by one chunk, threading its slots onto the free list.
 */
static int table_grow(struct sp_conn_table *t)
{
	struct sp_conn **chunks;
	struct sp_conn *c;
	uint32_t base, i;

	if (t->n_chunks >= (NIL / CONN_CHUNK) - 1)
		return -ENOMEM;
	chunks = realloc(t->chunks, sizeof(*chunks) * (t->n_chunks + 1));
	if (!chunks)
		return -ENOMEM;
	t->chunks = chunks;
	c = calloc(CONN_CHUNK, sizeof(*c));
	if (!c)
		return -ENOMEM;
	base = t->n_chunks * CONN_CHUNK;
	t->chunks[t->n_chunks++] = c;
	for (i = CONN_CHUNK; i-- > 0;) {
		c[i].side[SIDE_CLIENT].fd = c[i].side[SIDE_BACKEND].fd = -1;
		c[i].next = t->free_head;
		t->free_head = base + i;
	}
	return 0;
}

/**
 * dir_gave_back() - a direction gave back its pipe or buffer: a connection
 * starved of one can have it
 * @e: engine
 */
static void dir_gave_back(struct sp_engine *e)
{
	if (e->tcp->n_starved)
		e->tcp->starved_retry_ms = e->now_ms;
}

/**
 * halfclosed_unlink() - take a connection off the half-closed list
 * @t: the table
 * @c: connection
 */
static void halfclosed_unlink(struct sp_conn_table *t, struct sp_conn *c)
{
	struct sp_conn *n;

	if (!c->in_halfclosed)
		return;
	if (c->prev != NIL)
		conn_at(t, c->prev)->next = c->next;
	else
		t->half_head = c->next;
	if (c->next != NIL) {
		n = conn_at(t, c->next);
		n->prev = c->prev;
	}
	c->in_halfclosed = false;
	t->n_half--;
}

/**
 * idle_step() - how often half-closed pairs with this idle timeout are looked at
 * @timeout: ms, > 0
 *
 * A quarter of it, between 10 ms and a second: a pair is reclaimed at most
 * that late.
 */
static int64_t idle_step(int64_t timeout)
{
	int64_t step = timeout / 4;

	if (step < 10)
		step = 10;
	if (step > 1000)
		step = 1000;
	return step;
}

static void resume_listeners(struct sp_engine *e, bool reclaimable);

/**
 * halfclosed_link() - put a connection on the half-closed list, newest first
 * @e:   engine
 * @c:   connection
 * @idx: its slot
 *
 * The idle scan is brought forward to this pair's step when its listener's
 * timeout is shorter than those of the pairs already listed.  A listener
 * paused for lack of descriptors accepts again: this pair can make room.
 */
static void halfclosed_link(struct sp_engine *e, struct sp_conn *c, uint32_t idx)
{
	struct sp_conn_table *t = e->tcp;
	int64_t timeout;

	if (c->in_halfclosed)
		return;
	timeout = sp_lopt(e, c->listener, SP_OPT_IDLE_TIMEOUT_MS);
	if (timeout > 0) {
		int64_t due = e->now_ms + idle_step(timeout);

		if (t->next_idle_scan < 0 || due < t->next_idle_scan)
			t->next_idle_scan = due;
	}
	c->prev = NIL;
	c->next = t->half_head;
	if (t->half_head != NIL)
		conn_at(t, t->half_head)->prev = idx;
	t->half_head = idx;
	c->in_halfclosed = true;
	t->n_half++;
	if (t->paused_listeners)
		resume_listeners(e, true);
}

/**
 * set_abortive() - make close() send a reset instead of a FIN
 */
static void set_abortive(struct sp_engine *e, int fd)
{
	struct linger lg = { .l_onoff = 1, .l_linger = 0 };

	sp_sys(e, SP_STAT_SYS_SETSOCKOPT);
	setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
}

/**
 * fd_room() - whether there are descriptors to spare for one more connection
 */
static bool fd_room(struct sp_engine *e)
{
	return e->opt[SP_OPT_FD_LIMIT] <= 0 ||
	       (int64_t)e->stats[SP_STAT_FDS_OPEN] + FD_HEADROOM < e->opt[SP_OPT_FD_LIMIT];
}

/**
 * resume_listener() - listen on l again
 *
 * Listen on l again.  "Resumed" is logged only once the backlog has
 * drained, so a limit that is still being hit logs one line, not pairs.
 */
static void resume_listener(struct sp_engine *e, struct sp_listener *l)
{
	if (sp_epoll_mod(e, l->fd, EPOLLIN, listener_ref(l)) == 0) {
		tl(l)->paused = false;
		e->tcp->paused_listeners--;
	}
}

/**
 * resume_listeners() - resume the listeners a shortage paused, now that it may be over
 * @e:           engine
 * @reclaimable: a half-closed pair turned reclaimable (else descriptors were freed)
 *
 * With descriptors to spare every paused listener resumes.  Without, a
 * listener paused for lack of descriptors still resumes when a pair turned
 * reclaimable: accepting makes its room from that pair.  It must not wait
 * for a descriptor to be freed, or for its backoff: a pair turns
 * half-closed when its client's FIN is read, which frees nothing, and
 * before, a burst of clients that filled the descriptors fully open and
 * sent their FINs later kept accepting paused until the idle timeout, with
 * the backlog (and every new client in it) waiting behind them.
 */
static void resume_listeners(struct sp_engine *e, bool reclaimable)
{
	bool room = fd_room(e);
	int i;

	if (!room && !(reclaimable && e->tcp->half_head != NIL))
		return;
	for (i = 0; i < e->n_listeners; i++) {
		struct sp_listener *l = &e->listeners[i];

		if (l->proto == &sp_tcp_proto && l->state && tl(l)->paused && l->fd >= 0 &&
		    (room || tl(l)->for_room))
			resume_listener(e, l);
	}
}

/**
 * conn_close() - close a connection and free its slot
 * @e:     engine
 * @idx:   slot
 * @c:     connection
 * @reset: both sides get RST instead of FIN
 */
static void conn_close(struct sp_engine *e, uint32_t idx, struct sp_conn *c, bool reset)
{
	struct sp_conn_table *t = e->tcp;
	int bfd = c->side[SIDE_BACKEND].fd;
	unsigned sidei;

	if (reset) {
		for (sidei = 0; sidei < SIDES; sidei++)
			if (c->side[sidei].fd >= 0)
				set_abortive(e, c->side[sidei].fd);
	} else if (c->fin_first && bfd >= 0) {
		sp_ports_keep(e, &t->ports, c->listener, bfd, c->bport);
	}
	for (sidei = 0; sidei < SIDES; sidei++) {
		/* close() removes the descriptors from the epoll set. */
		sp_close(e, c->side[sidei].fd);
		c->side[sidei].fd = -1;
		c->mover->release(e, &c->dir[sidei]);
	}
	halfclosed_unlink(t, c);
	c->starved = c->want_pipe = c->fin_first = c->draining = false;
	c->broken = false;
	c->state = CONN_FREE;
	c->gen++;
	c->next = t->free_head;
	t->free_head = idx;
	sp_lgauge_sub(e, c->listener, SP_STAT_TCP_ACTIVE, 1);
	sp_lcount(e, c->listener, SP_STAT_TCP_CLOSED, 1);
	if (t->paused_listeners)
		resume_listeners(e, false);
	if (t->n_starved)
		t->starved_retry_ms = e->now_ms;  /* descriptors were freed: retry now */
}

#define RECLAIM_BATCH 8

/**
 * reclaim_for_room() - reset abandoned half-closed pairs to make room for new clients
 *
 * Make room for a new client by resetting the half-closed pairs that went
 * longest without progress.  A peer that half-closes and never finishes
 * costs two descriptors for as long as the other side keeps its half open;
 * without this, 1,500 such pairs at RLIMIT_NOFILE 1024 kept every new
 * client waiting in the backlog until the idle timeout.  A pair a peer
 * abandoned is worth less than a client that has not been served at all
 * (conntrack drops its oldest entries under pressure in the same spirit).
 * Fully open pairs are never taken.  force reclaims one pair even when the
 * descriptor count looks fine (EMFILE from a limit we do not know).
 * Returns how many pairs were reset.
 */
static uint64_t reclaim_for_room(struct sp_engine *e, bool force)
{
	struct sp_conn_table *t = e->tcp;
	uint64_t n = 0;

	while ((force || !fd_room(e)) && t->half_head != NIL) {
		uint32_t best[RECLAIM_BATCH], idx, i, k = 0;

		/* One pass collects the (up to) RECLAIM_BATCH oldest, oldest
		 * first; ties go to the pair linked earlier (further down). */
		for (idx = t->half_head; idx != NIL; idx = conn_at(t, idx)->next) {
			int64_t last = conn_at(t, idx)->last_ms;

			for (i = k; i > 0 && conn_at(t, best[i - 1])->last_ms >= last; i--)
				if (i < RECLAIM_BATCH)
					best[i] = best[i - 1];
			if (i < RECLAIM_BATCH) {
				best[i] = idx;
				if (k < RECLAIM_BATCH)
					k++;
			}
		}
		for (i = 0; i < k && (force || !fd_room(e)); i++) {
			struct sp_conn *c = conn_at(t, best[i]);

			sp_lstat(e, c->listener, SP_STAT_HEADROOM_RECLAIMED, 1);
			conn_close(e, best[i], c, true);
			force = false;
			n++;
		}
	}
	if (n) {
		sp_count(e, SP_STAT_HEADROOM_RECLAIMED, n);
		sp_emit(e, SP_EV_HEADROOM_RECLAIMED, 0, -1, n);
	}
	return n;
}

/**
 * set_sockopts() - no Nagle, and Go's keepalive settings, as docker-proxy's
 * @e:  engine
 * @fd: socket
 */
static void set_sockopts(struct sp_engine *e, int fd)
{
	int one = 1, idle = KEEPALIVE_S;

	sp_sys(e, SP_STAT_SYS_SETSOCKOPT);
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	sp_sys(e, SP_STAT_SYS_SETSOCKOPT);
	setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
	sp_sys(e, SP_STAT_SYS_SETSOCKOPT);
	setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
	sp_sys(e, SP_STAT_SYS_SETSOCKOPT);
	setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &idle, sizeof(idle));
}

/**
 * listener_setup() - socket options and O_NONBLOCK for a listener
 * @e:  engine
 * @fd: listening socket
 *
 * Options set on a listener are inherited by every accepted socket, which
 * saves five system calls per connection on the client side.
 */
static void listener_setup(struct sp_engine *e, int fd)
{
	int fl;

	set_sockopts(e, fd);
	sp_sys(e, SP_STAT_SYS_FCNTL);
	fl = fcntl(fd, F_GETFL);
	if (fl != -1 && !(fl & O_NONBLOCK)) {
		sp_sys(e, SP_STAT_SYS_FCNTL);
		fcntl(fd, F_SETFL, fl | O_NONBLOCK);
	}
}

/**
 * dir_idle() - an empty direction holds nothing: give back its pipe or buffer
 * @e: engine
 * @m: the connection's mover
 * @d: direction
 */
static void dir_idle(struct sp_engine *e, const struct sp_mover_ops *m, struct sp_dir *d)
{
	if (d->queued || !m->holds(d))
		return;
	m->idle(e, d);
	dir_gave_back(e);
}

/**
 * dir_pump() - move as much as possible in one direction
 * @e:          engine
 * @c:          connection
 * @sidei:      the side the direction reads from (dir[sidei])
 * @draining:   that side has failed: whatever it still yields is delivered,
 *              its errors and EOF end the direction, and no FIN is passed on
 * @dst_failed: set to which side an error came from (true: the destination)
 *
 * Return: 0, or -errno when the connection is broken
 */
static int dir_pump(struct sp_engine *e, struct sp_conn *c, unsigned sidei, bool draining,
		    bool *dst_failed)
{
	const struct sp_mover_ops *m = c->mover;
	struct sp_dir *d = &c->dir[sidei];
	struct sp_side *src = &c->side[sidei], *dst = &c->side[otheri(sidei)];
	bool progress = true;

	*dst_failed = true;
	while (progress) {
		progress = false;
		if (d->queued && dst->wr) {
			size_t before = d->queued;
			ssize_t n = m->flush(e, d, dst->fd);

			if (n == -EAGAIN) {
				dst->wr = false;
			} else if (n < 0) {
				return (int)n;
			} else {
				if (!d->queued)
					dir_gave_back(e);
				sp_lcount(e, c->listener, dir_bytes[sidei], (uint64_t)n);
				c->last_ms = e->now_ms;
				if ((size_t)n < before && d->queued)
					dst->wr = false;   /* socket buffer full */
				else
					progress = true;
			}
		}
		if (d->eof) {
			if (!d->queued && !d->shut && !draining) {
				sp_sys(e, SP_STAT_SYS_SHUTDOWN);
				if (shutdown(dst->fd, SHUT_WR) == -1 && errno != ENOTCONN)
					return -errno;
				d->shut = true;
				if (sidei == SIDE_CLIENT && !c->dir[SIDE_BACKEND].eof)
					c->fin_first = true;
			}
			break;
		}
		if (src->rd && m->room(d)) {
			ssize_t n = m->fill(e, d, src->fd);

			if (n == -EMFILE || n == -ENFILE || n == -ENOMEM) {
				/* No pipe to be had: leave the bytes in the socket,
				 * where TCP holds the sender back, and retry once
				 * descriptors are freed. */
				c->want_pipe = true;
				sp_lcount_error(e, c->listener, (int)-n);
				break;
			} else if (n == -EAGAIN) {
				if (d->queued && m->eagain_when_full) {
					/* EAGAIN with a non-empty pipe means the pipe is
					 * full as often as the socket is drained: only an
					 * empty pipe tells them apart, so read again once
					 * the write half has made room.  Taking it for
					 * drained could leave bytes in a socket whose
					 * sender waits for window: no edge would come. */
					break;
				}
				src->rd = false;
				dir_idle(e, m, d);
			} else if (n < 0 && !draining) {
				*dst_failed = false;
				return (int)n;
			} else if (n <= 0) {
				/* EOF, or (draining) the error after the data the
				 * broken side had queued. */
				d->eof = true;
				src->rd = false;
				dir_idle(e, m, d);
				progress = true;   /* pass the EOF on */
			} else {
				d->queued += (size_t)n;
				c->last_ms = e->now_ms;
				progress = true;
				/* A short read usually means the socket is drained, but
				 * it can also mean the pipe ran out of slots; the next
				 * round finds out (EAGAIN) once the pipe has room. */
			}
		}
	}
	return 0;
}

/**
 * conn_reset() - reset both sides, as the NAT path would pass a reset on
 */
static void conn_reset(struct sp_engine *e, uint32_t idx, struct sp_conn *c)
{
	sp_lcount(e, c->listener, SP_STAT_TCP_RESETS, 1);
	conn_close(e, idx, c, true);
}

/**
 * conn_abort() - count the error and reset both sides
 *
 * Both sides broken, or the survivor of one would not take its data: reset.
 */
static void conn_abort(struct sp_engine *e, uint32_t idx, struct sp_conn *c, int err)
{
	sp_lcount_error(e, c->listener, err);
	conn_reset(e, idx, c);
}

/**
 * starve() - queue a connection that could not get a pipe for a later retry
 */
static void starve(struct sp_engine *e, uint32_t idx)
{
	struct sp_conn_table *t = e->tcp;

	if (t->n_starved == t->cap_starved) {
		uint32_t cap = t->cap_starved ? t->cap_starved * 2 : 64;
		uint32_t *n = realloc(t->starved, sizeof(*n) * cap);

		if (!n) {
			/* Retried on the connection's next event instead. */
			conn_at(t, idx)->starved = false;
			return;
		}
		t->starved = n;
		t->cap_starved = cap;
	}
	t->starved[t->n_starved++] = idx;
	if (t->n_starved == 1)
		t->starved_retry_ms = e->now_ms + e->opt[SP_OPT_ACCEPT_BACKOFF_MS];
}

static void conn_pump(struct sp_engine *e, uint32_t idx, struct sp_conn *c);

/**
 * feed_starved() - retry the connections starved of pipes
 *
 * Retry connections that were starved of pipes (descriptors were freed, or
 * the backoff elapsed).  Entries whose slot was recycled are skipped.
 */
static void feed_starved(struct sp_engine *e)
{
	struct sp_conn_table *t = e->tcp;
	uint32_t n = t->n_starved, i;
	uint32_t *list = t->starved;

	t->starved = NULL;
	t->n_starved = t->cap_starved = 0;
	for (i = 0; i < n; i++) {
		struct sp_conn *c = conn_at(t, list[i]);

		if (c->state != CONN_OPEN || !c->starved)
			continue;
		c->starved = false;
		conn_pump(e, list[i], c);
	}
	free(list);
}

/**
 * sock_outq() - bytes the kernel still holds for the peer of fd
 *
 * Bytes the kernel still holds for the peer of fd (unsent or unacknowledged),
 * or -1 when it cannot say.
 */
static int sock_outq(struct sp_engine *e, int fd)
{
	int n;

	sp_sys(e, SP_STAT_SYS_OTHER);
	if (ioctl(fd, SIOCOUTQ, &n) == -1)
		return -1;
	return n;
}

/**
 * conn_drain() - a broken connection delivering what it holds
 *
 * A broken connection delivering what it holds.  The broken side's receive
 * queue (Linux returns queued data before the error) and the pipe go to the
 * survivor; once the survivor's peer acknowledged all of it, both sides are
 * reset: a reset sent earlier would make the survivor's kernel throw away
 * what it had not sent yet.  The timer resets the pair anyway at
 * linger_until, when the survivor's peer does not take the data.
 */
static void conn_drain(struct sp_engine *e, uint32_t idx, struct sp_conn *c)
{
	unsigned sidei = c->broken_side;
	struct sp_dir *d = &c->dir[sidei];
	int dst = c->side[otheri(sidei)].fd;
	bool dst_failed;
	int rc, outq;

	if (!d->eof)
		c->side[sidei].rd = true;  /* it will not signal again: read it to the end */
	rc = dir_pump(e, c, sidei, true, &dst_failed);
	if (rc < 0) {
		conn_abort(e, idx, c, -rc);
		return;
	}
	if (c->want_pipe) {
		c->want_pipe = false;
		if (!c->starved) {
			c->starved = true;
			starve(e, idx);
		}
	}
	if (!d->eof || d->queued)
		return;
	outq = sock_outq(e, dst);
	if (outq <= 0) {
		conn_reset(e, idx, c);
		return;
	}
	c->draining = true;   /* the timer looks again */
}

/**
 * dying_push() - note a broken connection for the timer
 *
 * Note a connection to finish draining (or to reset at its deadline);
 * false without memory.
 */
static bool dying_push(struct sp_engine *e, uint32_t idx, uint32_t gen)
{
	struct sp_conn_table *t = e->tcp;

	if (t->n_dying == t->cap_dying) {
		uint32_t cap = t->cap_dying ? t->cap_dying * 2 : 16;
		struct conn_ref *n = realloc(t->dying, sizeof(*n) * cap);

		if (!n)
			return false;
		t->dying = n;
		t->cap_dying = cap;
	}
	t->dying[t->n_dying++] = (struct conn_ref){ .idx = idx, .gen = gen };
	return true;
}

/**
 * conn_fail() - one side failed: deliver what it sent, then pass the reset on
 *
 * One side failed (err).  What the proxy already received from it is
 * delivered to the other side before the reset is passed on, as the
 * kernel's own path would have delivered it: before, uploads that ended
 * in a reset lost what the proxy held (12 of 20 stopped at about 128 KB,
 * 0 of 20 direct).  The other direction cannot be delivered any more and is
 * dropped.  A second failure, or nothing left to deliver, resets at once.
 */
static void conn_fail(struct sp_engine *e, uint32_t idx, struct sp_conn *c, unsigned sidei,
		      int err)
{
	struct sp_dir *d = &c->dir[sidei];
	struct sp_dir *back = &c->dir[otheri(sidei)];

	if (c->broken && c->broken_side == sidei) {
		conn_drain(e, idx, c);  /* the same side again: still delivering */
		return;
	}
	/* Without a deadline a draining pair could wait for good. */
	if (c->broken || c->state != CONN_OPEN || d->shut || !dying_push(e, idx, c->gen)) {
		conn_abort(e, idx, c, err);
		return;
	}
	sp_lcount_error(e, c->listener, err);
	c->broken = true;
	c->broken_side = (uint8_t)sidei;
	c->linger_until = e->now_ms + RESET_LINGER_MS;
	c->mover->release(e, back);
	back->eof = back->shut = true;
	halfclosed_unlink(e->tcp, c);
	c->side[otheri(sidei)].wr = true;
	conn_drain(e, idx, c);
}

/**
 * dying_timer() - finish or reset the broken connections
 *
 * Broken connections: finish those whose data was taken, reset those past
 * their deadline; ms until the next look, or -1 when none is left.
 */
static int64_t dying_timer(struct sp_engine *e)
{
	struct sp_conn_table *t = e->tcp;
	int64_t next = -1;
	uint32_t i, kept = 0;

	for (i = 0; i < t->n_dying; i++) {
		struct conn_ref r = t->dying[i];
		struct sp_conn *c = conn_at(t, r.idx);
		int64_t left;

		if (c->gen != r.gen || c->state != CONN_OPEN || !c->broken)
			continue;
		if (e->now_ms >= c->linger_until) {
			/* The survivor's peer did not take the data in time. */
			sp_count(e, SP_STAT_ERR_OTHER, 1);
			conn_reset(e, r.idx, c);
			continue;
		}
		if (c->draining) {
			int outq = sock_outq(e, c->side[otheri(c->broken_side)].fd);

			if (outq <= 0) {
				conn_reset(e, r.idx, c);
				continue;
			}
			left = DRAIN_POLL_MS;
		} else {
			left = c->linger_until - e->now_ms;
		}
		if (next < 0 || left < next)
			next = left;
		t->dying[kept++] = r;
	}
	t->n_dying = kept;
	return next;
}

/**
 * conn_pump() - run both pumps; close the connection when done or broken
 */
static void conn_pump(struct sp_engine *e, uint32_t idx, struct sp_conn *c)
{
	bool dst_failed;
	unsigned sidei;
	int rc;

	if (c->broken) {
		conn_drain(e, idx, c);
		return;
	}
	for (sidei = 0; sidei < SIDES; sidei++) {
		rc = dir_pump(e, c, sidei, false, &dst_failed);
		if (rc < 0) {
			conn_fail(e, idx, c, dst_failed ? otheri(sidei) : sidei, -rc);
			return;
		}
	}
	if (c->dir[SIDE_CLIENT].shut && c->dir[SIDE_BACKEND].shut) {
		conn_close(e, idx, c, false);
		return;
	}
	if (c->want_pipe) {
		c->want_pipe = false;
		if (!c->starved) {
			c->starved = true;
			starve(e, idx);
		}
	}
	/* Tracked even without an idle timeout: they are also what is
	 * reclaimed first when descriptors run short. */
	if (c->dir[SIDE_CLIENT].eof || c->dir[SIDE_BACKEND].eof)
		halfclosed_link(e, c, idx);
}

/**
 * pause_listener() - pause accepting on l for lack of descriptors (or memory)
 */
static void pause_listener(struct sp_engine *e, struct sp_listener *l, int err)
{
	struct sp_tcp_listener *tls = tl(l);

	if (tls->paused)
		return;
	if (sp_epoll_mod(e, l->fd, 0, listener_ref(l)) < 0)
		return;
	tls->paused = true;
	tls->for_room = err == EMFILE || err == ENFILE;
	tls->resume_at_ms = e->now_ms + e->opt[SP_OPT_ACCEPT_BACKOFF_MS];
	e->tcp->paused_listeners++;
	sp_lcount(e, l->id, SP_STAT_ACCEPT_PAUSES, 1);
	if (!tls->pause_reported) {
		tls->pause_reported = true;
		sp_emit(e, SP_EV_ACCEPT_PAUSED, err, l->id, 1);
	}
}

/**
 * backend_socket() - a nonblocking backend socket, connect() started
 * @e:           engine
 * @l:           listener
 * @connect_err: set to connect()'s errno when the socket was made but
 *               connect() failed at once, else 0
 * @bound_port:  set to the reused TIME_WAIT port bound, or 0
 * @client:      the client's address, to bind the socket to
 *               (SP_OPT_TRANSPARENT, transparent.c), or NULL
 * @client_len:  its length
 *
 * Return: the socket (connect in progress or done), or -errno
 */
static int backend_socket(struct sp_engine *e, struct sp_listener *l, int *connect_err,
			  uint16_t *bound_port, const struct sockaddr *client,
			  socklen_t client_len)
{
	struct sp_ports *ps = &e->tcp->ports;
	bool reuse = true;
	int fd, rc, one = 1, tp = 0;
	uint16_t port;

	*bound_port = 0;
again:
	*connect_err = 0;
	fd = -1;
	if (client) {
		tp = sp_transparent_socket(e, l->id, SOCK_STREAM, &l->backend, client, client_len,
					   &fd);
		if (tp < 0)
			return tp;
	}
	if (fd < 0) {
		sp_sys(e, SP_STAT_SYS_SOCKET);
		fd = socket(l->backend.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
		if (fd == -1)
			return -errno;
		sp_fd_opened(e);
	}
	set_sockopts(e, fd);
	/* Every backend socket carries SO_REUSEADDR, so that its TIME_WAIT
	 * remnant does not block a later explicit bind to its port (a
	 * transparent one has it already). */
	if (!tp) {
		sp_sys(e, SP_STAT_SYS_SETSOCKOPT);
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	}
	port = reuse && !tp ? sp_ports_bind(e, ps, l->id, fd, l->backend.ss_family) : 0;
	*bound_port = port;
	do {
		sp_sys(e, SP_STAT_SYS_CONNECT);
		rc = connect(fd, (struct sockaddr *)&l->backend, l->backend_len);
	} while (rc == -1 && errno == EINTR);
	if (rc == -1 && errno != EINPROGRESS) {
		if (tp && (errno == EADDRNOTAVAIL || errno == EADDRINUSE)) {
			/* The client's 4-tuple to the backend is taken (the same
			 * client port through another listener, or a TIME_WAIT
			 * the backend keeps): from the host's address. */
			sp_transparent_fallback(e, l->id, SP_EV_TP_FAILED, errno);
			sp_close(e, fd);
			client = NULL;
			tp = 0;
			goto again;
		}
		if (port && (errno == EADDRNOTAVAIL || errno == EADDRINUSE)) {
			/* That 4-tuple is not free to take over (e.g. a backend
			 * without timestamps): use a port of the kernel's. */
			sp_ports_result(e, ps, l->id, errno);
			sp_close(e, fd);
			reuse = false;
			goto again;
		}
		*connect_err = errno;
	} else if (port) {
		sp_ports_result(e, ps, l->id, 0);
	}
	if (tp && !*connect_err)
		sp_lcount(e, l->id, SP_STAT_TCP_TRANSPARENT, 1);
	return fd;
}

/**
 * client_address() - the peer of an accepted socket, for SP_OPT_TRANSPARENT
 * @e:   engine
 * @l:   listener
 * @cfd: accepted socket
 * @ss:  where to put the address
 * @len: set to its length
 *
 * Return: ss, or NULL when the listener is not transparent or the peer is
 * unknown (the connection is relayed from the host's address)
 */
static const struct sockaddr *client_address(struct sp_engine *e, struct sp_listener *l,
					     int cfd, struct sockaddr_storage *ss, socklen_t *len)
{
	if (!sp_lopt(e, l->id, SP_OPT_TRANSPARENT))
		return NULL;
	*len = sizeof(*ss);
	sp_sys(e, SP_STAT_SYS_OTHER);
	if (getpeername(cfd, (struct sockaddr *)ss, len) == -1) {
		sp_transparent_fallback(e, l->id, SP_EV_TP_FAILED, errno);
		return NULL;
	}
	return (const struct sockaddr *)ss;
}

/**
 * connect_queue_for() - the FIFO of connects with this timeout, made if need be
 * @t:       the table
 * @timeout: ms, > 0
 *
 * Return: the queue, or NULL without memory
 */
static struct connect_queue *connect_queue_for(struct sp_conn_table *t, int64_t timeout)
{
	struct connect_queue *q, *spare = NULL;
	uint32_t i;

	for (i = 0; i < t->n_cq; i++) {
		q = &t->cq[i];
		if (q->timeout == timeout)
			return q;
		if (!q->len && !spare)
			spare = q;
	}
	if (spare) {
		/* An emptied queue of a value no connect uses now. */
		spare->timeout = timeout;
		spare->head = 0;
		return spare;
	}
	q = realloc(t->cq, sizeof(*q) * (t->n_cq + 1));
	if (!q)
		return NULL;
	t->cq = q;
	q = &t->cq[t->n_cq++];
	*q = (struct connect_queue){ .timeout = timeout };
	return q;
}

/**
 * connecting_push() - queue a connect for its timeout
 * @e:       engine
 * @timeout: its listener's connect timeout, ms, > 0
 * @idx:     slot
 * @gen:     the slot's generation
 *
 * Without memory the connect falls back to the kernel's own timeout.
 */
static void connecting_push(struct sp_engine *e, int64_t timeout, uint32_t idx, uint32_t gen)
{
	struct sp_conn_table *t = e->tcp;
	struct connect_queue *q = connect_queue_for(t, timeout);

	if (!q)
		return;
	if (q->len == q->cap) {
		uint32_t cap = q->cap ? q->cap * 2 : 256, i;
		struct conn_ref *n = malloc(sizeof(*n) * cap);

		if (!n)
			return;
		for (i = 0; i < q->len; i++)
			n[i] = q->ring[(q->head + i) % q->cap];
		free(q->ring);
		q->ring = n;
		q->cap = cap;
		q->head = 0;
	}
	q->ring[(q->head + q->len++) % q->cap] = (struct conn_ref){ .idx = idx, .gen = gen };
	t->n_connecting++;
}

static void conn_connect_failed(struct sp_engine *e, uint32_t idx, struct sp_conn *c, int err);

/**
 * connect_timeouts() - give up connects older than their connect timeout
 * @e: engine
 *
 * Return: ms until the next deadline, or -1 when none is pending
 */
static int64_t connect_timeouts(struct sp_engine *e)
{
	struct sp_conn_table *t = e->tcp;
	int64_t next = -1;
	uint32_t i;

	for (i = 0; i < t->n_cq; i++) {
		struct connect_queue *q = &t->cq[i];

		while (q->len) {
			struct conn_ref r = q->ring[q->head];
			struct sp_conn *c = conn_at(t, r.idx);
			bool live = c->gen == r.gen && c->state == CONN_CONNECTING;

			if (live) {
				int64_t left = c->last_ms + q->timeout - e->now_ms;

				if (left > 0) {
					if (next < 0 || left < next)
						next = left;
					break;
				}
			}
			q->head = (q->head + 1) % q->cap;
			q->len--;
			t->n_connecting--;
			if (live)
				conn_connect_failed(e, r.idx, c, ETIMEDOUT);
		}
	}
	return next;
}

/**
 * conn_start() - start relaying an accepted client
 *
 * Start relaying an accepted client: open and connect the backend socket.
 */
static void conn_start(struct sp_engine *e, struct sp_listener *l, int cfd)
{
	struct sp_conn_table *t = e->tcp;
	struct sp_conn *c;
	uint32_t idx;
	int bfd, connect_err;
	uint16_t bport;
	int64_t connect_timeout;
	size_t want;
	struct sockaddr_storage peer;
	socklen_t peer_len = 0;
	const struct sockaddr *client;

	if (t->free_head == NIL && table_grow(t) < 0) {
		sp_lcount_error(e, l->id, ENOMEM);
		sp_close(e, cfd);
		sp_lcount(e, l->id, SP_STAT_TCP_FAILED, 1);
		return;
	}
	client = client_address(e, l, cfd, &peer, &peer_len);
	bfd = backend_socket(e, l, &connect_err, &bport, client, peer_len);
	if ((bfd == -EMFILE || bfd == -ENFILE) && t->half_head != NIL) {
		/* Out of descriptors the engine does not count (the front
		 * end's): make room as accepting does, rather than drop this
		 * client, and try once more. */
		sp_lcount_error(e, l->id, -bfd);
		reclaim_for_room(e, true);
		bfd = backend_socket(e, l, &connect_err, &bport, client, peer_len);
	}
	if (bfd < 0) {
		int err = -bfd;

		sp_lcount_error(e, l->id, err);
		sp_lcount(e, l->id, SP_STAT_TCP_FAILED, 1);
		sp_emit(e, SP_EV_CONNECT_FAILED, err, l->id, 1);
		sp_close(e, cfd);
		if (err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM)
			pause_listener(e, l, err);
		return;
	}

	idx = t->free_head;
	c = conn_at(t, idx);
	t->free_head = c->next;
	c->side[SIDE_CLIENT].fd = cfd;
	c->side[SIDE_BACKEND].fd = bfd;
	c->listener = l->id;
	c->state = CONN_CONNECTING;
	c->side[SIDE_CLIENT].rd = c->side[SIDE_CLIENT].wr = false;
	c->side[SIDE_BACKEND].rd = c->side[SIDE_BACKEND].wr = false;
	c->in_halfclosed = c->starved = c->want_pipe = c->fin_first = false;
	c->draining = false;
	c->broken = false;
	c->bport = bport;
	c->last_ms = e->now_ms;
	/* The listener's mover and sizes, for the connection's life. */
	c->mover = sp_mover_for(sp_lopt(e, l->id, SP_OPT_COPY_MODE));
	want = (size_t)sp_lopt(e, l->id, c->mover->size_option);
	sp_dir_init(&c->dir[SIDE_CLIENT], want);
	sp_dir_init(&c->dir[SIDE_BACKEND], want);
	sp_lcount(e, l->id, SP_STAT_TCP_ACTIVE, 1);

	if (connect_err) {
		sp_lcount(e, l->id, SP_STAT_TCP_FAILED, 1);
		sp_lcount_error(e, l->id, connect_err);
		sp_emit(e, SP_EV_CONNECT_FAILED, connect_err, l->id, 1);
		/* Like docker-proxy: a plain close, so the client sees FIN, or RST
		 * if it had already sent data. */
		conn_close(e, idx, c, false);
		return;
	}
	if (sp_epoll_add(e, cfd, SOCK_EVENTS, sock_ref(idx, c->gen, SIDE_CLIENT)) < 0 ||
	    sp_epoll_add(e, bfd, SOCK_EVENTS, sock_ref(idx, c->gen, SIDE_BACKEND)) < 0) {
		sp_lcount_error(e, l->id, errno);
		sp_lcount(e, l->id, SP_STAT_TCP_FAILED, 1);
		conn_close(e, idx, c, true);
		return;
	}
	/* An immediate success (possible on loopback) is completed like the
	 * asynchronous case: the edge-triggered registration reports EPOLLOUT. */
	connect_timeout = sp_lopt(e, l->id, SP_OPT_CONNECT_TIMEOUT_MS);
	if (connect_timeout > 0)
		connecting_push(e, connect_timeout, idx, c->gen);
}

/**
 * tcp_listener_event() - accept a batch of clients and start relaying each
 * @e:      engine
 * @l:      listener
 * @events: EPOLL* mask (unused: accept4() says what happened)
 */
static void tcp_listener_event(struct sp_engine *e, struct sp_listener *l, uint32_t events)
{
	struct sp_tcp_listener *tls = tl(l);
	int i;

	(void)events;
	for (i = 0; i < ACCEPT_BATCH && !tls->paused; i++) {
		int cfd;

		if (!fd_room(e) && (!reclaim_for_room(e, false) || !fd_room(e))) {
			/* Accepting now would take a client we may not be able to
			 * serve, and no abandoned pair is left to make room: it
			 * waits in the backlog instead. */
			pause_listener(e, l, EMFILE);
			return;
		}

		sp_sys(e, SP_STAT_SYS_ACCEPT);
		cfd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (cfd == -1) {
			int err = errno;

			switch (err) {
			case EAGAIN:
				if (tls->pause_reported) {
					/* The backlog drained: the shortage is over. */
					tls->pause_reported = false;
					sp_emit(e, SP_EV_ACCEPT_RESUMED, 0, l->id, 1);
				}
				return;
			case EINTR:
			case ECONNABORTED:
			case EPROTO:
			case EPERM:      /* refused by a firewall rule */
			case ENETDOWN: case ENOPROTOOPT: case EHOSTDOWN: case ENONET:
			case EHOSTUNREACH: case EOPNOTSUPP: case ENETUNREACH: case ETIMEDOUT:
				/* Network errors of the pending connection: accept(2)
				 * says to treat them like EAGAIN and retry. */
				continue;
			case EMFILE:
			case ENFILE:
				sp_lcount_error(e, l->id, err);
				if (reclaim_for_room(e, true))
					continue;
				pause_listener(e, l, err);
				return;
			case ENOBUFS:
			case ENOMEM:
				sp_lcount_error(e, l->id, err);
				pause_listener(e, l, err);
				return;
			default:
				/* The listener itself is broken (EBADF, EINVAL...). */
				sp_lcount_error(e, l->id, err);
				sp_emit(e, SP_EV_LISTENER_FAILED, err, l->id, 1);
				sp_epoll_del(e, l->fd);
				sp_close(e, l->fd);
				l->fd = -1;
				return;
			}
		}
		sp_fd_opened(e);
		sp_lcount(e, l->id, SP_STAT_TCP_ACCEPTED, 1);
		conn_start(e, l, cfd);
	}
}

/* Forward: conn_connected() reads the result of the connect with it. */
static int sock_error(struct sp_engine *e, int fd);

/**
 * conn_connect_failed() - the backend could not be reached: close as docker-proxy does
 *
 * The backend could not be reached: like docker-proxy, a plain close, so
 * the client sees FIN, or RST if it had already sent data.
 */
static void conn_connect_failed(struct sp_engine *e, uint32_t idx, struct sp_conn *c, int err)
{
	sp_lcount(e, c->listener, SP_STAT_TCP_FAILED, 1);
	sp_lcount_error(e, c->listener, err);
	sp_emit(e, SP_EV_CONNECT_FAILED, err, c->listener, 1);
	conn_close(e, idx, c, false);
}

/**
 * conn_connected() - the backend connect finished: relay, or fail it
 * @e:   engine
 * @idx: slot
 * @c:   connection
 */
static void conn_connected(struct sp_engine *e, uint32_t idx, struct sp_conn *c)
{
	int err = sock_error(e, c->side[SIDE_BACKEND].fd);

	if (err == ECONNRESET) {
		/* The backend accepted and reset before the connect's completion
		 * was seen: not a failed connect but a reset from that side,
		 * passed on as any other (the client sees the reset, not a
		 * FIN; before, it depended on which event came first). */
		conn_abort(e, idx, c, err);
		return;
	}
	if (err) {
		conn_connect_failed(e, idx, c, err);
		return;
	}
	c->state = CONN_OPEN;
	c->side[SIDE_BACKEND].wr = true;
	conn_pump(e, idx, c);
}

/**
 * sock_error() - fetch and clear a socket's pending error
 */
static int sock_error(struct sp_engine *e, int fd)
{
	int err = 0;
	socklen_t len = sizeof(err);

	sp_sys(e, SP_STAT_SYS_GETSOCKOPT);
	if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == -1)
		err = errno;
	return err;
}

/**
 * conn_event() - an event on one socket of a connection
 * @e:      engine
 * @sidei:  which socket
 * @idx:    slot
 * @c:      connection
 * @events: EPOLL* mask
 */
static void conn_event(struct sp_engine *e, unsigned sidei, uint32_t idx, struct sp_conn *c,
		       uint32_t events)
{
	struct sp_side *s = &c->side[sidei];

	if (c->state == CONN_FREE)
		return;
	/* Readiness hints; errors and hang-ups make both directions look ready
	 * so that the next system call reports what really happened. */
	if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
		s->rd = true;
	if (events & (EPOLLOUT | EPOLLHUP | EPOLLERR))
		s->wr = true;
	if (c->state == CONN_CONNECTING) {
		if (sidei == SIDE_BACKEND && (events & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
			conn_connected(e, idx, c);
		else if (sidei == SIDE_CLIENT && (events & (EPOLLRDHUP | EPOLLHUP)))
			/* The client finished before the backend answered (its
			 * FIN came with it from the backlog, or while connecting):
			 * as abandoned as a half-closed pair, and as reclaimable,
			 * so a backend slow to answer does not hold the room. */
			halfclosed_link(e, c, idx);
		return;
	}
	if (events & EPOLLERR) {
		/* A reset or an error on one side: the pump might not touch that
		 * side again (finished reading, nothing to write), so look now. */
		int err = sock_error(e, s->fd);

		if (err) {
			conn_fail(e, idx, c, sidei, err);
			return;
		}
	}
	conn_pump(e, idx, c);
}

/**
 * tcp_flow_event() - dispatch a connection's event, with the stale check:
 * events for a recycled slot are dropped
 * @e:      engine
 * @ref:    the event's reference
 * @events: EPOLL* mask
 */
static void tcp_flow_event(struct sp_engine *e, union sp_ref ref, uint32_t events)
{
	struct sp_conn *c = conn_at(e->tcp, ref.index);

	if (!c || !sp_ref_current(ref, c->gen))
		return;
	conn_event(e, ref.side, ref.index, c, events);
}

/**
 * reclaim_idle() - reset half-closed pairs idle for their listener's idle timeout
 * @e: engine
 *
 * Sets when to look again: the shortest step (idle_step()) of the pairs
 * left that have a timeout, or never (-1).
 */
static void reclaim_idle(struct sp_engine *e)
{
	struct sp_conn_table *t = e->tcp;
	uint32_t idx = t->half_head;
	int64_t step = -1;
	uint64_t n = 0;

	while (idx != NIL) {
		struct sp_conn *c = conn_at(t, idx);
		uint32_t next = c->next;
		int64_t timeout = sp_lopt(e, c->listener, SP_OPT_IDLE_TIMEOUT_MS);

		if (timeout > 0 && e->now_ms - c->last_ms >= timeout) {
			sp_lstat(e, c->listener, SP_STAT_IDLE_RECLAIMED, 1);
			conn_close(e, idx, c, true);
			n++;
		} else if (timeout > 0 && (step < 0 || idle_step(timeout) < step)) {
			step = idle_step(timeout);
		}
		idx = next;
	}
	t->next_idle_scan = step < 0 ? -1 : e->now_ms + step;
	if (n) {
		sp_count(e, SP_STAT_IDLE_RECLAIMED, n);
		sp_emit(e, SP_EV_IDLE_RECLAIMED, 0, -1, n);
	}
}

/**
 * tcp_timer() - accept resumption, pipe retries, broken pairs, connect
 * timeouts and the idle reclaim
 * @e: engine
 *
 * Return: ms until the next deadline, or -1
 */
static int64_t tcp_timer(struct sp_engine *e)
{
	struct sp_conn_table *t = e->tcp;
	int64_t next = -1;
	int i;

	if (t->paused_listeners) {
		for (i = 0; i < e->n_listeners; i++) {
			struct sp_listener *l = &e->listeners[i];
			struct sp_tcp_listener *tls;
			int64_t left;

			if (l->proto != &sp_tcp_proto || !l->state || l->fd < 0)
				continue;
			tls = tl(l);
			if (!tls->paused)
				continue;
			left = tls->resume_at_ms - e->now_ms;
			if (left <= 0) {
				if (fd_room(e) || (tls->for_room && t->half_head != NIL)) {
					resume_listener(e, l);
					if (!tls->paused)
						continue;
					/* epoll_ctl failed: try again after the backoff. */
				}
				tls->resume_at_ms = e->now_ms + e->opt[SP_OPT_ACCEPT_BACKOFF_MS];
				left = e->opt[SP_OPT_ACCEPT_BACKOFF_MS];
			}
			if (next < 0 || left < next)
				next = left;
		}
	}
	if (t->n_starved) {
		if (e->now_ms >= t->starved_retry_ms)
			feed_starved(e);
		if (t->n_starved) {
			int64_t left = t->starved_retry_ms - e->now_ms;

			if (left < 0)
				left = 0;
			if (next < 0 || left < next)
				next = left;
		}
	}
	if (t->n_dying) {
		int64_t left = dying_timer(e);

		if (left >= 0 && (next < 0 || left < next))
			next = left;
	}
	if (t->n_connecting) {
		int64_t left = connect_timeouts(e);

		if (left >= 0 && (next < 0 || left < next))
			next = left;
	}
	if (t->next_idle_scan >= 0 && t->half_head != NIL) {
		int64_t left;

		if (e->now_ms >= t->next_idle_scan)
			reclaim_idle(e);
		left = t->next_idle_scan - e->now_ms;
		if (t->next_idle_scan >= 0 && t->half_head != NIL && (next < 0 || left < next))
			next = left;
	}
	return next;
}

/**
 * tcp_add() - a new TCP listener: its state, socket options, registration
 * @e: engine
 * @l: listener, l->fd set
 *
 * Return: 0 or -errno (l->state left NULL)
 */
static int tcp_add(struct sp_engine *e, struct sp_listener *l)
{
	struct sp_tcp_listener *t = calloc(1, sizeof(*t));
	int rc;

	if (!t)
		return -ENOMEM;
	listener_setup(e, l->fd);
	rc = sp_epoll_add(e, l->fd, EPOLLIN, listener_ref(l));
	if (rc < 0) {
		free(t);
		return rc;
	}
	l->state = t;
	return 0;
}

/**
 * tcp_listener_free() - free a TCP listener's state
 * @e: engine
 * @l: listener
 */
static void tcp_listener_free(struct sp_engine *e, struct sp_listener *l)
{
	(void)e;
	free(l->state);
	l->state = NULL;
}

/**
 * tcp_remove() - close every connection of listener l and forget its
 * paused state and backend port pool
 * @e: engine
 * @l: listener
 */
static void tcp_remove(struct sp_engine *e, struct sp_listener *l)
{
	struct sp_conn_table *t = e->tcp;
	uint32_t i, j;

	for (i = 0; i < t->n_chunks; i++) {
		for (j = 0; j < CONN_CHUNK; j++) {
			struct sp_conn *c = &t->chunks[i][j];

			/* Reset, as on stop: a FIN would pass a cut transfer off
			 * as complete. */
			if (c->state != CONN_FREE && c->listener == l->id)
				conn_close(e, i * CONN_CHUNK + j, c, true);
		}
	}
	if (l->state && tl(l)->paused) {
		tl(l)->paused = false;
		t->paused_listeners--;
	}
	sp_ports_forget(&t->ports, l->id);
	tcp_listener_free(e, l);
}

/**
 * tcp_free() - close every connection (with a reset) and free the table
 * @e: engine
 */
static void tcp_free(struct sp_engine *e)
{
	struct sp_conn_table *t = e->tcp;
	uint32_t i, j;
	unsigned sidei;

	if (!t)
		return;
	for (i = 0; i < t->n_chunks; i++) {
		for (j = 0; j < CONN_CHUNK; j++) {
			struct sp_conn *c = &t->chunks[i][j];

			if (c->state == CONN_FREE)
				continue;
			/* The proxy is stopping with this connection open: a FIN
			 * would tell both peers the transfer was complete (a cut
			 * download would look whole), so they get a reset. */
			for (sidei = 0; sidei < SIDES; sidei++)
				if (c->side[sidei].fd >= 0)
					set_abortive(e, c->side[sidei].fd);
			for (sidei = 0; sidei < SIDES; sidei++) {
				sp_close(e, c->side[sidei].fd);
				c->mover->release(e, &c->dir[sidei]);
			}
			sp_gauge_sub(e, SP_STAT_TCP_ACTIVE, 1);
		}
		free(t->chunks[i]);
	}
	sp_ports_free(&t->ports);
	free(t->starved);
	for (i = 0; i < t->n_cq; i++)
		free(t->cq[i].ring);
	free(t->cq);
	free(t->dying);
	free(t->chunks);
	free(t);
	e->tcp = NULL;
}

const struct sp_proto sp_tcp_proto = {
	.name = "tcp",
	.id = SP_PROTO_TCP,
	.init = tcp_init,
	.free = tcp_free,
	.add = tcp_add,
	.listener_event = tcp_listener_event,
	.flow_event = tcp_flow_event,
	.timer = tcp_timer,
	.remove = tcp_remove,
	.listener_free = tcp_listener_free,
	.listener_options = SP_OPT_BIT(SP_OPT_COPY_MODE) | SP_OPT_BIT(SP_OPT_COPY_BUF) |
			    SP_OPT_BIT(SP_OPT_PIPE_SIZE) | SP_OPT_BIT(SP_OPT_IDLE_TIMEOUT_MS) |
			    SP_OPT_BIT(SP_OPT_CONNECT_TIMEOUT_MS) | SP_OPT_BIT(SP_OPT_TRANSPARENT),
};

/**
 * sp_engine_add_tcp() - relay connections accepted on listen_fd (engine.h)
 * @e:           engine
 * @listen_fd:   listening socket, owned from now on
 * @backend:     where to connect
 * @backend_len: length of @backend
 *
 * Return: the listener id, or -errno
 */
int sp_engine_add_tcp(struct sp_engine *e, int listen_fd, const struct sockaddr *backend,
		      socklen_t backend_len)
{
	return sp_listener_add(e, &sp_tcp_proto, listen_fd, 0, backend, backend_len);
}
