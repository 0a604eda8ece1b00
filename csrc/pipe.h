/* SPDX-License-Identifier: MIT
 *
 * pipe.h - the pool of kernel pipes the splice mover borrows from.
 */
#ifndef SPLICEPROXY_PIPE_H
#define SPLICEPROXY_PIPE_H

#include "core.h"

struct sp_pipe {
	int rd, wr;
	size_t cap;    /* bytes it holds (what F_SETPIPE_SZ made of it) */
	size_t sized;  /* the size it was last made for (the kernel rounds
			* it up to a power of two pages), or cap */
};

/* Once per engine. */
int sp_pipes_init(struct sp_engine *e);
void sp_pipes_free(struct sp_engine *e);
/* Take a pipe of want bytes from the pool (or create one); 0 or -errno. */
int sp_pipe_get(struct sp_engine *e, size_t want, struct sp_pipe *p);
/* Return an empty pipe to the pool (or close it if the pool is full). */
void sp_pipe_put(struct sp_engine *e, struct sp_pipe *p);
/* Close a pipe that may still hold data. */
void sp_pipe_drop(struct sp_engine *e, struct sp_pipe *p);

#endif
