"""The engine's counters as a file other processes can read while it runs.

With SPLICEPROXY_STATS_FILE set, the engine writes an image of its counters
to that file (at most every 100 ms while they change, and when it stops):
a 32-byte header (magic, layout version 2, counter count, pid, offset and
length of the names), one little-endian uint64 per counter, then the counter
names, each ending in a NUL.  The names travel with the values, so this
reader needs no copy of the engine's list.  The engine itself never reads
the file back.  This module only reads such files; it imports nothing heavy.
"""

from __future__ import annotations

import struct

MAGIC = 0x5453584C50535053
VERSION = 2
HEADER = struct.Struct("<QIIQII")

# A counters file is about a kilobyte; anything past this is not ours.
MAX_FILE_SIZE = 1 << 16


class StatsFormatError(ValueError):
    """The file is not a spliceproxy counters file of a known layout."""


def _header(data: bytes) -> tuple[int, int, int, int, int]:
    if len(data) < HEADER.size:
        raise StatsFormatError("counters file too short")
    magic, version, count, pid, names_off, names_len = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise StatsFormatError("not a spliceproxy counters file (bad magic)")
    if version != VERSION:
        raise StatsFormatError("counters file layout version %d, this reader knows %d"
                               % (version, VERSION))
    return count, pid, names_off, names_len, HEADER.size


def parse_stats(data: bytes) -> dict[str, int]:
    """Decode the bytes of a counters file into {name: value}."""
    count, _pid, names_off, names_len, values_off = _header(data)
    if (names_off < values_off + 8 * count or names_off + names_len > len(data)
            or len(data) < values_off + 8 * count):
        raise StatsFormatError("counters file truncated or inconsistent")
    names = data[names_off:names_off + names_len].split(b"\0")
    if len(names) != count + 1 or names[-1] != b"":
        raise StatsFormatError("counters file names do not match its count")
    try:
        keys = [n.decode("ascii") for n in names[:-1]]
    except UnicodeDecodeError:
        raise StatsFormatError("counters file names are not ASCII") from None
    values = struct.unpack_from("<%dQ" % count, data, values_off)
    return dict(zip(keys, values))


def read_stats_file(path: str) -> dict[str, int]:
    """Read a counters file (each write of it by the engine is one pwrite)."""
    with open(path, "rb") as f:
        return parse_stats(f.read(MAX_FILE_SIZE))


def stats_file_pid(path: str) -> int:
    """The pid of the process that last wrote the counters file."""
    with open(path, "rb") as f:
        data = f.read(HEADER.size)
    return _header(data)[1]
