"""The engine's counters as a file other processes can read while it runs.

With SPLICEPROXY_STATS_FILE set, the proxy keeps its counters in a shared
mapping of that file: a 32-byte header (magic, layout version, counter count,
pid) followed by one little-endian uint64 per counter, in STAT_NAMES order.
This module only reads such files; it imports nothing heavy.
"""

from __future__ import annotations

import struct

MAGIC = 0x5453584C50535053
VERSION = 1
HEADER = struct.Struct("<QIIQQ")

# Same order as SP_STATS_LIST in csrc/engine.h (a unit test checks they agree).
STAT_NAMES = (
    "tcp_accepted", "tcp_active", "tcp_failed", "tcp_closed", "tcp_resets",
    "bytes_c2b", "bytes_b2c", "accept_pauses", "idle_reclaimed",
    "udp_flows_active", "udp_flows_created", "udp_flows_expired", "udp_flows_evicted",
    "udp_dgrams_c2b", "udp_dgrams_b2c", "udp_bytes_c2b", "udp_bytes_b2c", "udp_drops",
    "pipes_open", "pipes_in_use", "fds_open",
    "err_emfile", "err_enobufs", "err_reset", "err_other", "events_dropped",
    "loop_wakeups", "syscalls",
    "sys_epoll_wait", "sys_epoll_ctl", "sys_accept", "sys_socket", "sys_connect",
    "sys_setsockopt", "sys_getsockopt", "sys_splice", "sys_read", "sys_write",
    "sys_shutdown", "sys_close", "sys_pipe", "sys_fcntl", "sys_recvmmsg", "sys_sendmmsg",
    "sys_recv", "sys_send", "sys_bind", "sys_other",
)

FILE_SIZE = HEADER.size + 8 * len(STAT_NAMES)


class StatsFormatError(ValueError):
    """The file is not a spliceproxy counters file of a known layout."""


def parse_stats(data: bytes) -> dict[str, int]:
    """Decode the bytes of a counters file into {name: value}."""
    if len(data) < HEADER.size:
        raise StatsFormatError("counters file too short")
    magic, version, count, _pid, _ = HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise StatsFormatError("not a spliceproxy counters file (magic/version mismatch)")
    count = min(count, len(STAT_NAMES))
    if len(data) < HEADER.size + 8 * count:
        raise StatsFormatError("counters file truncated")
    values = struct.unpack_from("<%dQ" % count, data, HEADER.size)
    return dict(zip(STAT_NAMES, values))


def read_stats_file(path: str) -> dict[str, int]:
    """Read a live counters file (a consistent-enough snapshot: each word is atomic)."""
    with open(path, "rb") as f:
        return parse_stats(f.read(FILE_SIZE))


def stats_file_pid(path: str) -> int:
    with open(path, "rb") as f:
        data = f.read(HEADER.size)
    if len(data) < HEADER.size:
        raise StatsFormatError("counters file too short")
    return HEADER.unpack_from(data)[3]
