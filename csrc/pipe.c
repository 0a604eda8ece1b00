/* SPDX-License-Identifier: MIT
 *
 * pipe.c - a pool of kernel pipes for splice relaying.
 *
 * A connection direction holds a pipe only while bytes are in flight in it;
 * idle connections hold none.  Empty pipes go back to a bounded pool so the
 * common case costs no pipe2()/close() at all.
 *
 * Each pipe knows its own size, and mappings may want different sizes
 * (SP_OPT_PIPE_SIZE is a listener's own): a pipe is taken for a size it
 * fits (see pipe_fits()) when the pool has one, else the newest pooled pipe
 * is resized, which costs one fcntl() instead of a pipe2() and a close().
 * F_SETPIPE_SZ can be refused (EPERM once the
 * user is over /proc/sys/fs/pipe-user-pages-soft, a budget shared with every
 * process of that user); the pipe then stays at the kernel's default and
 * resizing is not tried again for a while, but not for good: the budget comes
 * back when pipes are closed, here or in the other processes, so after
 * RESIZE_RETRY_MS (or at once when this engine closed a pipe) the next pipe
 * handed out, pooled or new, is grown again.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pipe.h"

#define PIPE_DEFAULT_SIZE 65536   /* what pipe2() gives (16 pages) */
#define RESIZE_RETRY_MS 1000       /* after a refused F_SETPIPE_SZ */

struct sp_pipe_pool {
	struct sp_pipe *idle;
	int n_idle;
	int cap;
	size_t max;           /* /proc/sys/fs/pipe-max-size, read on first use */
	int64_t retry_at_ms;  /* growing refused: not asked again before */
};

/**
 * pipe_max_size() - the largest pipe size the kernel allows us
 *
 * Largest pipe size the kernel allows us, from /proc/sys/fs/pipe-max-size.
 */
static long pipe_max_size(void)
{
	FILE *f = fopen("/proc/sys/fs/pipe-max-size", "re");
	long v = 1 << 20;

	if (f) {
		if (fscanf(f, "%ld", &v) != 1)
			v = 1 << 20;
		fclose(f);
	}
	return v;
}

/**
 * sp_pipes_init() - the engine's empty pool
 * @e: engine
 *
 * Return: 0 or -ENOMEM
 */
int sp_pipes_init(struct sp_engine *e)
{
	struct sp_pipe_pool *p = calloc(1, sizeof(*p));

	if (!p)
		return -ENOMEM;
	e->pipes = p;
	return 0;
}

/**
 * pipe_close() - close both ends of a pipe
 * @e:  engine
 * @pp: pipe
 */
static void pipe_close(struct sp_engine *e, struct sp_pipe *pp)
{
	sp_close(e, pp->rd);
	sp_close(e, pp->wr);
	pp->rd = pp->wr = -1;
	sp_gauge_sub(e, SP_STAT_PIPES_OPEN, 1);
	/* Pages given back to the user's budget: a refused resize may pass now. */
	e->pipes->retry_at_ms = 0;
}

/**
 * pipe_fits() - whether a pipe is of the size asked for
 * @pp:   pipe
 * @want: bytes asked for (at most pipe-max-size)
 *
 * By the size it was made for, not by its capacity: the kernel rounds up
 * to a power of two pages, which on a large-page machine is more than
 * twice a small size.
 */
static bool pipe_fits(const struct sp_pipe *pp, size_t want)
{
	return pp->sized == want;
}

/**
 * pipe_fit() - resize a pipe to want bytes, unless growing was refused recently
 * @e:    engine
 * @pp:   pipe, empty
 * @want: bytes asked for (at most pipe-max-size)
 */
static void pipe_fit(struct sp_engine *e, struct sp_pipe *pp, size_t want)
{
	struct sp_pipe_pool *p = e->pipes;
	bool grow = pp->cap < want;   /* only growing spends the user's budget */
	int got;

	if (pipe_fits(pp, want) || (grow && e->now_ms < p->retry_at_ms))
		return;
	sp_sys(e, SP_STAT_SYS_FCNTL);
	got = fcntl(pp->wr, F_SETPIPE_SZ, (int)want);
	if (got == -1) {
		/* EPERM: over pipe-user-pages-soft without CAP_SYS_RESOURCE.
		 * Keep the size it has rather than failing the connection.
		 * Shrinking an empty pipe is never refused for the budget, and
		 * a bigger pipe than asked for relays all the same. */
		if (grow) {
			sp_count(e, SP_STAT_PIPE_RESIZE_DENIED, 1);
			p->retry_at_ms = e->now_ms + RESIZE_RETRY_MS;
		}
		return;
	}
	pp->cap = (size_t)got;
	pp->sized = want;
}

