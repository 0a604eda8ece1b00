/* SPDX-License-Identifier: MIT
 *
 * mover.h - how a TCP direction moves its bytes, behind one small
 * interface: the connection state machine (tcp.c) decides when, a mover
 * how.  Each connection has its mover, chosen by its listener's
 * SP_OPT_COPY_MODE when it is accepted; a third data path is a third file
 * defining a struct sp_mover_ops and a line in sp_mover_for(), not a third
 * branch in tcp.c.
 */
#ifndef SPLICEPROXY_MOVER_H
#define SPLICEPROXY_MOVER_H

#include <sys/types.h>

#include "pipe.h"

/* One direction of a connection: src -> pipe (or buffer) -> dst. */
struct sp_dir {
	struct sp_pipe pipe;   /* splice mover: rd/wr == -1 when none is held */
	char *buf;             /* copy mover: buffer held while in flight */
	size_t buf_cap;        /* copy mover: bytes buf was allocated with */
	size_t buf_off;        /* copy mover: bytes of buf already written */
	size_t want;           /* bytes of pipe (splice) or buffer (copy) it asks
				* for: its listener's value of the mover's
				* size_option when the connection was accepted */
	size_t queued;         /* bytes read from src, not yet written to dst */
	bool eof;              /* src gave EOF */
	bool shut;             /* EOF passed on: shutdown(dst, SHUT_WR) done */
};

struct sp_mover_ops {
	const char *name;
	/* Move bytes from src into the direction: >0 bytes, 0 on EOF,
	 * -EAGAIN, or -errno (-EMFILE/-ENFILE/-ENOMEM: nothing to hold them
	 * in; the bytes stay in the socket). */
	ssize_t (*fill)(struct sp_engine *e, struct sp_dir *d, int src);
	/* Move queued bytes to dst: bytes written or -errno. */
	ssize_t (*flush)(struct sp_engine *e, struct sp_dir *d, int dst);
	/* Whether the direction can take more bytes from its source. */
	bool (*room)(const struct sp_dir *d);
	/* Whether it holds a pipe or buffer (given back when it empties). */
	bool (*holds)(const struct sp_dir *d);
	/* An empty direction: give back what it holds. */
	void (*idle)(struct sp_engine *e, struct sp_dir *d);
	/* Give back what it holds, even with data in it. */
	void (*release)(struct sp_engine *e, struct sp_dir *d);
	/* fill() may say -EAGAIN while the source still has bytes, when the
	 * direction is full without looking full (a pipe out of slots). */
	bool eagain_when_full;
	/* The option that sizes what a direction holds (sp_dir.want). */
	int size_option;
};

extern const struct sp_mover_ops sp_mover_splice;  /* mover_splice.c */
extern const struct sp_mover_ops sp_mover_copy;    /* mover_copy.c */

/**
 * sp_mover_for() - the mover of a copy mode
 * @mode: SP_COPY_* (SP_OPT_COPY_MODE, already validated)
 */
static inline const struct sp_mover_ops *sp_mover_for(int64_t mode)
{
	return mode == SP_COPY_READWRITE ? &sp_mover_copy : &sp_mover_splice;
}

/**
 * sp_dir_init() - an empty direction holding nothing
 * @d:    direction
 * @want: bytes of pipe or buffer it will ask for (sp_dir.want)
 */
static inline void sp_dir_init(struct sp_dir *d, size_t want)
{
	*d = (struct sp_dir){ .pipe = { .rd = -1, .wr = -1 }, .want = want };
}

#endif
