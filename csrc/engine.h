/* SPDX-License-Identifier: MIT
 *
 * engine.h - public interface of the spliceproxy relay engine.
 *
 * One engine is one epoll loop holding any number of TCP and UDP listeners,
 * each with its own backend address.  The engine owns every descriptor handed
 * to it.  All functions return >= 0 on success or -errno; the library never
 * prints, never exits and never touches process-wide signal dispositions.
 *
 * Threading: one thread runs sp_engine_run(); sp_engine_stop() may be called
 * from any thread or signal handler; sp_engine_stats() may be read from any
 * thread at any time (each counter is an aligned 64-bit word written by the
 * loop thread alone).
 *
 * The counters live in the engine's own memory, never in memory another
 * process can write: what the engine decides (accept pausing on fds_open)
 * must not be steerable from outside.  Other processes see them through a
 * file the engine writes copies to (sp_engine_set_stats_fd()).
 */
#ifndef SPLICEPROXY_ENGINE_H
#define SPLICEPROXY_ENGINE_H

#include <stdint.h>
#include <sys/socket.h>

struct sp_engine;

/* Counters, in the order of the values in a counters file (whose names
 * travel with it, so readers need no copy of this list).  Each is defined
 * here once: X(NAME) D(KIND, "help"), KIND being COUNTER (only grows) or
 * GAUGE (a level now, goes up and down).  SP_STATS_TABLE(X, D) expands both
 * halves; SP_STATS_LIST(X) the names alone. */
