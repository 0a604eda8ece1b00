/* SPDX-License-Identifier: MIT
 *
 * loop.c - engine lifetime, options, the epoll loop, the event ring.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>

#include "pipe.h"
#include "proto.h"

#define SP_EPOLL_BATCH 256

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
	[SP_OPT_SPIN_US] = 0,
};

/**
 * sp_engine_new() - create an engine (engine.h)
 * @out: the engine
 *
 * Return: 0 or -errno
 */
int sp_engine_new(struct sp_engine **out)
{
	struct sp_engine *e;
	unsigned p;
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
	rc = sp_epoll_add(e, e->ctlfd, EPOLLIN, sp_ref(SP_REF_CONTROL, 0, 0, 0, 0));
	if (rc < 0)
		goto fail;
	rc = sp_pipes_init(e);
	if (rc < 0)
		goto fail;
	for (p = 0; p < SP_PROTO_COUNT; p++) {
		rc = sp_protos[p]->init(e);
		if (rc < 0)
			goto fail;
	}
	*out = e;
	return 0;
fail:
	sp_engine_free(e);
	return rc;
}

/**
 * sp_engine_free() - close and free everything the engine holds (engine.h)
 * @e: engine, or NULL
 */
void sp_engine_free(struct sp_engine *e)
{
	unsigned p;

	if (!e)
		return;
	sp_listeners_free(e);
	for (p = 0; p < SP_PROTO_COUNT; p++)
		sp_protos[p]->free(e);
	sp_pipes_free(e);
	free(e->tp_exclude);
	sp_close(e, e->ctlfd);
	sp_close(e, e->epfd);
	/* The last image: every gauge back at zero, the final totals. */
	e->now_ms = sp_now_ms();
	sp_stats_flush(e, true);
	free(e);
}

/**
 * option_sizes() - whether an option sizes something live connections hold
 * @option: enum sp_option
 *
 * A copy buffer allocated at the old size and read into at the new one
 * overruns it.
 */
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

/**
 * sp_engine_set_option() - set an engine option (engine.h)
 * @e:      engine
 * @option: enum sp_option
 * @value:  its value
 *
 * Return: 0, -EINVAL or -EBUSY
 */
int sp_engine_set_option(struct sp_engine *e, int option, int64_t value)
{
	int rc = sp_option_check(option, value);

	if (rc < 0)
		return rc;
	/* Sizing options are fixed once anything can be relayed, rather than
	 * every buffer and table learning to be resized under live traffic. */
	if (option_sizes(option) && e->n_listeners > 0)
		return -EBUSY;
	e->opt[option] = value;
	return 0;
}

/**
 * sp_engine_get_option() - the value an option has, for the engine or a listener (engine.h)
 * @e:      engine
 * @id:     listener id, or -1 for the engine's own value
 * @option: enum sp_option
 * @value:  the value
 *
 * Return: 0, -EINVAL, -ENOENT, or -EOPNOTSUPP for an option the
 * listener's protocol does not let it have of its own
 */
int sp_engine_get_option(const struct sp_engine *e, int id, int option, int64_t *value)
{
	if (option < 0 || option >= SP_OPT_COUNT)
		return -EINVAL;
	if (id < 0) {
		*value = e->opt[option];
		return 0;
	}
	if (id >= e->n_listeners || e->listeners[id].removed)
		return -ENOENT;
	if (!(e->listeners[id].proto->listener_options & SP_OPT_BIT(option)))
		return -EOPNOTSUPP;
	*value = sp_lopt(e, id, option);
	return 0;
}

/**
 * sp_engine_watch() - make run() return SP_RUN_WATCH when fd is readable (engine.h)
 * @e:  engine
 * @fd: descriptor, not owned; -1 clears
 *
 * Return: 0 or -errno
 */
int sp_engine_watch(struct sp_engine *e, int fd)
{
	int rc;

	if (e->watchfd >= 0) {
		sp_epoll_del(e, e->watchfd);
		e->watchfd = -1;
	}
	if (fd < 0)
		return 0;
	rc = sp_epoll_add(e, fd, EPOLLIN, sp_ref(SP_REF_WATCH, 0, 0, 0, 0));
	if (rc < 0)
		return rc;
	e->watchfd = fd;
	return 0;
}

/**
 * sp_engine_stop() - make run() return SP_RUN_STOPPED; async-signal-safe (engine.h)
 * @e: engine
 *
 * Return: 0 or -errno
 */
int sp_engine_stop(struct sp_engine *e)
{
	uint64_t one = 1;

	e->stop_requested = 1;
	/* write(2) on an eventfd is async-signal-safe; EAGAIN means already signalled. */
	if (write(e->ctlfd, &one, sizeof(one)) == -1 && errno != EAGAIN)
		return -errno;
	return 0;
}

