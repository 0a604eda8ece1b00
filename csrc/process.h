/* SPDX-License-Identifier: MIT
 *
 * process.h - process helpers the front end calls around the engine (opening
 * a listener, the descriptor limit, the process name, the privilege drop).
 * They hold no engine state and are kept apart from engine.h, whose API is
 * the relay engine's alone.  Same conventions: >= 0 or -errno, no printing.
 */
#ifndef SPLICEPROXY_PROCESS_H
#define SPLICEPROXY_PROCESS_H

#include <stdint.h>
#include <sys/socket.h>

/* Open a listening socket on addr the way docker-proxy does: SO_REUSEADDR
 * for TCP only (a restarted proxy binds over the last one's TIME_WAIT
 * sockets; on UDP it would let another user bind the port too),
 * IPV6_V6ONLY for AF_INET6, backlog from net.core.somaxconn for TCP,
 * IP_PKTINFO/IPV6_RECVPKTINFO for UDP.  type is SOCK_STREAM or SOCK_DGRAM.
 * On failure *step names the failing call ("socket", "bind", "listen", ...). */
int sp_open_listener(int type, const struct sockaddr *addr, socklen_t len, const char **step);

/* Raise the soft RLIMIT_NOFILE to the hard limit.  Returns the new limit. */
int64_t sp_raise_nofile(void);

/* Set the process name ps and top show (PR_SET_NAME, 15 bytes at most):
 * the launcher execs the interpreter, which would otherwise be shown. */
int sp_set_process_name(const char *name);

/* Become uid/gid for good: no supplementary groups, no capabilities but
 * those in keep (bit n: capability n) in the bounding, permitted and
 * effective sets, of those only the ones in inheritable inheritable (a
 * helper the process runs may get them ambient), none ambient,
 * no_new_privs, and the parent-death signal re-armed (changing credentials
 * clears it).  As systemd's drop_privileges(uid, gid, keep_capabilities).
 * Call once every socket is set up.  On failure *step names the call that
 * failed. */
int sp_drop_privileges(uint32_t uid, uint32_t gid, uint64_t keep, uint64_t inheritable,
		       const char **step);

/* no_new_privs alone, for a process that keeps its user (not started as
 * root, or asked to stay root): nothing it executes gains a privilege. */
int sp_no_new_privs(void);

#endif
