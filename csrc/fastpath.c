// SPDX-License-Identifier: MIT
/*
 * fastpath.c - cgroup socket-address programs that let host-local clients
 * skip the relay (see fastpath.h for the rules a rewrite obeys).
 *
 * No compiler is needed at install time: the programs are emitted here from
 * instruction macros and loaded with bpf(2).  They are kept tiny and each
 * instruction says what it is for.  Two program shapes cover the eight hooks:
 *
 *   forward (connect4/6, sendmsg4/6): check namespace and source, look the
 *     dialled address up, check that its listener carries the mapping's tag,
 *     record the reverse in the client socket's storage, rewrite, count;
 *   reverse (getpeername4/6, recvmsg4/6): if the socket has a record and the
 *     kernel is about to report the target, report the dialled address.
 *
 * Socket storage maps need BTF for their key and value; a four-type blob is
 * built by hand below.
 *
 * Why the listener check is a socket lookup plus a storage tag rather than a
 * SOCKMAP holding the listener: a socket put in a sockmap gets a psock and
 * BPF protocol ops, which would put every relayed byte of that listener's
 * connections through extra code; socket storage changes nothing on the
 * socket, dies with it, and the lookup also proves the tagged socket is the
 * one a plain connect would reach.
 */
#include "fastpath.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <linux/btf.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/vfs.h>
#include <unistd.h>

#ifndef SO_NETNS_COOKIE
#define SO_NETNS_COOKIE 71
#endif
#ifndef CGROUP2_SUPER_MAGIC
#define CGROUP2_SUPER_MAGIC 0x63677270
#endif

/* The kernel's internal ENOTSUPP, seen from some bpf() paths. */
#define ENOTSUPP_COMPAT	524

#define FP_MAX_ENTRIES	16384	/* published host address:port entries */
#define FP_MAX_INSNS	160
#define FP_NAME_PREFIX	"sp_fp_"

/* Stack slots (offsets from R10) used by the forward program. */
#define ST_KEY		(-24)	/* struct fp_key, 20 bytes */
#define ST_KEY_PORT	(ST_KEY + (int)offsetof(struct fp_key, port))
#define ST_KEY_FAMILY	(ST_KEY + (int)offsetof(struct fp_key, family))
#define ST_KEY_PROTO	(ST_KEY + (int)offsetof(struct fp_key, proto))
#define ST_TUPLE	(-64)	/* struct bpf_sock_tuple, 36 bytes, -64..-29 */

#define CTX(f)		((short)offsetof(struct bpf_sock_addr, f))
#define SK(f)		((short)offsetof(struct bpf_sock, f))
#define VAL(f)		((short)offsetof(struct fp_value, f))
#define REV(f)		((short)offsetof(struct fp_rev, f))

/* ---- instruction macros (the kernel's filter.h spelling) ---- */

#define INSN(c, d, s, o, i) \
	((struct bpf_insn){ .code = (c), .dst_reg = (d), .src_reg = (s), .off = (o), .imm = (i) })
#define MOV_REG(d, s)		INSN(BPF_ALU64 | BPF_MOV | BPF_X, d, s, 0, 0)
#define MOV_IMM(d, v)		INSN(BPF_ALU64 | BPF_MOV | BPF_K, d, 0, 0, v)
#define ADD_IMM(d, v)		INSN(BPF_ALU64 | BPF_ADD | BPF_K, d, 0, 0, v)
#define AND_IMM(d, v)		INSN(BPF_ALU64 | BPF_AND | BPF_K, d, 0, 0, v)
#define OR_REG(d, s)		INSN(BPF_ALU64 | BPF_OR | BPF_X, d, s, 0, 0)
#define LDX(sz, d, s, o)	INSN(BPF_LDX | (sz) | BPF_MEM, d, s, o, 0)
#define STX(sz, d, s, o)	INSN(BPF_STX | (sz) | BPF_MEM, d, s, o, 0)
#define ST(sz, d, o, v)		INSN(BPF_ST | (sz) | BPF_MEM, d, 0, o, v)
#define JEQ_IMM(d, v, o)	INSN(BPF_JMP | BPF_JEQ | BPF_K, d, 0, o, v)
#define JNE_IMM(d, v, o)	INSN(BPF_JMP | BPF_JNE | BPF_K, d, 0, o, v)
#define JNE_REG(d, s, o)	INSN(BPF_JMP | BPF_JNE | BPF_X, d, s, o, 0)
#define JA(o)			INSN(BPF_JMP | BPF_JA, 0, 0, o, 0)
#define CALL(fn)		INSN(BPF_JMP | BPF_CALL, 0, 0, 0, fn)
#define EXIT()			INSN(BPF_JMP | BPF_EXIT, 0, 0, 0, 0)
/* lock *(u64 *)(d + o) += s; BPF_ATOMIC has the value of the older BPF_XADD */
#define XADD64(d, s, o)		INSN(BPF_STX | BPF_DW | BPF_ATOMIC, d, s, o, BPF_ADD)

