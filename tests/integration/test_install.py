"""Installs that move: a wheel built in one venv runs from another, and a broken
install says why.

`python -m build` makes the sdist and the wheel in a build venv from a copy of
the source tree; the build venv is then deleted and the wheel installed in a
fresh venv at another path, as pip does with a cached wheel.  Every proxy is
started exactly as dockerd starts one (status pipe on fd 3, dockerd's PATH,
nothing else in the environment).  The directories are world-readable because
a proxy started as root drops to nobody.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest

from support import engine as engine_support
from support import servers as srv
from support.servers import proxy_argv, spawn

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DOCKERD_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
# What a fresh install is checked with: dockerd's environment, standalone
# (the proxy process itself is looked at) or in engine mode, the default, on
# a socket of the test's own (never root's /run/spliceproxy).
STANDALONE_ENV = dict(DOCKERD_ENV, SPLICEPROXY_ENGINE="0")


def _engine_env(sock_dir: str) -> dict:
    return dict(DOCKERD_ENV, SPLICEPROXY_ENGINE_SOCKET=os.path.join(sock_dir, "engine.sock"),
                SPLICEPROXY_ENGINE_IDLE_EXIT="1s")
BASE_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
COPY_IGNORE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "*.so", ".tox",
                                     "__pycache__", ".pytest_cache", ".hypothesis", ".benchmarks")


def _run(argv, timeout=600, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)


def _venv(path: Path) -> Path:
    r = _run([BASE_PYTHON, "-m", "venv", str(path)])
    assert r.returncode == 0, r.stderr
    return path


def _pip(venv: Path, *args: str) -> None:
    r = _run([str(venv / "bin" / "python3"), "-m", "pip", "install", "-q",
              "--disable-pip-version-check", *args])
    assert r.returncode == 0, r.stdout + r.stderr


def _site(venv: Path) -> Path:
    return venv / "lib" / ("python%d.%d" % sys.version_info[:2]) / "site-packages"


@pytest.fixture(scope="module")
def workdir():
    d = Path(tempfile.mkdtemp(prefix="spliceproxy-install-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def dists(workdir):
    """(sdist, wheel) built by `python -m build` in a venv that is then deleted."""
    if BASE_PYTHON != sys.executable:
        r = _run([BASE_PYTHON, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
        if r.stdout.strip() != "%d.%d" % sys.version_info[:2]:
            pytest.skip("%s is another Python version than the tests'" % BASE_PYTHON)
    src = workdir / "src"
    shutil.copytree(REPO, src, ignore=COPY_IGNORE)
    build_venv = _venv(workdir / "build-venv")
    _pip(build_venv, "build")
    r = _run([str(build_venv / "bin" / "python3"), "-m", "build", "--outdir",
              str(workdir / "dist"), str(src)], timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    shutil.rmtree(build_venv)
    shutil.rmtree(src)
    sdists = list((workdir / "dist").glob("spliceproxy-*.tar.gz"))
    wheels = list((workdir / "dist").glob("spliceproxy-*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, list((workdir / "dist").iterdir())
    return sdists[0], wheels[0], build_venv


@pytest.fixture(scope="module")
def installed(workdir, dists):
    """A fresh venv at another path with the wheel (no extras) installed."""
    venv = _venv(workdir / "elsewhere" / "venv")
    _pip(venv, "--no-deps", str(dists[1]))
    return venv


def _broken_copy(workdir: Path, wheel: Path, name: str) -> Path:
    venv = _venv(workdir / name)
    _pip(venv, "--no-deps", str(wheel))
    return venv


def _serve_echo(command: str) -> None:
    """Start `command` as dockerd would, relay one echo through it, stop it."""
    with srv.EchoServer() as echo:
        port = srv.free_port()
        with spawn(proxy_argv(command, "tcp", "127.0.0.1", port, "127.0.0.1", echo.port),
                   env=STANDALONE_ENV) as p:
            assert p.status == b"0\n"
            srv.echo_roundtrip("127.0.0.1", port, b"relocated")
            with open(f"/proc/{p.pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")[:-1]
            with open(f"/proc/{p.pid}/maps") as f:
                engines = {line.split()[-1] for line in f if "_engine" in line}
            assert p.stop() == 0
    return argv, engines


def test_build_makes_an_sdist_and_a_wheel_with_the_launcher_and_engine(dists):
    sdist, wheel, _ = dists
    names = zipfile.ZipFile(wheel).namelist()
    scripts = [n.rsplit("/", 1)[-1] for n in names if ".data/scripts/" in n]
    assert scripts == ["spliceproxy-front"], names
    # The `spliceproxy` command is the C stub, installed beside the launcher.
    assert any(n.endswith(".data/data/bin/spliceproxy") for n in names), names
    assert any(n.startswith("spliceproxy/_engine") and n.endswith(".so") for n in names), names
    assert "manylinux" not in wheel.name  # a plain linux wheel: see cibuildwheel in pyproject
    # The wheel was built from the sdist, so it holds what a build needs.
    members = {m.split("/", 1)[-1] for m in tarfile.open(sdist).getnames()}
    assert {"scripts/spliceproxy.in", "csrc/engine.h", "src/spliceproxy/_engine.pyx",
            "csrc/stub/stub.c"} <= members


def test_wheel_runs_in_a_fresh_venv_after_the_build_venv_is_gone(dists, installed):
    build_venv = dists[2]
    assert not build_venv.exists()
    command = str(installed / "bin" / "spliceproxy")
    r = _run([command, "-v"], env=DOCKERD_ENV)
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout.startswith("spliceproxy (docker-proxy compatible) version ")
    argv, engines = _serve_echo(command)
    assert argv[:3] == [str(installed / "bin" / "python3").encode(), b"-I", b"-S"]
    assert len(engines) == 1 and next(iter(engines)).startswith(str(_site(installed))), engines
    # The launcher names the build's interpreter (pip's isolated build
    # environment, gone as well) as its fallback only.
    launcher = (installed / "bin" / "spliceproxy-front").read_text()
    fallback = re.search(r'^for py in "\$dir/python3" (\S+); do$', launcher, re.M)
    assert fallback and not os.path.exists(fallback.group(1)), fallback


def test_a_tree_built_before_the_stub_still_installs_the_stub(workdir, dists):
    # A source tree updated in place keeps its build/ directory; before the
    # stub became the command, build/scripts-X.Y/spliceproxy was the old
    # launcher, and a re-run of scripts/install-venv must not install it.
    tree = workdir / "updated-tree"
    with tarfile.open(dists[0]) as tar:
        # Our own sdist; the data filter where this Python has it (3.11.4+).
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(tree, **safe)
    (src,) = tree.iterdir()
    old = src / "build" / ("scripts-%d.%d" % sys.version_info[:2]) / "spliceproxy"
    old.parent.mkdir(parents=True)
    old.write_text("#!/bin/sh\necho 'the old launcher' >&2\nexit 7\n")
    old.chmod(0o755)
    venv = _venv(workdir / "updated-venv")
    _pip(venv, "--no-deps", str(src))
    command = venv / "bin" / "spliceproxy"
    assert command.read_bytes()[:4] == b"\x7fELF", "the old launcher was installed"
    r = _run([str(command), "-v"], env=DOCKERD_ENV)
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    shutil.rmtree(tree)


def test_wheel_serves_through_its_engine_by_default(installed):
    """The engine-mode counterpart of the two tests around it: dockerd's
    environment and no SPLICEPROXY_ENGINE, so the port goes to an engine the
    stub starts from the fresh install."""
    command = str(installed / "bin" / "spliceproxy")
    host = engine_support.EngineHost(command, prefix="in-")
    host.env = dict(_engine_env(host.dir), SPLICEPROXY_LOG_FILE=host.log_path)
    try:
        with srv.EchoServer() as echo:
            lp = host.start("tcp", echo.port)
            assert lp.status == b"0\n"
            assert os.readlink("/proc/%d/exe" % lp.pid) == os.path.realpath(command)
            srv.echo_roundtrip("127.0.0.1", lp.port, b"relocated, through the engine")
            engine = host.engine_pid()
            with open("/proc/%d/maps" % engine) as f:
                engines = {line.split()[-1] for line in f if "_engine" in line}
            assert len(engines) == 1 and next(iter(engines)).startswith(str(_site(installed)))
            assert [m["stub_pid"] for m in host.status()["mappings"]] == [lp.pid]
            assert lp.stop() == 0
    finally:
        host.close()


def test_symlinked_command_uses_its_target_environment(workdir, installed):
    # pipx and `uv tool` put a symlink on PATH; the directory it is in may
    # hold an unrelated python3 (here one that would fail loudly).
    bindir = workdir / "symlink-bin"
    bindir.mkdir(exist_ok=True)
    decoy = bindir / "python3"
    decoy.write_text("#!/bin/sh\necho 'wrong interpreter' >&2\nexit 7\n")
    decoy.chmod(0o755)
    link = bindir / "spliceproxy"
    if not link.exists():
        link.symlink_to(installed / "bin" / "spliceproxy")
    argv, engines = _serve_echo(str(link))
    assert argv[0] == str(installed / "bin" / "python3").encode()
    r = _run([str(link), "install-path"], env=DOCKERD_ENV)
    assert (r.returncode, r.stdout) == (0, str(installed / "bin" / "spliceproxy") + "\n")


def test_install_path_is_the_real_command_from_either_entry(installed):
    want = os.path.realpath(installed / "bin" / "spliceproxy") + "\n"
    for argv in ([str(installed / "bin" / "spliceproxy"), "install-path"],
                 [str(installed / "bin" / "python3"), "-m", "spliceproxy", "install-path"]):
        r = _run(argv, env=DOCKERD_ENV)
        assert (r.returncode, r.stdout) == (0, want), (argv, r.stderr)


def test_bench_without_the_extra_names_the_extra(installed):
    r = _run([str(installed / "bin" / "spliceproxy"), "bench", "--quick"], env=DOCKERD_ENV,
             timeout=60)
    assert r.returncode == 1
    assert "pip install 'spliceproxy[bench]'" in r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout == ""
    # What needs no extra still works: the gate and the help.
    for args in (["bench", "--help"], ["bench", "gate", "--help"]):
        r = _run([str(installed / "bin" / "spliceproxy"), *args], env=DOCKERD_ENV)
        assert (r.returncode, r.stderr) == (0, ""), args
        assert r.stdout.startswith("usage: spliceproxy bench"), r.stdout


def test_bench_measures_this_command_though_it_is_not_on_path(workdir, dists):
    # As in the Quick start: the venv's bin is not on PATH, and under the
    # launcher's -S the interpreter's scripts directory is the base
    # interpreter's.  One short loopback round shows whether it was run.
    if os.geteuid() == 0 and shutil.which("ip") is None:
        pytest.skip("as root the benchmark builds namespaces: needs ip (apt-get install iproute2)")
    venv = _broken_copy(workdir, dists[1], "with-bench")
    _pip(venv, "cffi>=1.15", "pyroute2>=0.7")
    out = workdir / "bench-out"
    out.mkdir(exist_ok=True)
    r = _run([str(venv / "bin" / "spliceproxy"), "bench", "--quick", "--paths",
              "native,spliceproxy", "--variants", "loopback", "--rounds", "1",
              "--json", str(out / "b.json"), "--png", ""],
             env=dict(DOCKERD_ENV, HOME=str(out)), cwd=out, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "skipped spliceproxy" not in r.stdout + r.stderr
    header = next(line for line in r.stdout.splitlines() if line.startswith("loopback metric"))
    assert header.split()[3:5] == ["native", "spliceproxy"], header


def _start_broken(command: str, status_pipe: bool = True, env: dict = STANDALONE_ENV):
    p = spawn(proxy_argv(command, "tcp", "127.0.0.1", srv.free_port(), "127.0.0.1", 9),
              env=env, stderr=subprocess.PIPE, status_pipe=status_pipe, check=False)
    try:
        rc = p.proc.wait(10)
        err = p.proc.stderr.read().decode()
    finally:
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGKILL)
            p.proc.wait()
        p.proc.stderr.close()
    return p.status, rc, err


def _assert_says_why(status, rc, err, *phrases):
    assert rc == 1
    assert status.startswith(b"1\nspliceproxy: cannot start: "), status
    text = status[2:].decode()
    assert err == text + "\n"
    for phrase in phrases:
        assert phrase in text, text
    assert "Traceback" not in err


def _assert_engine_says_why(command: str, *phrases):
    """The same broken install in engine mode (the default): the stub
    cannot start the engine, and says why in the front end's words."""
    d = engine_support.private_dir("in-")
    sock = os.path.join(d, "engine.sock")
    try:
        status, rc, err = _start_broken(command, env=_engine_env(d))
        assert rc == 1
        head = b"1\ncannot start the spliceproxy engine for %s: spliceproxy: cannot start: " % (
            sock.encode())
        assert status.startswith(head), status
        text = status[2:].decode()
        assert err == "spliceproxy: " + text + "\n"
        for phrase in phrases:
            assert phrase in text, text
        assert srv.wait_for(lambda: engine_support.engine_processes(sock) == [], 5.0)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_package_missing_is_reported_on_fd3_and_stderr(workdir, dists):
    venv = _broken_copy(workdir, dists[1], "no-package")
    shutil.rmtree(_site(venv) / "spliceproxy")
    status, rc, err = _start_broken(str(venv / "bin" / "spliceproxy"))
    _assert_says_why(status, rc, err, "cannot import the spliceproxy package",
                     str(_site(venv)), "pip install --force-reinstall spliceproxy")
    _assert_engine_says_why(str(venv / "bin" / "spliceproxy"),
                            "cannot import the spliceproxy package", str(_site(venv)))


