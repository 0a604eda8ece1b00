/* SPDX-License-Identifier: MIT
 *
 * mover_splice.c - the default data path: splice(2) from the source socket
 * into a kernel pipe borrowed from the pool (pipe.c) and from the pipe to
 * the destination, so payload never enters user space.  A direction holds
 * a pipe only while bytes are in flight in it.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>

#include "mover.h"

/**
 * splice_fill() - splice from src into the direction's pipe, taking one first
 * @e:   engine
 * @d:   direction
 * @src: source socket
 *
 * Return: >0 bytes, 0 on EOF, -EAGAIN, or -errno
 */
static ssize_t splice_fill(struct sp_engine *e, struct sp_dir *d, int src)
{
	ssize_t n;

	if (d->pipe.rd < 0) {
		int rc = sp_pipe_get(e, d->want, &d->pipe);

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

/**
 * splice_flush() - splice queued bytes from the pipe to dst
 * @e:   engine
 * @d:   direction
 * @dst: destination socket
 *
 * An emptied pipe goes back to the pool at once.
 *
 * Return: bytes written or -errno
 */
static ssize_t splice_flush(struct sp_engine *e, struct sp_dir *d, int dst)
{
	ssize_t n;

	do {
		sp_sys(e, SP_STAT_SYS_SPLICE);
		n = splice(d->pipe.rd, NULL, dst, NULL, d->queued,
			   SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
	} while (n == -1 && errno == EINTR);
	if (n == -1)
		return -errno;
	d->queued -= (size_t)n;
	if (!d->queued)
		sp_pipe_put(e, &d->pipe);
	return n;
}

/**
 * splice_room() - whether the pipe has room; an empty direction holds no
 * pipe yet and takes one on the next fill
 * @d: direction
 */
static bool splice_room(const struct sp_dir *d)
{
	if (d->pipe.rd >= 0)
		return d->queued < d->pipe.cap;
	return true;
}

/**
 * splice_holds() - whether the direction holds a pipe
 * @d: direction
 */
static bool splice_holds(const struct sp_dir *d)
{
	return d->pipe.rd >= 0;
}

/**
 * splice_idle() - give an empty direction's pipe back to the pool
 * @e: engine
 * @d: direction
 */
static void splice_idle(struct sp_engine *e, struct sp_dir *d)
{
	if (d->queued)
		return;
	if (d->pipe.rd >= 0)
		sp_pipe_put(e, &d->pipe);
}

/**
 * splice_release() - give back the pipe, closing it if it still holds data
 * @e: engine
 * @d: direction
 */
static void splice_release(struct sp_engine *e, struct sp_dir *d)
{
	if (d->pipe.rd >= 0) {
		if (d->queued)
			sp_pipe_drop(e, &d->pipe);
		else
			sp_pipe_put(e, &d->pipe);
	}
	d->queued = 0;
}

const struct sp_mover_ops sp_mover_splice = {
	.name = "splice",
	.fill = splice_fill,
	.flush = splice_flush,
	.room = splice_room,
	.holds = splice_holds,
	.idle = splice_idle,
	.release = splice_release,
	/* EAGAIN with a non-empty pipe means the pipe is full (out of slots)
	 * as often as the socket is drained: only an empty pipe tells. */
	.eagain_when_full = true,
	.size_option = SP_OPT_PIPE_SIZE,
};