enum { R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 };

/**
 * struct prog - a program being emitted
 * @insn:	the instructions
 * @n:		how many
 * @out:	indexes of jumps to the common exit, patched by prog_end()
 * @nout:	how many
 * @full:	set when an array overflowed (a bug, reported as -E2BIG)
 */
struct prog {
	struct bpf_insn insn[FP_MAX_INSNS];
	int n;
	int out[48];
	int nout;
	int full;
};

static void emit(struct prog *p, struct bpf_insn in)
{
	if (p->n >= FP_MAX_INSNS) {
		p->full = 1;
		return;
	}
	p->insn[p->n++] = in;
}

/* A conditional jump (its offset ignored) that leaves the program with the
 * connect untouched. */
static void emit_out(struct prog *p, struct bpf_insn jmp)
{
	if (p->nout >= (int)(sizeof(p->out) / sizeof(p->out[0]))) {
		p->full = 1;
		return;
	}
	p->out[p->nout++] = p->n;
	emit(p, jmp);
}

static void emit_ld_imm64(struct prog *p, int dst, int pseudo, uint64_t v)
{
	emit(p, INSN(BPF_LD | BPF_DW | BPF_IMM, dst, pseudo, 0, (int32_t)(uint32_t)v));
	emit(p, INSN(0, 0, 0, 0, (int32_t)(uint32_t)(v >> 32)));
}

/* The common exit: "1" lets the syscall go on, rewritten or not. */
static void prog_end(struct prog *p)
{
	for (int i = 0; i < p->nout; i++)
		p->insn[p->out[i]].off = (short)(p->n - p->out[i] - 1);
	emit(p, MOV_IMM(R0, 1));
	emit(p, EXIT());
}

/* Leave if the 16 bytes at base+off are ::1. Clobbers R3, R4. */
static void emit_out_if_v6_loopback(struct prog *p, int base, short off)
{
	emit(p, LDX(BPF_W, R3, base, off + 12));	/* last word ...   */
	emit(p, JNE_IMM(R3, (int32_t)htonl(1), 6));	/* ... not 1: fine */
	emit(p, LDX(BPF_W, R3, base, off));
	emit(p, LDX(BPF_W, R4, base, off + 4));
	emit(p, OR_REG(R3, R4));
	emit(p, LDX(BPF_W, R4, base, off + 8));
	emit(p, OR_REG(R3, R4));
	emit_out(p, JEQ_IMM(R3, 0, 0));			/* all zero: ::1    */
}

/* Leave if the IPv4 address at base+off is in 127.0.0.0/8. Clobbers R3. */
static void emit_out_if_v4_loopback(struct prog *p, int base, short off)
{
	emit(p, LDX(BPF_W, R3, base, off));
	emit(p, AND_IMM(R3, 0xff));			/* first octet     */
	emit_out(p, JEQ_IMM(R3, 127, 0));
}

/* Copy @words 32-bit words from src+so to dst+do through R3. */
static void emit_copy(struct prog *p, int dst, short doff, int src, short soff, int words)
{
	for (int i = 0; i < words; i++) {
		emit(p, LDX(BPF_W, R3, src, soff + 4 * i));
		emit(p, STX(BPF_W, dst, R3, doff + 4 * i));
	}
}

/**
 * emit_forward() - the connect4/6 and sendmsg4/6 program
 * @p:		output
 * @v6:		IPv6 hook
 * @sendmsg:	unconnected UDP send (count as a datagram, check the source
 *		address given in the message too)
 * @cookie:	the netns cookie of the namespace served
 * @maps:	fds of the entry map, the tag storage and the reverse storage
 */
