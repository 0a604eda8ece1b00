"""Which user a proxy started as root becomes, and holding that identity.

Every proxy used to become ``nobody``: all of them then shared one per-user
pipe budget with each other and with every ``nobody`` process on the host
(containers without user namespaces run as nobody), and any such process
could stop or kill them.  By default each proxy now gets a uid no other
process has, the way systemd's DynamicUser= picks one:

* from ``UID_RANGE`` (65536 ids that systemd documents as unused, above
  its container ranges and below 2^31), starting at a point derived from the
  pid so that concurrent proxies rarely probe the same ids;
* skipping any uid or gid that the user and group databases know (NSS, so
  /etc/passwd, /etc/group and directory services alike) and any uid or gid
  inside a range of /etc/subuid or /etc/subgid;
* holding an exclusive flock on ``LOCK_DIR/<uid>`` for the process's whole
  life (the descriptor stays open through the privilege drop, read-only),
  so two proxies never hold the same uid; the kernel releases the lock when
  the process exits, however it exits.

``LOCK_DIR`` (/run/spliceproxy/uids) is created root-owned, mode 0700, and
verified (no links, owner root, no access for group or others) before a
lock in it is trusted.  The gid is the same number as the uid.

SPLICEPROXY_USER names an explicit user instead (a name or a uid), as before.
"""

from __future__ import annotations

import os

from spliceproxy import userns

__all__ = ["LOCK_DIR", "UID_RANGE", "IdentityError", "Identity", "choose"]

UID_RANGE = (0x7FFE0000, 0x7FFEFFFF)  # 2147352576..2147418111
LOCK_DIR = "/run/spliceproxy/uids"

_S_IFMT = 0o170000
_S_IFDIR = 0o040000


class IdentityError(Exception):
    """No identity to become (reported on fd 3)."""


class Identity:
    """The (uid, gid) to become; ``lock_fd`` holds a dynamic uid (or -1)."""

    __slots__ = ("uid", "gid", "lock_fd", "dynamic")

    def __init__(self, uid: int, gid: int, lock_fd: int = -1) -> None:
        self.uid = uid
        self.gid = gid
        self.lock_fd = lock_fd
        self.dynamic = lock_fd >= 0

    def __repr__(self) -> str:
        return "Identity(uid=%d, gid=%d%s)" % (self.uid, self.gid,
                                                ", dynamic" if self.dynamic else "")


def named(spec: str | int) -> Identity:
    """The identity SPLICEPROXY_USER names (a name or an int uid)."""
    import pwd

    if isinstance(spec, int):
        try:
            entry = pwd.getpwuid(spec)
        except KeyError:
            return Identity(spec, spec)  # a uid without an entry: the same gid
        return Identity(entry.pw_uid, entry.pw_gid)
    try:
        entry = pwd.getpwnam(spec)
    except KeyError:
        if spec == "nobody":
            return Identity(65534, 65534)  # the conventional nobody/nogroup ids
        raise IdentityError("invalid SPLICEPROXY_USER=%r: no such user" % spec) from None
    return Identity(entry.pw_uid, entry.pw_gid)


def _sub_ranges(path: str) -> list[tuple[int, int]]:
    """[first, last] id ranges of /etc/subuid or /etc/subgid (name:start:count)."""
    out = []
    try:
        with open(path, "rb") as f:
            text = f.read(1 << 20)
    except OSError:
        return out
    for line in text.split(b"\n"):
        parts = line.strip().split(b":")
        if len(parts) != 3 or not (parts[1].isdigit() and parts[2].isdigit()):
            continue  # bytes.isdigit() is ASCII-only
        start, count = int(parts[1]), int(parts[2])
        if count:
            out.append((start, start + count - 1))
    return out


def _known(uid: int, ranges: list[tuple[int, int]]) -> bool:
    import grp
    import pwd

    for lo, hi in ranges:
        if lo <= uid <= hi:
            return True
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        pass
    try:
        grp.getgrgid(uid)
        return True
    except KeyError:
        return False


