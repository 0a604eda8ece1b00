# cython: language_level=3
"""Thin binding of the kernel fast path (csrc/fastpath.h).

Converts types and turns -errno results into OSError.  Which addresses get
entries, ids and counters are policy, kept in spliceproxy.fastpath.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset, strerror


cdef extern from "fastpath.h" nogil:
    struct fp:
        pass

    enum:
        FP_HOOKS

    struct fp_report:
        int kind
        int err
        char what[160]
        char *log
        size_t log_size

    struct fp_key:
        uint32_t addr[4]
        uint16_t port
        uint8_t family
        uint8_t proto

    struct fp_value:
        uint32_t addr[4]
        uint16_t port
        uint8_t family
        uint8_t pad
        uint32_t id
        uint64_t connects
        uint64_t datagrams

    int fp_open(fp **out, const char *cgroup_path, fp_report *rep)
    void fp_close(fp *f)
    uint64_t fp_netns_cookie(const fp *f)
    int fp_entry_add(fp *f, const fp_key *key, const fp_value *val)
    int fp_entry_del(fp *f, const fp_key *key)
    int fp_entry_get(fp *f, const fp_key *key, fp_value *val)
    int fp_entry_next(fp *f, const fp_key *prev, fp_key *next)
    int fp_tag(fp *f, int sock_fd, uint32_t id)
    int fp_untag(fp *f, int sock_fd)
    int fp_tag_get(fp *f, int sock_fd, uint32_t *id)
    int fp_try_load(int hook, const void *insns, unsigned int n, fp_report *rep)
    int fp_attached(const char *cgroup_path, unsigned int *counts)
    int fp_programs_loaded()


# enum fp_fail, by name
FAIL_KINDS = ("none", "kernel", "cgroup", "permission", "verifier", "other")
HOOKS = ("connect4", "connect6", "sendmsg4", "sendmsg6",
         "recvmsg4", "recvmsg6", "getpeername4", "getpeername6")

_LOG_SIZE = 1 << 20


class LoadError(Exception):
    """The programs could not be loaded or attached.

    kind is one of FAIL_KINDS, errno the failed step's errno, what the step,
    log the verifier's log ('' unless the verifier spoke)."""

    def __init__(self, kind, err, what, log):
        super().__init__("%s (%s)" % (what, kind))
        self.kind = kind
        self.errno = err
        self.what = what
        self.log = log


cdef int check(int rc) except -1:
    if rc < 0:
        raise OSError(-rc, strerror(-rc).decode())
    return rc


cdef void make_key(fp_key *k, int family, bytes addr, int port, int proto) except *:
    memset(k, 0, sizeof(fp_key))
    if len(addr) not in (4, 16):
        raise ValueError("address must be 4 or 16 bytes")
    memcpy(<void *>k.addr, <const char *>addr, len(addr))
    k.port = ((port & 0xff) << 8) | ((port >> 8) & 0xff)  # network order
    k.family = family
    k.proto = proto


cdef tuple key_tuple(const fp_key *k):
    n = 4 if k.family == 2 else 16
    port = ((k.port & 0xff) << 8) | (k.port >> 8)
    return (k.family, (<const char *>k.addr)[:n], port, k.proto)


cdef int report_init(fp_report *rep) except -1:
    """A zeroed report with room for the verifier's log (the caller frees rep.log)."""
    memset(rep, 0, sizeof(rep[0]))
    rep.log = <char *>malloc(_LOG_SIZE)
    if rep.log == NULL:
        raise MemoryError()
    rep.log_size = _LOG_SIZE
    rep.log[0] = 0
    return 0


cdef load_error(fp_report *rep):
    """The LoadError a failed load's report describes."""
    kind = FAIL_KINDS[rep.kind] if 0 <= rep.kind < len(FAIL_KINDS) else "other"
    return LoadError(kind, rep.err, rep.what.decode(errors="replace"),
                     rep.log.decode(errors="replace"))


