/* SPDX-License-Identifier: MIT
 *
 * loop.c - engine lifetime, options, the epoll loop, the event ring.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <netinet/in.h>

#include "internal.h"

#define SP_EPOLL_BATCH 256

static const char *const stat_names[SP_STAT_COUNT] = {
#define SP_STAT_NAME(name) #name,
	SP_STATS_LIST(SP_STAT_NAME)
#undef SP_STAT_NAME
};

/* Lower-case copies of the counter names, built once (names are ABI). */
static char stat_names_lower[SP_STAT_COUNT][32];

const char *sp_stat_name(int i)
{
	if (i < 0 || i >= SP_STAT_COUNT)
		return NULL;
	if (!stat_names_lower[i][0]) {
		const char *s = stat_names[i];
		size_t k;

		for (k = 0; s[k] && k < sizeof(stat_names_lower[i]) - 1; k++)
			stat_names_lower[i][k] = (char)(s[k] >= 'A' && s[k] <= 'Z' ? s[k] + 32 : s[k]);
		stat_names_lower[i][k] = '\0';
	}
	return stat_names_lower[i];
}

/*
 * The counters file.  The engine never maps it: a mapping would put the
 * counters the engine decides by in memory the file's other writers control,
 * and a truncated file would kill the process with SIGBUS.  Instead a whole
 * image (header, values, names) is written with one pwrite() at offset 0,
 * rate-limited to one per SP_STATS_FLUSH_MS.  Rewriting the header and the
 * names every time costs nothing measurable (about a kilobyte, ten times a
 * second at most) and repairs a file someone truncated or scribbled on.
 */
#define STATS_IMAGE_MAX (sizeof(struct sp_stats_header) + SP_STAT_COUNT * (8 + 32))

/* Build the file image of the current counters in buf; returns its length. */
static size_t stats_image(const struct sp_engine *e, unsigned char *buf)
{
	struct sp_stats_header h;
	size_t off = sizeof(h) + 8 * SP_STAT_COUNT, names = off;
	int i;

	for (i = 0; i < SP_STAT_COUNT; i++) {
		uint64_t v = htole64(e->stats[i]);
		const char *name = sp_stat_name(i);
		size_t n = strlen(name) + 1;

		memcpy(buf + sizeof(h) + 8 * i, &v, 8);
		memcpy(buf + off, name, n);
		off += n;
	}
	h.magic = htole64(SP_STATS_MAGIC);
	h.version = htole32(SP_STATS_VERSION);
	h.count = htole32(SP_STAT_COUNT);
	h.pid = htole64((uint64_t)getpid());
	h.names_off = htole32((uint32_t)names);
	h.names_len = htole32((uint32_t)(off - names));
	memcpy(buf, &h, sizeof(h));
	return off;
}

/* One write of the image; a failure is counted, never acted upon. */
static int stats_write(struct sp_engine *e)
{
	unsigned char buf[STATS_IMAGE_MAX];
	size_t len;
	ssize_t n;
	int err = 0;

	/* Counted before the image is taken so that it includes itself:
	 * otherwise every write would leave the counters "changed" and an
	 * idle engine would wake up to write again, forever. */
	sp_sys(e, SP_STAT_SYS_OTHER);
	len = stats_image(e, buf);
	do {
		n = pwrite(e->stats_fd, buf, len, 0);
	} while (n == -1 && errno == EINTR);
	if (n == -1)
		err = errno;
	else if ((size_t)n != len)
		err = ENOSPC;
	if (err)
		sp_count(e, SP_STAT_STATS_WRITE_ERRORS, 1);
	/* Remember what this attempt stood for even when it failed (its own
	 * error count included), so a full disk costs one attempt per change
	 * of the counters, not a retry loop. */
	memcpy(e->stats_sent, e->stats, sizeof(e->stats_sent));
	e->stats_next_ms = e->now_ms + SP_STATS_FLUSH_MS;
	return -err;
}

int64_t sp_stats_flush(struct sp_engine *e, bool force)
{
	if (e->stats_fd < 0)
		return -1;
	if (!force && !memcmp(e->stats_sent, e->stats, sizeof(e->stats_sent)))
		return -1;
	if (force || e->now_ms >= e->stats_next_ms) {
		stats_write(e);
		return -1;
	}
	return e->stats_next_ms - e->now_ms;
}

