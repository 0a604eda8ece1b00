"""SPLICEPROXY_* settings: parsed once, strictly, into one immutable object.

A setting that is misread fails open (a "no" that keeps root, a digit-like
character that becomes uid 0), so every accepted form is named here and
everything else must be a SettingError with a message, never another
exception.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from spliceproxy import settings
from spliceproxy.settings import SettingError, Settings, load


def env(**values) -> dict[bytes, bytes]:
    return {("SPLICEPROXY_" + k).encode(): (v if isinstance(v, bytes) else v.encode())
            for k, v in values.items()}


def test_defaults():
    s = load({})
    assert s.keep_privileges is False
    assert s.user is None
    assert s.log_file is None and s.stats_file is None
    assert s.udp_timeout == 90_000 and s.udp_max_flows == 16384
    assert s.idle_timeout == 120_000 and s.pipe_size == 1 << 20
    assert s.connect_timeout == 30_000 and s.udp_max_flows_per_addr == 0
    assert s.copy_mode == "COPY_SPLICE" and s.copy_buf == 65536


def test_empty_means_unset():
    assert load(env(KEEP_PRIVILEGES="", USER="", UDP_TIMEOUT="")).keep_privileges is False


GO_TRUE = ["1", "t", "T", "TRUE", "true", "True"]
GO_FALSE = ["0", "f", "F", "FALSE", "false", "False"]


@pytest.mark.parametrize("text", GO_TRUE)
def test_go_true_values(text):
    assert load(env(KEEP_PRIVILEGES=text)).keep_privileges is True


@pytest.mark.parametrize("text", GO_FALSE)
def test_go_false_values(text):
    assert load(env(KEEP_PRIVILEGES=text)).keep_privileges is False


@pytest.mark.parametrize("text", ["no", "off", "yes", "on", "y", "n", "tRUE", "FaLsE", " 1",
                                  "1 ", "01", "2", "١", "true\n", "enable"])
def test_other_booleans_are_refused(text):
    with pytest.raises(SettingError) as info:
        load(env(KEEP_PRIVILEGES=text))
    msg = str(info.value)
    assert msg.startswith("invalid SPLICEPROXY_KEEP_PRIVILEGES=%r: not a boolean" % text), msg


@pytest.mark.parametrize("text", [
    "\u0660",      # ARABIC-INDIC DIGIT ZERO: int() reads it as 0, i.e. root
    "\u00b2",      # SUPERSCRIPT TWO: str.isdigit() is true, int() raises
    "\u0661\u0662",
    "\uff10",      # FULLWIDTH DIGIT ZERO
    "0\u0660",
    "1 2", "-1", "+5", "4294967295", "99999999999999999999", "root:x", "a/b",
])
def test_bad_users(text):
    with pytest.raises(SettingError) as info:
        load(env(USER=text))
    assert "SPLICEPROXY_USER" in str(info.value)


@pytest.mark.parametrize("text,value", [("0", 0), ("65534", 65534), ("4294967294", 4294967294),
                                        ("nobody", "nobody"), ("daemon", "daemon"),
                                        ("svc-proxy_1.x", "svc-proxy_1.x"), ("a1", "a1")])
def test_good_users(text, value):
    assert load(env(USER=text)).user == value


@pytest.mark.parametrize("name", ["PIPE_SIZE", "UDP_MAX_FLOWS", "COPY_BUF"])
@pytest.mark.parametrize("text", ["\u0664\u0660\u0669\u0666", "\u00b2", "0x1000", "1_000",
                                  " 8192", "8192 ", "+8192", "-1", "8192.0", "1e4", "", "x"])
def test_numbers_are_ascii_digits_only(name, text):
    if text == "":
        return  # empty is unset, tested above
    with pytest.raises(SettingError) as info:
        load(env(**{name: text}))
    assert str(info.value).startswith("invalid SPLICEPROXY_%s=" % name)


def test_numbers_in_range():
    assert load(env(PIPE_SIZE="65536")).pipe_size == 65536
    with pytest.raises(SettingError, match="between 4096 and"):
        load(env(PIPE_SIZE="4095"))
    with pytest.raises(SettingError, match="between 1 and"):
        load(env(UDP_MAX_FLOWS="0"))


@pytest.mark.parametrize("text,ms", [("90s", 90_000), ("1m30s", 90_000), ("250ms", 250),
                                     ("2.5", 2500), ("1.5h", 5_400_000), ("300us", 0)])
def test_durations(text, ms):
    assert load(env(IDLE_TIMEOUT=text)).idle_timeout == ms


@pytest.mark.parametrize("text", ["\u0663s", "\u0663", "1e3", "inf", "nan", "-1s", "+1s",
                                  "1 s", "s", "10x", "1m-2s", "\u00b2s"])
def test_bad_durations(text):
    with pytest.raises(SettingError) as info:
        load(env(IDLE_TIMEOUT=text))
    assert str(info.value).startswith("invalid SPLICEPROXY_IDLE_TIMEOUT=")


def test_udp_timeout_must_be_positive():
    with pytest.raises(SettingError, match="at least 1ms"):
        load(env(UDP_TIMEOUT="0"))


def test_copy_mode():
    assert load(env(COPY_MODE="readwrite")).copy_mode == "COPY_READWRITE"
    with pytest.raises(SettingError, match="use splice or readwrite"):
        load(env(COPY_MODE="Splice"))


def test_spin_is_a_duration_in_microseconds_off_by_default():
    assert load({}).spin == 0
    assert load(env(SPIN="50us")).spin == 50
    assert load(env(SPIN="50\u00b5s")).spin == 50
    assert load(env(SPIN="0.1ms")).spin == 100
    assert load(env(SPIN="1ms500us")).spin == 1500
    assert load(env(SPIN="0")).spin == 0
    assert load(env(SPIN="10ms")).spin == 10_000
    assert ("OPT_SPIN_US", 20) in Settings(spin=20).engine_options()


@pytest.mark.parametrize("text,reason", [
    ("50", "must be at most 10000us"),       # a plain number is seconds
    ("11ms", "must be at most 10000us"),
    ("-5us", "invalid duration"),
    ("50 us", "unknown unit"),
    ("\u0665\u0660us", "invalid duration"),
    ("fast", "invalid duration"),
])
def test_spin_rejects_bad_values(text, reason):
    with pytest.raises(SettingError, match="invalid SPLICEPROXY_SPIN=.*%s" % reason):
        load(env(SPIN=text))


@pytest.mark.parametrize("name", [v.name for v in settings.VARIABLES])
def test_non_utf8_value_is_an_error_for_every_variable(name):
    with pytest.raises(SettingError) as info:
        load(env(**{name: b"/tmp/\xff\xfe.log"}))
    msg = str(info.value)
    assert msg == "invalid SPLICEPROXY_%s='/tmp/\\xff\\xfe.log': not valid UTF-8" % name


def test_reads_os_environb_by_default():
    code = ("import sys; from spliceproxy.settings import load, SettingError\n"
            "try:\n    load()\nexcept SettingError as e:\n    print(e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60,
                         env={**os.environ, "SPLICEPROXY_LOG_FILE": os.fsdecode(b"/tmp/\xff")})
    assert res.returncode == 0, res.stderr
    assert res.stdout == b"invalid SPLICEPROXY_LOG_FILE='/tmp/\\xff': not valid UTF-8\n"


def test_settings_are_immutable():
    s = load({})
    with pytest.raises(AttributeError):
        s.keep_privileges = True
    with pytest.raises(AttributeError):
        del s.user
    with pytest.raises(AttributeError):
        s.new_attribute = 1


def test_engine_options_name_real_engine_options():
    from spliceproxy import _engine

    opts = Settings().engine_options()
    assert {name for name, _ in opts} == {
        "OPT_UDP_TIMEOUT_MS", "OPT_UDP_MAX_FLOWS", "OPT_UDP_MAX_FLOWS_PER_ADDR",
        "OPT_IDLE_TIMEOUT_MS", "OPT_CONNECT_TIMEOUT_MS", "OPT_PIPE_SIZE", "OPT_COPY_MODE",
        "OPT_COPY_BUF", "OPT_SPIN_US"}
    for name, value in opts:
        assert isinstance(getattr(_engine, name), int)
        if isinstance(value, str):
            assert isinstance(getattr(_engine, value), int)


def test_every_variable_is_an_attribute_and_documented():
    page = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "configuration.md")
    with open(page, encoding="utf-8") as f:
        text = f.read()
    s = Settings()
    for v in settings.VARIABLES:
        assert getattr(s, v.attr) == v.default
        assert "`SPLICEPROXY_%s`" % v.name in text, v.name


def test_imports_nothing_heavy():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); before = set(sys.modules); "
            "import spliceproxy.settings; print(' '.join(sorted(set(sys.modules) - before)))")
    src = os.path.dirname(os.path.dirname(settings.__file__))
    res = subprocess.run([sys.executable, "-I", "-S", "-c", code, src], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    added = set(res.stdout.split())
    assert "spliceproxy.settings" in added
    heavy = {"argparse", "re", "dataclasses", "enum", "ipaddress", "socket", "_socket", "typing",
             "logging", "collections", "spliceproxy._engine"}
    assert not added & heavy, added
