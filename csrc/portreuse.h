/* SPDX-License-Identifier: MIT
 *
 * portreuse.h - backend ports left in TIME_WAIT, kept per listener and
 * bound again by the next backend sockets (portreuse.c has the why).
 */
#ifndef SPLICEPROXY_PORTREUSE_H
#define SPLICEPROXY_PORTREUSE_H

#include "core.h"

struct sp_port_pool;

/* The pools of every listener, indexed by listener id. */
struct sp_ports {
	struct sp_port_pool *pool;
	int n;
};

void sp_ports_keep(struct sp_engine *e, struct sp_ports *ps, int id, int fd, uint16_t port);
uint16_t sp_ports_bind(struct sp_engine *e, struct sp_ports *ps, int id, int fd, int family);
void sp_ports_result(struct sp_engine *e, struct sp_ports *ps, int id, int err);
void sp_ports_forget(struct sp_ports *ps, int id);
void sp_ports_free(struct sp_ports *ps);

#endif