#define SP_STATS_LIST(X) SP_STATS_TABLE(X, SP_STAT_NO_DOC)
#define SP_STAT_NO_DOC(kind, help)
#define SP_STATS_TABLE(X, D)                                                                      \
	X(TCP_ACCEPTED)        D(COUNTER, "connections accepted")                                 \
	X(TCP_ACTIVE)          D(GAUGE,   "connections open now")                                 \
	X(TCP_FAILED)          D(COUNTER, "backend connect failures")                             \
	X(TCP_CLOSED)          D(COUNTER, "connections finished")                                 \
	X(TCP_RESETS)          D(COUNTER, "resets propagated from one side to the other")         \
	X(BYTES_C2B)           D(COUNTER, "bytes relayed client -> backend")                      \
	X(BYTES_B2C)           D(COUNTER, "bytes relayed backend -> client")                      \
	X(ACCEPT_PAUSES)       D(COUNTER, "accept paused for lack of descriptors")                \
	X(IDLE_RECLAIMED)      D(COUNTER, "half-closed pairs reclaimed by timeout")               \
	X(HEADROOM_RECLAIMED)  D(COUNTER, "half-closed pairs reset to make room for new clients") \
	X(UDP_FLOWS_ACTIVE)    D(GAUGE,   "UDP client entries now")                               \
	X(UDP_FLOWS_CREATED)   D(COUNTER, "UDP client entries created")                           \
	X(UDP_FLOWS_EXPIRED)   D(COUNTER, "UDP entries expired after the timeout")                \
	X(UDP_FLOWS_EVICTED)   D(COUNTER, "UDP entries evicted by the table bound")               \
	X(UDP_ADDR_EVICTED)    D(COUNTER, "UDP entries evicted by the per-address bound")         \
	X(UDP_DGRAMS_C2B)      D(COUNTER, "datagrams client -> backend")                          \
	X(UDP_DGRAMS_B2C)      D(COUNTER, "datagrams backend -> client")                          \
	X(UDP_BYTES_C2B)       D(COUNTER, "UDP payload bytes client -> backend")                  \
	X(UDP_BYTES_B2C)       D(COUNTER, "UDP payload bytes backend -> client")                  \
	X(UDP_DROPS)           D(COUNTER, "datagrams that could not be delivered")                \
	X(TCP_TRANSPARENT)     D(COUNTER, "connections relayed from the client's own address")    \
	X(UDP_FLOWS_TRANSPARENT) D(COUNTER, "UDP entries relayed from the client's own address")  \
	X(TRANSPARENT_FALLBACKS) D(COUNTER, "transparent-mode clients relayed from the host's address") \
	X(PIPES_OPEN)          D(GAUGE,   "kernel pipes open now, pooled or in use")              \
	X(PIPES_IN_USE)        D(GAUGE,   "pipes holding data in flight")                         \
	X(PIPE_RESIZE_DENIED)  D(COUNTER, "F_SETPIPE_SZ refused (user pipe budget)")              \
	X(FDS_OPEN)            D(GAUGE,   "descriptors the engine holds")                         \
	X(ERR_EMFILE)          D(COUNTER, "EMFILE/ENFILE seen")                                   \
	X(ERR_ENOBUFS)         D(COUNTER, "ENOBUFS/ENOMEM seen")                                  \
	X(ERR_RESET)           D(COUNTER, "ECONNRESET/EPIPE seen")                                \
	X(ERR_OTHER)           D(COUNTER, "any other per-connection error")                       \
	X(EVENTS_DROPPED)      D(COUNTER, "log events lost because the ring was full")            \
	X(STATS_WRITE_ERRORS)  D(COUNTER, "failed or short writes of the counters file")          \
	X(LOOP_WAKEUPS)        D(COUNTER, "epoll_wait returns (empty spin polls not counted)")    \
	X(SPIN_POLLS)          D(COUNTER, "epoll_wait(..., 0) calls of the busy-poll")            \
	X(SPIN_HITS)           D(COUNTER, "busy-polls that found events (a wake-up saved)")       \
	X(SYSCALLS)            D(COUNTER, "every system call the engine made")                    \
	X(SYS_EPOLL_WAIT)      D(COUNTER, "epoll_wait system calls")                              \
	X(SYS_EPOLL_CTL)       D(COUNTER, "epoll_ctl system calls")                               \
	X(SYS_ACCEPT)          D(COUNTER, "accept system calls")                                  \
	X(SYS_SOCKET)          D(COUNTER, "socket system calls")                                  \
	X(SYS_CONNECT)         D(COUNTER, "connect system calls")                                 \
	X(SYS_SETSOCKOPT)      D(COUNTER, "setsockopt system calls")                              \
	X(SYS_GETSOCKOPT)      D(COUNTER, "getsockopt system calls")                              \
	X(SYS_SPLICE)          D(COUNTER, "splice system calls")                                  \
	X(SYS_READ)            D(COUNTER, "read system calls")                                    \
	X(SYS_WRITE)           D(COUNTER, "write system calls")                                   \
	X(SYS_SHUTDOWN)        D(COUNTER, "shutdown system calls")                                \
	X(SYS_CLOSE)           D(COUNTER, "close system calls")                                   \
	X(SYS_PIPE)            D(COUNTER, "pipe system calls")                                    \
	X(SYS_FCNTL)           D(COUNTER, "fcntl system calls")                                   \
	X(SYS_RECVMMSG)        D(COUNTER, "recvmmsg system calls")                                \
	X(SYS_SENDMMSG)        D(COUNTER, "sendmmsg system calls")                                \
	X(SYS_RECV)            D(COUNTER, "recv system calls")                                    \
	X(SYS_SEND)            D(COUNTER, "send system calls")                                    \
	X(SYS_BIND)            D(COUNTER, "bind system calls")                                    \
	X(SYS_OTHER)           D(COUNTER, "system calls of any other kind")

/* The counters each listener also keeps for itself, beside the engine's
 * totals (sp_engine_listener_stats()): what can be told apart per port. */
#define SP_LISTENER_STATS_LIST(X)                                           \
	X(TCP_ACCEPTED) X(TCP_ACTIVE) X(TCP_FAILED) X(TCP_CLOSED) X(TCP_RESETS) \
	X(BYTES_C2B) X(BYTES_B2C) X(ACCEPT_PAUSES) X(IDLE_RECLAIMED)           \
	X(HEADROOM_RECLAIMED) X(UDP_FLOWS_ACTIVE) X(UDP_FLOWS_CREATED)         \
	X(UDP_FLOWS_EXPIRED) X(UDP_FLOWS_EVICTED) X(UDP_ADDR_EVICTED)          \
	X(UDP_DGRAMS_C2B) X(UDP_DGRAMS_B2C) X(UDP_BYTES_C2B) X(UDP_BYTES_B2C)  \
	X(UDP_DROPS) X(ERR_EMFILE) X(ERR_ENOBUFS) X(ERR_RESET) X(ERR_OTHER)    \
	X(TCP_TRANSPARENT) X(UDP_FLOWS_TRANSPARENT) X(TRANSPARENT_FALLBACKS)