/**
 * sp_engine_stats() - the engine's counters, SP_STAT_COUNT of them (engine.h)
 * @e: engine
 */
const uint64_t *sp_engine_stats(const struct sp_engine *e)
{
	return e->stats;
}

/**
 * min_timeout() - the smaller of two timeouts where -1 means none
 * @a: ms or -1
 * @b: ms or -1
 */
static int64_t min_timeout(int64_t a, int64_t b)
{
	if (a < 0)
		return b;
	if (b < 0)
		return a;
	return a < b ? a : b;
}

/**
 * bytes_moved() - bytes relayed so far in either direction, TCP and UDP
 * @e: engine
 */
static uint64_t bytes_moved(const struct sp_engine *e)
{
	return e->stats[SP_STAT_BYTES_C2B] + e->stats[SP_STAT_BYTES_B2C] +
	       e->stats[SP_STAT_UDP_BYTES_C2B] + e->stats[SP_STAT_UDP_BYTES_B2C];
}

/**
 * protos_timer() - run every protocol's deadlines
 * @e: engine
 *
 * Return: ms until the next one, or -1
 */
static int64_t protos_timer(struct sp_engine *e)
{
	int64_t wait = -1;
	unsigned p;

	for (p = 0; p < SP_PROTO_COUNT; p++)
		wait = min_timeout(wait, sp_protos[p]->timer(e));
	return wait;
}

/**
 * dispatch() - hand one epoll event to what its reference names
 * @e:      engine
 * @ref:    the event's reference
 * @events: EPOLL* mask
 *
 * Return: SP_RUN_WATCH when the watched descriptor is readable, else -1
 */
static int dispatch(struct sp_engine *e, union sp_ref ref, uint32_t events)
{
	struct sp_listener *l;

	switch (ref.type) {
	case SP_REF_CONTROL:
		/* Handled at the top of the loop via stop_requested. */
		break;
	case SP_REF_WATCH:
		return SP_RUN_WATCH;
	case SP_REF_LISTENER:
		l = sp_listener_of(e, ref);
		if (l)
			l->proto->listener_event(e, l, events);
		break;
	case SP_REF_FLOW:
		/* The protocol checks the slot's generation (sp_ref_current()). */
		if (ref.proto < SP_PROTO_COUNT)
			sp_protos[ref.proto]->flow_event(e, ref, events);
		break;
	default:
		break;
	}
	return -1;
}

/**
 * sp_engine_run() - serve until an event, a signal, stop() or the timeout (engine.h)
 * @e:          engine
 * @timeout_ms: -1 for none
 *
 * Return: an SP_RUN_* value or -errno
 */
int sp_engine_run(struct sp_engine *e, int timeout_ms)
{
	struct epoll_event evs[SP_EPOLL_BATCH];
	int64_t deadline = timeout_ms >= 0 ? sp_now_ms() + timeout_ms : -1;
	/* Busy-poll window (SP_OPT_SPIN_US, off by default): a blocked thread
	 * can take tens of microseconds to wake, and after a wake-up that
	 * moved bytes the answer is usually a round trip away, so keep
	 * polling until spin_until.  A clock bound, re-armed only by traffic,
	 * so an idle engine sleeps again within SP_OPT_SPIN_US of its last
	 * byte.  Measured on this project's VMs it did not pay
	 * (docs/benchmarking.md, "Busy-poll"), hence opt-in. */
	int64_t spin_until = 0;
	int result = -1;

	while (result < 0) {
		int64_t wait;
		uint64_t moved;
		bool spin = false;
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
		wait = protos_timer(e);
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
		if (spin_until && wait != 0) {
			if (sp_now_us() < spin_until) {
				spin = true;
				wait = 0;
				sp_count(e, SP_STAT_SPIN_POLLS, 1);
			} else {
				spin_until = 0;
			}
		}

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
		if (spin && !n)
			continue;
		if (spin)
			sp_count(e, SP_STAT_SPIN_HITS, 1);
		sp_count(e, SP_STAT_LOOP_WAKEUPS, 1);
		e->now_ms = sp_now_ms();
		moved = bytes_moved(e);

		for (i = 0; i < n; i++) {
			union sp_ref ref = { .u64 = evs[i].data.u64 };
			int r = dispatch(e, ref, evs[i].events);

			if (r >= 0)
				result = r;
		}
		if (e->opt[SP_OPT_SPIN_US] && bytes_moved(e) != moved)
			spin_until = sp_now_us() + e->opt[SP_OPT_SPIN_US];
		if (deadline >= 0 && result < 0 && sp_now_ms() >= deadline)
			result = SP_RUN_TIMEOUT;
	}
	return result;
}
