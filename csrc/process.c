/* SPDX-License-Identifier: MIT
 *
 * process.c - process set-up around the loop: opening listeners the way
 * docker-proxy does, the descriptor limit, the process name, and dropping
 * privileges (process.h).  None of it touches an engine.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <grp.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <linux/capability.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>

#include "process.h"
#include "userns.h"

/* The backlog Go uses: net.core.somaxconn, capped to what listen() takes. */
static int somaxconn(void)
{
	FILE *f = fopen("/proc/sys/net/core/somaxconn", "re");
	int v = 4096;

	if (f) {
		if (fscanf(f, "%d", &v) != 1 || v <= 0)
			v = 4096;
		fclose(f);
	}
	if (v > 65535)
		v = 65535;
	return v;
}

int sp_open_listener(int type, const struct sockaddr *addr, socklen_t len, const char **step)
{
	int one = 1;
	int fd, err;
	int family = addr->sa_family;

	*step = "socket";
	if (family != AF_INET && family != AF_INET6)
		return -EAFNOSUPPORT;
	if (type != SOCK_STREAM && type != SOCK_DGRAM)
		return -ESOCKTNOSUPPORT;
	fd = socket(family, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd == -1)
		return -errno;
	*step = "setsockopt";
	/* TCP only, as docker-proxy: it lets a restarted proxy bind over the
	 * TIME_WAIT sockets of the last one.  On UDP it would let any local
	 * user bind the same port with SO_REUSEADDR and receive the clients'
	 * datagrams (the newest socket wins), so UDP listeners never set it. */
	if (type == SOCK_STREAM &&
	    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) == -1)
		goto fail;
	if (family == AF_INET6 &&
	    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one)) == -1)
		goto fail;
	if (type == SOCK_DGRAM) {
		if (family == AF_INET &&
		    setsockopt(fd, IPPROTO_IP, IP_PKTINFO, &one, sizeof(one)) == -1)
			goto fail;
		if (family == AF_INET6 &&
		    setsockopt(fd, IPPROTO_IPV6, IPV6_RECVPKTINFO, &one, sizeof(one)) == -1)
			goto fail;
	}
	*step = "bind";
	if (bind(fd, addr, len) == -1)
		goto fail;
	if (type == SOCK_STREAM) {
		*step = "listen";
		if (listen(fd, somaxconn()) == -1)
			goto fail;
	}
	*step = NULL;
	return fd;
fail:
	err = errno;
	close(fd);
	return -err;
}

int64_t sp_raise_nofile(void)
{
	struct rlimit rl;

	if (getrlimit(RLIMIT_NOFILE, &rl) == -1)
		return -errno;
	if (rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		if (setrlimit(RLIMIT_NOFILE, &rl) == -1)
			return -errno;
	}
	return rl.rlim_cur == RLIM_INFINITY ? INT64_MAX : (int64_t)rl.rlim_cur;
}

int sp_set_process_name(const char *name)
{
	if (prctl(PR_SET_NAME, name, 0, 0, 0) == -1)
		return -errno;
	return 0;
}

/* Highest capability number this kernel knows. */
static int cap_last_cap(void)
{
	FILE *f = fopen("/proc/sys/kernel/cap_last_cap", "re");
	int v = 63;

	if (f) {
		if (fscanf(f, "%d", &v) != 1 || v < 0 || v > 63)
			v = 63;
		fclose(f);
	}
	return v;
}

/**
 * caps_are() - whether this process's capability sets are what they should be
 * @want: CapInh, CapPrm, CapEff, CapBnd, CapAmb, in that order
 * @check_bounding: whether to check CapBnd (only root can change it)
 *
 * As /proc/self/status reports them.  Return: 0 if so, -EPERM if any is
 * not, -errno if unreadable.
 */
static int caps_are(const uint64_t want[5], bool check_bounding)
{
	static const char *const keys[] = { "CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:" };
	unsigned int mask = check_bounding ? 0x1f : 0x17, seen = 0;
	char line[256];
	size_t i;
	FILE *f = fopen("/proc/self/status", "re");

	if (!f)
		return -errno;
	while (fgets(line, sizeof(line), f)) {
		for (i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
			size_t n = strlen(keys[i]);
			unsigned long long v;

			if (!(mask & 1u << i) || strncmp(line, keys[i], n) != 0)
				continue;
			if (sscanf(line + n, "%llx", &v) != 1 || v != want[i]) {
				fclose(f);
				return -EPERM;
			}
			seen |= 1u << i;
		}
	}
	fclose(f);
	/* CapAmb is missing before Linux 4.3, where there is no ambient set. */
	if ((seen | 1u << 4) != (mask | 1u << 4))
		return -EPERM;
	return 0;
}