static void emit_forward(struct prog *p, int v6, int sendmsg, uint64_t cookie, const int maps[3])
{
	int words = v6 ? 4 : 1;
	short uaddr = v6 ? CTX(user_ip6) : CTX(user_ip4);
	short tuple_len = v6 ? sizeof(((struct bpf_sock_tuple *)0)->ipv6)
			     : sizeof(((struct bpf_sock_tuple *)0)->ipv4);
	/* In the v4 tuple saddr sits at ST_TUPLE + 24 so that sport/dport
	 * land on the same slots as the v6 tuple's. */
	short tuple = v6 ? ST_TUPLE : ST_TUPLE + 24;
	short t_daddr = tuple + (v6 ? 16 : 4);
	short t_dport = tuple + (v6 ? 34 : 10);

	emit(p, MOV_REG(R6, R1));				/* R6 = ctx */

	/* Only the namespace that loaded us: a container or another netns may
	 * use the same addresses for something else entirely. */
	emit(p, CALL(BPF_FUNC_get_netns_cookie));		/* R0 = cookie(ctx) */
	emit_ld_imm64(p, R1, 0, cookie);
	emit_out(p, JNE_REG(R0, R1, 0));

	/* A socket tied to a device or bound to a loopback source cannot reach
	 * the container: leave it to the relay. */
	emit(p, LDX(BPF_DW, R2, R6, CTX(sk)));			/* R2 = ctx->sk */
	emit(p, LDX(BPF_W, R3, R2, SK(bound_dev_if)));
	emit_out(p, JNE_IMM(R3, 0, 0));
	if (v6) {
		emit_out_if_v6_loopback(p, R2, SK(src_ip6));
		if (sendmsg)
			emit_out_if_v6_loopback(p, R6, CTX(msg_src_ip6));
	} else {
		emit_out_if_v4_loopback(p, R2, SK(src_ip4));
		if (sendmsg)
			emit_out_if_v4_loopback(p, R6, CTX(msg_src_ip4));
	}

	/* Key = dialled address, port, family, protocol (zeroed first: the
	 * hash covers every byte). */
	emit(p, ST(BPF_DW, R10, ST_KEY, 0));
	emit(p, ST(BPF_DW, R10, ST_KEY + 8, 0));
	emit(p, ST(BPF_W, R10, ST_KEY + 16, 0));
	emit_copy(p, R10, ST_KEY, R6, uaddr, words);
	emit(p, LDX(BPF_W, R3, R6, CTX(user_port)));
	emit(p, STX(BPF_H, R10, R3, ST_KEY_PORT));
	emit(p, ST(BPF_B, R10, ST_KEY_FAMILY, v6 ? AF_INET6 : AF_INET));
	emit(p, LDX(BPF_W, R3, R6, CTX(protocol)));
	emit(p, JEQ_IMM(R3, IPPROTO_TCP, 1));			/* TCP or UDP only */
	emit_out(p, JNE_IMM(R3, IPPROTO_UDP, 0));		/* (MPTCP, SCTP: no) */
	emit(p, STX(BPF_B, R10, R3, ST_KEY_PROTO));

	/* R7 = the entry, or leave. */
	emit_ld_imm64(p, R1, BPF_PSEUDO_MAP_FD, (uint32_t)maps[0]);
	emit(p, MOV_REG(R2, R10));
	emit(p, ADD_IMM(R2, ST_KEY));
	emit(p, CALL(BPF_FUNC_map_lookup_elem));
	emit_out(p, JEQ_IMM(R0, 0, 0));
	emit(p, MOV_REG(R7, R0));
	/* Never across families (6->4 stays on the relay). */
	emit(p, LDX(BPF_B, R3, R7, VAL(family)));
	emit_out(p, JNE_IMM(R3, v6 ? AF_INET6 : AF_INET, 0));

	/* Find the socket a plain connect would reach: the listener on the
	 * dialled address:port (saddr/sport 0: listeners only). */
	emit(p, ST(BPF_DW, R10, ST_TUPLE, 0));
	emit(p, ST(BPF_DW, R10, ST_TUPLE + 8, 0));
	emit(p, ST(BPF_DW, R10, ST_TUPLE + 16, 0));
	emit(p, ST(BPF_DW, R10, ST_TUPLE + 24, 0));
	emit(p, ST(BPF_W, R10, ST_TUPLE + 32, 0));
	emit_copy(p, R10, t_daddr, R10, ST_KEY, words);
	emit(p, LDX(BPF_H, R3, R10, ST_KEY_PORT));
	emit(p, STX(BPF_H, R10, R3, t_dport));
	emit(p, LDX(BPF_B, R9, R10, ST_KEY_PROTO));		/* R9 = protocol */
	emit(p, MOV_REG(R1, R6));				/* ctx */
	emit(p, MOV_REG(R2, R10));
	emit(p, ADD_IMM(R2, tuple));				/* tuple */
	emit(p, MOV_IMM(R3, tuple_len));
	emit(p, MOV_IMM(R4, -1));				/* BPF_F_CURRENT_NETNS */
	emit(p, MOV_IMM(R5, 0));				/* flags */
	emit(p, JNE_IMM(R9, IPPROTO_TCP, 2));
	emit(p, CALL(BPF_FUNC_sk_lookup_tcp));
	emit(p, JA(1));
	emit(p, CALL(BPF_FUNC_sk_lookup_udp));
	emit_out(p, JEQ_IMM(R0, 0, 0));				/* nobody listens */
	emit(p, MOV_REG(R8, R0));				/* R8 = listener (ref) */

	/* R9 = its tag (0 if none), then drop the reference. */
	emit_ld_imm64(p, R1, BPF_PSEUDO_MAP_FD, (uint32_t)maps[1]);
	emit(p, MOV_REG(R2, R8));
	emit(p, MOV_IMM(R3, 0));
	emit(p, MOV_IMM(R4, 0));				/* lookup, never create */
	emit(p, CALL(BPF_FUNC_sk_storage_get));
	emit(p, MOV_IMM(R9, 0));
	emit(p, JEQ_IMM(R0, 0, 1));
	emit(p, LDX(BPF_W, R9, R0, 0));
	emit(p, MOV_REG(R1, R8));
	emit(p, CALL(BPF_FUNC_sk_release));
	/* Only this mapping's own listener (ids start at 1). */
	emit_out(p, JEQ_IMM(R9, 0, 0));
	emit(p, LDX(BPF_W, R3, R7, VAL(id)));
	emit_out(p, JNE_REG(R3, R9, 0));

	/* Record the reverse in the client socket's storage; without it the
	 * client would see the container address, so no record, no rewrite. */
	emit_ld_imm64(p, R1, BPF_PSEUDO_MAP_FD, (uint32_t)maps[2]);
	emit(p, LDX(BPF_DW, R2, R6, CTX(sk)));
	emit(p, MOV_IMM(R3, 0));
	emit(p, MOV_IMM(R4, BPF_SK_STORAGE_GET_F_CREATE));
	emit(p, CALL(BPF_FUNC_sk_storage_get));
	emit_out(p, JEQ_IMM(R0, 0, 0));
	emit_copy(p, R0, REV(dialled), R10, ST_KEY, words);
	emit_copy(p, R0, REV(target), R7, VAL(addr), words);
	emit(p, LDX(BPF_H, R3, R10, ST_KEY_PORT));
	emit(p, STX(BPF_H, R0, R3, REV(dialled_port)));
	emit(p, LDX(BPF_H, R3, R7, VAL(port)));
	emit(p, STX(BPF_H, R0, R3, REV(target_port)));
	emit(p, ST(BPF_W, R0, REV(family), v6 ? AF_INET6 : AF_INET));

	/* Rewrite to the container and count. */
	emit_copy(p, R6, uaddr, R7, VAL(addr), words);
	emit(p, LDX(BPF_H, R3, R7, VAL(port)));
	emit(p, STX(BPF_W, R6, R3, CTX(user_port)));
	emit(p, MOV_IMM(R3, 1));
	emit(p, XADD64(R7, R3, sendmsg ? VAL(datagrams) : VAL(connects)));
	prog_end(p);
}

