"""Which user namespace this is, and what it maps (spliceproxy.userns)."""

from __future__ import annotations

import os

from spliceproxy import identity, userns


def _map(tmp_path, text: str) -> str:
    path = tmp_path / "map"
    path.write_text(text)
    return str(path)


def test_read_map(tmp_path):
    assert userns.read_map(_map(tmp_path, "         0          0 4294967295\n")) == \
        [(0, 0, 4294967295)]
    assert userns.read_map(_map(tmp_path, "0 1001 1\n1 100000 65536\n")) == \
        [(0, 1001, 1), (1, 100000, 65536)]
    assert userns.read_map(_map(tmp_path, "0 x 1\n")) is None
    assert userns.read_map(str(tmp_path / "none")) is None


def test_in_initial():
    assert userns.in_initial([(0, 0, 4294967295)])
    assert not userns.in_initial([(0, 1001, 1), (1, 100000, 65536)])
    assert not userns.in_initial([(0, 0, 1)])  # unshare --map-root-user as root
    here = userns.read_map()
    assert userns.in_initial() == (here is None or here == [(0, 0, 4294967295)])


def test_maps(tmp_path):
    rootless = _map(tmp_path, "0 1001 1\n1 100000 65536\n")
    assert userns.maps(0, 65536, rootless)
    assert not userns.maps(0, 65537, rootless)
    assert not userns.maps(*identity.UID_RANGE, rootless)  # no dynamic uid there
    assert userns.maps(*identity.UID_RANGE, _map(tmp_path, "0 0 4294967295\n"))
    assert userns.maps(10, 20, _map(tmp_path, "15 0 10\n0 50 15\n"))  # out of order, adjacent
    assert not userns.maps(10, 20, _map(tmp_path, "0 0 12\n13 0 10\n"))  # 12 is missing
    assert userns.maps(1, 2, str(tmp_path / "none"))  # unknown: setresuid() will say


def test_root_of_a_rootless_namespace_keeps_its_ids(monkeypatch, tmp_path):
    """RootlessKit maps its user and the user's subordinate ids: no dynamic
    uid exists there, and becoming one would fail; root there stays the user."""
    rootless = _map(tmp_path, "0 1001 1\n1 100000 65536\n")
    monkeypatch.setattr(userns, "UID_MAP", rootless)
    monkeypatch.setattr(userns, "GID_MAP", rootless)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(identity, "dynamic", lambda: (_ for _ in ()).throw(AssertionError))
    who = identity.choose(None, False)
    assert (who.uid, who.gid, who.dynamic) == (os.getuid(), os.getgid(), False)
