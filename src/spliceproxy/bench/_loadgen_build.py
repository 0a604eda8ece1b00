"""cffi build script for the load generator's hot loops (module spliceproxy.bench._loadgen).

The measuring side must never be the bottleneck, so every per-byte and
per-message loop is C: bulk send, TCP and UDP ping-pong, connect-exchange-close,
UDP bursts, many idle connections, the backend servers' epoll loop, and starting a
proxy the way dockerd does (clone with CLONE_VM | CLONE_VFORK, as Go's os/exec).  Each
function returns >= 0 or -errno; cffi releases the GIL around every call, so
Python threads can drive several streams in parallel.
"""

import os

from cffi import FFI

CDEF = """
int lg_setns(int fd);
long long lg_bulk_send(int fd, long long total, int chunk);
int lg_rr(int fd, int iters, int size, double *lat_ns);
int lg_connect_rate(int family, const char *ip, int port, int count, double *lat_ns);
int lg_udp_rr(int fd, int iters, int size, int timeout_ms, double *lat_ns);
int lg_udp_burst(int fd, int count, int size, int window, int timeout_ms, double *elapsed_s);
int lg_open_many(int family, const char *ip, int port, int n, int *fds);
void lg_close_many(int *fds, int n);
int lg_serve(int *lfds, int *kinds, int n, int stopfd);
int lg_rr_multi(int *fds, int nfds, int iters, int size, double *lat_ns);
int lg_udp_rr_multi(int *fds, int nfds, int iters, int size, int timeout_ms, double *lat_ns);
int lg_connect_rate_multi(int family, const char **ips, int *ports, int n, int count,
                          unsigned int seed, double *lat_ns);
int lg_spawn(const char *path, char **argv, char **envp, int listen_fd, int timeout_ms,
             char *status, int cap, int *status_len, double *ready_ns);
"""

# The C itself is an ordinary source file beside this one, compiled with
# -Werror by the lint like every other C file of the repository.
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "loadgen.c")) as _f:
    SOURCE = _f.read()

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("spliceproxy.bench._loadgen", SOURCE, extra_compile_args=["-O2"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