/**
 * emit_reverse() - the getpeername4/6 and recvmsg4/6 program
 * @p:		output
 * @v6:		IPv6 hook
 * @rev_fd:	the reverse storage
 *
 * Reports the dialled address only when the kernel is about to report the
 * exact target recorded for this socket.
 */
static void emit_reverse(struct prog *p, int v6, int rev_fd)
{
	int words = v6 ? 4 : 1;
	short uaddr = v6 ? CTX(user_ip6) : CTX(user_ip4);

	emit(p, MOV_REG(R6, R1));				/* R6 = ctx */
	emit_ld_imm64(p, R1, BPF_PSEUDO_MAP_FD, (uint32_t)rev_fd);
	emit(p, LDX(BPF_DW, R2, R6, CTX(sk)));
	emit(p, MOV_IMM(R3, 0));
	emit(p, MOV_IMM(R4, 0));
	emit(p, CALL(BPF_FUNC_sk_storage_get));
	emit_out(p, JEQ_IMM(R0, 0, 0));				/* never rewritten */
	emit(p, LDX(BPF_W, R3, R0, REV(family)));
	emit_out(p, JNE_IMM(R3, v6 ? AF_INET6 : AF_INET, 0));
	for (int i = 0; i < words; i++) {
		emit(p, LDX(BPF_W, R3, R6, uaddr + 4 * i));
		emit(p, LDX(BPF_W, R4, R0, REV(target) + 4 * i));
		emit_out(p, JNE_REG(R3, R4, 0));
	}
	emit(p, LDX(BPF_W, R3, R6, CTX(user_port)));
	emit(p, LDX(BPF_H, R4, R0, REV(target_port)));
	emit_out(p, JNE_REG(R3, R4, 0));
	emit_copy(p, R6, uaddr, R0, REV(dialled), words);
	emit(p, LDX(BPF_H, R3, R0, REV(dialled_port)));
	emit(p, STX(BPF_W, R6, R3, CTX(user_port)));
	prog_end(p);
}

/* ---- bpf(2) ---- */

struct fp {
	int cgroup_fd;
	int btf_fd;
	int map_fd[3];		/* entries, tags, reverse */
	int prog_fd[FP_HOOKS];
	int link_fd[FP_HOOKS];
	uint64_t cookie;
};

/* name: for messages; short: the program's name (15 characters at most),
 * distinct per hook so that a listing of the host's programs tells them apart. */
static const struct {
	const char *name;
	const char *short_name;
	enum bpf_attach_type type;
} hooks[FP_HOOKS] = {
	[FP_CONNECT4]     = { "connect4", "conn4", BPF_CGROUP_INET4_CONNECT },
	[FP_CONNECT6]     = { "connect6", "conn6", BPF_CGROUP_INET6_CONNECT },
	[FP_SENDMSG4]     = { "sendmsg4", "send4", BPF_CGROUP_UDP4_SENDMSG },
	[FP_SENDMSG6]     = { "sendmsg6", "send6", BPF_CGROUP_UDP6_SENDMSG },
	[FP_RECVMSG4]     = { "recvmsg4", "recv4", BPF_CGROUP_UDP4_RECVMSG },
	[FP_RECVMSG6]     = { "recvmsg6", "recv6", BPF_CGROUP_UDP6_RECVMSG },
	[FP_GETPEERNAME4] = { "getpeername4", "peer4", BPF_CGROUP_INET4_GETPEERNAME },
	[FP_GETPEERNAME6] = { "getpeername6", "peer6", BPF_CGROUP_INET6_GETPEERNAME },
};