int sp_engine_set_stats_fd(struct sp_engine *e, int fd)
{
	int rc;

	if (fd < -1)
		return -EINVAL;
	e->stats_fd = fd;
	if (fd < 0)
		return 0;
	e->now_ms = sp_now_ms();
	rc = stats_write(e);
	/* Descriptors pwrite() can never work on are refused; anything else
	 * (ENOSPC, EIO, EDQUOT) may pass and is only counted. */
	if (rc == -EBADF || rc == -ESPIPE || rc == -EINVAL || rc == -EISDIR) {
		e->stats_fd = -1;
		return rc;
	}
	return 0;
}

int64_t sp_now_ms(void)
{
	struct timespec ts;

	/* CLOCK_MONOTONIC_COARSE is served from the vDSO: no system call. */
	clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void sp_count_error(struct sp_engine *e, int err)
{
	switch (err) {
	case EMFILE:
	case ENFILE:
		sp_count(e, SP_STAT_ERR_EMFILE, 1);
		break;
	case ENOBUFS:
	case ENOMEM:
		sp_count(e, SP_STAT_ERR_ENOBUFS, 1);
		break;
	case ECONNRESET:
	case EPIPE:
		sp_count(e, SP_STAT_ERR_RESET, 1);
		break;
	default:
		sp_count(e, SP_STAT_ERR_OTHER, 1);
	}
}

void sp_lcount_error(struct sp_engine *e, int id, int err)
{
	enum sp_stat s;

	switch (err) {
	case EMFILE:
	case ENFILE:
		s = SP_STAT_ERR_EMFILE;
		break;
	case ENOBUFS:
	case ENOMEM:
		s = SP_STAT_ERR_ENOBUFS;
		break;
	case ECONNRESET:
	case EPIPE:
		s = SP_STAT_ERR_RESET;
		break;
	default:
		s = SP_STAT_ERR_OTHER;
	}
	sp_lcount(e, id, s, 1);
}

void sp_emit(struct sp_engine *e, int kind, int err, int listener, uint64_t count)
{
	struct sp_event *ev;

	if (e->ring_len) {
		/* Coalesce bursts (a flood of refused connects) into one line. */
		ev = &e->ring[(e->ring_head + e->ring_len - 1) % SP_EVENT_RING];
		if (ev->kind == kind && ev->err == err && ev->listener == listener) {
			ev->count += count;
			return;
		}
	}
	if (e->ring_len == SP_EVENT_RING) {
		sp_count(e, SP_STAT_EVENTS_DROPPED, count);
		return;
	}
	ev = &e->ring[(e->ring_head + e->ring_len) % SP_EVENT_RING];
	ev->kind = kind;
	ev->err = err;
	ev->listener = listener;
	ev->pad = 0;
	ev->count = count;
	e->ring_len++;
}

int sp_engine_next_event(struct sp_engine *e, struct sp_event *ev)
{
	if (!e->ring_len)
		return 0;
	*ev = e->ring[e->ring_head];
	e->ring_head = (e->ring_head + 1) % SP_EVENT_RING;
	e->ring_len--;
	return 1;
}

int sp_epoll_add(struct sp_engine *e, int fd, uint32_t events, uint64_t tag)
{
	struct epoll_event ev = { .events = events, .data.u64 = tag };

	sp_sys(e, SP_STAT_SYS_EPOLL_CTL);
	if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, fd, &ev) == -1)
		return -errno;
	return 0;
}

int sp_epoll_mod(struct sp_engine *e, int fd, uint32_t events, uint64_t tag)
{
	struct epoll_event ev = { .events = events, .data.u64 = tag };

	sp_sys(e, SP_STAT_SYS_EPOLL_CTL);
	if (epoll_ctl(e->epfd, EPOLL_CTL_MOD, fd, &ev) == -1)
		return -errno;
	return 0;
}

int sp_epoll_del(struct sp_engine *e, int fd)
{
	sp_sys(e, SP_STAT_SYS_EPOLL_CTL);
	if (epoll_ctl(e->epfd, EPOLL_CTL_DEL, fd, NULL) == -1)
		return -errno;
	return 0;
}

void sp_close(struct sp_engine *e, int fd)
{
	if (fd < 0)
		return;
	sp_sys(e, SP_STAT_SYS_CLOSE);
	/* close() always releases the descriptor, even on EINTR: never retry. */
	close(fd);
	sp_gauge_sub(e, SP_STAT_FDS_OPEN, 1);
}

static const int64_t option_defaults[SP_OPT_COUNT] = {
	[SP_OPT_PIPE_SIZE] = 1 << 20,
	[SP_OPT_PIPE_POOL_MAX] = 16,
	[SP_OPT_COPY_MODE] = SP_COPY_SPLICE,
	[SP_OPT_COPY_BUF] = 64 << 10,
	[SP_OPT_IDLE_TIMEOUT_MS] = 120000,
	[SP_OPT_UDP_TIMEOUT_MS] = 90000,
	[SP_OPT_UDP_MAX_FLOWS] = 16384,
	[SP_OPT_ACCEPT_BACKOFF_MS] = 100,
	[SP_OPT_FD_LIMIT] = 0,
	[SP_OPT_CONNECT_TIMEOUT_MS] = 30000,
	[SP_OPT_UDP_MAX_FLOWS_PER_ADDR] = 0,
};

