# Declarations of csrc/engine.h and csrc/process.h, nothing else.
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t

    struct sockaddr:
        pass


cdef extern from "engine.h" nogil:
    struct sp_engine:
        pass

    struct sp_event:
        int32_t kind
        int32_t err
        int32_t listener
        uint64_t count

    struct sp_stats_header:
        uint64_t magic
        uint32_t version
        uint32_t count
        uint64_t pid
        uint32_t names_off
        uint32_t names_len

    enum sp_option:
        SP_OPT_PIPE_SIZE
        SP_OPT_PIPE_POOL_MAX
        SP_OPT_COPY_MODE
        SP_OPT_COPY_BUF
        SP_OPT_IDLE_TIMEOUT_MS
        SP_OPT_UDP_TIMEOUT_MS
        SP_OPT_UDP_MAX_FLOWS
        SP_OPT_ACCEPT_BACKOFF_MS
        SP_OPT_FD_LIMIT
        SP_OPT_CONNECT_TIMEOUT_MS
        SP_OPT_UDP_MAX_FLOWS_PER_ADDR
        SP_OPT_SPIN_US
        SP_OPT_TRANSPARENT
        SP_OPT_COUNT

    enum sp_copy_mode:
        SP_COPY_SPLICE
        SP_COPY_READWRITE

    enum sp_run_result:
        SP_RUN_STOPPED
        SP_RUN_EVENTS
        SP_RUN_WATCH
        SP_RUN_TIMEOUT
        SP_RUN_INTERRUPTED

    enum sp_event_kind:
        SP_EV_CONNECT_FAILED
        SP_EV_ACCEPT_PAUSED
        SP_EV_ACCEPT_RESUMED
        SP_EV_ACCEPT_ERROR
        SP_EV_UDP_SEND_FAILED
        SP_EV_UDP_REPLY_FAILED
        SP_EV_UDP_EVICTED
        SP_EV_UDP_FLOW_FAILED
        SP_EV_LISTENER_FAILED
        SP_EV_IDLE_RECLAIMED
        SP_EV_HEADROOM_RECLAIMED
        SP_EV_UDP_ADDR_EVICTED
        SP_EV_TP_LOOPBACK
        SP_EV_TP_FAMILY
        SP_EV_TP_NETWORK
        SP_EV_TP_LOCAL
        SP_EV_TP_FAILED

    struct sp_prefix:
        uint8_t family
        uint8_t len
        uint8_t addr[16]

    enum sp_kind:
        SP_KIND_COUNTER
        SP_KIND_GAUGE

    enum:
        SP_STAT_COUNT
        SP_STATS_MAGIC
        SP_STATS_VERSION
        SP_STATS_FLUSH_MS
        SP_TRANSPARENT_EXCLUDE_MAX

    int sp_engine_new(sp_engine **out)
    void sp_engine_free(sp_engine *e)
    int sp_engine_set_stats_fd(sp_engine *e, int fd)
    int sp_engine_set_option(sp_engine *e, int option, int64_t value)
    int sp_engine_add_tcp(sp_engine *e, int listen_fd, const sockaddr *backend, socklen_t backend_len)
    int sp_engine_add_udp(sp_engine *e, int fd, int family, const sockaddr *backend, socklen_t backend_len)
    int sp_engine_remove(sp_engine *e, int id)
    int sp_engine_set_transparent_exclude(sp_engine *e, const sp_prefix *p, int n)
    int sp_engine_listener_stats(const sp_engine *e, int id, uint64_t *out)
    int sp_engine_set_listener_option(sp_engine *e, int id, int option, int64_t value)
    int sp_engine_get_option(const sp_engine *e, int id, int option, int64_t *value)
    int sp_stat_per_listener(int i)
    int sp_engine_watch(sp_engine *e, int fd)
    int sp_engine_run(sp_engine *e, int timeout_ms)
    int sp_engine_stop(sp_engine *e)
    int sp_engine_next_event(sp_engine *e, sp_event *ev)
    int sp_engine_reserve_pipes(sp_engine *e, int n)
    const uint64_t *sp_engine_stats(const sp_engine *e)
    const char *sp_stat_name(int i)
    int sp_stat_kind(int i)
    const char *sp_stat_help(int i)


cdef extern from "process.h" nogil:
    int sp_open_listener(int type, const sockaddr *addr, socklen_t len, const char **step)
    int64_t sp_raise_nofile()
    int sp_set_process_name(const char *name)
    int sp_drop_privileges(uint32_t uid, uint32_t gid, uint64_t keep, uint64_t inheritable,
                           const char **step)
    int sp_no_new_privs()
