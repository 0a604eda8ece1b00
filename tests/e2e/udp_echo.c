/*
 * udp_echo: the UDP "container" of the end-to-end suite.
 *
 * Binds 0.0.0.0:PORT (with a second argument "6": [::]:PORT, IPv4 too) and
 * sends every datagram back to whoever sent it. It
 * prints "ready PORT" once bound, so a test can wait for the container
 * instead of racing its first datagram against the bind. Built at test time
 * with `gcc -static` and copied into a busybox image that has no libc.
 */
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	struct sockaddr_in6 addr6;
	struct sockaddr_in addr;
	int v6 = argc == 3 && strcmp(argv[2], "6") == 0;
	char buf[65536];
	char *end;
	long port;
	int fd;

	if (argc != 2 && !v6) {
		fprintf(stderr, "usage: udp_echo PORT [6]\n");
		return 2;
	}
	errno = 0;
	port = strtol(argv[1], &end, 10);
	if (errno != 0 || *end != '\0' || port < 1 || port > 65535) {
		fprintf(stderr, "udp_echo: bad port %s\n", argv[1]);
		return 2;
	}

	fd = socket(v6 ? AF_INET6 : AF_INET, SOCK_DGRAM, 0);
	if (fd == -1) {
		perror("udp_echo: socket");
		return 1;
	}
	memset(&addr, 0, sizeof(addr));
	addr.sin_family = AF_INET;
	addr.sin_addr.s_addr = htonl(INADDR_ANY);
	addr.sin_port = htons((unsigned short)port);
	memset(&addr6, 0, sizeof(addr6));
	addr6.sin6_family = AF_INET6;
	addr6.sin6_addr = in6addr_any;
	addr6.sin6_port = addr.sin_port;
	if (v6 ? bind(fd, (struct sockaddr *)&addr6, sizeof(addr6)) == -1 :
		 bind(fd, (struct sockaddr *)&addr, sizeof(addr)) == -1) {
		perror("udp_echo: bind");
		return 1;
	}
	printf("ready %ld\n", port);
	fflush(stdout);

	for (;;) {
		struct sockaddr_storage peer;
		socklen_t len = sizeof(peer);
		ssize_t n;

		n = recvfrom(fd, buf, sizeof(buf), 0, (struct sockaddr *)&peer, &len);
		if (n == -1) {
			if (errno == EINTR)
				continue;
			perror("udp_echo: recvfrom");
			return 1;
		}
		/* A lost echo is the client's problem to notice, not a reason to stop. */
		if (sendto(fd, buf, (size_t)n, 0, (struct sockaddr *)&peer, len) == -1 &&
		    errno != EINTR)
			perror("udp_echo: sendto");
	}
}