cdef class Programs:
    """The loaded, attached programs and their maps (csrc/fastpath.c)."""

    cdef fp *f

    def __cinit__(self, cgroup_path):
        cdef fp_report rep
        cdef bytes path = cgroup_path.encode() if isinstance(cgroup_path, str) else cgroup_path
        cdef const char *cpath = path
        cdef int rc
        report_init(&rep)
        try:
            with nogil:
                rc = fp_open(&self.f, cpath, &rep)
            if rc < 0:
                raise load_error(&rep)
        finally:
            free(rep.log)

    def __dealloc__(self):
        if self.f != NULL:
            fp_close(self.f)
            self.f = NULL

    def close(self):
        """Detach the programs and free the maps (idempotent)."""
        if self.f != NULL:
            fp_close(self.f)
            self.f = NULL

    cdef fp *live(self) except NULL:
        if self.f == NULL:
            raise ValueError("fast path is closed")
        return self.f

    @property
    def netns_cookie(self):
        return fp_netns_cookie(self.live())

    def entry_add(self, int family, bytes addr, int port, int proto,
                  bytes target_addr, int target_port, unsigned int mapping_id):
        cdef fp_key k
        cdef fp_value v
        make_key(&k, family, addr, port, proto)
        memset(&v, 0, sizeof(v))
        if len(target_addr) not in (4, 16):
            raise ValueError("target address must be 4 or 16 bytes")
        memcpy(<void *>v.addr, <const char *>target_addr, len(target_addr))
        v.port = ((target_port & 0xff) << 8) | ((target_port >> 8) & 0xff)
        v.family = 2 if len(target_addr) == 4 else 10
        v.id = mapping_id
        check(fp_entry_add(self.live(), &k, &v))

    def entry_del(self, int family, bytes addr, int port, int proto):
        cdef fp_key k
        make_key(&k, family, addr, port, proto)
        check(fp_entry_del(self.live(), &k))

    def entry_get(self, int family, bytes addr, int port, int proto):
        """(mapping id, connects, datagrams) of one entry."""
        cdef fp_key k
        cdef fp_value v
        make_key(&k, family, addr, port, proto)
        check(fp_entry_get(self.live(), &k, &v))
        return (v.id, v.connects, v.datagrams)

    def entries(self):
        """Every entry: [((family, addr, port, proto), (id, connects, datagrams))]."""
        cdef fp_key prev, cur
        cdef fp_value v
        cdef fp *f = self.live()
        cdef int rc
        cdef bint first = True
        out = []
        while True:
            rc = fp_entry_next(f, NULL if first else &prev, &cur)
            if rc == -2:  # ENOENT: the end
                return out
            check(rc)
            first = False
            prev = cur
            if fp_entry_get(f, &cur, &v) == 0:
                out.append((key_tuple(&cur), (v.id, v.connects, v.datagrams)))

    def tag(self, int sock_fd, unsigned int mapping_id):
        check(fp_tag(self.live(), sock_fd, mapping_id))

    def untag(self, int sock_fd):
        check(fp_untag(self.live(), sock_fd))

    def tag_get(self, int sock_fd):
        cdef uint32_t v = 0
        check(fp_tag_get(self.live(), sock_fd, &v))
        return v


def try_load(hook, bytes insns):
    """Load raw instructions (8 bytes each) for one hook and drop them;
    raises LoadError classified as fp_open() would."""
    cdef fp_report rep
    cdef int rc
    cdef int h = HOOKS.index(hook)
    report_init(&rep)
    try:
        rc = fp_try_load(h, <const char *>insns, len(insns) // 8, &rep)
        if rc == -22 and rep.kind == 0:
            raise ValueError("bad hook or program size")
        if rc < 0:
            raise load_error(&rep)
    finally:
        free(rep.log)


def attached(cgroup_path):
    """{hook name: number of programs attached to this cgroup directory}."""
    cdef unsigned int counts[FP_HOOKS]
    cdef bytes path = cgroup_path.encode() if isinstance(cgroup_path, str) else cgroup_path
    check(fp_attached(path, counts))
    return {HOOKS[i]: counts[i] for i in range(FP_HOOKS)}


def programs_loaded():
    """How many fast-path programs exist on this host (any holder)."""
    return check(fp_programs_loaded())
