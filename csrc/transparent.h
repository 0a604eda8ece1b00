/* SPDX-License-Identifier: MIT
 *
 * transparent.h - backend sockets that come from the client's own address
 * (SP_OPT_TRANSPARENT, transparent.c), for tcp.c and udp.c.
 */
#ifndef SPLICEPROXY_TRANSPARENT_H
#define SPLICEPROXY_TRANSPARENT_H

#include "core.h"

int sp_transparent_socket(struct sp_engine *e, int id, int type,
			  const struct sockaddr_storage *backend,
			  const struct sockaddr *client, socklen_t client_len, int *fd);
void sp_transparent_fallback(struct sp_engine *e, int id, int kind, int err);

#endif
