"""The user namespace this process runs in, as /proc/self/{uid,gid}_map show it.

A rootless dockerd (RootlessKit) runs as root of a user namespace that maps
only its user's own uid and that user's subordinate range (/etc/subuid):
root there is that user on the host.  Its /run is a copy of the host's, in
which the host's entries (/run/spliceproxy among them) are symbolic links.
So root of a user namespace other than the host's takes its engine socket
directory from XDG_RUNTIME_DIR, as a user does (control.resolve_socket; the
stub decides alike), and becomes a dynamic uid only if the namespace maps
the whole range of them (identity.choose).
"""

from __future__ import annotations

__all__ = ["in_initial", "maps", "read_map"]

UID_MAP = "/proc/self/uid_map"
GID_MAP = "/proc/self/gid_map"
_ALL = (0, 0, 4294967295)


def read_map(path: str = UID_MAP) -> list[tuple[int, int, int]] | None:
    """(first id inside, first id outside, count) per line; None if unreadable."""
    try:
        with open(path, "rb") as f:
            text = f.read(65536)
    except OSError:
        return None
    out = []
    for line in text.split(b"\n"):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3 or not all(x.isdigit() for x in fields):
            return None
        out.append((int(fields[0]), int(fields[1]), int(fields[2])))
    return out


def in_initial(uid_map: list[tuple[int, int, int]] | None = None) -> bool:
    """Is this the host's own user namespace (every uid mapped to itself)?
    True when the map cannot be read, as the stub decides."""
    if uid_map is None:
        uid_map = read_map(UID_MAP)
    return uid_map is None or uid_map == [_ALL]


def maps(first: int, last: int, path: str = UID_MAP) -> bool:
    """Is every id from first to last mapped in this namespace's map at path?"""
    ranges = read_map(path)
    if ranges is None:
        return True  # no /proc to ask: as before, setresuid() will say
    need = first
    for inside, _outside, count in sorted(ranges):
        if inside <= need < inside + count:
            need = inside + count
            if need > last:
                return True
    return False
