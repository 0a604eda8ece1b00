/* SPDX-License-Identifier: MIT
 *
 * tcp.c - the TCP relay: accept, nonblocking backend connect, and a splice(2)
 * pump per direction through a pooled kernel pipe.
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

#include "internal.h"

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

/* One direction of a connection: src -> pipe (or buffer) -> dst. */
struct sp_dir {
	struct sp_pipe pipe;   /* rd/wr == -1 when none is held */
	char *buf;             /* read/write copy mode: buffer held while in flight */
	size_t buf_cap;        /* read/write mode: bytes buf was allocated with */
	size_t buf_off;        /* read/write mode: bytes of buf already written */
	size_t queued;         /* bytes read from src, not yet written to dst */
	bool eof;              /* src gave EOF */
	bool shut;             /* EOF passed on: shutdown(dst, SHUT_WR) done */
};

struct sp_conn {
	int cfd, bfd;          /* client and backend sockets */
	uint32_t gen;          /* slot generation, checked against epoll tags */
	uint32_t next;         /* free list / half-closed list links */
	uint32_t prev;
	int listener;
	uint8_t state;
	bool c_rd, c_wr, b_rd, b_wr;  /* readiness hints from edge-triggered events */
	bool in_halfclosed;
	bool want_pipe;        /* a pump found no pipe to be had */
	bool fin_first;        /* we sent the backend FIN before it sent one:
				* our backend socket ends in TIME_WAIT */
	uint16_t bport;        /* backend local port (network order) if we chose it */
	bool starved;          /* queued on the starved list for a retry */
	uint8_t broken;        /* BROKEN_CLIENT/BACKEND: that side failed, the
				* other gets what was received from it first */
	bool draining;         /* all of it written: waiting for the peer's ACKs */
	int64_t linger_until;  /* broken: reset anyway at this time */
	int64_t last_ms;       /* last progress, for the idle reclaim */
	struct sp_dir c2b, b2c;
};

#define NIL UINT32_MAX

enum { BROKEN_CLIENT = 1, BROKEN_BACKEND = 2 };

/*
 * Backend ports left in TIME_WAIT.  When the client closes first, the proxy
 * is the side that sends the backend its FIN first, so every such backend
 * connection leaves a TIME_WAIT socket holding an ephemeral port towards the
 * one container address.  After ~28k connections in a minute the range is
 * exhausted: connect() scans in vain and the rate collapses to a few hundred
 * per second (moby #47537).  Linux lets a socket explicitly bound (with
 * SO_REUSEADDR) to such a port take over the TIME_WAIT 4-tuple when TCP
 * timestamps make it safe (PAWS), so those ports are kept on a stack and
 * reused, most recent first; the TIME_WAIT sockets are then recycled instead
 * of piling up.  If reuse fails repeatedly (e.g. a backend without
 * timestamps), it is switched off for a while.
 */
#define PORT_POOL_MAX 65536
#define PORT_REUSE_FAILS 8
#define PORT_REUSE_BACKOFF_MS 10000

struct sp_port_pool {
	uint16_t *ports;
	uint32_t n, cap;
	uint32_t fails;
	int64_t disabled_until;
};

/* A slot and the generation it had: stale once the slot is recycled. */
struct conn_ref {
	uint32_t idx, gen;
};

struct sp_conn_table {
	struct sp_conn **chunks;
	uint32_t n_chunks;
	uint32_t free_head;
	uint32_t half_head;     /* half-closed connections, for the idle reclaim
				 * and to make room for new clients */
	uint32_t n_half;
	int64_t next_idle_scan;
	struct conn_ref *connecting;  /* FIFO of backend connects, oldest first */
	uint32_t conn_head, conn_len, conn_cap;
	struct conn_ref *dying;       /* broken connections delivering what is left */
	uint32_t n_dying, cap_dying;
	int paused_listeners;
	struct sp_port_pool *ports;  /* per listener id: backend ports in TIME_WAIT */
	int n_ports;
	uint32_t *starved;      /* connections waiting for a pipe */
	uint32_t n_starved, cap_starved;
	int64_t starved_retry_ms;
};

static struct sp_conn *conn_at(struct sp_conn_table *t, uint32_t idx)
{
	uint32_t chunk = idx / CONN_CHUNK;

	if (chunk >= t->n_chunks)
		return NULL;
	return &t->chunks[chunk][idx % CONN_CHUNK];
}

static uint64_t conn_tag(unsigned type, uint32_t idx, uint32_t gen)
{
	return ((uint64_t)type << 56) | ((uint64_t)(gen & 0xffffff) << 32) | idx;
}

