/* SPDX-License-Identifier: MIT
 *
 * protos.c - the protocols an engine serves, indexed by enum sp_proto_id.
 * Adding one (SCTP, say) is a line here and a file of its own; the loop
 * walks this table and does not change.
 */
#include "proto.h"

const struct sp_proto *const sp_protos[SP_PROTO_COUNT] = {
	[SP_PROTO_TCP] = &sp_tcp_proto,
	[SP_PROTO_UDP] = &sp_udp_proto,
};