def _private_dir(parent_fd: int, name: str, shown: str) -> int:
    """Open (creating it 0700) the directory name in parent_fd; verify it is
    a real directory owned by root that nobody else may enter."""
    try:
        os.mkdir(name, 0o700, dir_fd=parent_fd)
    except FileExistsError:
        pass
    except OSError as e:
        raise IdentityError("cannot create %s: %s" % (shown, e.strerror)) from None
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=parent_fd)
    except OSError as e:
        raise IdentityError("cannot open %s: %s (it must be a directory, not a link)"
                            % (shown, e.strerror)) from None
    st = os.fstat(fd)
    if st.st_mode & _S_IFMT != _S_IFDIR or st.st_uid != 0 or st.st_mode & 0o077:
        os.close(fd)
        raise IdentityError("refusing %s: it must be a directory owned by root with mode 0700 "
                            "(found uid %d, mode %04o)" % (shown, st.st_uid, st.st_mode & 0o7777))
    return fd


def _lock_dir() -> int:
    from spliceproxy import files

    parts = [p for p in LOCK_DIR.split("/") if p]
    try:
        fd = files.open_dir("/" + "/".join(parts[:-2]))
    except files.FileRefused as e:
        raise IdentityError("cannot use %s: %s" % (LOCK_DIR, e)) from None
    shown = "/" + "/".join(parts[:-2])
    for name in parts[-2:]:
        shown = shown.rstrip("/") + "/" + name
        try:
            nfd = _private_dir(fd, name, shown)
        finally:
            os.close(fd)
        fd = nfd
    return fd


def dynamic() -> Identity:
    """A uid from UID_RANGE no other process holds (see the module text)."""
    import fcntl

    lo, hi = UID_RANGE
    span = hi - lo + 1
    ranges = _sub_ranges("/etc/subuid") + _sub_ranges("/etc/subgid")
    dfd = _lock_dir()
    try:
        start = (os.getpid() * 2654435761) % span
        for i in range(span):
            uid = lo + (start + i) % span
            if _known(uid, ranges):
                continue
            name = str(uid)
            try:
                fd = os.open(name, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC |
                             os.O_NONBLOCK, 0o600, dir_fd=dfd)
            except OSError as e:
                raise IdentityError("cannot create a uid lock in %s: %s"
                                    % (LOCK_DIR, e.strerror)) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # another proxy has this one
            except OSError as e:
                os.close(fd)
                raise IdentityError("cannot lock %s/%s: %s"
                                    % (LOCK_DIR, name, e.strerror)) from None
            return Identity(uid, uid, fd)
    finally:
        os.close(dfd)
    raise IdentityError("no free uid left in %d-%d (%s)" % (lo, hi, LOCK_DIR))


def choose(user: str | int | None, keep_privileges: bool) -> Identity | None:
    """The identity to become once the sockets are set up, or None to stay.

    Root becomes ``user`` (SPLICEPROXY_USER) or, by default, a dynamic uid
    of its own; keep_privileges turns the drop off.  A process that is not
    root keeps its ids and only loses the ability to gain more, and so does
    root of a user namespace that does not map UID_RANGE (RootlessKit's:
    there root is the user running the rootless dockerd)."""
    if keep_privileges:
        return None
    if os.geteuid() != 0:
        return Identity(os.getuid(), os.getgid())
    if user is not None:
        return named(user)
    if not (userns.maps(*UID_RANGE, userns.UID_MAP) and userns.maps(*UID_RANGE, userns.GID_MAP)):
        # Root of a user namespace without those ids (a rootless dockerd's,
        # which maps the user and its subordinate ids): it is a user of the
        # host already, and keeps its ids as a user does.
        return Identity(os.getuid(), os.getgid())
    return dynamic()
