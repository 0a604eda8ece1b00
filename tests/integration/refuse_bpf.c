/* SPDX-License-Identifier: MIT
 *
 * refuse_bpf: run a command under a seccomp filter that makes bpf() fail
 * with EPERM the way a kernel before 6.5 fails it for the host engine once
 * the engine has dropped its privileges.
 *
 *	refuse_bpf update COMMAND [ARG...]
 *		bpf(BPF_MAP_UPDATE_ELEM) fails, every other call is allowed
 *	refuse_bpf after-load COMMAND [ARG...]
 *		every bpf() command fails except those loading and attaching
 *		the programs need (BTF_LOAD, MAP_CREATE, PROG_LOAD, LINK_CREATE):
 *		map lookups, updates, deletes and walks are all refused
 *
 * Before 6.5 the kernel checks the capability on every bpf() call, so the
 * programs load and attach (before the drop) and each later map operation
 * -- a mapping's entries, its listener's tag, the status's counts -- is
 * refused. This kernel lets the engine keep those rights, so the tests make
 * it refuse instead. The filter is inherited by every process the command
 * starts (the stub's engine among them).
 *
 * Exit status: 127 when the filter cannot be installed or the command cannot
 * be run, with the reason on stderr; otherwise the command's.
 */
#include <errno.h>
#include <linux/audit.h>
#include <linux/bpf.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__x86_64__)
#define ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define ARCH AUDIT_ARCH_AARCH64
#else
#error "refuse_bpf: add this architecture's AUDIT_ARCH_*"
#endif

/* The low 32 bits of the first argument: bpf()'s cmd is an int. */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define ARG0_LO offsetof(struct seccomp_data, args[0])
#else
#define ARG0_LO (offsetof(struct seccomp_data, args[0]) + 4)
#endif

#define RET(v) BPF_STMT(BPF_RET | BPF_K, (v))
#define REFUSE RET(SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA))
#define ALLOW RET(SECCOMP_RET_ALLOW)
/* Jump to the ALLOW @n instructions on when the loaded value is @k. */
#define ALLOW_IF(k, n) BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (k), (n), 0)

/* Up to the bpf() command in the accumulator; everything else is allowed. */
#define PROLOGUE(skip_to_allow)                                                \
	BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)), \
	/* Another ABI's numbers mean other calls: refuse them all. */            \
	BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, ARCH, 1, 0),                        \
	RET(SECCOMP_RET_KILL_PROCESS),                                           \
	BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),   \
	BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_bpf, 0, (skip_to_allow) + 1),  \
	BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ARG0_LO)

static struct sock_filter refuse_update[] = {
	PROLOGUE(2),
	BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, BPF_MAP_UPDATE_ELEM, 0, 1),
	REFUSE,
	ALLOW,
};

static struct sock_filter refuse_after_load[] = {
	PROLOGUE(5),
	ALLOW_IF(BPF_BTF_LOAD, 4),
	ALLOW_IF(BPF_MAP_CREATE, 3),
	ALLOW_IF(BPF_PROG_LOAD, 2),
	ALLOW_IF(BPF_LINK_CREATE, 1),
	REFUSE,
	ALLOW,
};

int main(int argc, char **argv)
{
	struct sock_fprog prog;

	if (argc < 3)
		goto usage;
	if (strcmp(argv[1], "update") == 0) {
		prog.filter = refuse_update;
		prog.len = sizeof(refuse_update) / sizeof(refuse_update[0]);
	} else if (strcmp(argv[1], "after-load") == 0) {
		prog.filter = refuse_after_load;
		prog.len = sizeof(refuse_after_load) / sizeof(refuse_after_load[0]);
	} else {
		goto usage;
	}
	/*
	 * No PR_SET_NO_NEW_PRIVS: the engine must still start as root and
	 * drop its privileges itself; root may install a filter without it.
	 */
	if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0) {
		fprintf(stderr, "%s: installing the seccomp filter: %s\n", argv[0],
			strerror(errno));
		return 127;
	}
	execvp(argv[2], argv + 2);
	fprintf(stderr, "%s: %s: %s\n", argv[0], argv[2], strerror(errno));
	return 127;
usage:
	fprintf(stderr, "usage: %s update|after-load COMMAND [ARG...]\n", argv[0]);
	return 127;
}