/**
 * sp_pipes_free() - close the pooled pipes and free the pool
 * @e: engine
 */
void sp_pipes_free(struct sp_engine *e)
{
	struct sp_pipe_pool *p = e->pipes;

	if (!p)
		return;
	while (p->n_idle)
		pipe_close(e, &p->idle[--p->n_idle]);
	free(p->idle);
	free(p);
	e->pipes = NULL;
}

/**
 * sp_pipe_get() - take a pipe of want bytes from the pool, or create one
 * @e:    engine
 * @want: bytes asked for (capped at pipe-max-size)
 * @out:  the pipe
 *
 * Return: 0 or -errno
 */
int sp_pipe_get(struct sp_engine *e, size_t want, struct sp_pipe *out)
{
	struct sp_pipe_pool *p = e->pipes;
	int fds[2];

	if (!p->max)
		p->max = (size_t)pipe_max_size();
	if (want > p->max)
		want = p->max;
	if (p->n_idle) {
		/* The newest pipe that fits, else the newest, resized below. */
		int i = p->n_idle - 1;

		while (i > 0 && !pipe_fits(&p->idle[i], want))
			i--;
		if (!pipe_fits(&p->idle[i], want))
			i = p->n_idle - 1;
		*out = p->idle[i];
		memmove(&p->idle[i], &p->idle[i + 1], sizeof(*p->idle) * (size_t)(p->n_idle - 1 - i));
		p->n_idle--;
	} else {
		sp_sys(e, SP_STAT_SYS_PIPE);
		if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) == -1)
			return -errno;
		sp_count(e, SP_STAT_FDS_OPEN, 2);
		sp_count(e, SP_STAT_PIPES_OPEN, 1);
		out->rd = fds[0];
		out->wr = fds[1];
		out->cap = out->sized = PIPE_DEFAULT_SIZE;
	}
	pipe_fit(e, out, want);
	sp_count(e, SP_STAT_PIPES_IN_USE, 1);
	return 0;
}

/**
 * sp_pipe_put() - return an empty pipe to the pool, or close it if the pool is full
 * @e:  engine
 * @pp: pipe, marked as none held afterwards
 */
void sp_pipe_put(struct sp_engine *e, struct sp_pipe *pp)
{
	struct sp_pipe_pool *p = e->pipes;

	sp_gauge_sub(e, SP_STAT_PIPES_IN_USE, 1);
	if (p->n_idle < e->opt[SP_OPT_PIPE_POOL_MAX]) {
		if (p->n_idle == p->cap) {
			int cap = p->cap ? p->cap * 2 : 16;
			struct sp_pipe *n = realloc(p->idle, sizeof(*n) * cap);

			if (n) {
				p->idle = n;
				p->cap = cap;
			}
		}
		if (p->n_idle < p->cap) {
			p->idle[p->n_idle++] = *pp;
			pp->rd = pp->wr = -1;
			return;
		}
	}
	pipe_close(e, pp);
}

/**
 * sp_pipe_drop() - close a pipe that may still hold data
 * @e:  engine
 * @pp: pipe
 */
void sp_pipe_drop(struct sp_engine *e, struct sp_pipe *pp)
{
	sp_gauge_sub(e, SP_STAT_PIPES_IN_USE, 1);
	pipe_close(e, pp);
}

/**
 * sp_engine_reserve_pipes() - fill the pool with n pipes ahead of use (engine.h)
 * @e: engine
 * @n: pipes wanted in the pool
 *
 * Return: pipes now pooled, or -errno
 */
int sp_engine_reserve_pipes(struct sp_engine *e, int n)
{
	struct sp_pipe_pool *p = e->pipes;
	struct sp_pipe tmp[64];
	int i, got = 0, rc = 0;

	if (n > 64)
		n = 64;
	if (n > e->opt[SP_OPT_PIPE_POOL_MAX])
		n = (int)e->opt[SP_OPT_PIPE_POOL_MAX];
	/* Take n pipes (creating what the pool lacks), then give them all back. */
	for (i = 0; i < n; i++) {
		rc = sp_pipe_get(e, (size_t)e->opt[SP_OPT_PIPE_SIZE], &tmp[i]);
		if (rc < 0)
			break;
		got++;
	}
	for (i = 0; i < got; i++)
		sp_pipe_put(e, &tmp[i]);
	if (rc < 0 && !got)
		return rc;
	return p->n_idle;
}
