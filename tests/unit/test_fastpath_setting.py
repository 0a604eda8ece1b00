"""SPLICEPROXY_FASTPATH takes Go booleans only, and the fast path's input checks."""

from __future__ import annotations

import pytest

from spliceproxy import fastpath, settings

GO_TRUE = ["1", "t", "T", "TRUE", "true", "True"]
GO_FALSE = ["0", "f", "F", "FALSE", "false", "False"]


@pytest.mark.parametrize("value", GO_TRUE)
def test_go_true_values_turn_it_on(value):
    assert fastpath.parse_setting(value) is True
    assert fastpath.enabled({"SPLICEPROXY_FASTPATH": value}) is True


@pytest.mark.parametrize("value", GO_FALSE)
def test_go_false_values_turn_it_off(value):
    assert fastpath.parse_setting(value) is False


def test_unset_or_empty_is_off():
    # As for every setting: dockerd's environment may carry "VAR=" for unset.
    assert fastpath.parse_setting(None) is False
    assert fastpath.parse_setting("") is False
    assert fastpath.enabled({}) is False
    assert settings.load({}).fastpath is False


@pytest.mark.parametrize("value", ["yes", "on", "tRUE", " 1", "1 ", "2", "y", "\u0661"])
def test_anything_else_is_an_error_naming_the_setting(value):
    with pytest.raises(settings.SettingError) as e:
        fastpath.parse_setting(value)
    assert "SPLICEPROXY_FASTPATH" in str(e.value) and repr(value) in str(e.value)
    with pytest.raises(settings.SettingError) as e:
        settings.load({b"SPLICEPROXY_FASTPATH": value.encode()})
    assert str(e.value).startswith("invalid SPLICEPROXY_FASTPATH=")


@pytest.mark.parametrize("value", GO_TRUE)
def test_settings_read_it_too(value):
    assert settings.load({b"SPLICEPROXY_FASTPATH": value.encode()}).fastpath is True


def test_unavailable_is_falsy_and_says_why():
    u = fastpath.Unavailable("kernel", "connect4: not supported by this kernel")
    assert not u
    assert "kernel" in str(u) and "connect4" in str(u)


def test_load_on_a_missing_directory_is_a_reason_not_an_exception(tmp_path):
    got = fastpath.load(str(tmp_path / "nope"))
    assert not got and got.kind in ("cgroup", "module")


def test_local_addresses_are_concrete():
    import socket
    for fam, wild in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        addrs = fastpath.local_addresses(fam)
        assert wild not in addrs
        assert all(not a.lower().startswith("fe80") for a in addrs)


# SPLICEPROXY_FASTPATH_CGROUP: where the host engine attaches the programs.

def test_cgroup_setting_defaults_to_the_cgroup_v2_root():
    assert settings.load({}).fastpath_cgroup is None  # the engine uses default_cgroup_path()
    root = fastpath.default_cgroup_path()
    if root is None:
        pytest.skip("cgroup v2 is not mounted here")
    assert fastpath.cgroup_path(settings.load({})) == root


@pytest.mark.parametrize("value,reason", [
    ("sys/fs/cgroup", "not an absolute path"),
    ("/nonexistent-cgroup-dir", "not a directory"),
    ("/proc/self", "not a cgroup v2 directory"),
])
def test_cgroup_setting_must_name_a_cgroup2_directory(value, reason):
    with pytest.raises(settings.SettingError) as e:
        settings.load({b"SPLICEPROXY_FASTPATH_CGROUP": value.encode()})
    assert str(e.value).startswith("invalid SPLICEPROXY_FASTPATH_CGROUP=%r: %s" % (value, reason))


def test_cgroup_setting_takes_a_cgroup2_directory():
    root = fastpath.default_cgroup_path()
    if root is None:
        pytest.skip("cgroup v2 is not mounted here")
    conf = settings.load({b"SPLICEPROXY_FASTPATH_CGROUP": root.encode()})
    assert conf.fastpath_cgroup == root
    assert fastpath.cgroup_path(conf) == root