/* bpf(2) returning the result or -errno. */
static int sys_bpf(int cmd, union bpf_attr *attr)
{
	long rc = syscall(__NR_bpf, cmd, attr, sizeof(*attr));

	if (rc == -1)
		return -errno;
	return (int)rc;
}

static int fail(struct fp_report *rep, int kind, int err, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

/* Fill the report and return -err. */
static int fail(struct fp_report *rep, int kind, int err, const char *fmt, ...)
{
	va_list ap;

	if (rep) {
		rep->kind = kind;
		rep->err = err;
		va_start(ap, fmt);
		vsnprintf(rep->what, sizeof(rep->what), fmt, ap);
		va_end(ap);
	}
	return -err;
}

/* Classify a bpf() failure that had no verifier log. */
static int fail_bpf(struct fp_report *rep, int err, const char *what)
{
	if (err == EPERM || err == EACCES)
		return fail(rep, FP_FAIL_PERMISSION, err, "%s: not permitted (needs CAP_BPF and CAP_NET_ADMIN)", what);
	if (err == ENOSYS || err == EINVAL || err == EOPNOTSUPP || err == ENOTSUPP_COMPAT)
		return fail(rep, FP_FAIL_KERNEL, err, "%s: not supported by this kernel", what);
	return fail(rep, FP_FAIL_OTHER, err, "%s: %s", what, strerror(err));
}

/* Socket storage needs BTF for key (int) and value (a byte array of the
 * value's size): int, u8, u8[sizeof tag], u8[sizeof rev]. */
static int load_btf(struct fp_report *rep)
{
	static const char strings[] = "\0int\0u8";
	struct {
		struct btf_header hdr;
		struct btf_type t_int;	uint32_t int_enc;
		struct btf_type t_u8;	uint32_t u8_enc;
		struct btf_type t_tag;	struct btf_array a_tag;
		struct btf_type t_rev;	struct btf_array a_rev;
		char str[sizeof(strings)];
	} __attribute__((packed)) b;
	union bpf_attr attr;
	int fd;

	memset(&b, 0, sizeof(b));
	b.hdr.magic = BTF_MAGIC;
	b.hdr.version = BTF_VERSION;
	b.hdr.hdr_len = sizeof(b.hdr);
	b.hdr.type_off = 0;
	b.hdr.type_len = offsetof(__typeof__(b), str) - sizeof(b.hdr);
	b.hdr.str_off = b.hdr.type_len;
	b.hdr.str_len = sizeof(strings);
	b.t_int.name_off = 1;					/* [1] int */
	b.t_int.info = BTF_KIND_INT << 24;
	b.t_int.size = 4;
	b.int_enc = BTF_INT_SIGNED << 24 | 32;
	b.t_u8.name_off = 5;					/* [2] u8 */
	b.t_u8.info = BTF_KIND_INT << 24;
	b.t_u8.size = 1;
	b.u8_enc = 8;
	b.t_tag.info = BTF_KIND_ARRAY << 24;			/* [3] u8[8] */
	b.a_tag = (struct btf_array){ .type = 2, .index_type = 1, .nelems = 8 };
	b.t_rev.info = BTF_KIND_ARRAY << 24;			/* [4] u8[40] */
	b.a_rev = (struct btf_array){ .type = 2, .index_type = 1,
				      .nelems = sizeof(struct fp_rev) };
	memcpy(b.str, strings, sizeof(strings));

	memset(&attr, 0, sizeof(attr));
	attr.btf = (uintptr_t)&b;
	attr.btf_size = sizeof(b);
	fd = sys_bpf(BPF_BTF_LOAD, &attr);
	if (fd < 0)
		return fail_bpf(rep, -fd, "loading BTF");
	return fd;
}

static int create_map(struct fp_report *rep, const char *name, enum bpf_map_type type,
		      unsigned int key, unsigned int value, unsigned int max,
		      int btf_fd, unsigned int btf_value)
{
	union bpf_attr attr;
	int fd;

	memset(&attr, 0, sizeof(attr));
	attr.map_type = type;
	attr.key_size = key;
	attr.value_size = value;
	attr.max_entries = max;
	attr.map_flags = BPF_F_NO_PREALLOC;
	snprintf(attr.map_name, sizeof(attr.map_name), FP_NAME_PREFIX "%s", name);
	if (btf_fd >= 0) {
		attr.btf_fd = btf_fd;
		attr.btf_key_type_id = 1;
		attr.btf_value_type_id = btf_value;
	}
	fd = sys_bpf(BPF_MAP_CREATE, &attr);
	if (fd < 0)
		return fail_bpf(rep, -fd, name);
	return fd;
}

/* Load one program; on failure load it again with the log on, so the
 * report carries the verifier's words. */
static int load_prog(struct fp_report *rep, int hook, const struct prog *p)
{
	union bpf_attr attr;
	int fd, err;

	if (p->full)
		return fail(rep, FP_FAIL_OTHER, E2BIG, "%s: program too long", hooks[hook].name);
	memset(&attr, 0, sizeof(attr));
	attr.prog_type = BPF_PROG_TYPE_CGROUP_SOCK_ADDR;
	attr.expected_attach_type = hooks[hook].type;
	attr.insns = (uintptr_t)p->insn;
	attr.insn_cnt = (unsigned int)p->n;
	attr.license = (uintptr_t)"Dual MIT/GPL";
	snprintf(attr.prog_name, sizeof(attr.prog_name), FP_NAME_PREFIX "%s",
		 hooks[hook].short_name);
	fd = sys_bpf(BPF_PROG_LOAD, &attr);
	if (fd >= 0)
		return fd;
	err = -fd;
	if (err == EPERM || !rep || !rep->log || rep->log_size < 64)
		return fail_bpf(rep, err, hooks[hook].name);
	rep->log[0] = '\0';
	attr.log_buf = (uintptr_t)rep->log;
	attr.log_size = (unsigned int)(rep->log_size > (1u << 24) ? (1u << 24) : rep->log_size);
	attr.log_level = 1;
	fd = sys_bpf(BPF_PROG_LOAD, &attr);
	if (fd >= 0)	/* passed the second time: should not happen */
		return fd;
	if (fd == -ENOSPC)	/* log truncated: still the verifier speaking */
		err = EACCES;
	rep->log[rep->log_size - 1] = '\0';
	if (rep->log[0] == '\0')
		return fail_bpf(rep, err, hooks[hook].name);
	/* An unknown helper or context field is the kernel's age, not a bug. */
	if (strstr(rep->log, "invalid func") || strstr(rep->log, "unknown func"))
		return fail(rep, FP_FAIL_KERNEL, err, "%s: this kernel lacks a helper the program needs",
			    hooks[hook].name);
	return fail(rep, FP_FAIL_VERIFIER, err, "%s: rejected by the verifier", hooks[hook].name);
}

/**
 * fp_try_load() - load a caller's program for one hook, then drop it
 * @hook:	enum fp_hook
 * @insns:	struct bpf_insn array
 * @n:		how many
 * @rep:	as for fp_open()
 *
 * Lets the failure classification be checked with programs that must fail.
 */
int fp_try_load(int hook, const void *insns, unsigned int n, struct fp_report *rep)
{
	struct prog *p;
	int fd;

	if (hook < 0 || hook >= FP_HOOKS || n > FP_MAX_INSNS)
		return -EINVAL;
	p = calloc(1, sizeof(*p));
	if (!p)
		return -ENOMEM;
	memcpy(p->insn, insns, n * sizeof(struct bpf_insn));
	p->n = (int)n;
	if (rep) {
		rep->kind = FP_FAIL_NONE;
		rep->err = 0;
		rep->what[0] = '\0';
	}
	fd = load_prog(rep, hook, p);
	free(p);
	if (fd < 0)
		return fd;
	close(fd);
	return 0;
}

/* The netns cookie of the calling thread's namespace. */
static int netns_cookie(uint64_t *out, struct fp_report *rep)
{
	socklen_t len = sizeof(*out);
	int s, err;

	s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (s == -1)
		return fail(rep, FP_FAIL_OTHER, errno, "socket: %s", strerror(errno));
	if (getsockopt(s, SOL_SOCKET, SO_NETNS_COOKIE, out, &len) == -1) {
		err = errno;
		close(s);
		if (err == ENOPROTOOPT)
			return fail(rep, FP_FAIL_KERNEL, err, "SO_NETNS_COOKIE: not supported by this kernel");
		return fail(rep, FP_FAIL_OTHER, err, "SO_NETNS_COOKIE: %s", strerror(err));
	}
	close(s);
	return 0;
}

static int open_cgroup(const char *path, struct fp_report *rep)
{
	struct statfs st;
	int fd, err;

	fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd == -1) {
		err = errno;
		if (err == EACCES || err == EPERM)
			return fail(rep, FP_FAIL_PERMISSION, err, "%s: %s", path, strerror(err));
		return fail(rep, FP_FAIL_CGROUP, err, "cgroup v2 not mounted at %s (%s)",
			    path, strerror(err));
	}
	if (fstatfs(fd, &st) == -1 || st.f_type != CGROUP2_SUPER_MAGIC) {
		close(fd);
		return fail(rep, FP_FAIL_CGROUP, ENOTDIR, "%s is not a cgroup v2 directory", path);
	}
	return fd;
}