def test_engine_missing_is_reported_on_fd3_and_stderr(workdir, dists):
    venv = _broken_copy(workdir, dists[1], "no-engine")
    for so in (_site(venv) / "spliceproxy").glob("_engine*.so"):
        so.unlink()
    status, rc, err = _start_broken(str(venv / "bin" / "spliceproxy"))
    _assert_says_why(status, rc, err, "is incomplete", "_engine",
                     "pip install --force-reinstall spliceproxy")
    _assert_engine_says_why(str(venv / "bin" / "spliceproxy"), "is incomplete", "_engine")


def test_interpreter_gone_is_reported_on_fd3_and_stderr(workdir, dists):
    # Neither the venv's interpreter nor the build's (deleted with the build
    # venv) is there any more.
    venv = _broken_copy(workdir, dists[1], "no-python")
    for name in ("python3", "python", "python%d.%d" % sys.version_info[:2]):
        (venv / "bin" / name).unlink(missing_ok=True)
    command = str(venv / "bin" / "spliceproxy")
    status, rc, err = _start_broken(command)
    _assert_says_why(status, rc, err, "no Python interpreter", str(venv / "bin" / "python3"),
                     "spliceproxy install-path")
    _assert_engine_says_why(command, "no Python interpreter", str(venv / "bin" / "python3"))
    # Started by hand (no fd 3), stderr alone tells.
    status, rc, err = _start_broken(command, status_pipe=False)
    assert rc == 1 and "no Python interpreter" in err, err


def test_cibuildwheel_settings_and_the_wheels_abi(workdir, dists):
    # The manylinux containers cannot be fetched here: check what can be
    # checked without them, that cibuildwheel accepts the settings and that
    # the engine needs nothing but glibc (a manylinux tag is possible).
    tools = _venv(workdir / "tools")
    _pip(tools, "cibuildwheel", "auditwheel")
    r = _run([str(tools / "bin" / "cibuildwheel"), "--print-build-identifiers",
              "--platform", "linux"], cwd=REPO)
    assert r.returncode == 0, r.stderr
    ids = r.stdout.split()
    assert "cp311-manylinux_x86_64" in ids and "cp39-manylinux_x86_64" in ids, ids
    assert not any("musllinux" in i or "i686" in i for i in ids), ids
    r = _run([str(tools / "bin" / "auditwheel"), "show", str(dists[1])])
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert re.search(r'consistent with the following platform tag: "manylinux_2_\d+_', text), text
    assert re.search(r"libraries: libc\.so\.6 with versions", text), text
