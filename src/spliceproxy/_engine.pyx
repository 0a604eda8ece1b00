# cython: language_level=3
"""Thin binding of the C relay engine (csrc/engine.h) and its process
helpers (csrc/process.h).

Converts types, releases the GIL for the whole run loop, and turns -errno
results into OSError in one place.  Policy lives in the Python front end.
"""

from cpython.exc cimport PyErr_CheckSignals
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy, memset, strerror

from spliceproxy._engine cimport *


cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        pass

    struct in6_addr:
        pass

    struct sockaddr_in:
        unsigned short sin_family
        unsigned short sin_port
        in_addr sin_addr

    struct sockaddr_in6:
        unsigned short sin6_family
        unsigned short sin6_port
        in6_addr sin6_addr

    struct sockaddr_storage:
        pass

    unsigned short htons(unsigned short)

cdef extern from "<sys/socket.h>" nogil:
    enum:
        AF_INET
        AF_INET6
        SOCK_STREAM
        SOCK_DGRAM

# The C enums the front end needs, by name: their values come from engine.h
# through the .pxd, so reordering an enum cannot silently remap an option.
# tests/unit/test_engine_api.py checks every one against the header.
RUN_STOPPED = SP_RUN_STOPPED
RUN_EVENTS = SP_RUN_EVENTS
RUN_WATCH = SP_RUN_WATCH
RUN_TIMEOUT = SP_RUN_TIMEOUT
RUN_INTERRUPTED = SP_RUN_INTERRUPTED

OPT_PIPE_SIZE = SP_OPT_PIPE_SIZE
OPT_PIPE_POOL_MAX = SP_OPT_PIPE_POOL_MAX
OPT_COPY_MODE = SP_OPT_COPY_MODE
OPT_COPY_BUF = SP_OPT_COPY_BUF
OPT_IDLE_TIMEOUT_MS = SP_OPT_IDLE_TIMEOUT_MS
OPT_UDP_TIMEOUT_MS = SP_OPT_UDP_TIMEOUT_MS
OPT_UDP_MAX_FLOWS = SP_OPT_UDP_MAX_FLOWS
OPT_ACCEPT_BACKOFF_MS = SP_OPT_ACCEPT_BACKOFF_MS
OPT_FD_LIMIT = SP_OPT_FD_LIMIT
OPT_CONNECT_TIMEOUT_MS = SP_OPT_CONNECT_TIMEOUT_MS
OPT_UDP_MAX_FLOWS_PER_ADDR = SP_OPT_UDP_MAX_FLOWS_PER_ADDR
OPT_SPIN_US = SP_OPT_SPIN_US
OPT_TRANSPARENT = SP_OPT_TRANSPARENT

COPY_SPLICE = SP_COPY_SPLICE
COPY_READWRITE = SP_COPY_READWRITE

EV_CONNECT_FAILED = SP_EV_CONNECT_FAILED
EV_ACCEPT_PAUSED = SP_EV_ACCEPT_PAUSED
EV_ACCEPT_RESUMED = SP_EV_ACCEPT_RESUMED
EV_ACCEPT_ERROR = SP_EV_ACCEPT_ERROR
EV_UDP_SEND_FAILED = SP_EV_UDP_SEND_FAILED
EV_UDP_REPLY_FAILED = SP_EV_UDP_REPLY_FAILED
EV_UDP_EVICTED = SP_EV_UDP_EVICTED
EV_UDP_FLOW_FAILED = SP_EV_UDP_FLOW_FAILED
EV_LISTENER_FAILED = SP_EV_LISTENER_FAILED
EV_IDLE_RECLAIMED = SP_EV_IDLE_RECLAIMED
EV_HEADROOM_RECLAIMED = SP_EV_HEADROOM_RECLAIMED
EV_UDP_ADDR_EVICTED = SP_EV_UDP_ADDR_EVICTED
EV_TP_LOOPBACK = SP_EV_TP_LOOPBACK
EV_TP_FAMILY = SP_EV_TP_FAMILY
EV_TP_NETWORK = SP_EV_TP_NETWORK
EV_TP_LOCAL = SP_EV_TP_LOCAL
EV_TP_FAILED = SP_EV_TP_FAILED
TRANSPARENT_EXCLUDE_MAX = SP_TRANSPARENT_EXCLUDE_MAX

STATS_HEADER_SIZE = sizeof(sp_stats_header)
STATS_VERSION = SP_STATS_VERSION
STATS_FLUSH_MS = SP_STATS_FLUSH_MS


cdef object _oserror(int err, filename=None):
    """The one place a positive errno becomes an exception."""
    msg = strerror(err).decode("utf-8", "replace")
    if filename is None:
        return OSError(err, msg)
    return OSError(err, msg, filename)