static void close_fd(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

/**
 * fp_open() - load the programs and attach them to a cgroup v2 directory
 * @out:	the fast path, on success
 * @cgroup_path: the directory (the host's root for real use)
 * @rep:	on failure, why (may be NULL)
 *
 * Serves the calling thread's network namespace.  The links are the only
 * thing keeping the programs attached: fp_close() or the death of the
 * process detaches them.
 */
int fp_open(struct fp **out, const char *cgroup_path, struct fp_report *rep)
{
	struct prog *p = NULL;
	struct fp *fp;
	int rc, i;

	*out = NULL;
	if (rep) {
		rep->kind = FP_FAIL_NONE;
		rep->err = 0;
		rep->what[0] = '\0';
		if (rep->log && rep->log_size)
			rep->log[0] = '\0';
	}
	fp = calloc(1, sizeof(*fp));
	if (!fp)
		return fail(rep, FP_FAIL_OTHER, ENOMEM, "out of memory");
	fp->cgroup_fd = fp->btf_fd = -1;
	for (i = 0; i < 3; i++)
		fp->map_fd[i] = -1;
	for (i = 0; i < FP_HOOKS; i++)
		fp->prog_fd[i] = fp->link_fd[i] = -1;

	rc = netns_cookie(&fp->cookie, rep);
	if (rc < 0)
		goto err;
	rc = fp->cgroup_fd = open_cgroup(cgroup_path, rep);
	if (rc < 0)
		goto err;
	rc = fp->btf_fd = load_btf(rep);
	if (rc < 0)
		goto err;
	rc = fp->map_fd[0] = create_map(rep, "map", BPF_MAP_TYPE_HASH, sizeof(struct fp_key),
					sizeof(struct fp_value), FP_MAX_ENTRIES, -1, 0);
	if (rc < 0)
		goto err;
	rc = fp->map_fd[1] = create_map(rep, "tag", BPF_MAP_TYPE_SK_STORAGE, sizeof(int),
					8, 0, fp->btf_fd, 3);
	if (rc < 0)
		goto err;
	rc = fp->map_fd[2] = create_map(rep, "rev", BPF_MAP_TYPE_SK_STORAGE, sizeof(int),
					sizeof(struct fp_rev), 0, fp->btf_fd, 4);
	if (rc < 0)
		goto err;

	p = malloc(sizeof(*p));		/* 1.3 KiB: kept off the caller's stack */
	if (!p) {
		rc = fail(rep, FP_FAIL_OTHER, ENOMEM, "out of memory");
		goto err;
	}
	for (i = 0; i < FP_HOOKS; i++) {
		union bpf_attr attr;
		int v6 = i & 1;

		memset(p, 0, sizeof(*p));
		if (i == FP_CONNECT4 || i == FP_CONNECT6)
			emit_forward(p, v6, 0, fp->cookie, fp->map_fd);
		else if (i == FP_SENDMSG4 || i == FP_SENDMSG6)
			emit_forward(p, v6, 1, fp->cookie, fp->map_fd);
		else
			emit_reverse(p, v6, fp->map_fd[2]);
		rc = fp->prog_fd[i] = load_prog(rep, i, p);
		if (rc < 0)
			goto err;

		memset(&attr, 0, sizeof(attr));
		attr.link_create.prog_fd = (unsigned int)fp->prog_fd[i];
		attr.link_create.target_fd = (unsigned int)fp->cgroup_fd;
		attr.link_create.attach_type = hooks[i].type;
		rc = fp->link_fd[i] = sys_bpf(BPF_LINK_CREATE, &attr);
		if (rc < 0) {
			rc = fail_bpf(rep, -rc, "attaching with a BPF link");
			goto err;
		}
	}
	free(p);
	*out = fp;
	return 0;
err:
	free(p);
	fp_close(fp);
	return rc;
}

/** fp_close() - detach and free everything (NULL is fine). */
void fp_close(struct fp *fp)
{
	int i;

	if (!fp)
		return;
	for (i = 0; i < FP_HOOKS; i++) {
		close_fd(&fp->link_fd[i]);
		close_fd(&fp->prog_fd[i]);
	}
	for (i = 0; i < 3; i++)
		close_fd(&fp->map_fd[i]);
	close_fd(&fp->btf_fd);
	close_fd(&fp->cgroup_fd);
	free(fp);
}

uint64_t fp_netns_cookie(const struct fp *fp)
{
	return fp->cookie;
}

static int map_op(int cmd, int map_fd, const void *key, void *value, uint64_t flags)
{
	union bpf_attr attr;

	memset(&attr, 0, sizeof(attr));
	attr.map_fd = (unsigned int)map_fd;
	attr.key = (uintptr_t)key;
	if (cmd == BPF_MAP_GET_NEXT_KEY)
		attr.next_key = (uintptr_t)value;
	else
		attr.value = (uintptr_t)value;
	attr.flags = flags;
	return sys_bpf(cmd, &attr);
}

/* An entry must name a concrete address: a wildcard would rewrite connects
 * to addresses the mapping does not serve. */
static int key_ok(const struct fp_key *k)
{
	if (k->family == AF_INET)
		return k->addr[0] != 0 && !k->addr[1] && !k->addr[2] && !k->addr[3];
	if (k->family == AF_INET6)
		return k->addr[0] || k->addr[1] || k->addr[2] || k->addr[3];
	return 0;
}

/** fp_entry_add() - add or replace the entry for one host address:port. */
int fp_entry_add(struct fp *fp, const struct fp_key *key, const struct fp_value *val)
{
	struct fp_value v = *val;

	if (!key_ok(key) || key->port == 0 || val->id == 0 ||
	    (key->proto != IPPROTO_TCP && key->proto != IPPROTO_UDP))
		return -EINVAL;
	v.connects = v.datagrams = 0;
	return map_op(BPF_MAP_UPDATE_ELEM, fp->map_fd[0], key, &v, BPF_ANY);
}

int fp_entry_del(struct fp *fp, const struct fp_key *key)
{
	return map_op(BPF_MAP_DELETE_ELEM, fp->map_fd[0], key, NULL, 0);
}

int fp_entry_get(struct fp *fp, const struct fp_key *key, struct fp_value *val)
{
	return map_op(BPF_MAP_LOOKUP_ELEM, fp->map_fd[0], key, val, 0);
}

/** fp_entry_next() - iterate: @prev NULL for the first key; -ENOENT at the end. */
int fp_entry_next(struct fp *fp, const struct fp_key *prev, struct fp_key *next)
{
	return map_op(BPF_MAP_GET_NEXT_KEY, fp->map_fd[0], prev, next, 0);
}

/**
 * fp_tag() - mark a listening socket as mapping @id's own
 *
 * The tag lives in the socket's storage, so it goes away with the socket:
 * a closed listener can no longer vouch for its entries.
 */
int fp_tag(struct fp *fp, int sock_fd, uint32_t id)
{
	uint64_t v = id;

	if (id == 0)
		return -EINVAL;
	return map_op(BPF_MAP_UPDATE_ELEM, fp->map_fd[1], &sock_fd, &v, BPF_ANY);
}

int fp_untag(struct fp *fp, int sock_fd)
{
	return map_op(BPF_MAP_DELETE_ELEM, fp->map_fd[1], &sock_fd, NULL, 0);
}

int fp_tag_get(struct fp *fp, int sock_fd, uint32_t *id)
{
	uint64_t v = 0;
	int rc = map_op(BPF_MAP_LOOKUP_ELEM, fp->map_fd[1], &sock_fd, &v, 0);

	if (rc < 0)
		return rc;
	*id = (uint32_t)v;
	return 0;
}

/**
 * fp_attached() - how many programs are attached to a cgroup, per hook
 *
 * Counts every program on the directory itself, ours or not (for tests and
 * for checking that nothing was left behind).
 */
int fp_attached(const char *cgroup_path, unsigned int counts[FP_HOOKS])
{
	int fd, rc = 0;

	fd = open(cgroup_path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd == -1)
		return -errno;
	for (int i = 0; i < FP_HOOKS; i++) {
		union bpf_attr attr;

		memset(&attr, 0, sizeof(attr));
		attr.query.target_fd = (unsigned int)fd;
		attr.query.attach_type = hooks[i].type;
		rc = sys_bpf(BPF_PROG_QUERY, &attr);
		if (rc < 0)
			break;
		counts[i] = attr.query.prog_cnt;
	}
	close(fd);
	return rc < 0 ? rc : 0;
}

/**
 * fp_programs_loaded() - how many of our programs exist on the whole host
 *
 * Walks every loaded program by id and counts the names we give ours; a
 * program goes once no link and no descriptor holds it.
 */
int fp_programs_loaded(void)
{
	union bpf_attr attr;
	uint32_t id = 0;
	int count = 0;

	for (;;) {
		struct bpf_prog_info info;
		int fd, rc;

		memset(&attr, 0, sizeof(attr));
		attr.start_id = id;
		rc = sys_bpf(BPF_PROG_GET_NEXT_ID, &attr);
		if (rc == -ENOENT)
			return count;
		if (rc < 0)
			return rc;
		id = attr.next_id;
		memset(&attr, 0, sizeof(attr));
		attr.prog_id = id;
		fd = sys_bpf(BPF_PROG_GET_FD_BY_ID, &attr);
		if (fd == -ENOENT)	/* went away meanwhile */
			continue;
		if (fd < 0)
			return fd;
		memset(&info, 0, sizeof(info));
		memset(&attr, 0, sizeof(attr));
		attr.info.bpf_fd = (unsigned int)fd;
		attr.info.info_len = sizeof(info);
		attr.info.info = (uintptr_t)&info;
		rc = sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &attr);
		close(fd);
		if (rc < 0)
			return rc;
		if (strncmp(info.name, FP_NAME_PREFIX, strlen(FP_NAME_PREFIX)) == 0)
			count++;
	}
}
