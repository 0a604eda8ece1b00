/* SPDX-License-Identifier: MIT
 *
 * fastpath.h - kernel fast path for host-local clients of a published port.
 *
 * Cgroup socket-address programs rewrite a connect() (and an unconnected UDP
 * sendmsg()) to a published host address:port straight to the container's
 * address, and reverse hooks (getpeername, UDP recvmsg) show the client the
 * address it dialled.  The relay stays in place behind it: every check that
 * fails leaves the connect untouched, so it reaches the relay's listener.
 *
 * A rewrite happens only when all of these hold:
 *  - the connecting socket lives in the network namespace that opened the
 *    fast path (the netns cookie is compiled into the programs);
 *  - the dialled address:port:protocol has an entry (concrete addresses
 *    only: a wildcard mapping adds one entry per local address);
 *  - the socket that listens on the dialled address carries the tag of that
 *    entry's mapping (socket storage set from user space), so a closed
 *    listener, a stale entry or another program on the port is never
 *    bypassed;
 *  - the entry's target has the family of the socket (no 6->4);
 *  - the socket is not bound to a device or to a loopback source address,
 *    from which the container could not be reached.
 *
 * The programs are held by BPF links on a cgroup v2 directory: they detach
 * when the last descriptor goes, so a killed holder leaves nothing behind.
 * All functions return >= 0 or -errno; nothing prints or exits.
 */
#ifndef SPLICEPROXY_FASTPATH_H
#define SPLICEPROXY_FASTPATH_H

#include <stddef.h>
#include <stdint.h>

struct fp;

/* The hooks, in attach order. */
enum fp_hook {
	FP_CONNECT4,
	FP_CONNECT6,
	FP_SENDMSG4,
	FP_SENDMSG6,
	FP_RECVMSG4,
	FP_RECVMSG6,
	FP_GETPEERNAME4,
	FP_GETPEERNAME6,
	FP_HOOKS,
};

/* Why fp_open() failed, for the one log line the front end writes. */
enum fp_fail {
	FP_FAIL_NONE,
	FP_FAIL_KERNEL,		/* the kernel lacks a needed feature */
	FP_FAIL_CGROUP,		/* no cgroup v2 at the given path */
	FP_FAIL_PERMISSION,	/* not privileged for bpf() or the cgroup */
	FP_FAIL_VERIFIER,	/* the verifier rejected a program (see log) */
	FP_FAIL_OTHER,
};

/**
 * struct fp_report - what went wrong in fp_open()
 * @kind:	enum fp_fail
 * @err:	positive errno of the failed step
 * @what:	the step, as text
 * @log:	caller's buffer for the verifier log (may be NULL)
 * @log_size:	its size
 */
struct fp_report {
	int kind;
	int err;
	char what[160];
	char *log;
	size_t log_size;
};

/* Map layouts, shared by user space and the programs.  Addresses and ports
 * are in network byte order; an IPv4 address fills addr[0]. */
struct fp_key {
	uint32_t addr[4];
	uint16_t port;
	uint8_t family;		/* AF_INET or AF_INET6 */
	uint8_t proto;		/* IPPROTO_TCP or IPPROTO_UDP */
};

struct fp_value {
	uint32_t addr[4];	/* container address */
	uint16_t port;		/* container port */
	uint8_t family;
	uint8_t pad;
	uint32_t id;		/* mapping id (>= 1); the listener's tag */
	uint64_t connects;	/* connect()s rewritten (counted by the programs) */
	uint64_t datagrams;	/* unconnected UDP sends rewritten */
};

/* Reverse record kept in the client socket's own storage. */
struct fp_rev {
	uint32_t dialled[4];
	uint32_t target[4];
	uint16_t dialled_port;
	uint16_t target_port;
	uint32_t family;
};

int fp_open(struct fp **out, const char *cgroup_path, struct fp_report *rep);
void fp_close(struct fp *fp);
uint64_t fp_netns_cookie(const struct fp *fp);

int fp_entry_add(struct fp *fp, const struct fp_key *key, const struct fp_value *val);
int fp_entry_del(struct fp *fp, const struct fp_key *key);
int fp_entry_get(struct fp *fp, const struct fp_key *key, struct fp_value *val);
int fp_entry_next(struct fp *fp, const struct fp_key *prev, struct fp_key *next);

int fp_tag(struct fp *fp, int sock_fd, uint32_t id);
int fp_untag(struct fp *fp, int sock_fd);
int fp_tag_get(struct fp *fp, int sock_fd, uint32_t *id);

int fp_try_load(int hook, const void *insns, unsigned int n, struct fp_report *rep);
int fp_attached(const char *cgroup_path, unsigned int counts[FP_HOOKS]);
int fp_programs_loaded(void);

#endif /* SPLICEPROXY_FASTPATH_H */
