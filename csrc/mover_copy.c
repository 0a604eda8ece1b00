/* SPDX-License-Identifier: MIT
 *
 * mover_copy.c - the read/write data path (SP_COPY_READWRITE): bytes are
 * read into a user-space buffer of SP_OPT_COPY_BUF bytes (the
 * connection's listener's) and sent on.
 * Slower by design, for comparisons; a direction holds its buffer only
 * while bytes are in flight.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/socket.h>

#include "mover.h"

/**
 * copy_fill() - read from src into the direction's buffer, allocating it first
 * @e:   engine
 * @d:   direction
 * @src: source socket
 *
 * Return: >0 bytes, 0 on EOF, -EAGAIN, or -errno
 */
static ssize_t copy_fill(struct sp_engine *e, struct sp_dir *d, int src)
{
	ssize_t n;

	if (!d->buf) {
		d->buf_cap = d->want;
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

/**
 * copy_flush() - send the buffer's unsent bytes to dst
 * @e:   engine
 * @d:   direction
 * @dst: destination socket
 *
 * A buffer sent whole is freed at once.
 *
 * Return: bytes written or -errno
 */
static ssize_t copy_flush(struct sp_engine *e, struct sp_dir *d, int dst)
{
	ssize_t n;

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

/**
 * copy_room() - whether the buffer has room; none is held while empty
 * @d: direction
 */
static bool copy_room(const struct sp_dir *d)
{
	if (d->buf)
		return d->queued < d->buf_cap;
	return true;
}

/**
 * copy_holds() - whether the direction holds a buffer
 * @d: direction
 */
static bool copy_holds(const struct sp_dir *d)
{
	return d->buf != NULL;
}

/**
 * copy_idle() - free an empty direction's buffer
 * @e: engine
 * @d: direction
 */
static void copy_idle(struct sp_engine *e, struct sp_dir *d)
{
	(void)e;
	if (d->queued)
		return;
	free(d->buf);
	d->buf = NULL;
}

/**
 * copy_release() - free the buffer, even with data in it
 * @e: engine
 * @d: direction
 */
static void copy_release(struct sp_engine *e, struct sp_dir *d)
{
	(void)e;
	free(d->buf);
	d->buf = NULL;
	d->queued = 0;
}

const struct sp_mover_ops sp_mover_copy = {
	.name = "readwrite",
	.fill = copy_fill,
	.flush = copy_flush,
	.room = copy_room,
	.holds = copy_holds,
	.idle = copy_idle,
	.release = copy_release,
	/* A read that fits in the buffer's room and returns EAGAIN means the
	 * socket is drained. */
	.eagain_when_full = false,
	.size_option = SP_OPT_COPY_BUF,
};