int sp_engine_new(struct sp_engine **out)
{
	struct sp_engine *e;
	int rc;

	e = calloc(1, sizeof(*e));
	if (!e)
		return -ENOMEM;
	e->epfd = e->ctlfd = e->watchfd = e->stats_fd = -1;
	memcpy(e->opt, option_defaults, sizeof(e->opt));
	e->now_ms = sp_now_ms();

	sp_sys(e, SP_STAT_SYS_OTHER);
	e->epfd = epoll_create1(EPOLL_CLOEXEC);
	if (e->epfd == -1) {
		rc = -errno;
		goto fail;
	}
	sp_fd_opened(e);
	sp_sys(e, SP_STAT_SYS_OTHER);
	e->ctlfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (e->ctlfd == -1) {
		rc = -errno;
		goto fail;
	}
	sp_fd_opened(e);
	rc = sp_epoll_add(e, e->ctlfd, EPOLLIN, sp_tag(SP_TAG_CONTROL, 0));
	if (rc < 0)
		goto fail;
	rc = sp_pipes_init(e);
	if (rc < 0)
		goto fail;
	rc = sp_tcp_init(e);
	if (rc < 0)
		goto fail;
	rc = sp_udp_init(e);
	if (rc < 0)
		goto fail;
	*out = e;
	return 0;
fail:
	sp_engine_free(e);
	return rc;
}

void sp_engine_free(struct sp_engine *e)
{
	int i;

	if (!e)
		return;
	for (i = 0; i < e->n_listeners; i++) {
		struct sp_listener *l = &e->listeners[i];

		if (l->type == SOCK_DGRAM)
			sp_udp_listener_free(e, l);
		sp_close(e, l->fd);
		l->fd = -1;
	}
	sp_tcp_free(e);
	sp_udp_free(e);
	sp_pipes_free(e);
	free(e->listeners);
	sp_close(e, e->ctlfd);
	sp_close(e, e->epfd);
	/* The last image: every gauge back at zero, the final totals. */
	e->now_ms = sp_now_ms();
	sp_stats_flush(e, true);
	free(e);
}

/* Whether an option sizes something live connections hold: a copy buffer
 * allocated at the old size and read into at the new one overruns it. */
static bool option_sizes(int option)
{
	switch (option) {
	case SP_OPT_PIPE_SIZE:
	case SP_OPT_PIPE_POOL_MAX:
	case SP_OPT_COPY_MODE:
	case SP_OPT_COPY_BUF:
	case SP_OPT_UDP_MAX_FLOWS:
	case SP_OPT_UDP_MAX_FLOWS_PER_ADDR:
		return true;
	default:
		return false;
	}
}

int sp_engine_set_option(struct sp_engine *e, int option, int64_t value)
{
	if (option < 0 || option >= SP_OPT_COUNT || value < 0)
		return -EINVAL;
	/* Sizing options are fixed once anything can be relayed, rather than
	 * every buffer and table learning to be resized under live traffic. */
	if (option_sizes(option) && e->n_listeners > 0)
		return -EBUSY;
	switch (option) {
	case SP_OPT_COPY_MODE:
		if (value != SP_COPY_SPLICE && value != SP_COPY_READWRITE)
			return -EINVAL;
		break;
	case SP_OPT_COPY_BUF:
		if (value < 1 || value > (64 << 20))
			return -EINVAL;
		break;
	case SP_OPT_PIPE_SIZE:
		if (value < 4096 || value > (1 << 30))
			return -EINVAL;
		sp_pipes_resize(e);
		break;
	case SP_OPT_UDP_MAX_FLOWS:
		if (value < 1)
			return -EINVAL;
		break;
	default:
		break;
	}
	e->opt[option] = value;
	return 0;
}