enum sp_stat {
#define SP_STAT_ENUM(name) SP_STAT_##name,
	SP_STATS_LIST(SP_STAT_ENUM)
#undef SP_STAT_ENUM
	SP_STAT_COUNT
};

/* What a counter is (sp_stat_kind()): a total that only grows, or a level. */
enum sp_kind { SP_KIND_COUNTER = 0, SP_KIND_GAUGE = 1 };

/*
 * A counters file (layout version 2), written whole at offset 0:
 *   struct sp_stats_header (32 bytes, little-endian fields);
 *   count values, little-endian uint64, in SP_STATS_LIST order;
 *   at names_off, names_len bytes: the count lower-case counter names,
 *   each ending in a NUL.
 * A reader takes the names from the file, so counters can be added without
 * breaking readers of an older list.
 */
#define SP_STATS_MAGIC 0x5453584c50535053ULL /* "SPSPLXST" little-endian */
#define SP_STATS_VERSION 2
struct sp_stats_header {
	uint64_t magic;
	uint32_t version;
	uint32_t count;
	uint64_t pid;
	uint32_t names_off;
	uint32_t names_len;
};

/* Tunables, set with sp_engine_set_option().  Those marked "sizing" size
 * buffers and tables that live connections use, so they are refused with
 * -EBUSY once a listener was added; the others apply at any time. */
enum sp_option {
	SP_OPT_PIPE_SIZE,          /* sizing: bytes per relay pipe (F_SETPIPE_SZ), default 1 MiB */
	SP_OPT_PIPE_POOL_MAX,      /* sizing: idle pipes kept for reuse, default 16 */
	SP_OPT_COPY_MODE,          /* sizing: SP_COPY_SPLICE (default) or SP_COPY_READWRITE */
	SP_OPT_COPY_BUF,           /* sizing: buffer bytes in read/write mode, default 64 KiB */
	SP_OPT_IDLE_TIMEOUT_MS,    /* reclaim half-closed pairs idle this long, default
				    * 120000 (as conntrack's CLOSE_WAIT); 0 = never */
	SP_OPT_UDP_TIMEOUT_MS,     /* UDP entry expiry, default 90000 */
	SP_OPT_UDP_MAX_FLOWS,      /* sizing: UDP entries per listener, default 16384 */
	SP_OPT_ACCEPT_BACKOFF_MS,  /* pause after EMFILE/ENFILE, default 100 */
	SP_OPT_FD_LIMIT,           /* RLIMIT_NOFILE: accepting pauses near it; 0 = unknown */
	SP_OPT_CONNECT_TIMEOUT_MS, /* give up a backend connect after this long, default
				    * 30000; 0 = the kernel's own (about two minutes) */
	SP_OPT_UDP_MAX_FLOWS_PER_ADDR, /* sizing: UDP entries per client address; 0 (default)
					* = a sixteenth of SP_OPT_UDP_MAX_FLOWS */
	SP_OPT_SPIN_US,            /* after a wake-up that moved bytes, poll without
				    * blocking for up to this many microseconds
				    * (at most 1000000); 0 (default) = off */
	SP_OPT_TRANSPARENT,        /* 1: backend sockets come from the client's own
				    * address and port (IP_TRANSPARENT, transparent.c);
				    * 0 (default) = from the host's */
	SP_OPT_COUNT
};

enum sp_copy_mode { SP_COPY_SPLICE = 0, SP_COPY_READWRITE = 1 };

/* What sp_engine_run() returned for, when not an error. */
enum sp_run_result {
	SP_RUN_STOPPED = 0,  /* sp_engine_stop() was called */
	SP_RUN_EVENTS = 1,   /* events are queued: drain with sp_engine_next_event() */
	SP_RUN_WATCH = 2,    /* the watched descriptor became readable */
	SP_RUN_TIMEOUT = 3,  /* timeout_ms elapsed */
	SP_RUN_INTERRUPTED = 4, /* a signal interrupted epoll_wait */
};

