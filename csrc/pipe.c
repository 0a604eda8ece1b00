/* SPDX-License-Identifier: MIT
 *
 * pipe.c - a pool of kernel pipes for splice relaying.
 *
 * A connection direction holds a pipe only while bytes are in flight in it;
 * idle connections hold none.  Empty pipes go back to a bounded pool so the
 * common case costs no pipe2()/close() at all.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "internal.h"

struct sp_pipe_pool {
	struct sp_pipe *idle;
	int n_idle;
	int cap;
	size_t capacity;   /* bytes a pooled pipe holds (after F_SETPIPE_SZ) */
	int64_t sized_for; /* SP_OPT_PIPE_SIZE the pool was sized for */
	bool resize_denied;/* F_SETPIPE_SZ refused (user pipe limits): stop asking */
	long max_size;     /* /proc/sys/fs/pipe-max-size, read once */
};

/* Largest pipe size the kernel allows us, from /proc/sys/fs/pipe-max-size. */
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

int sp_pipes_init(struct sp_engine *e)
{
	struct sp_pipe_pool *p = calloc(1, sizeof(*p));

	if (!p)
		return -ENOMEM;
	p->capacity = 65536;
	p->sized_for = -1;
	p->max_size = pipe_max_size();
	e->pipes = p;
	return 0;
}

static void pipe_close(struct sp_engine *e, struct sp_pipe *pp)
{
	sp_close(e, pp->rd);
	sp_close(e, pp->wr);
	pp->rd = pp->wr = -1;
	sp_gauge_sub(e, SP_STAT_PIPES_OPEN, 1);
}

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

size_t sp_pipe_capacity(struct sp_engine *e)
{
	return e->pipes->capacity;
}

int sp_pipe_get(struct sp_engine *e, struct sp_pipe *out)
{
	struct sp_pipe_pool *p = e->pipes;
	int fds[2];

	if (p->sized_for != e->opt[SP_OPT_PIPE_SIZE]) {
		/* The size changed: drop pooled pipes of the old size. */
		while (p->n_idle)
			pipe_close(e, &p->idle[--p->n_idle]);
		p->sized_for = e->opt[SP_OPT_PIPE_SIZE];
		p->resize_denied = false;
		p->capacity = 65536;
	}
	if (p->n_idle) {
		*out = p->idle[--p->n_idle];
		sp_count(e, SP_STAT_PIPES_IN_USE, 1);
		return 0;
	}
	sp_sys(e, SP_STAT_SYS_PIPE);
	if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) == -1)
		return -errno;
	sp_count(e, SP_STAT_FDS_OPEN, 2);
	sp_count(e, SP_STAT_PIPES_OPEN, 1);
	out->rd = fds[0];
	out->wr = fds[1];
	if (!p->resize_denied && p->sized_for != 65536) {
		long want = (long)p->sized_for;
		int got;

		if (want > p->max_size)
			want = p->max_size;
		sp_sys(e, SP_STAT_SYS_FCNTL);
		got = fcntl(fds[1], F_SETPIPE_SZ, (int)want);
		if (got == -1) {
			/* EPERM: over pipe-user-pages-soft without CAP_SYS_RESOURCE.
			 * Keep the default size rather than failing the connection. */
			p->resize_denied = true;
		} else {
			p->capacity = (size_t)got;
		}
	}
	sp_count(e, SP_STAT_PIPES_IN_USE, 1);
	return 0;
}

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

void sp_pipe_drop(struct sp_engine *e, struct sp_pipe *pp)
{
	sp_gauge_sub(e, SP_STAT_PIPES_IN_USE, 1);
	pipe_close(e, pp);
}

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
		rc = sp_pipe_get(e, &tmp[i]);
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