int sp_tcp_init(struct sp_engine *e)
{
	struct sp_conn_table *t = calloc(1, sizeof(*t));

	if (!t)
		return -ENOMEM;
	t->free_head = NIL;
	t->half_head = NIL;
	e->tcp = t;
	return 0;
}

/* Grow the table by one chunk, threading its slots onto the free list. */
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
		c[i].cfd = c[i].bfd = -1;
		c[i].next = t->free_head;
		t->free_head = base + i;
	}
	return 0;
}

static void dir_init(struct sp_dir *d)
{
	memset(d, 0, sizeof(*d));
	d->pipe.rd = d->pipe.wr = -1;
}

/* Release what a direction holds (pipe or buffer), even with data in it. */
static void dir_release(struct sp_engine *e, struct sp_dir *d)
{
	if (d->pipe.rd >= 0) {
		if (d->queued)
			sp_pipe_drop(e, &d->pipe);
		else
			sp_pipe_put(e, &d->pipe);
	}
	free(d->buf);
	d->buf = NULL;
	d->queued = 0;
}

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

static void halfclosed_link(struct sp_conn_table *t, struct sp_conn *c, uint32_t idx)
{
	if (c->in_halfclosed)
		return;
	c->prev = NIL;
	c->next = t->half_head;
	if (t->half_head != NIL)
		conn_at(t, t->half_head)->prev = idx;
	t->half_head = idx;
	c->in_halfclosed = true;
	t->n_half++;
}

/* Make close() send a reset instead of a FIN. */
static void set_abortive(struct sp_engine *e, int fd)
{
	struct linger lg = { .l_onoff = 1, .l_linger = 0 };

	sp_sys(e, SP_STAT_SYS_SETSOCKOPT);
	setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
}

/* Whether there are descriptors to spare for one more connection. */
static bool fd_room(struct sp_engine *e)
{
	return e->opt[SP_OPT_FD_LIMIT] <= 0 ||
	       (int64_t)e->stats[SP_STAT_FDS_OPEN] + FD_HEADROOM < e->opt[SP_OPT_FD_LIMIT];
}

/* Listen on l again.  "Resumed" is logged only once the backlog has
 * drained, so a limit that is still being hit logs one line, not pairs. */
static void resume_listener(struct sp_engine *e, struct sp_listener *l)
{
	if (sp_epoll_mod(e, l->fd, EPOLLIN, sp_tag(SP_TAG_TCP_LISTENER, (uint32_t)l->id)) == 0) {
		l->paused = false;
		e->tcp->paused_listeners--;
	}
}

/* Resume listeners paused for lack of descriptors: some were just freed. */
static void resume_listeners(struct sp_engine *e)
{
	int i;

	if (!fd_room(e))
		return;
	for (i = 0; i < e->n_listeners; i++) {
		struct sp_listener *l = &e->listeners[i];

		if (l->type == SOCK_STREAM && l->paused && l->fd >= 0)
			resume_listener(e, l);
	}
}

/* The port pool of listener id, created on first use; NULL without memory. */
static struct sp_port_pool *port_pool(struct sp_engine *e, int id)
{
	struct sp_conn_table *t = e->tcp;

	if (id >= t->n_ports) {
		struct sp_port_pool *n = realloc(t->ports, sizeof(*n) * (id + 1));

		if (!n)
			return NULL;
		memset(n + t->n_ports, 0, sizeof(*n) * (id + 1 - t->n_ports));
		t->ports = n;
		t->n_ports = id + 1;
	}
	return &t->ports[id];
}