cdef socklen_t _sockaddr(sockaddr_storage *ss, int family, bytes addr, int port) except 0:
    """Fill ss from (family, packed address, port); returns its length."""
    cdef sockaddr_in *sin
    cdef sockaddr_in6 *sin6
    if port < 0 or port > 65535:
        raise ValueError("port out of range: %d" % port)
    memset(ss, 0, sizeof(sockaddr_storage))
    if family == AF_INET and len(addr) == 4:
        sin = <sockaddr_in *>ss
        sin.sin_family = AF_INET
        sin.sin_port = htons(port)
        memcpy(&sin.sin_addr, <char *>addr, 4)
        return sizeof(sockaddr_in)
    if family == AF_INET6 and len(addr) == 16:
        sin6 = <sockaddr_in6 *>ss
        sin6.sin6_family = AF_INET6
        sin6.sin6_port = htons(port)
        memcpy(&sin6.sin6_addr, <char *>addr, 16)
        return sizeof(sockaddr_in6)
    raise ValueError("bad address for family %d" % family)


def stat_names():
    """Counter names in ABI order."""
    return tuple(sp_stat_name(i).decode() for i in range(SP_STAT_COUNT))


def stat_kinds():
    """{name: "counter" or "gauge"} for every counter (engine.h's SP_STATS_TABLE)."""
    return {sp_stat_name(i).decode(): ("gauge" if sp_stat_kind(i) == SP_KIND_GAUGE else "counter")
            for i in range(SP_STAT_COUNT)}


def stat_help():
    """{name: one-line description} for every counter."""
    return {sp_stat_name(i).decode(): sp_stat_help(i).decode() for i in range(SP_STAT_COUNT)}


def open_listener(int type, int family, bytes addr, int port):
    """Open a listening socket like docker-proxy.

    Returns (fd, None) or (-errno, failing_step)."""
    cdef sockaddr_storage ss
    cdef socklen_t n = _sockaddr(&ss, family, addr, port)
    cdef const char *step = NULL
    cdef int rc = sp_open_listener(type, <sockaddr *>&ss, n, &step)
    if rc >= 0:
        return rc, None
    return rc, (step.decode() if step != NULL else "socket")


def raise_nofile():
    """Raise the soft NOFILE limit to the hard one; returns the limit."""
    cdef long long rc = sp_raise_nofile()
    if rc < 0:
        raise _oserror(<int>-rc)
    return rc


def set_process_name(str name):
    """Name the process for ps/top (truncated to 15 bytes by the kernel)."""
    cdef bytes b = name.encode("utf-8", "surrogateescape")[:15]
    cdef int rc = sp_set_process_name(b)
    if rc < 0:
        raise _oserror(-rc)


def drop_privileges(uid, gid, keep=(), inheritable=()):
    """Become uid/gid with no capabilities but those of keep (capability
    numbers; of those, inheritable also inheritable) and no way back (see
    process.h)."""
    cdef const char *step = NULL
    cdef uint64_t keep_mask = 0, inh_mask = 0
    for cap in keep:
        keep_mask |= (<uint64_t>1) << cap
    for cap in inheritable:
        inh_mask |= (<uint64_t>1) << cap
    cdef int rc = sp_drop_privileges(uid, gid, keep_mask, inh_mask, &step)
    if rc < 0:
        raise _oserror(-rc, step.decode() if step != NULL else None)


def no_new_privs():
    """Set no_new_privs: nothing this process executes gains a privilege."""
    cdef int rc = sp_no_new_privs()
    if rc < 0:
        raise _oserror(-rc, "prctl(PR_SET_NO_NEW_PRIVS)")