/**
 * sp_drop_privileges() - become uid/gid keeping only the capabilities asked for (process.h)
 * @uid:         user
 * @gid:         group
 * @keep:        capabilities kept (bounding, permitted, effective)
 * @inheritable: those of keep also kept inheritable
 * @step:        the call that failed
 *
 * Return: 0 or -errno
 */
int sp_drop_privileges(uint32_t uid, uint32_t gid, uint64_t keep, uint64_t inheritable,
		       const char **step)
{
	struct __user_cap_header_struct hdr = { .version = _LINUX_CAPABILITY_VERSION_3 };
	struct __user_cap_data_struct data[2];
	int pdeath = 0, last, cap, err;
	pid_t parent = getppid();
	bool root = geteuid() == 0;
	/* Root of a user namespace that stays uid 0 there (a rootless
	 * dockerd's: identity.py) is its user on the host; it still gives up
	 * every capability over that namespace but those it keeps. */
	bool stay = uid == 0 && root && !sp_initial_userns();
	uint64_t want[5];

	/* Only root has capabilities to keep (and can empty the bounding set;
	 * below root, no_new_privs already makes it irrelevant). */
	if (!root)
		keep = inheritable = 0;
	inheritable &= keep;
	*step = "prctl(PR_GET_PDEATHSIG)";
	if (prctl(PR_GET_PDEATHSIG, &pdeath, 0, 0, 0) == -1)
		return -errno;
	*step = "prctl(PR_SET_NO_NEW_PRIVS)";
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == -1)
		return -errno;
	if (root) {
		*step = "prctl(PR_CAPBSET_DROP)";
		last = cap_last_cap();
		for (cap = 0; cap <= last; cap++)
			if (!(keep & (uint64_t)1 << cap) &&
			    prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == -1 && errno != EINVAL)
				return -errno;
		*step = "prctl(PR_CAP_AMBIENT_CLEAR_ALL)";
		if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) == -1 &&
		    errno != EINVAL)
			return -errno;
		*step = "setgroups";
		if (setgroups(0, NULL) == -1 && !(stay && errno == EPERM))
			return -errno;  /* (a namespace may deny setgroups) */
		/* The permitted set survives the uid change only so. */
		*step = "prctl(PR_SET_KEEPCAPS)";
		if (keep && !stay && prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) == -1)
			return -errno;
	}
	*step = "setresgid";
	if (setresgid(gid, gid, gid) == -1)
		return -errno;
	*step = "setresuid";
	if (setresuid(uid, uid, uid) == -1)
		return -errno;
	if (uid != 0 || stay) {
		/* setresuid() away from root clears the effective set (and the
		 * permitted one, without KEEPCAPS) but not the inheritable one
		 * (dockerd's children inherit CapInh from it); staying uid 0
		 * clears none of them: set all three. */
		memset(data, 0, sizeof(data));
		data[0].effective = data[0].permitted = (uint32_t)keep;
		data[1].effective = data[1].permitted = (uint32_t)(keep >> 32);
		data[0].inheritable = (uint32_t)inheritable;
		data[1].inheritable = (uint32_t)(inheritable >> 32);
		*step = "capset";
		if (syscall(SYS_capset, &hdr, data) == -1)
			return -errno;
		*step = "prctl(PR_SET_KEEPCAPS)";
		if (keep && !stay && prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0) == -1)
			return -errno;
		/* Check the drop is for good: the five sets hold what was asked
		 * (bounding: when started as root), and there is no way back. */
		want[0] = inheritable;
		want[1] = want[2] = want[3] = keep;
		want[4] = 0;
		*step = "capability check (/proc/self/status)";
		err = caps_are(want, root);
		if (err < 0)
			return err;
		*step = "setuid(0) check";
		if (!stay && setuid(0) == 0)
			return -EPERM;
	}
	/* A credential change clears the parent-death signal dockerd set:
	 * re-arm it, and act on it if the parent already went away. */
	if (pdeath) {
		*step = "prctl(PR_SET_PDEATHSIG)";
		if (prctl(PR_SET_PDEATHSIG, pdeath, 0, 0, 0) == -1)
			return -errno;
		if (getppid() != parent)
			raise(pdeath);
	}
	*step = NULL;
	return 0;
}

/**
 * sp_no_new_privs() - set no_new_privs (process.h)
 *
 * Return: 0 or -errno
 */
int sp_no_new_privs(void)
{
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == -1)
		return -errno;
	return 0;
}
