/* SPDX-License-Identifier: MIT
 *
 * refuse_map_update: run a command under a seccomp filter that fails
 * bpf(BPF_MAP_UPDATE_ELEM, ...) with EPERM and allows everything else.
 *
 *	refuse_map_update COMMAND [ARG...]
 *
 * This is what a kernel before 6.5 does to the host engine once it has
 * dropped its privileges: the programs are loaded and attached (before the
 * drop), but every later map update -- a mapping's entries, its listener's
 * tag -- is refused.  This kernel lets the engine keep those rights, so the
 * tests make it refuse instead.  The filter is inherited by every process
 * the command starts (the stub's engine among them).
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
#error "refuse_map_update: add this architecture's AUDIT_ARCH_*"
#endif

/* The low 32 bits of the first argument: bpf()'s cmd is an int. */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define ARG0_LO offsetof(struct seccomp_data, args[0])
#else
#define ARG0_LO (offsetof(struct seccomp_data, args[0]) + 4)
#endif

int main(int argc, char **argv)
{
	struct sock_filter insns[] = {
		/* Another ABI's syscall numbers mean other calls: refuse them all. */
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, ARCH, 1, 0),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_bpf, 0, 3),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ARG0_LO),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, BPF_MAP_UPDATE_ELEM, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA)),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog prog = {
		.len = sizeof(insns) / sizeof(insns[0]),
		.filter = insns,
	};

	if (argc < 2) {
		fprintf(stderr, "usage: %s COMMAND [ARG...]\n", argv[0]);
		return 127;
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
	execvp(argv[1], argv + 1);
	fprintf(stderr, "%s: %s: %s\n", argv[0], argv[1], strerror(errno));
	return 127;
}
