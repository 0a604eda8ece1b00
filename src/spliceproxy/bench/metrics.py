"""What the benchmark measures: profiles, metrics and the reference paths.

Plain data, imported by the harness, the report and the gate alike: reading
or gating a result loads none of the measuring code.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1 << 30


@dataclass
class Profile:
    name: str
    rounds: int
    lat_rounds: int  # rounds of the latency and connection-rate groups (rr, crr, udp)
    bulk_bytes: int
    streams: int
    stream_bytes: int
    rr_iters: int
    crr_count: int
    udp_iters: int
    burst_count: int
    scale_conns: int
    churn_count: int
    spawns: int
    ports_rounds: int  # rounds of the ports group's many-mapping figures
    ports_ranges: tuple  # mapping counts measured all alive at once (ports group)
    strace_bytes: int
    strace_conns: int
    strace_rounds: int
    loopback_groups: tuple


# crr_count x lat_rounds stays well below the ~28k ephemeral ports: docker-proxy,
# haproxy and socat each leave a TIME_WAIT socket per connection in the host
# namespace towards the one container port, and a larger count made the later
# paths fail to connect at all.  Many short rounds rather than a few long
# ones: each per-round ratio pairs measurements close in time, so a
# neighbour's burst of load hits both sides of it; 7 rounds of 256 MiB left
# 4-stream throughput (near 1x docker-proxy) conclusive in opposite
# directions in two runs.
PROFILES = {
    "quick": Profile("quick", rounds=13, lat_rounds=11, bulk_bytes=128 << 20, streams=4,
                     stream_bytes=32 << 20,
                     rr_iters=1000, crr_count=200, udp_iters=1000, burst_count=10000,
                     scale_conns=1000, churn_count=30000, spawns=8, ports_rounds=3,
                     ports_ranges=(100,), strace_bytes=64 << 20,
                     strace_conns=100, strace_rounds=3,
                     loopback_groups=("bulk", "rr", "crr", "udp")),
    "full": Profile("full", rounds=15, lat_rounds=15, bulk_bytes=512 << 20, streams=4,
                    stream_bytes=128 << 20,
                    rr_iters=5000, crr_count=400, udp_iters=3000, burst_count=50000,
                    scale_conns=10000, churn_count=100000, spawns=20, ports_rounds=3,
                    ports_ranges=(100, 1000), strace_bytes=256 << 20,
                    strace_conns=500, strace_rounds=3,
                    loopback_groups=("bulk", "rr", "crr", "udp")),
}


# metric -> (unit, better, description)
METRICS = {
    "bulk_1": ("Gbit/s", "higher", "one TCP stream"),
    "bulk_n": ("Gbit/s", "higher", "parallel TCP streams, aggregate"),
    "cpu_per_gb": ("s/GB", "lower", "proxy CPU seconds per GB relayed"),
    "cpu_per_gb_n": ("s/GB", "lower", "proxy CPU seconds per GB, parallel streams"),
    "syscalls_per_gib": ("calls", "lower", "proxy system calls per GiB relayed"),
    "rr_p50": ("us", "lower", "1-byte TCP ping-pong p50"),
    "rr_p99": ("us", "lower", "1-byte TCP ping-pong p99"),
    "rr_added_p50": ("us", "lower", "p50 latency added over native"),
    "rr_added_p99": ("us", "lower", "p99 latency added over native"),
    "rr_cpu_us": ("us", "lower", "proxy CPU per 1-byte TCP round trip"),
    "crr_rate": ("conn/s", "higher", "connect, 1-byte exchange, close"),
    "syscalls_per_conn": ("calls", "lower", "proxy system calls per connection"),
    "udp_rr_p50": ("us", "lower", "64-byte UDP ping-pong p50"),
    "udp_rr_p99": ("us", "lower", "64-byte UDP ping-pong p99"),
    "udp_added_p50": ("us", "lower", "UDP p50 latency added over native"),
    "udp_cpu_us": ("us", "lower", "proxy CPU per 64-byte UDP round trip"),
    "udp_pps": ("pkt/s", "higher", "64-byte datagrams echoed per second, 64 in flight"),
    "udp_loss_pct": ("%", "lower", "datagrams lost in the burst"),
    "agg_crr_rate": ("conn/s", "higher", "connections/s, four clients on four ports at once"),
    "agg_bulk": ("Gbit/s", "higher", "four TCP streams on four ports at once, aggregate"),
    "agg_cpu_per_gb": ("s/GB", "lower", "CPU of every proxy process per GB, four ports"),
    "scale_served_pct": ("%", "higher", "concurrent connections served"),
    "rss_per_conn_kib": ("KiB", "lower", "proxy RSS per idle connection"),
    "fds_per_conn": ("fds", "lower", "proxy fds per connection"),
    "threads": ("threads", "lower", "proxy threads with connections open"),
    "churn_rate": ("conn/s", "higher", "connect-exchange-close rate over the whole churn run"),
    "churn_hold": ("ratio", "higher", "churn rate of the last tenth over the first tenth"),
    "churn_done_pct": ("%", "higher", "churn connections completed"),
    "churn_time_wait": ("sockets", "lower", "TIME_WAIT sockets the churn left behind"),
    "spawn_ms": ("ms", "lower", "spawn to ready (status pipe)"),
    "idle_rss_mib": ("MiB", "lower", "idle RSS of one process"),
    "port_uss_kib": ("KiB", "lower", "private memory (USS) of one published port's process"),
    "port_spawn_ms": ("ms", "lower", "spawn to ready (status pipe), engine running"),
    "port_first_spawn_ms": ("ms", "lower",
                            "spawn to ready (status pipe), no engine running: the first port"),
    "ports100_uss_mib": ("MiB", "lower", "USS of every proxy process, 100 mappings"),
    "ports1000_uss_mib": ("MiB", "lower", "USS of every proxy process, 1,000 mappings"),
    "ports100_spawn_ms": ("ms", "lower", "spawn to ready of 100 mappings back to back, summed"),
    "ports1000_spawn_ms": ("ms", "lower",
                           "spawn to ready of 1,000 mappings back to back, summed"),
    "strace_syscalls_per_gib": ("calls", "lower", "system calls per GiB (strace -c)"),
    "strace_syscalls_per_conn": ("calls", "lower", "system calls per connection (strace -c)"),
}
REFS = ("native", "iptables", "docker-proxy", "docker-proxy-20.10")
# docker-proxy 28.5 is the reference (path docker-proxy); the system's 20.10
# is the second one, while installed.
DOCKER_PROXIES = ("docker-proxy", "docker-proxy-20.10")
# The plain relay, reference of the same engine run with a setting changed
# (spliceproxy-spin): its ratios to it are in every result too.
PLAIN = "spliceproxy"
# Figures that do not drift with timing: counted, not timed, so one round is
# a measurement.  System calls per GiB are not among them: how much each
# splice moves depends on scheduling.
COUNTS = frozenset(("syscalls_per_conn", "udp_loss_pct", "scale_served_pct",
                    "rss_per_conn_kib", "fds_per_conn", "threads", "churn_done_pct",
                    "churn_time_wait", "idle_rss_mib", "strace_syscalls_per_conn",
                    "port_uss_kib", "ports100_uss_mib", "ports1000_uss_mib"))
MIN_TIMING_ROUNDS = 3
# Groups measured exchange by exchange over all paths at once, pinned to one CPU.
INTERLEAVED = ("rr", "crr", "udp")
# The spawn group's floor: a bare interpreter that binds, reports ready and waits.
BARE = "python-bare"
# The ports group's paths besides docker-proxy: `spliceproxy` is engine mode
# (SPLICEPROXY_ENGINE=1, the installed command is the stub that hands the
# port to the engine), and the same command standalone (SPLICEPROXY_ENGINE=0,
# one relay process per port).
PORTS_STANDALONE = "spliceproxy-standalone"