/* Fill a new listener slot; returns it, or NULL when out of memory. */
static struct sp_listener *listener_slot(struct sp_engine *e, int fd, int type, int family,
					 const struct sockaddr *backend, socklen_t len)
{
	struct sp_listener *l;
	int i;

	/* A removed listener's slot first: ids stay small, and a port range
	 * coming and going does not grow the table. */
	for (i = 0; i < e->n_listeners; i++) {
		l = &e->listeners[i];
		if (l->removed) {
			memset(l, 0, sizeof(*l));
			l->fd = fd;
			l->type = type;
			l->family = family;
			l->id = i;
			memcpy(&l->backend, backend, len);
			l->backend_len = len;
			return l;
		}
	}
	if (e->n_listeners == e->cap_listeners) {
		int cap = e->cap_listeners ? e->cap_listeners * 2 : 4;
		struct sp_listener *n = realloc(e->listeners, sizeof(*n) * cap);

		if (!n)
			return NULL;
		e->listeners = n;
		e->cap_listeners = cap;
	}
	l = &e->listeners[e->n_listeners];
	memset(l, 0, sizeof(*l));
	l->fd = fd;
	l->type = type;
	l->family = family;
	l->id = e->n_listeners;
	memcpy(&l->backend, backend, len);
	l->backend_len = len;
	e->n_listeners++;
	return l;
}

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

int sp_engine_add_tcp(struct sp_engine *e, int listen_fd, const struct sockaddr *backend,
		      socklen_t backend_len)
{
	struct sp_listener *l;
	int rc = check_backend(backend, backend_len);

	if (rc < 0)
		return rc;
	l = listener_slot(e, listen_fd, SOCK_STREAM, 0, backend, backend_len);
	if (!l)
		return -ENOMEM;
	sp_fd_opened(e);
	sp_tcp_listener_setup(e, listen_fd);
	rc = sp_epoll_add(e, listen_fd, EPOLLIN, sp_tag(SP_TAG_TCP_LISTENER, (uint32_t)l->id));
	if (rc < 0) {
		/* Keep the slot (ids are stable) but give the descriptor back. */
		sp_gauge_sub(e, SP_STAT_FDS_OPEN, 1);
		l->fd = -1;
		return rc;
	}
	return l->id;
}

int sp_engine_add_udp(struct sp_engine *e, int fd, int family, const struct sockaddr *backend,
		      socklen_t backend_len)
{
	struct sp_listener *l;
	int rc = check_backend(backend, backend_len);

	if (rc < 0)
		return rc;
	if (family != AF_INET && family != AF_INET6)
		return -EAFNOSUPPORT;
	l = listener_slot(e, fd, SOCK_DGRAM, family, backend, backend_len);
	if (!l)
		return -ENOMEM;
	sp_fd_opened(e);
	rc = sp_udp_listener_init(e, l);
	if (rc < 0) {
		sp_gauge_sub(e, SP_STAT_FDS_OPEN, 1);
		l->fd = -1;
		return rc;
	}
	return l->id;
}

int sp_engine_remove(struct sp_engine *e, int id)
{
	struct sp_listener *l;
	unsigned i, kept = 0;

	if (id < 0 || id >= e->n_listeners || e->listeners[id].removed)
		return -ENOENT;
	l = &e->listeners[id];
	if (l->type == SOCK_STREAM)
		sp_tcp_listener_remove(e, l);
	else
		sp_udp_listener_free(e, l);
	if (l->fd >= 0) {
		/* Explicitly: the stub holds a duplicate of this socket, so
		 * close() alone would leave it in the epoll set. */
		sp_epoll_del(e, l->fd);
		sp_close(e, l->fd);
		l->fd = -1;
	}
	/* Its queued events would be read as those of the next listener that
	 * gets this id. */
	for (i = 0; i < e->ring_len; i++) {
		struct sp_event *ev = &e->ring[(e->ring_head + i) % SP_EVENT_RING];

		if (ev->listener != id)
			e->ring[(e->ring_head + kept++) % SP_EVENT_RING] = *ev;
	}
	e->ring_len = kept;
	l->removed = true;
	return 0;
}

static const enum sp_stat listener_stats[] = {
#define SP_LSTAT_ENTRY(name) SP_STAT_##name,
	SP_LISTENER_STATS_LIST(SP_LSTAT_ENTRY)
#undef SP_LSTAT_ENTRY
};

int sp_stat_per_listener(int i)
{
	size_t k;

	for (k = 0; k < sizeof(listener_stats) / sizeof(listener_stats[0]); k++)
		if ((int)listener_stats[k] == i)
			return 1;
	return 0;
}

int sp_engine_set_listener_option(struct sp_engine *e, int id, int option, int64_t value)
{
	struct sp_listener *l;

	if (id < 0 || id >= e->n_listeners || e->listeners[id].removed)
		return -ENOENT;
	l = &e->listeners[id];
	switch (option) {
	case SP_OPT_UDP_TIMEOUT_MS:
	case SP_OPT_UDP_MAX_FLOWS_PER_ADDR:
		if (value < 0)
			return -EINVAL;
		break;
	case SP_OPT_UDP_MAX_FLOWS:
		if (value < 1)
			return -EINVAL;
		break;
	default:
		return -EINVAL;
	}
	l->opt[option] = value;
	l->opt_own |= 1u << option;
	return 0;
}

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

