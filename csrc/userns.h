/* SPDX-License-Identifier: MIT
 *
 * userns.h - which user namespace this process runs in, for the stub and the
 * privilege drop alike (src/spliceproxy/userns.py says the same in Python).
 *
 * Root of a user namespace other than the host's (RootlessKit's, for a
 * rootless dockerd) is a user of the host: it takes its engine socket from
 * XDG_RUNTIME_DIR and, where no dynamic uid is mapped, keeps its ids.
 */
#ifndef SPLICEPROXY_USERNS_H
#define SPLICEPROXY_USERNS_H

#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <unistd.h>

/**
 * sp_initial_userns() - is this the host's own user namespace?
 *
 * It is when /proc/self/uid_map maps every id to itself ("0 0 4294967295").
 * Returns true when the map cannot be read, as before there was a question.
 */
static inline bool sp_initial_userns(void)
{
	char buf[256];
	unsigned long inside, outside, count;
	int fd = open("/proc/self/uid_map", O_RDONLY | O_CLOEXEC);
	ssize_t n;
	int end = 0;

	if (fd == -1)
		return true;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return true;
	buf[n] = '\0';
	if (sscanf(buf, " %lu %lu %lu %n", &inside, &outside, &count, &end) != 3)
		return true;
	return inside == 0 && outside == 0 && count == 4294967295UL && buf[end] == '\0';
}

#endif /* SPLICEPROXY_USERNS_H */