/* Things worth a log line; the front end decides how to word and where to send them. */
enum sp_event_kind {
	SP_EV_CONNECT_FAILED = 1, /* backend connect failed (err) */
	SP_EV_ACCEPT_PAUSED,      /* accept failed for lack of descriptors (err) */
	SP_EV_ACCEPT_RESUMED,     /* accepting again */
	SP_EV_ACCEPT_ERROR,       /* another accept error (err); the listener keeps going */
	SP_EV_UDP_SEND_FAILED,    /* datagram to the backend dropped (err); count coalesced */
	SP_EV_UDP_REPLY_FAILED,   /* datagram to a client dropped (err); count coalesced */
	SP_EV_UDP_EVICTED,        /* entries evicted by the table bound; count */
	SP_EV_UDP_FLOW_FAILED,    /* creating a backend socket failed (err) */
	SP_EV_LISTENER_FAILED,    /* the listener failed and was removed (err) */
	SP_EV_IDLE_RECLAIMED,     /* half-closed pairs reclaimed; count */
	SP_EV_HEADROOM_RECLAIMED, /* half-closed pairs reset for lack of descriptors; count */
	SP_EV_UDP_ADDR_EVICTED,   /* entries evicted by the per-address bound; count */
	/* SP_OPT_TRANSPARENT: a client relayed from the host's address instead,
	 * because (each kind emitted once per listener): */
	SP_EV_TP_LOOPBACK,        /* its address is a loopback (or link-local) one */
	SP_EV_TP_FAMILY,          /* it is an IPv4 client of an IPv6 listener (mapped) */
	SP_EV_TP_NETWORK,         /* its address is in a sp_engine_set_transparent_exclude() prefix */
	SP_EV_TP_LOCAL,           /* the kernel says its address is local to the host */
	SP_EV_TP_FAILED,          /* binding its address failed (err) */
};

struct sp_event {
	int32_t kind;     /* enum sp_event_kind */
	int32_t err;      /* positive errno, or 0 */
	int32_t listener; /* listener id from sp_engine_add_*() */
	int32_t pad;
	uint64_t count;   /* how many occurrences this event stands for */
};

/* Create an engine (its counters in its own memory). */
int sp_engine_new(struct sp_engine **out);

/* Close every descriptor (open connections end with a reset, see tcp.c),
 * write the counters file a last time, and free the engine. */
void sp_engine_free(struct sp_engine *e);

/* Publish the counters to fd (not owned; -1 clears): an image as described
 * above, written with pwrite() at offset 0 at once, then at most every
 * SP_STATS_FLUSH_MS while counters change, and at sp_engine_free().  A
 * failed or short write (full disk, a file truncated by someone else) is
 * counted in STATS_WRITE_ERRORS and never stops the relay; the next write
 * puts the whole image back.  -EBADF, -ESPIPE or -EINVAL for a descriptor
 * pwrite() can never work on (it is not kept). */
#define SP_STATS_FLUSH_MS 100
int sp_engine_set_stats_fd(struct sp_engine *e, int fd);

int sp_engine_set_option(struct sp_engine *e, int option, int64_t value);

/* Add a listening TCP socket (ownership passes to the engine; it is made
 * nonblocking).  Returns the listener id. */
int sp_engine_add_tcp(struct sp_engine *e, int listen_fd,
		      const struct sockaddr *backend, socklen_t backend_len);

/* Add a bound UDP socket.  family selects the cmsg family for reply-source
 * handling (AF_INET/AF_INET6); IP_PKTINFO/IPV6_RECVPKTINFO is enabled on it.
 * Returns the listener id. */
int sp_engine_add_udp(struct sp_engine *e, int fd, int family,
		      const struct sockaddr *backend, socklen_t backend_len);

/* A network prefix: family AF_INET or AF_INET6, len bits of addr. */
struct sp_prefix {
	uint8_t family;
	uint8_t len;
	uint8_t addr[16];
};

#define SP_TRANSPARENT_EXCLUDE_MAX 256

