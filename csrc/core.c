/* SPDX-License-Identifier: MIT
 *
 * core.c - the ground floor every other unit calls down to: counter names
 * and the counters file, the clock, error classes, the event ring, epoll
 * helpers and sp_close().  Calls nothing above it.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <endian.h>
#include <errno.h>
#include <string.h>
#include <unistd.h>
#include <sys/epoll.h>

#include "core.h"

static const char *const stat_names[SP_STAT_COUNT] = {
#define SP_STAT_NAME(name) #name,
	SP_STATS_LIST(SP_STAT_NAME)
#undef SP_STAT_NAME
};

/* Lower-case copies of the counter names, built once (names are ABI). */
static char stat_names_lower[SP_STAT_COUNT][32];

/**
 * sp_stat_name() - the lower-case name of counter i, NULL out of range
 * @i: enum sp_stat
 */
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

/**
 * stats_image() - build the file image of the current counters
 * @e:   engine
 * @buf: STATS_IMAGE_MAX bytes
 *
 * Return: the image's length
 */
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

/**
 * stats_write() - one write of the image; a failure is counted, never acted upon
 * @e: engine
 *
 * Return: 0 or -errno of the write
 */
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

/**
 * sp_stats_flush() - write the counters file if it is due and counters changed
 * @e:     engine
 * @force: write now, changed or not
 *
 * Return: ms until a write is due, or -1 when none is pending
 */
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

/**
 * sp_engine_set_stats_fd() - keep the counters in fd from now on (engine.h)
 * @e:  engine
 * @fd: counters file, not owned; -1 for none
 *
 * Return: 0, or -errno for a descriptor pwrite() can never work on
 */
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

/**
 * sp_now_ms() - the monotonic clock in milliseconds
 */
int64_t sp_now_ms(void)
{
	struct timespec ts;

	/* CLOCK_MONOTONIC_COARSE is served from the vDSO: no system call. */
	clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/**
 * sp_now_us() - the monotonic clock in microseconds
 *
 * The vDSO's fine clock: the coarse one of sp_now_ms() ticks every few ms,
 * longer than any busy-poll window.
 */
int64_t sp_now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/**
 * sp_option_check() - whether value is one option may take
 * @option: enum sp_option
 * @value:  the value
 *
 * One check for the engine's values (sp_engine_set_option()) and a
 * listener's own (sp_engine_set_listener_option()), so that a value one
 * refuses the other cannot take.
 *
 * Return: 0 or -EINVAL
 */
int sp_option_check(int option, int64_t value)
{
	if (option < 0 || option >= SP_OPT_COUNT || value < 0)
		return -EINVAL;
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
		break;
	case SP_OPT_UDP_MAX_FLOWS:
		if (value < 1)
			return -EINVAL;
		break;
	case SP_OPT_SPIN_US:
		if (value > 1000000)
			return -EINVAL;
		break;
	case SP_OPT_TRANSPARENT:
		if (value > 1)
			return -EINVAL;
		break;
	default:
		break;
	}
	return 0;
}

/**
 * sp_count_error() - classify a per-connection errno into the error counters
 * @e:   engine
 * @err: positive errno
 */
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

/**
 * sp_lcount_error() - sp_count_error() for the engine and for listener id
 * @e:   engine
 * @id:  listener id
 * @err: positive errno
 */
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

/**
 * sp_emit() - queue an event for the front end
 * @e:        engine
 * @kind:     enum sp_event_kind
 * @err:      errno it is about, or 0
 * @listener: listener id, -1 for the engine
 * @count:    how many times it happened
 *
 * Coalesces with the newest event of the same kind, listener and errno.
 */
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

/**
 * sp_engine_next_event() - take the oldest queued event (engine.h)
 * @e:  engine
 * @ev: filled in
 *
 * Return: 1 with *ev filled, 0 when the ring is empty
 */
int sp_engine_next_event(struct sp_engine *e, struct sp_event *ev)
{
	if (!e->ring_len)
		return 0;
	*ev = e->ring[e->ring_head];
	e->ring_head = (e->ring_head + 1) % SP_EVENT_RING;
	e->ring_len--;
	return 1;
}

/**
 * sp_events_forget() - drop the queued events of a listener
 * @e:        engine
 * @listener: listener id
 *
 * A removed listener's events would be read as those of the next listener
 * that gets its id.
 */
void sp_events_forget(struct sp_engine *e, int listener)
{
	unsigned i, kept = 0;

	for (i = 0; i < e->ring_len; i++) {
		struct sp_event *ev = &e->ring[(e->ring_head + i) % SP_EVENT_RING];

		if (ev->listener != listener)
			e->ring[(e->ring_head + kept++) % SP_EVENT_RING] = *ev;
	}
	e->ring_len = kept;
}

/**
 * sp_epoll_add() - register fd in the engine's epoll set (counted)
 * @e:      engine
 * @fd:     descriptor
 * @events: EPOLL* mask
 * @ref:    what the events are for
 *
 * Return: 0 or -errno
 */
int sp_epoll_add(struct sp_engine *e, int fd, uint32_t events, union sp_ref ref)
{
	struct epoll_event ev = { .events = events, .data.u64 = ref.u64 };

	sp_sys(e, SP_STAT_SYS_EPOLL_CTL);
	if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, fd, &ev) == -1)
		return -errno;
	return 0;
}

/**
 * sp_epoll_mod() - change fd's registration (counted)
 * @e:      engine
 * @fd:     descriptor
 * @events: EPOLL* mask
 * @ref:    what the events are for
 *
 * Return: 0 or -errno
 */
int sp_epoll_mod(struct sp_engine *e, int fd, uint32_t events, union sp_ref ref)
{
	struct epoll_event ev = { .events = events, .data.u64 = ref.u64 };

	sp_sys(e, SP_STAT_SYS_EPOLL_CTL);
	if (epoll_ctl(e->epfd, EPOLL_CTL_MOD, fd, &ev) == -1)
		return -errno;
	return 0;
}

/**
 * sp_epoll_del() - take fd out of the epoll set (counted)
 * @e:  engine
 * @fd: descriptor
 *
 * Return: 0 or -errno
 */
int sp_epoll_del(struct sp_engine *e, int fd)
{
	sp_sys(e, SP_STAT_SYS_EPOLL_CTL);
	if (epoll_ctl(e->epfd, EPOLL_CTL_DEL, fd, NULL) == -1)
		return -errno;
	return 0;
}

/**
 * sp_close() - close(2), counted, with the FDS_OPEN gauge kept
 * @e:  engine
 * @fd: descriptor; ignored when < 0
 */
void sp_close(struct sp_engine *e, int fd)
{
	if (fd < 0)
		return;
	sp_sys(e, SP_STAT_SYS_CLOSE);
	/* close() always releases the descriptor, even on EINTR: never retry. */
	close(fd);
	sp_gauge_sub(e, SP_STAT_FDS_OPEN, 1);
}