int sp_engine_watch(struct sp_engine *e, int fd)
{
	int rc;

	if (e->watchfd >= 0) {
		sp_epoll_del(e, e->watchfd);
		e->watchfd = -1;
	}
	if (fd < 0)
		return 0;
	rc = sp_epoll_add(e, fd, EPOLLIN, sp_tag(SP_TAG_WATCH, 0));
	if (rc < 0)
		return rc;
	e->watchfd = fd;
	return 0;
}

int sp_engine_stop(struct sp_engine *e)
{
	uint64_t one = 1;

	e->stop_requested = 1;
	/* write(2) on an eventfd is async-signal-safe; EAGAIN means already signalled. */
	if (write(e->ctlfd, &one, sizeof(one)) == -1 && errno != EAGAIN)
		return -errno;
	return 0;
}

const uint64_t *sp_engine_stats(const struct sp_engine *e)
{
	return e->stats;
}

/* Smallest non-negative of two timeouts where -1 means none. */
static int64_t min_timeout(int64_t a, int64_t b)
{
	if (a < 0)
		return b;
	if (b < 0)
		return a;
	return a < b ? a : b;
}

int sp_engine_run(struct sp_engine *e, int timeout_ms)
{
	struct epoll_event evs[SP_EPOLL_BATCH];
	int64_t deadline = timeout_ms >= 0 ? sp_now_ms() + timeout_ms : -1;
	int result = -1;

	while (result < 0) {
		int64_t wait;
		int n, i;

		if (e->stop_requested) {
			uint64_t v;

			e->stop_requested = 0;
			if (read(e->ctlfd, &v, sizeof(v)) == -1 && errno != EAGAIN)
				return -errno;
			return SP_RUN_STOPPED;
		}
		if (e->ring_len)
			return SP_RUN_EVENTS;

		e->now_ms = sp_now_ms();
		wait = min_timeout(sp_tcp_timer(e), sp_udp_timer(e));
		if (e->ring_len)
			return SP_RUN_EVENTS;
		if (deadline >= 0) {
			int64_t left = deadline - e->now_ms;

			if (left <= 0)
				return SP_RUN_TIMEOUT;
			wait = min_timeout(wait, left);
		}
		if (wait > 0x7fffffff)
			wait = 0x7fffffff;

		sp_sys(e, SP_STAT_SYS_EPOLL_WAIT);
		/* After counting the epoll_wait below, so that an image written
		 * now is exact; a pending write bounds the wait, so the last
		 * change lands within SP_STATS_FLUSH_MS even when traffic stops. */
		wait = min_timeout(wait, sp_stats_flush(e, false));
		n = epoll_wait(e->epfd, evs, SP_EPOLL_BATCH, (int)wait);
		if (n == -1) {
			if (errno == EINTR)
				return SP_RUN_INTERRUPTED;
			return -errno;
		}
		sp_count(e, SP_STAT_LOOP_WAKEUPS, 1);
		e->now_ms = sp_now_ms();

		for (i = 0; i < n; i++) {
			uint64_t tag = evs[i].data.u64;
			uint32_t idx = sp_tag_index(tag);
			uint32_t ev = evs[i].events;
			unsigned type = sp_tag_type(tag);

			switch (type) {
			case SP_TAG_CONTROL:
				/* Handled at the top of the loop via stop_requested. */
				break;
			case SP_TAG_WATCH:
				result = SP_RUN_WATCH;
				break;
			case SP_TAG_TCP_LISTENER:
				if (idx < (uint32_t)e->n_listeners && e->listeners[idx].fd >= 0)
					sp_tcp_listener_event(e, &e->listeners[idx], ev);
				break;
			case SP_TAG_TCP_CLIENT:
			case SP_TAG_TCP_BACKEND:
				sp_tcp_dispatch(e, tag, ev);
				break;
			case SP_TAG_UDP_LISTENER:
				if (idx < (uint32_t)e->n_listeners && e->listeners[idx].fd >= 0)
					sp_udp_listener_event(e, &e->listeners[idx], ev);
				break;
			case SP_TAG_UDP_FLOW:
				sp_udp_flow_event(e, idx, ev);
				break;
			default:
				break;
			}
		}
		if (deadline >= 0 && result < 0 && sp_now_ms() >= deadline)
			result = SP_RUN_TIMEOUT;
	}
	return result;
}
