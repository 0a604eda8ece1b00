/* SPDX-License-Identifier: MIT
 *
 * proto.h - the protocols of the engine: their ids (the proto field of
 * union sp_ref) and their tables of operations (struct sp_proto, core.h).
 * Only the loop and the protocols themselves include this.
 */
#ifndef SPLICEPROXY_PROTO_H
#define SPLICEPROXY_PROTO_H

#include "core.h"

/* Which protocol owns a listener or a flow (the proto field of union sp_ref). */
enum sp_proto_id {
	SP_PROTO_TCP = 0,
	SP_PROTO_UDP,
	SP_PROTO_COUNT
};
_Static_assert(SP_PROTO_COUNT <= 8, "the protocol fits union sp_ref's 3 bits");

extern const struct sp_proto sp_tcp_proto;  /* tcp.c */
extern const struct sp_proto sp_udp_proto;  /* udp.c */

/* protos.c: every protocol, indexed by enum sp_proto_id. */
extern const struct sp_proto *const sp_protos[SP_PROTO_COUNT];

#endif