/* Remember the local port of a backend socket about to enter TIME_WAIT. */
static void port_release(struct sp_engine *e, struct sp_conn *c)
{
	struct sp_port_pool *pp = port_pool(e, c->listener);
	struct sockaddr_storage ss;
	socklen_t len = sizeof(ss);
	uint16_t port;

	if (!pp || e->now_ms < pp->disabled_until || pp->n >= PORT_POOL_MAX)
		return;
	port = c->bport;
	if (!port) {
		sp_sys(e, SP_STAT_SYS_OTHER);
		if (getsockname(c->bfd, (struct sockaddr *)&ss, &len) == -1)
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

/* Close a connection.  reset_client / reset_backend choose RST over FIN. */
static void conn_close(struct sp_engine *e, uint32_t idx, struct sp_conn *c,
		       bool reset_client, bool reset_backend)
{
	struct sp_conn_table *t = e->tcp;

	if (reset_client && c->cfd >= 0)
		set_abortive(e, c->cfd);
	if (reset_backend && c->bfd >= 0)
		set_abortive(e, c->bfd);
	else if (c->fin_first && c->bfd >= 0)
		port_release(e, c);
	/* close() removes the descriptors from the epoll set. */
	sp_close(e, c->cfd);
	sp_close(e, c->bfd);
	c->cfd = c->bfd = -1;
	dir_release(e, &c->c2b);
	dir_release(e, &c->b2c);
	halfclosed_unlink(t, c);
	c->starved = c->want_pipe = c->fin_first = c->draining = false;
	c->broken = 0;
	c->state = CONN_FREE;
	c->gen++;
	c->next = t->free_head;
	t->free_head = idx;
	sp_lgauge_sub(e, c->listener, SP_STAT_TCP_ACTIVE, 1);
	sp_lcount(e, c->listener, SP_STAT_TCP_CLOSED, 1);
	if (t->paused_listeners)
		resume_listeners(e);
	if (t->n_starved)
		t->starved_retry_ms = e->now_ms;  /* descriptors were freed: retry now */
}

#define RECLAIM_BATCH 8

/*
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
			conn_close(e, best[i], c, true, true);
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

/* Options set on a listener are inherited by every accepted socket, which
 * saves five system calls per connection on the client side. */
void sp_tcp_listener_setup(struct sp_engine *e, int fd)
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

/* Give an emptied pipe back to the pool; a connection starved of pipes
 * can have it. */
static void pipe_release(struct sp_engine *e, struct sp_dir *d)
{
	sp_pipe_put(e, &d->pipe);
	if (e->tcp->n_starved)
		e->tcp->starved_retry_ms = e->now_ms;
}

/* An empty direction holds nothing: give back its pipe or buffer. */
static void dir_idle(struct sp_engine *e, struct sp_dir *d)
{
	if (d->queued)
		return;
	if (d->pipe.rd >= 0)
		pipe_release(e, d);
	free(d->buf);
	d->buf = NULL;
}

/* Whether a direction can take more bytes from its source: an empty one
 * holds no pipe or buffer yet and takes one on the next read. */
static bool dir_room(const struct sp_dir *d)
{
	if (d->buf)
		return d->queued < d->buf_cap;
	if (d->pipe.rd >= 0)
		return d->queued < d->pipe.cap;
	return true;
}

/* The read half of a pump step: move bytes from src into the direction's
 * pipe (or buffer).  Returns >0 bytes, 0 on EOF, -EAGAIN, or -errno. */
static ssize_t dir_read(struct sp_engine *e, struct sp_dir *d, int src)
{
	ssize_t n;

	if (e->opt[SP_OPT_COPY_MODE] == SP_COPY_READWRITE) {
		if (!d->buf) {
			d->buf_cap = (size_t)e->opt[SP_OPT_COPY_BUF];
			d->buf = malloc(d->buf_cap);
			if (!d->buf)
				return -ENOMEM;
			d->buf_off = 0;
		}
		do {
			sp_sys(e, SP_STAT_SYS_READ);
			n = read(src, d->buf + d->queued, d->buf_cap - d->queued);
		} while (n == -1 && errno == EINTR);
		return n == -1 ? -errno : n;
	}
	if (d->pipe.rd < 0) {
		int rc = sp_pipe_get(e, &d->pipe);

		if (rc < 0)
			return rc;
	}
	do {
		sp_sys(e, SP_STAT_SYS_SPLICE);
		n = splice(src, NULL, d->pipe.wr, NULL, d->pipe.cap - d->queued,
			   SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
	} while (n == -1 && errno == EINTR);
	if (n == -1)
		return -errno;
	return n;
}

/* The write half: move queued bytes to dst.  Returns bytes or -errno. */
static ssize_t dir_write(struct sp_engine *e, struct sp_dir *d, int dst)
{
	ssize_t n;

	if (d->buf) {
		do {
			sp_sys(e, SP_STAT_SYS_WRITE);
			n = send(dst, d->buf + d->buf_off, d->queued - d->buf_off, MSG_NOSIGNAL);
		} while (n == -1 && errno == EINTR);
		if (n == -1)
			return -errno;
		d->buf_off += (size_t)n;
		if (d->buf_off == d->queued) {
			free(d->buf);
			d->buf = NULL;
			d->buf_off = 0;
			d->queued = 0;
		}
		return n;
	}
	do {
		sp_sys(e, SP_STAT_SYS_SPLICE);
		n = splice(d->pipe.rd, NULL, dst, NULL, d->queued,
			   SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
	} while (n == -1 && errno == EINTR);
	if (n == -1)
		return -errno;
	d->queued -= (size_t)n;
	if (!d->queued)
		pipe_release(e, d);
	return n;
}

/* Move as much as possible in one direction.  Returns 0, or -errno when the
 * connection is broken; *dst_failed tells which side the error came from.
 * draining: src has failed; whatever it still yields is delivered, its
 * errors and EOF end the direction, and no FIN is passed on. */
static int dir_pump(struct sp_engine *e, struct sp_conn *c, struct sp_dir *d, int src, int dst,
		    bool *src_rd, bool *dst_wr, enum sp_stat bytes_stat, bool draining,
		    bool *dst_failed)
{
	bool progress = true;

	*dst_failed = true;
	while (progress) {
		progress = false;
		if (d->queued && *dst_wr) {
			size_t before = d->queued;
			ssize_t n = dir_write(e, d, dst);

			if (n == -EAGAIN) {
				*dst_wr = false;
			} else if (n < 0) {
				return (int)n;
			} else {
				sp_lcount(e, c->listener, bytes_stat, (uint64_t)n);
				c->last_ms = e->now_ms;
				if ((size_t)n < before && d->queued)
					*dst_wr = false;   /* socket buffer full */
				else
					progress = true;
			}
		}
		if (d->eof) {
			if (!d->queued && !d->shut && !draining) {
				sp_sys(e, SP_STAT_SYS_SHUTDOWN);
				if (shutdown(dst, SHUT_WR) == -1 && errno != ENOTCONN)
					return -errno;
				d->shut = true;
				if (d == &c->c2b && !c->b2c.eof)
					c->fin_first = true;
			}
			break;
		}
		if (*src_rd && dir_room(d)) {
			ssize_t n = dir_read(e, d, src);

			if (n == -EMFILE || n == -ENFILE || n == -ENOMEM) {
				/* No pipe to be had: leave the bytes in the socket,
				 * where TCP holds the sender back, and retry once
				 * descriptors are freed. */
				c->want_pipe = true;
				sp_lcount_error(e, c->listener, (int)-n);
				break;
			} else if (n == -EAGAIN) {
				if (d->queued && !d->buf) {
					/* A drained socket or a pipe out of slots: only
					 * an empty pipe tells them apart, so read again
					 * once the write half has made room.  Taking it
					 * for drained could leave bytes in a socket whose
					 * sender waits for window: no edge would come. */
					break;
				}
				*src_rd = false;
				dir_idle(e, d);
			} else if (n < 0 && !draining) {
				*dst_failed = false;
				return (int)n;
			} else if (n <= 0) {
				/* EOF, or (draining) the error after the data the
				 * broken side had queued. */
				d->eof = true;
				*src_rd = false;
				dir_idle(e, d);
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

/* Reset both sides, as the NAT path would pass a reset on. */
static void conn_reset(struct sp_engine *e, uint32_t idx, struct sp_conn *c)
{
	sp_lcount(e, c->listener, SP_STAT_TCP_RESETS, 1);
	conn_close(e, idx, c, true, true);
}

/* Both sides broken, or the survivor of one would not take its data: reset. */
static void conn_abort(struct sp_engine *e, uint32_t idx, struct sp_conn *c, int err)
{
	sp_lcount_error(e, c->listener, err);
	conn_reset(e, idx, c);
}

/* Queue a connection that could not get a pipe for a later retry. */
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

/* Retry connections that were starved of pipes (descriptors were freed, or
 * the backoff elapsed).  Entries whose slot was recycled are skipped. */
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

/* Bytes the kernel still holds for the peer of fd (unsent or unacknowledged),
 * or -1 when it cannot say. */
static int sock_outq(struct sp_engine *e, int fd)
{
	int n;

	sp_sys(e, SP_STAT_SYS_OTHER);
	if (ioctl(fd, SIOCOUTQ, &n) == -1)
		return -1;
	return n;
}

/*
 * A broken connection delivering what it holds.  The broken side's receive
 * queue (Linux returns queued data before the error) and the pipe go to the
 * survivor; once the survivor's peer acknowledged all of it, both sides are
 * reset: a reset sent earlier would make the survivor's kernel throw away
 * what it had not sent yet.  The timer resets the pair anyway at
 * linger_until, when the survivor's peer does not take the data.
 */
static void conn_drain(struct sp_engine *e, uint32_t idx, struct sp_conn *c)
{
	bool from_client = c->broken == BROKEN_CLIENT, dst_failed;
	struct sp_dir *d = from_client ? &c->c2b : &c->b2c;
	int src = from_client ? c->cfd : c->bfd, dst = from_client ? c->bfd : c->cfd;
	bool *src_rd = from_client ? &c->c_rd : &c->b_rd;
	bool *dst_wr = from_client ? &c->b_wr : &c->c_wr;
	int rc, outq;

	if (!d->eof)
		*src_rd = true;  /* it will not signal again: read it to the end */
	rc = dir_pump(e, c, d, src, dst, src_rd, dst_wr,
		      from_client ? SP_STAT_BYTES_C2B : SP_STAT_BYTES_B2C, true, &dst_failed);
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

/* Note a connection to finish draining (or to reset at its deadline);
 * false without memory. */
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

/*
 * One side failed (err).  What the proxy already received from it is
 * delivered to the other side before the reset is passed on, as the
 * kernel's own path would have delivered it: before, uploads that ended
 * in a reset lost what the proxy held (12 of 20 stopped at about 128 KB,
 * 0 of 20 direct).  The other direction cannot be delivered any more and is
 * dropped.  A second failure, or nothing left to deliver, resets at once.
 */
static void conn_fail(struct sp_engine *e, uint32_t idx, struct sp_conn *c, bool client_side,
		      int err)
{
	uint8_t side = client_side ? BROKEN_CLIENT : BROKEN_BACKEND;
	struct sp_dir *d = client_side ? &c->c2b : &c->b2c;
	struct sp_dir *back = client_side ? &c->b2c : &c->c2b;

	if (c->broken == side) {
		conn_drain(e, idx, c);  /* the same side again: still delivering */
		return;
	}
	/* Without a deadline a draining pair could wait for good. */
	if (c->broken || c->state != CONN_OPEN || d->shut || !dying_push(e, idx, c->gen)) {
		conn_abort(e, idx, c, err);
		return;
	}
	sp_lcount_error(e, c->listener, err);
	c->broken = side;
	c->linger_until = e->now_ms + RESET_LINGER_MS;
	dir_release(e, back);
	back->eof = back->shut = true;
	halfclosed_unlink(e->tcp, c);
	if (client_side)
		c->b_wr = true;
	else
		c->c_wr = true;
	conn_drain(e, idx, c);
}

/* Broken connections: finish those whose data was taken, reset those past
 * their deadline; ms until the next look, or -1 when none is left. */
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
			int outq = sock_outq(e, c->broken == BROKEN_CLIENT ? c->bfd : c->cfd);

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

/* Run both pumps; close the connection when done or broken. */
static void conn_pump(struct sp_engine *e, uint32_t idx, struct sp_conn *c)
{
	bool dst_failed;
	int rc;

	if (c->broken) {
		conn_drain(e, idx, c);
		return;
	}
	rc = dir_pump(e, c, &c->c2b, c->cfd, c->bfd, &c->c_rd, &c->b_wr, SP_STAT_BYTES_C2B,
		      false, &dst_failed);
	if (rc < 0) {
		conn_fail(e, idx, c, !dst_failed, -rc);
		return;
	}
	rc = dir_pump(e, c, &c->b2c, c->bfd, c->cfd, &c->b_rd, &c->c_wr, SP_STAT_BYTES_B2C,
		      false, &dst_failed);
	if (rc < 0) {
		conn_fail(e, idx, c, dst_failed, -rc);
		return;
	}
	if (c->c2b.shut && c->b2c.shut) {
		conn_close(e, idx, c, false, false);
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
	if (c->c2b.eof || c->b2c.eof)
		halfclosed_link(e->tcp, c, idx);
}

/* Pause accepting on l for lack of descriptors (or memory). */
static void pause_listener(struct sp_engine *e, struct sp_listener *l, int err)
{
	if (l->paused)
		return;
	if (sp_epoll_mod(e, l->fd, 0, sp_tag(SP_TAG_TCP_LISTENER, (uint32_t)l->id)) < 0)
		return;
	l->paused = true;
	l->resume_at_ms = e->now_ms + e->opt[SP_OPT_ACCEPT_BACKOFF_MS];
	e->tcp->paused_listeners++;
	sp_lcount(e, l->id, SP_STAT_ACCEPT_PAUSES, 1);
	if (!l->pause_reported) {
		l->pause_reported = true;
		sp_emit(e, SP_EV_ACCEPT_PAUSED, err, l->id, 1);
	}
}

/* A nonblocking backend socket, connect() started.  Returns the socket
 * (connect in progress or done) or -errno; *connect_err is the connect()
 * errno when the socket was made but connect() failed at once. */
static int backend_socket(struct sp_engine *e, struct sp_listener *l, int *connect_err,
			  uint16_t *bound_port)
{
	struct sp_port_pool *pp = NULL;
	struct sockaddr_storage local;
	socklen_t len;
	int fd, rc, one = 1, tries;
	uint16_t port;

	*bound_port = 0;
	if (e->tcp->n_ports > l->id && e->now_ms >= e->tcp->ports[l->id].disabled_until)
		pp = &e->tcp->ports[l->id];
	memset(&local, 0, sizeof(local));
	local.ss_family = l->backend.ss_family;
	len = local.ss_family == AF_INET6 ? sizeof(struct sockaddr_in6)
					  : sizeof(struct sockaddr_in);
again:
	*connect_err = 0;
	port = 0;
	sp_sys(e, SP_STAT_SYS_SOCKET);
	fd = socket(l->backend.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd == -1)
		return -errno;
	sp_fd_opened(e);
	set_sockopts(e, fd);
	/* Every backend socket carries SO_REUSEADDR, so that its TIME_WAIT
	 * remnant does not block a later explicit bind to its port. */
	sp_sys(e, SP_STAT_SYS_SETSOCKOPT);
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	/* A port also held by another program's socket (no SO_REUSEADDR) cannot
	 * be bound: try the next one on the same socket, then let the kernel
	 * choose.  Only a failed takeover of our own TIME_WAIT counts against
	 * the pool. */
	for (tries = 0; pp && pp->n && tries < 4; tries++) {
		uint16_t p = pp->ports[--pp->n];

		if (local.ss_family == AF_INET6)
			((struct sockaddr_in6 *)&local)->sin6_port = p;
		else
			((struct sockaddr_in *)&local)->sin_port = p;
		sp_sys(e, SP_STAT_SYS_BIND);
		if (bind(fd, (struct sockaddr *)&local, len) == 0) {
			port = p;
			break;
		}
	}
	*bound_port = port;
	do {
		sp_sys(e, SP_STAT_SYS_CONNECT);
		rc = connect(fd, (struct sockaddr *)&l->backend, l->backend_len);
	} while (rc == -1 && errno == EINTR);
	if (rc == -1 && errno != EINPROGRESS) {
		if (port && (errno == EADDRNOTAVAIL || errno == EADDRINUSE)) {
			/* That 4-tuple is not free to take over (e.g. a backend
			 * without timestamps): use a port of the kernel's. */
			sp_close(e, fd);
			if (++pp->fails >= PORT_REUSE_FAILS) {
				pp->disabled_until = e->now_ms + PORT_REUSE_BACKOFF_MS;
				pp->n = 0;
				pp->fails = 0;
			}
			pp = NULL;
			goto again;
		}
		*connect_err = errno;
	} else if (port) {
		pp->fails = 0;
	}
	return fd;
}

/* Queue a connect for its timeout.  Connects start in time order and share
 * one timeout, so a FIFO holds them in deadline order. */
static void connecting_push(struct sp_engine *e, uint32_t idx, uint32_t gen)
{
	struct sp_conn_table *t = e->tcp;

	if (t->conn_len == t->conn_cap) {
		uint32_t cap = t->conn_cap ? t->conn_cap * 2 : 256, i;
		struct conn_ref *n = malloc(sizeof(*n) * cap);

		if (!n)
			return;   /* this connect falls back to the kernel's timeout */
		for (i = 0; i < t->conn_len; i++)
			n[i] = t->connecting[(t->conn_head + i) % t->conn_cap];
		free(t->connecting);
		t->connecting = n;
		t->conn_cap = cap;
		t->conn_head = 0;
	}
	t->connecting[(t->conn_head + t->conn_len++) % t->conn_cap] =
		(struct conn_ref){ .idx = idx, .gen = gen };
}

static void conn_connect_failed(struct sp_engine *e, uint32_t idx, struct sp_conn *c, int err);

/* Give up connects older than the connect timeout; ms until the next
 * deadline, or -1 when none is pending. */
static int64_t connect_timeouts(struct sp_engine *e)
{
	struct sp_conn_table *t = e->tcp;
	int64_t timeout = e->opt[SP_OPT_CONNECT_TIMEOUT_MS];

	while (t->conn_len) {
		struct conn_ref r = t->connecting[t->conn_head];
		struct sp_conn *c = conn_at(t, r.idx);

		if (c->gen == r.gen && c->state == CONN_CONNECTING && timeout > 0) {
			int64_t left = c->last_ms + timeout - e->now_ms;

			if (left > 0)
				return left;
		}
		t->conn_head = (t->conn_head + 1) % t->conn_cap;
		t->conn_len--;
		if (c->gen == r.gen && c->state == CONN_CONNECTING && timeout > 0)
			conn_connect_failed(e, r.idx, c, ETIMEDOUT);
	}
	return -1;
}

/* Start relaying an accepted client: open and connect the backend socket. */
static void conn_start(struct sp_engine *e, struct sp_listener *l, int cfd)
{
	struct sp_conn_table *t = e->tcp;
	struct sp_conn *c;
	uint32_t idx;
	int bfd, connect_err;
	uint16_t bport;

	if (t->free_head == NIL && table_grow(t) < 0) {
		sp_lcount_error(e, l->id, ENOMEM);
		sp_close(e, cfd);
		sp_lcount(e, l->id, SP_STAT_TCP_FAILED, 1);
		return;
	}
	bfd = backend_socket(e, l, &connect_err, &bport);
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
	c->cfd = cfd;
	c->bfd = bfd;
	c->listener = l->id;
	c->state = CONN_CONNECTING;
	c->c_rd = c->c_wr = c->b_rd = c->b_wr = false;
	c->in_halfclosed = c->starved = c->want_pipe = c->fin_first = false;
	c->draining = false;
	c->broken = 0;
	c->bport = bport;
	c->last_ms = e->now_ms;
	dir_init(&c->c2b);
	dir_init(&c->b2c);
	sp_lcount(e, l->id, SP_STAT_TCP_ACTIVE, 1);

	if (connect_err) {
		sp_lcount(e, l->id, SP_STAT_TCP_FAILED, 1);
		sp_lcount_error(e, l->id, connect_err);
		sp_emit(e, SP_EV_CONNECT_FAILED, connect_err, l->id, 1);
		/* Like docker-proxy: a plain close, so the client sees FIN, or RST
		 * if it had already sent data. */
		conn_close(e, idx, c, false, false);
		return;
	}
	if (sp_epoll_add(e, cfd, SOCK_EVENTS, conn_tag(SP_TAG_TCP_CLIENT, idx, c->gen)) < 0 ||
	    sp_epoll_add(e, bfd, SOCK_EVENTS, conn_tag(SP_TAG_TCP_BACKEND, idx, c->gen)) < 0) {
		sp_lcount_error(e, l->id, errno);
		sp_lcount(e, l->id, SP_STAT_TCP_FAILED, 1);
		conn_close(e, idx, c, true, true);
		return;
	}
	/* An immediate success (possible on loopback) is completed like the
	 * asynchronous case: the edge-triggered registration reports EPOLLOUT. */
	if (e->opt[SP_OPT_CONNECT_TIMEOUT_MS] > 0)
		connecting_push(e, idx, c->gen);
}

void sp_tcp_listener_event(struct sp_engine *e, struct sp_listener *l, uint32_t events)
{
	int i;

	(void)events;
	for (i = 0; i < ACCEPT_BATCH && !l->paused; i++) {
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
				if (l->pause_reported) {
					/* The backlog drained: the shortage is over. */
					l->pause_reported = false;
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

/* The backend connect finished (or failed). */
static int sock_error(struct sp_engine *e, int fd);

/* The backend could not be reached: like docker-proxy, a plain close, so
 * the client sees FIN, or RST if it had already sent data. */
static void conn_connect_failed(struct sp_engine *e, uint32_t idx, struct sp_conn *c, int err)
{
	sp_lcount(e, c->listener, SP_STAT_TCP_FAILED, 1);
	sp_lcount_error(e, c->listener, err);
	sp_emit(e, SP_EV_CONNECT_FAILED, err, c->listener, 1);
	conn_close(e, idx, c, false, false);
}

static void conn_connected(struct sp_engine *e, uint32_t idx, struct sp_conn *c)
{
	int err = sock_error(e, c->bfd);

	if (err) {
		conn_connect_failed(e, idx, c, err);
		return;
	}
	c->state = CONN_OPEN;
	c->b_wr = true;
	conn_pump(e, idx, c);
}

/* Fetch and clear a socket's pending error. */
static int sock_error(struct sp_engine *e, int fd)
{
	int err = 0;
	socklen_t len = sizeof(err);

	sp_sys(e, SP_STAT_SYS_GETSOCKOPT);
	if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == -1)
		err = errno;
	return err;
}

static void conn_event(struct sp_engine *e, unsigned type, uint32_t idx, struct sp_conn *c,
		       uint32_t events)
{
	if (c->state == CONN_FREE)
		return;
	/* Readiness hints; errors and hang-ups make both directions look ready
	 * so that the next system call reports what really happened. */
	if (type == SP_TAG_TCP_CLIENT) {
		if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
			c->c_rd = true;
		if (events & (EPOLLOUT | EPOLLHUP | EPOLLERR))
			c->c_wr = true;
	} else {
		if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
			c->b_rd = true;
		if (events & (EPOLLOUT | EPOLLHUP | EPOLLERR))
			c->b_wr = true;
	}
	if (c->state == CONN_CONNECTING) {
		if (type == SP_TAG_TCP_BACKEND && (events & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
			conn_connected(e, idx, c);
		return;
	}
	if (events & EPOLLERR) {
		/* A reset or an error on one side: the pump might not touch that
		 * side again (finished reading, nothing to write), so look now. */
		int err = sock_error(e, type == SP_TAG_TCP_CLIENT ? c->cfd : c->bfd);

		if (err) {
			conn_fail(e, idx, c, type == SP_TAG_TCP_CLIENT, err);
			return;
		}
	}
	conn_pump(e, idx, c);
}

/* Dispatch with the generation check: events for a recycled slot are stale. */
void sp_tcp_dispatch(struct sp_engine *e, uint64_t tag, uint32_t events)
{
	struct sp_conn *c = conn_at(e->tcp, sp_tag_index(tag));

	if (!c || ((c->gen & 0xffffff) != ((tag >> 32) & 0xffffff)))
		return;
	conn_event(e, sp_tag_type(tag), sp_tag_index(tag), c, events);
}

/* Reset half-closed pairs that saw no progress for the idle timeout. */
static void reclaim_idle(struct sp_engine *e)
{
	struct sp_conn_table *t = e->tcp;
	int64_t timeout = e->opt[SP_OPT_IDLE_TIMEOUT_MS];
	uint32_t idx = t->half_head;
	uint64_t n = 0;

	while (idx != NIL) {
		struct sp_conn *c = conn_at(t, idx);
		uint32_t next = c->next;

		if (e->now_ms - c->last_ms >= timeout) {
			sp_lstat(e, c->listener, SP_STAT_IDLE_RECLAIMED, 1);
			conn_close(e, idx, c, true, true);
			n++;
		}
		idx = next;
	}
	if (n) {
		sp_count(e, SP_STAT_IDLE_RECLAIMED, n);
		sp_emit(e, SP_EV_IDLE_RECLAIMED, 0, -1, n);
	}
}

int64_t sp_tcp_timer(struct sp_engine *e)
{
	struct sp_conn_table *t = e->tcp;
	int64_t next = -1;
	int i;

	if (t->paused_listeners) {
		for (i = 0; i < e->n_listeners; i++) {
			struct sp_listener *l = &e->listeners[i];
			int64_t left;

			if (l->type != SOCK_STREAM || !l->paused || l->fd < 0)
				continue;
			left = l->resume_at_ms - e->now_ms;
			if (left <= 0) {
				if (fd_room(e)) {
					resume_listener(e, l);
					if (!l->paused)
						continue;
					/* epoll_ctl failed: try again after the backoff. */
				}
				l->resume_at_ms = e->now_ms + e->opt[SP_OPT_ACCEPT_BACKOFF_MS];
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
	if (t->conn_len) {
		int64_t left = connect_timeouts(e);

		if (left >= 0 && (next < 0 || left < next))
			next = left;
	}
	if (e->opt[SP_OPT_IDLE_TIMEOUT_MS] > 0 && t->half_head != NIL) {
		int64_t step = e->opt[SP_OPT_IDLE_TIMEOUT_MS] / 4;
		int64_t left;

		if (step < 10)
			step = 10;
		if (step > 1000)
			step = 1000;
		if (e->now_ms >= t->next_idle_scan) {
			reclaim_idle(e);
			t->next_idle_scan = e->now_ms + step;
		}
		left = t->next_idle_scan - e->now_ms;
		if (t->half_head != NIL && (next < 0 || left < next))
			next = left;
	}
	return next;
}

void sp_tcp_listener_remove(struct sp_engine *e, struct sp_listener *l)
{
	struct sp_conn_table *t = e->tcp;
	uint32_t i, j;

	for (i = 0; i < t->n_chunks; i++) {
		for (j = 0; j < CONN_CHUNK; j++) {
			struct sp_conn *c = &t->chunks[i][j];

			/* Reset, as on stop: a FIN would pass a cut transfer off
			 * as complete. */
			if (c->state != CONN_FREE && c->listener == l->id)
				conn_close(e, i * CONN_CHUNK + j, c, true, true);
		}
	}
	if (l->paused) {
		l->paused = false;
		t->paused_listeners--;
	}
	if (l->id < t->n_ports) {
		struct sp_port_pool *pp = &t->ports[l->id];

		free(pp->ports);
		memset(pp, 0, sizeof(*pp));
	}
}

void sp_tcp_free(struct sp_engine *e)
{
	struct sp_conn_table *t = e->tcp;
	uint32_t i, j;

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
			if (c->cfd >= 0)
				set_abortive(e, c->cfd);
			if (c->bfd >= 0)
				set_abortive(e, c->bfd);
			sp_close(e, c->cfd);
			sp_close(e, c->bfd);
			dir_release(e, &c->c2b);
			dir_release(e, &c->b2c);
			sp_gauge_sub(e, SP_STAT_TCP_ACTIVE, 1);
		}
		free(t->chunks[i]);
	}
	for (i = 0; i < (uint32_t)t->n_ports; i++)
		free(t->ports[i].ports);
	free(t->ports);
	free(t->starved);
	free(t->connecting);
	free(t->dying);
	free(t->chunks);
	free(t);
	e->tcp = NULL;
}