cdef class Engine:
    """One epoll loop holding any number of TCP/UDP listeners."""

    cdef sp_engine *e

    def __cinit__(self):
        cdef int rc
        self.e = NULL
        rc = sp_engine_new(&self.e)
        if rc < 0:
            raise _oserror(-rc)

    def __dealloc__(self):
        if self.e != NULL:
            sp_engine_free(self.e)
            self.e = NULL

    cdef int _check(self) except -1:
        if self.e == NULL:
            raise ValueError("engine is closed")
        return 0

    def close(self):
        """Close every socket the engine holds."""
        if self.e != NULL:
            sp_engine_free(self.e)
            self.e = NULL

    def set_stats_fd(self, int fd):
        """Publish the counters to fd (not owned; -1 stops), see engine.h."""
        self._check()
        cdef int rc = sp_engine_set_stats_fd(self.e, fd)
        if rc < 0:
            raise _oserror(-rc)

    def set_option(self, int option, long long value):
        self._check()
        cdef int rc = sp_engine_set_option(self.e, option, value)
        if rc < 0:
            raise _oserror(-rc)

    def add_tcp(self, int fd, int family, bytes addr, int port):
        """Hand a listening TCP socket (fd) to the engine; returns the listener id."""
        self._check()
        cdef sockaddr_storage ss
        cdef socklen_t n = _sockaddr(&ss, family, addr, port)
        cdef int rc = sp_engine_add_tcp(self.e, fd, <sockaddr *>&ss, n)
        if rc < 0:
            raise _oserror(-rc)
        return rc

    def add_udp(self, int fd, int listen_family, int family, bytes addr, int port):
        """Hand a bound UDP socket to the engine; returns the listener id."""
        self._check()
        cdef sockaddr_storage ss
        cdef socklen_t n = _sockaddr(&ss, family, addr, port)
        cdef int rc = sp_engine_add_udp(self.e, fd, listen_family, <sockaddr *>&ss, n)
        if rc < 0:
            raise _oserror(-rc)
        return rc

    def remove(self, int listener):
        """Close listener (an id from add_*) and everything it owns; the id may be reused."""
        self._check()
        cdef int rc = sp_engine_remove(self.e, listener)
        if rc < 0:
            raise _oserror(-rc)

    def set_transparent_exclude(self, prefixes):
        """The prefixes, (family, packed address, length) each, whose clients
        transparent listeners relay from the host's address (engine.h)."""
        self._check()
        cdef sp_prefix buf[SP_TRANSPARENT_EXCLUDE_MAX]
        cdef int n = 0
        cdef bytes raw
        items = list(prefixes)
        if len(items) > SP_TRANSPARENT_EXCLUDE_MAX:
            raise ValueError("more than %d prefixes" % SP_TRANSPARENT_EXCLUDE_MAX)
        for family, addr, length in items:
            raw = bytes(addr)
            if len(raw) != (4 if family == AF_INET else 16 if family == AF_INET6 else -1) \
                    or not 0 <= length <= 8 * len(raw):
                raise ValueError("bad prefix %r/%r" % (addr, length))
            memset(&buf[n], 0, sizeof(sp_prefix))
            buf[n].family = family
            buf[n].len = length
            memcpy(buf[n].addr, <char *>raw, len(raw))
            n += 1
        cdef int rc = sp_engine_set_transparent_exclude(self.e, buf, n)
        if rc < 0:
            raise _oserror(-rc)

    def set_listener_option(self, int listener, int option, long long value):
        """Give one listener its own value of a per-listener option (engine.h)."""
        self._check()
        cdef int rc = sp_engine_set_listener_option(self.e, listener, option, value)
        if rc < 0:
            raise _oserror(-rc)

    def get_option(self, int option, int listener=-1):
        """The value of option a listener runs with (its own, else the engine's),
        or with listener -1 the engine's own (engine.h)."""
        self._check()
        cdef int64_t value = 0
        cdef int rc = sp_engine_get_option(self.e, listener, option, &value)
        if rc < 0:
            raise _oserror(-rc)
        return value

    def listener_stats(self, int listener):
        """The counters a listener keeps for itself, as {name: value}."""
        self._check()
        cdef uint64_t out[SP_STAT_COUNT]
        cdef int rc = sp_engine_listener_stats(self.e, listener, out)
        if rc < 0:
            raise _oserror(-rc)
        return {sp_stat_name(i).decode(): out[i] for i in range(SP_STAT_COUNT)
                if sp_stat_per_listener(i)}

    def reserve_pipes(self, int n):
        """Create n pooled relay pipes now; returns how many are pooled."""
        self._check()
        cdef int rc = sp_engine_reserve_pipes(self.e, n)
        if rc < 0:
            raise _oserror(-rc)
        return rc

    def watch(self, int fd):
        """Return from run() with RUN_WATCH when fd is readable (-1 clears)."""
        self._check()
        cdef int rc = sp_engine_watch(self.e, fd)
        if rc < 0:
            raise _oserror(-rc)

    def run(self, int timeout_ms=-1):
        """Run the loop without the GIL; returns a RUN_* code.

        Pending Python signal handlers run before this returns."""
        self._check()
        cdef int rc
        with nogil:
            rc = sp_engine_run(self.e, timeout_ms)
        PyErr_CheckSignals()
        if rc < 0:
            raise _oserror(-rc)
        return rc

    def stop(self):
        self._check()
        cdef int rc = sp_engine_stop(self.e)
        if rc < 0:
            raise _oserror(-rc)

    def events(self):
        """Drain queued events: a list of (kind, errno, listener, count)."""
        self._check()
        cdef sp_event ev
        out = []
        while sp_engine_next_event(self.e, &ev):
            out.append((ev.kind, ev.err, ev.listener, ev.count))
        return out

    def stats(self):
        """The engine's own counters as {name: value}."""
        self._check()
        cdef const uint64_t *s = sp_engine_stats(self.e)
        return {sp_stat_name(i).decode(): s[i] for i in range(SP_STAT_COUNT)}