/* The prefixes whose clients SP_OPT_TRANSPARENT listeners relay from the
 * host's address (container networks: a container there would answer its
 * peer directly, not through the host).  Replaces the list; n = 0 clears.
 * 0, or -EINVAL (a bad family or length, n beyond
 * SP_TRANSPARENT_EXCLUDE_MAX), -ENOMEM. */
int sp_engine_set_transparent_exclude(struct sp_engine *e, const struct sp_prefix *p, int n);

/* Remove listener id at runtime: its socket and everything it owns are
 * closed (TCP connections reset, as on stop; UDP entries closed), its
 * queued events dropped, and its counters leave the engine's gauges.  The
 * id may be given to a later listener.  Works on a listener that failed
 * (SP_EV_LISTENER_FAILED) too.  0, or -ENOENT for an unknown id. */
int sp_engine_remove(struct sp_engine *e, int id);

/* Give listener id its own value of option instead of the engine's, so one
 * engine can serve mappings whose settings differ.  Which options a
 * listener may own is its protocol's to say: a TCP listener
 * SP_OPT_COPY_MODE, SP_OPT_COPY_BUF, SP_OPT_PIPE_SIZE (the mover, buffer
 * and pipe size of connections it accepts from now on),
 * SP_OPT_IDLE_TIMEOUT_MS and SP_OPT_CONNECT_TIMEOUT_MS (connects started
 * from now on); a UDP listener SP_OPT_UDP_TIMEOUT_MS, SP_OPT_UDP_MAX_FLOWS
 * and SP_OPT_UDP_MAX_FLOWS_PER_ADDR.  The others (the pipe pool's bound,
 * the descriptor limit, the accept backoff, the busy-poll) are the
 * engine's by nature.  Values are checked as sp_engine_set_option()
 * checks them.  0, -EINVAL (a bad value), -EOPNOTSUPP (an option its
 * protocol keeps engine-wide), or -ENOENT. */
int sp_engine_set_listener_option(struct sp_engine *e, int id, int option, int64_t value);

/* The value of option that listener id runs with (its own, else the
 * engine's), or with id -1 the engine's.  0, -EINVAL, -ENOENT, or
 * -EOPNOTSUPP for an option the listener's protocol keeps engine-wide. */
int sp_engine_get_option(const struct sp_engine *e, int id, int option, int64_t *value);

/* Copy listener id's counters into out[SP_STAT_COUNT]: the counters of
 * SP_LISTENER_STATS_LIST, zero for the others.  0 or -ENOENT. */
int sp_engine_listener_stats(const struct sp_engine *e, int id, uint64_t *out);

/* 1 if counter i is one a listener keeps for itself, else 0. */
int sp_stat_per_listener(int i);

/* Make run() return SP_RUN_WATCH when fd becomes readable (the front end
 * passes its signal wakeup descriptor).  The fd is not owned.  -1 clears. */
int sp_engine_watch(struct sp_engine *e, int fd);

/* Run the loop until stopped, an event is queued, the watched fd is
 * readable, a signal interrupts, or timeout_ms (-1: none) elapses. */
int sp_engine_run(struct sp_engine *e, int timeout_ms);

/* Ask a running loop to return SP_RUN_STOPPED.  Async-signal-safe. */
int sp_engine_stop(struct sp_engine *e);

/* Create n relay pipes in the pool now (e.g. before dropping privileges,
 * so that they count against root's pipe-user-pages limits, not those of
 * the unprivileged user every proxy shares).  Returns how many exist. */
int sp_engine_reserve_pipes(struct sp_engine *e, int n);

/* Pop the oldest queued event; 1 if one was copied, 0 if none. */
int sp_engine_next_event(struct sp_engine *e, struct sp_event *ev);

/* The counters (SP_STAT_COUNT words). */
const uint64_t *sp_engine_stats(const struct sp_engine *e);

/* Name of counter i, lower case ("tcp_accepted"), or NULL. */
const char *sp_stat_name(int i);

/* Kind of counter i (enum sp_kind), or -EINVAL. */
int sp_stat_kind(int i);

/* One-line description of counter i, or NULL. */
const char *sp_stat_help(int i);

#endif
