"""A private dockerd in its own network namespace, with the proxy under test as
its userland proxy.

Everything a daemon needs lives in one temporary directory (data-root,
exec-root, socket, pidfile, containerd's root and state) and one network
namespace named ``spe2e-<pid>[-suffix]`` (the prefix is
``SPLICEPROXY_E2E_NETNS_PREFIX``, the two daemons' bridge subnets the halves of
``SPLICEPROXY_E2E_SUBNET``; a range the host already uses or a prefix a
namespace already carries fails the session with the reason); containerd is started by the
fixture with the same private paths, so a containerd already running on the
machine is never used. Teardown removes containers, stops dockerd and
containerd, kills whatever is still running in the namespace (and reports it
as a leak), unmounts what is left under the directory, deletes the namespace
and the directory, also when the test failed.

Which proxy: ``shutil.which("spliceproxy")`` by default, or the absolute path
in ``SPLICEPROXY_E2E_PROXY`` (e.g. ``/usr/sbin/docker-proxy`` to run the same
scenarios against the reference). spliceproxy runs every scenario three times:
standalone (``SPLICEPROXY_ENGINE=0`` in dockerd's environment), in engine
mode (``SPLICEPROXY_ENGINE=1``, each daemon with its own
``SPLICEPROXY_ENGINE_SOCKET`` in its private directory and a 1 s idle exit,
so an engine never outlives its daemon's last mapping by more than that), and
in engine mode with the kernel fast path on (``fastpath``:
``SPLICEPROXY_FASTPATH=1``, ``SPLICEPROXY_FASTPATH_CGROUP`` a child cgroup
``<prefix><pid>[-suffix]-fp`` made for each daemon). In that mode the
host-local clients (netns_client.py run in the daemon's namespace) are moved
into their daemon's cgroup before they exec, so they are the only processes
on the machine the programs ever rewrite; teardown checks that nothing is
attached to that cgroup any more, removes it, and at the end of the mode that
the cgroup v2 root carries no more programs than before.
Prerequisites that are missing skip the suite with the reason, unless
``SPLICEPROXY_E2E_REQUIRE=1`` (CI), which turns them into errors.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from spliceproxy import fastpath as fastpath_mod

from support import cc as cc_flags
from support import fastpath_env

HERE = Path(__file__).resolve().parent
CLIENT = HERE / "netns_client.py"
UDP_ECHO_SRC = HERE / "udp_echo.c"
BUSYBOX = Path("/bin/busybox")
IMAGE = "local/spe2e-busybox:test"
NETNS_DIR = Path("/var/run/netns")
# Moves the shell into the cgroup ($0), then becomes the command.
CGROUP_LAUNCH = 'echo $$ > "$0/cgroup.procs" && exec "$@"'

# Bridge subnets, one per daemon, from the benchmarking range; with
# SPLICEPROXY_E2E_SUBNET set, the first address of each half of it.
SESSION_BIP = "198.18.77.1/24"
SCRATCH_BIP = "198.18.78.1/24"
NETNS_PREFIX = os.environ.get("SPLICEPROXY_E2E_NETNS_PREFIX") or "spe2e-"

APPLETS = ("sh", "httpd", "sleep", "seq", "cat", "echo", "ls")
CMD_TIMEOUT = 60.0
START_TIMEOUT = 40.0
STOP_TIMEOUT = 25.0


# --------------------------------------------------------------------------
# prerequisites


def _is_static_elf(path: Path) -> bool:
    """True when the ELF file has no PT_INTERP, i.e. needs no dynamic loader."""
    try:
        with open(path, "rb") as f:
            ident = f.read(64)
            if ident[:4] != b"\x7fELF" or ident[4] != 2:  # only ELF64 matters here
                return False
            endian = "<" if ident[5] == 1 else ">"
            phoff = struct.unpack_from(endian + "Q", ident, 0x20)[0]
            phentsize, phnum = struct.unpack_from(endian + "HH", ident, 0x36)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    for i in range(phnum):
        (p_type,) = struct.unpack_from(endian + "I", table, i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def _proxy_path() -> tuple[str | None, str]:
    env = os.environ.get("SPLICEPROXY_E2E_PROXY")
    if env:
        if not os.path.isabs(env):
            return None, f"SPLICEPROXY_E2E_PROXY must be an absolute path, got {env!r}"
        if not os.access(env, os.X_OK):
            return None, f"SPLICEPROXY_E2E_PROXY={env} is not an executable file"
        return env, ""
    # The console script installed for the interpreter running the tests; PATH
    # may hold only a wrapper (a pyenv shim) that dockerd must not be given.
    script = Path(sysconfig.get_path("scripts")) / "spliceproxy"
    if script.is_file() and os.access(script, os.X_OK):
        return str(script), ""
    found = shutil.which("spliceproxy")
    if not found:
        return None, "spliceproxy is not installed (pip install .): no `spliceproxy` on PATH"
    return os.path.realpath(found), ""


def _missing_prerequisite() -> str | None:
    if sys.platform != "linux":
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root (network namespaces, dockerd)"
    for tool in ("dockerd", "docker", "containerd", "runc", "nsenter", "ip", "iptables", "gcc"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (apt-get install docker.io iproute2 iptables gcc libc6-dev)"
    if not BUSYBOX.exists() or not _is_static_elf(BUSYBOX):
        return f"{BUSYBOX} is missing or not static (apt-get install busybox-static)"
    path, why = _proxy_path()
    if path is None:
        return why
    return None


def _require_prerequisites() -> None:
    why = _missing_prerequisite()
    if why is None:
        return
    if os.environ.get("SPLICEPROXY_E2E_REQUIRE") == "1":
        pytest.fail(f"e2e prerequisites missing with SPLICEPROXY_E2E_REQUIRE=1: {why}",
                    pytrace=False)
    pytest.skip(f"e2e: {why}")


# --------------------------------------------------------------------------
# processes


@dataclass
class PsEntry:
    """One line of `ps -e -o pid=,ppid=,comm=,args=`."""

    pid: int
    ppid: int
    comm: str
    args: str

    def __str__(self) -> str:
        return f"{self.pid:>7} {self.ppid:>7} {self.comm:<16} {self.args}"


def _alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pids, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    left = [p for p in pids if _alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if _alive(p)]
    return left


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"<{path}: {e.strerror}>"
    return "\n".join(text.splitlines()[-lines:]) or "<empty>"


# --------------------------------------------------------------------------
# network namespace


class Netns:
    """A named network namespace with loopback up and IPv6 enabled on it.

    ``cgroup`` (fast-path mode): the cgroup every client started here joins."""

    def __init__(self, name: str):
        self.name = name
        self.path = NETNS_DIR / name
        self.cgroup: Path | None = None

    def create(self) -> None:
        subprocess.run(["ip", "netns", "add", self.name], check=True, timeout=10,
                       capture_output=True)
        self.run(["ip", "link", "set", "lo", "up"], check=True)
        # /proc/sys/net shows the namespace of the process that opens it.
        self.run(["sysctl", "-q", "-w", "net.ipv6.conf.lo.disable_ipv6=0"], check=True)

    def cmd(self, argv) -> list[str]:
        return ["nsenter", f"--net={self.path}", *map(str, argv)]

    def in_cgroup(self, argv, cgroup: bool = True) -> list[str]:
        """argv, run from the clients' cgroup when there is one (and cgroup is true)."""
        argv = list(map(str, argv))
        if self.cgroup is None or not cgroup:
            return argv
        return ["sh", "-c", CGROUP_LAUNCH, str(self.cgroup), *argv]

    def run(self, argv, timeout: float = 30.0, check: bool = False, **kw):
        return subprocess.run(self.cmd(argv), timeout=timeout, check=check,
                              capture_output=True, text=True, **kw)

    def client(self, *args, timeout: float = 60.0, cgroup: bool = True,
               netns_path: str | None = None) -> dict:
        """Run netns_client.py inside the namespace (or the one at netns_path)
        and return its JSON result. cgroup=False keeps it out of the clients'
        cgroup: the fast path leaves it alone, the relay serves it."""
        argv = self.in_cgroup([sys.executable, CLIENT, *args], cgroup)
        if netns_path is None:
            r = self.run(argv, timeout=timeout)
        else:
            r = subprocess.run(["nsenter", f"--net={netns_path}", *argv], timeout=timeout,
                               capture_output=True, text=True)
        if r.returncode != 0:
            raise AssertionError(
                f"netns client {args} failed rc={r.returncode}\n{r.stderr}{r.stdout}")
        return json.loads(r.stdout)

    def hold_port(self, port: int) -> subprocess.Popen:
        """Open a TCP listener on 0.0.0.0:port in the namespace; close stdin to release."""
        p = subprocess.Popen(self.cmd([sys.executable, CLIENT, "hold", port]),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = ""
        try:
            line = _readline_with_timeout(p, 10.0)
        finally:
            if line.strip() != "ready":
                p.kill()
                p.wait(5)
        if line.strip() != "ready":
            raise AssertionError(f"could not hold port {port} in {self.name}: {line!r}")
        return p

    def open_request(self, host: str, port: int, cgroup: bool = True) -> subprocess.Popen:
        """A connection through the port left open mid-request; close stdin to end it."""
        p = subprocess.Popen(self.cmd(self.in_cgroup([sys.executable, CLIENT, "open-request",
                                                      host, port], cgroup)),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = _readline_with_timeout(p, 15.0)
        if line.strip() != "ready":
            p.kill()
            p.wait(5)
            raise AssertionError(f"no connection to {host}:{port} in {self.name}: {line!r}")
        return p

    def ino(self) -> tuple[int, int]:
        st = os.stat(self.path)
        return st.st_dev, st.st_ino

    def pids(self) -> list[int]:
        """Every live process whose network namespace is this one."""
        try:
            want = self.ino()
        except OSError:
            return []
        out = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                st = os.stat(f"/proc/{entry}/ns/net")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == want and _alive(int(entry)):
                out.append(int(entry))
        return out

    def ps(self) -> list[PsEntry]:
        """What `ps` shows, restricted to processes in this namespace."""
        r = subprocess.run(["ps", "-e", "-ww", "-o", "pid=,ppid=,comm=,args="],
                           capture_output=True, text=True, timeout=10, check=True)
        mine = set(self.pids())
        entries = []
        for line in r.stdout.splitlines():
            parts = line.split(None, 3)
            if len(parts) < 3:
                continue
            pid, ppid, comm = int(parts[0]), int(parts[1]), parts[2]
            if pid in mine:
                entries.append(PsEntry(pid, ppid, comm, parts[3] if len(parts) > 3 else ""))
        return entries

    def delete(self) -> None:
        if self.path.exists():
            subprocess.run(["ip", "netns", "del", self.name], timeout=10, capture_output=True)


def _readline_with_timeout(p: subprocess.Popen, timeout: float) -> str:
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            return ""
        return p.stdout.readline()
    finally:
        sel.close()


# --------------------------------------------------------------------------
# the daemon


@dataclass
class ProxyUnderTest:
    path: str
    #: what `ps -o comm` shows for it
    name: str
    #: engine mode: the installed command, a C stub, hands ports to the engine
    engine: bool = False
    #: engine mode with the kernel fast path on (SPLICEPROXY_FASTPATH=1)
    fastpath: bool = False

    @property
    def is_reference(self) -> bool:
        return self.name == "docker-proxy"

    @property
    def stub(self) -> str:
        return self.path

    @property
    def programs(self) -> tuple[str, ...]:
        """Program paths a per-port process of this proxy shows in its argv."""
        if self.is_reference:
            return (self.path,)
        # The stub execs the launcher beside it, as the interpreter's script,
        # outside engine mode; in engine mode the stub itself stays.
        launcher = os.path.join(os.path.dirname(self.path), "spliceproxy-front")
        return tuple(dict.fromkeys((self.path, self.stub, launcher)))

    @property
    def comms(self) -> tuple[str, ...]:
        """What `ps -o comm` shows for a per-port process (the stub, in engine mode)."""
        return (self.name, "spliceproxy") if self.engine else (self.name,)


@dataclass
class Daemon:
    """dockerd + containerd with private paths inside their own netns."""

    netns: Netns
    workdir: Path
    proxy: ProxyUnderTest
    bip: str
    rootfs: Path
    dockerd: subprocess.Popen | None = None
    containerd: subprocess.Popen | None = None
    leaks: list[str] = field(default_factory=list)
    #: more dockerd flags (e.g. --iptables=false) and environment for the proxies
    extra_args: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)

    # paths
    @property
    def sock(self) -> Path:
        return self.workdir / "docker.sock"

    @property
    def log(self) -> Path:
        return self.workdir / "dockerd.log"

    @property
    def containerd_log(self) -> Path:
        return self.workdir / "containerd.log"

    @property
    def proxy_log(self) -> Path:
        return self.workdir / "proxy.log"

    @property
    def engine_socket(self) -> Path:
        """The engine's control socket (engine mode); the 0700 work directory holds it."""
        return self.workdir / "engine.sock"

    @property
    def metrics_socket(self) -> Path:
        """Where the engine serves /metrics (engine mode), beside its control socket."""
        return self.workdir / "metrics.sock"

    @property
    def gateway(self) -> str:
        return self.bip.split("/")[0]

    # lifecycle
    def start(self) -> None:
        w = self.workdir
        for d in ("data", "exec", "containerd/root", "containerd/state", "containerd/opt",
                  "docker-config"):
            (w / d).mkdir(parents=True, exist_ok=True)
        self.netns.create()
        if self.proxy.fastpath:
            self._make_cgroup()
        self._start_containerd()
        # An empty daemon.json so the machine's /etc/docker/daemon.json is never read.
        (w / "daemon.json").write_text("{}\n")
        self.proxy_log.touch()
        self.start_dockerd()
        self._import_image()

    def start_dockerd(self) -> None:
        """Start (or restart, on the same state) dockerd and wait for its API."""
        w = self.workdir
        env = dict(os.environ)
        env["SPLICEPROXY_LOG_FILE"] = str(self.proxy_log)
        for k in ("SPLICEPROXY_ENGINE", "SPLICEPROXY_ENGINE_SOCKET",
                  "SPLICEPROXY_ENGINE_IDLE_EXIT", "SPLICEPROXY_FASTPATH",
                  "SPLICEPROXY_FASTPATH_CGROUP", "SPLICEPROXY_METRICS_ADDR"):
            env.pop(k, None)
        if self.proxy.engine:
            env["SPLICEPROXY_ENGINE"] = "1"
            env["SPLICEPROXY_ENGINE_SOCKET"] = str(self.engine_socket)
            env["SPLICEPROXY_METRICS_ADDR"] = "unix:" + str(self.metrics_socket)
            # Teardown waits 5 s for the namespace to empty: the engine's
            # default grace (5 s) would count as a leak.
            env["SPLICEPROXY_ENGINE_IDLE_EXIT"] = "1s"
        else:
            env["SPLICEPROXY_ENGINE"] = "0"
        if self.proxy.fastpath:
            assert self.netns.cgroup is not None
            env["SPLICEPROXY_FASTPATH"] = "1"
            env["SPLICEPROXY_FASTPATH_CGROUP"] = str(self.netns.cgroup)
        env.update(self.extra_env)
        argv = self.netns.cmd([
            shutil.which("dockerd"),
            "--config-file", w / "daemon.json",
            "--data-root", w / "data",
            "--exec-root", w / "exec",
            "--pidfile", w / "docker.pid",
            "-H", f"unix://{self.sock}",
            "--containerd", w / "containerd" / "containerd.sock",
            "--bip", self.bip,
            "--userland-proxy=true",
            "--userland-proxy-path", self.proxy.path,
            "--shutdown-timeout", "2",
            *self.extra_args,
        ])
        with open(self.log, "ab") as logf:
            self.dockerd = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                            stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.dockerd.poll() is not None:
                raise RuntimeError(f"dockerd exited with {self.dockerd.returncode}"
                                   f" during startup\n{self.diagnostics()}")
            r = self.docker("version", "--format", "{{.Server.Version}}", check=False,
                            timeout=10)
            if r.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"dockerd not ready after {START_TIMEOUT}s\n"
                                   f"{r.stderr}\n{self.diagnostics()}")
            time.sleep(0.2)

    @property
    def cgroup_path(self) -> Path:
        """The clients' cgroup (fast-path mode), named after the namespace."""
        root = fastpath_mod.default_cgroup_path()
        assert root is not None
        return Path(root) / f"{self.netns.name}-fp"

    def _make_cgroup(self) -> None:
        self.cgroup_path.mkdir()
        self.netns.cgroup = self.cgroup_path

    def _remove_cgroup(self) -> None:
        """Once every engine is gone: nothing attached, no process left, removed."""
        cg = self.netns.cgroup
        if cg is None or not cg.exists():
            return
        deadline = time.monotonic() + 10.0
        while sum(fastpath_mod.attached(str(cg)).values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = fastpath_mod.attached(str(cg))
        if sum(left.values()):
            self.leaks.append(f"fast-path programs still attached to {cg}: {left}")
        while True:
            try:
                cg.rmdir()
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    procs = (cg / "cgroup.procs").read_text().split()
                    self.leaks.append(f"cannot remove {cg}: {e.strerror}; processes {procs}")
                    for pid in procs:
                        _signal(int(pid), signal.SIGKILL)
                    _wait_gone([int(p) for p in procs], 5.0)
                    with contextlib.suppress(OSError):
                        cg.rmdir()
                    break
                time.sleep(0.05)

    def _start_containerd(self) -> None:
        c = self.workdir / "containerd"
        (c / "config.toml").write_text(
            "version = 2\n"
            f'root = "{c / "root"}"\n'
            f'state = "{c / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            "[grpc]\n"
            f'  address = "{c / "containerd.sock"}"\n'
            "[ttrpc]\n"
            '  address = ""\n'
            "[debug]\n"
            '  address = ""\n'
            "[metrics]\n"
            '  address = ""\n'
            '[plugins."io.containerd.internal.v1.opt"]\n'
            f'  path = "{c / "opt"}"\n'
        )
        argv = self.netns.cmd([shutil.which("containerd"), "--config", c / "config.toml"])
        with open(self.containerd_log, "ab") as logf:
            self.containerd = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                               stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while not (c / "containerd.sock").exists():
            if self.containerd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("containerd did not come up\n"
                                   + _tail(self.containerd_log, 40))
            time.sleep(0.05)

    def _import_image(self) -> None:
        tar = subprocess.Popen(["tar", "-C", str(self.rootfs), "-c", "."],
                               stdout=subprocess.PIPE)
        try:
            r = subprocess.run(self._docker_argv("import", "-", IMAGE), stdin=tar.stdout,
                               capture_output=True, text=True, timeout=CMD_TIMEOUT,
                               env=self._docker_env())
        finally:
            tar.stdout.close()
            tar.wait(CMD_TIMEOUT)
        if r.returncode != 0 or tar.returncode != 0:
            raise RuntimeError(f"docker import failed: {r.stderr}\n{self.diagnostics()}")

    def _docker_env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env["DOCKER_HOST"] = f"unix://{self.sock}"
        env["DOCKER_CONFIG"] = str(self.workdir / "docker-config")
        return env

    def _docker_argv(self, *args) -> list[str]:
        return [shutil.which("docker"), *map(str, args)]

    def docker(self, *args, check: bool = True, timeout: float = CMD_TIMEOUT):
        """Run the docker client against this daemon (from the host namespace)."""
        try:
            r = subprocess.run(self._docker_argv(*args), capture_output=True, text=True,
                               timeout=timeout, env=self._docker_env())
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"`docker {' '.join(map(str, args))}` still running after"
                                 f" {timeout}s\n{self.diagnostics()}") from e
        if check and r.returncode != 0:
            raise AssertionError(f"`docker {' '.join(map(str, args))}` failed"
                                 f" rc={r.returncode}: {r.stderr.strip()}\n{self.diagnostics()}")
        return r

    @property
    def pid(self) -> int:
        assert self.dockerd is not None
        return self.dockerd.pid

    def alive(self) -> bool:
        return self.dockerd is not None and self.dockerd.poll() is None

    def stop_dockerd(self, timeout: float = STOP_TIMEOUT) -> bool:
        """SIGTERM dockerd and wait; SIGKILL after timeout. True if it stopped on SIGTERM."""
        if self.dockerd is None or self.dockerd.poll() is not None:
            return True
        self.dockerd.send_signal(signal.SIGTERM)
        try:
            self.dockerd.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            self.leaks.append(f"dockerd ignored SIGTERM for {timeout}s; killed")
            self.dockerd.kill()
            self.dockerd.wait(10)
            return False

    def remove_all_containers(self) -> None:
        if not self.alive():
            return
        r = self.docker("ps", "-aq", check=False, timeout=20)
        ids = r.stdout.split()
        if ids:
            self.docker("rm", "-f", *ids, check=False, timeout=STOP_TIMEOUT)

    def close(self) -> None:
        """Tear everything down; record anything that had to be killed as a leak."""
        try:
            try:
                self.remove_all_containers()
            except AssertionError as e:
                self.leaks.append(f"removing containers failed: {e}")
            self.stop_dockerd()
            if self.containerd is not None and self.containerd.poll() is None:
                self.containerd.send_signal(signal.SIGTERM)
                try:
                    self.containerd.wait(10)
                except subprocess.TimeoutExpired:
                    self.containerd.kill()
                    self.containerd.wait(10)
            left = _wait_gone(self.netns.pids(), 5.0)
            if left:
                self.leaks.append("processes left in the namespace after dockerd and containerd"
                                  " stopped:\n" + "\n".join(map(str, self.netns.ps())))
                for pid in left:
                    _signal(pid, signal.SIGKILL)
                _wait_gone(left, 5.0)
        finally:
            self._remove_cgroup()
            self._unmount_all()
            self.netns.delete()
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _unmount_all(self) -> None:
        prefix = str(self.workdir)
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
        mine = [p for p in points if p == prefix or p.startswith(prefix + "/")]
        for point in sorted(set(mine), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=10)

    # views
    def _ours(self) -> list[PsEntry]:
        progs = self.proxy.programs
        return [e for e in self.netns.ps() if any(p in e.args.split()[:4] for p in progs)]

    def proxies(self) -> list[PsEntry]:
        """Per-port processes of the proxy under test in the daemon's namespace, as ps
        shows them (in engine mode the stubs, not the engine).

        The program path is argv[0], or comes after the interpreter and its
        flags when a script is run by it (spliceproxy's launcher shows as
        `/usr/bin/python3 -I -S /path/spliceproxy ...`).
        """
        return [e for e in self._ours() if not _is_engine(e)]

    def engines(self) -> list[PsEntry]:
        """The host engine(s) serving this daemon's mappings (engine mode)."""
        return [e for e in self._ours() if _is_engine(e)]

    def status(self) -> dict:
        """`spliceproxy status --json` against this daemon's engine."""
        env = dict(os.environ)
        env["SPLICEPROXY_ENGINE_SOCKET"] = str(self.engine_socket)
        r = subprocess.run([self.proxy.path, "status", "--json"], capture_output=True,
                           text=True, timeout=20, env=env)
        assert r.returncode == 0, f"spliceproxy status rc={r.returncode}: {r.stderr}"
        return json.loads(r.stdout)

    def container_ip(self, name: str) -> str:
        r = self.docker("inspect", "-f", "{{.NetworkSettings.IPAddress}}", name)
        ip = r.stdout.strip()
        assert ip.startswith(self.gateway.rsplit(".", 1)[0] + "."), (ip, self.bip)
        return ip

    def wait_log(self, container: str, text: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            r = self.docker("logs", container, check=False, timeout=10)
            if text in r.stdout + r.stderr:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{container} never logged {text!r}: {r.stdout}{r.stderr}"
                                     f"\n{self.diagnostics()}")
            time.sleep(0.1)

    def diagnostics(self, lines: int = 40) -> str:
        procs = "\n".join(map(str, self.netns.ps())) if self.netns.path.exists() else "<none>"
        return (
            f"--- proxy under test: {self.proxy.path}\n"
            f"--- processes in netns {self.netns.name}:\n{procs}\n"
            f"--- dockerd log ({self.log}), last {lines} lines:\n{_tail(self.log, lines)}\n"
            f"--- proxy log (SPLICEPROXY_LOG_FILE), last {lines} lines:\n"
            f"{_tail(self.proxy_log, lines)}"
        )


def _is_engine(e: PsEntry) -> bool:
    return " engine --socket " in f" {e.args} "


_LIVE_DAEMONS: list[Daemon] = []


# --------------------------------------------------------------------------
# fixtures


def _fastpath_prerequisite() -> str | None:
    if fastpath_mod.default_cgroup_path() is None:
        return "cgroup v2 is not mounted"
    return None


@pytest.fixture(scope="session", params=["standalone", "engine", "fastpath"])
def proxy_under_test(request) -> ProxyUnderTest:
    _require_prerequisites()
    path, _ = _proxy_path()
    assert path is not None
    proxy = ProxyUnderTest(path=path, name=os.path.basename(path)[:15],
                           engine=request.param in ("engine", "fastpath"),
                           fastpath=request.param == "fastpath")
    if proxy.engine and proxy.is_reference:
        pytest.skip("engine mode is spliceproxy's; the reference runs standalone only")
    if proxy.engine and not os.access(proxy.stub, os.X_OK):
        pytest.fail(f"engine mode: no executable {proxy.stub} beside {path}", pytrace=False)
    if not proxy.fastpath:
        yield proxy
        return
    why = _fastpath_prerequisite()
    if why is not None:
        if os.environ.get("SPLICEPROXY_E2E_REQUIRE") == "1":
            pytest.fail(f"fast-path mode with SPLICEPROXY_E2E_REQUIRE=1: {why}", pytrace=False)
        pytest.skip(f"e2e fast-path mode: {why}")
    root = fastpath_mod.default_cgroup_path()
    on_root = fastpath_mod.attached(root)
    loaded = fastpath_mod.programs_loaded()
    yield proxy
    # The engines attached to their daemons' cgroups only, and went with them.
    assert fastpath_mod.attached(root) == on_root, (
        f"programs on the cgroup v2 root changed: {on_root} -> {fastpath_mod.attached(root)}")
    deadline = time.monotonic() + 10.0
    while fastpath_mod.programs_loaded() > loaded and time.monotonic() < deadline:
        time.sleep(0.05)
    now = fastpath_mod.programs_loaded()
    if now > loaded:
        # More than before: ours, unless other work on the machine (a
        # benchmark's fast path, another test run) attached some meanwhile.
        others = fastpath_env.attached_elsewhere((f"{NETNS_PREFIX}{os.getpid()}",))
        assert others, (f"fast-path programs loaded: {loaded} before the fast-path mode, "
                        f"{now} after, and no other cgroup holds any")


@pytest.fixture
def engine_mode(proxy_under_test) -> ProxyUnderTest:
    """For scenarios of engine mode alone (with or without the fast path)."""
    if not proxy_under_test.engine:
        pytest.skip("engine mode only")
    return proxy_under_test


def _e2e_network() -> tuple[str, str]:
    """(session bip, scratch bip), checked against the host; pytest.fail with the reason."""
    import ipaddress

    from spliceproxy.bench import topology

    raw = os.environ.get("SPLICEPROXY_E2E_SUBNET")
    if raw:
        try:
            net = ipaddress.ip_network(raw, strict=True)
        except ValueError as exc:
            pytest.fail(f"SPLICEPROXY_E2E_SUBNET={raw!r}: {exc}", pytrace=False)
        if net.version != 4 or net.prefixlen > 28:
            pytest.fail(f"SPLICEPROXY_E2E_SUBNET={raw!r}: need an IPv4 /28 or larger "
                        "(two bridges)", pytrace=False)
        halves = list(net.subnets(prefixlen_diff=1))
        bips = tuple(f"{next(h.hosts())}/{h.prefixlen}" for h in halves)
        ranges = [str(net)]
    else:
        bips = (SESSION_BIP, SCRATCH_BIP)
        ranges = [str(ipaddress.ip_interface(b).network) for b in bips]
    try:
        topology.check_prefix(NETNS_PREFIX)
        for r in ranges:
            clash = topology.subnet_conflicts(r)
            if clash:
                raise topology.ConfigError(
                    f"{r} is already in use on this host ({'; '.join(clash[:5])}); choose "
                    "another with SPLICEPROXY_E2E_SUBNET")
        names = topology.prefix_conflicts(NETNS_PREFIX)
        if names:
            raise topology.ConfigError(
                f"network namespace(s) with prefix {NETNS_PREFIX!r} already exist "
                f"({', '.join(names[:5])}); choose another with SPLICEPROXY_E2E_NETNS_PREFIX")
    except topology.ConfigError as exc:
        pytest.fail(f"e2e network: {exc}", pytrace=False)
    return bips


@pytest.fixture(scope="session")
def e2e_network(proxy_under_test) -> tuple[str, str]:
    return _e2e_network()


@pytest.fixture(scope="session")
def page_token() -> str:
    """Content of the page httpd serves, unique per run."""
    return f"spliceproxy e2e {uuid.uuid4().hex}"


@pytest.fixture(scope="session")
def image_rootfs(proxy_under_test, page_token):
    """busybox-static + the UDP echo compiled now, laid out as an image root."""
    root = Path(tempfile.mkdtemp(prefix=f"{NETNS_PREFIX}{os.getpid()}-rootfs-", dir="/tmp"))
    try:
        (root / "bin").mkdir()
        (root / "www").mkdir()
        (root / "tmp").mkdir()
        shutil.copy2(BUSYBOX, root / "bin" / "busybox")
        for applet in APPLETS:
            (root / "bin" / applet).symlink_to("busybox")
        (root / "www" / "index.html").write_text(page_token + "\n")
        r = subprocess.run(["gcc", "-static", "-O2", *cc_flags.cflags(),
                            "-o", str(root / "bin" / "udp_echo"), str(UDP_ECHO_SRC)],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            msg = f"gcc -static failed (libc6-dev installed?): {r.stderr.strip()}"
            if os.environ.get("SPLICEPROXY_E2E_REQUIRE") == "1":
                pytest.fail(msg, pytrace=False)
            pytest.skip(f"e2e: {msg}")
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _new_daemon(proxy: ProxyUnderTest, rootfs: Path, bip: str, suffix: str) -> Daemon:
    name = f"{NETNS_PREFIX}{os.getpid()}{suffix}"
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir="/tmp"))
    d = Daemon(netns=Netns(name), workdir=workdir, proxy=proxy, bip=bip, rootfs=rootfs)
    _LIVE_DAEMONS.append(d)
    try:
        d.start()
    except BaseException:
        d.close()
        _LIVE_DAEMONS.remove(d)
        raise
    return d


def _finish(d: Daemon) -> None:
    try:
        d.close()
    finally:
        _LIVE_DAEMONS.remove(d)
    if d.leaks:
        pytest.fail("teardown found leftovers:\n" + "\n".join(d.leaks), pytrace=False)


@pytest.fixture(scope="session")
def dockerd(proxy_under_test, image_rootfs, e2e_network):
    """One daemon shared by the scenarios (started once)."""
    d = _new_daemon(proxy_under_test, image_rootfs, e2e_network[0], "")
    yield d
    _finish(d)


@pytest.fixture
def docker(dockerd):
    """The shared daemon, emptied of containers after each test, checked for leftover proxies."""
    yield dockerd
    if not dockerd.alive():
        pytest.fail("the shared dockerd died during the test\n" + dockerd.diagnostics(),
                    pytrace=False)
    dockerd.remove_all_containers()
    left = _wait_gone([p.pid for p in dockerd.proxies()], 10.0)
    if left:
        stray = [str(p) for p in dockerd.proxies()]
        for pid in left:
            _signal(pid, signal.SIGKILL)
        pytest.fail("proxy processes survived removal of every container:\n"
                    + "\n".join(stray) + "\n" + dockerd.diagnostics(), pytrace=False)


@pytest.fixture
def scratch_dockerd(proxy_under_test, image_rootfs, e2e_network):
    """A daemon of its own, for a test that stops it."""
    d = _new_daemon(proxy_under_test, image_rootfs, e2e_network[1], "-b")
    yield d
    _finish(d)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and rep.when in ("call", "setup"):
        already = str(rep.longrepr)
        for d in list(_LIVE_DAEMONS):
            if str(d.log) in already:
                continue  # the assertion message carries it already
            try:
                text = d.diagnostics(lines=60)
            except Exception as e:  # diagnostics must never hide the real failure
                text = f"<diagnostics unavailable: {e!r}>"
            rep.sections.append((f"dockerd {d.netns.name}", text))



def pytest_report_collectionfinish(config, start_path, items):
    """Say in the header, before anything runs, that these tests start daemons.

    (pytest_report_header would not do: a conftest below the test root is
    loaded only during collection, after the header is printed.)
    """
    if not any(HERE in Path(str(item.path)).parents for item in items):
        return []
    why = _missing_prerequisite()
    if why is None:
        path, _ = _proxy_path()
        return [f"e2e: starts private dockerd and containerd daemons (own data-root, socket and "
                f"network namespace {NETNS_PREFIX}*, all removed afterwards; the host's dockerd "
                f"is not used), userland proxy {path}, standalone, in engine mode and in "
                f"engine mode with the fast path (attached to child cgroups "
                f"{NETNS_PREFIX}*-fp only)"]
    if os.environ.get("SPLICEPROXY_E2E_REQUIRE") == "1":
        return [f"e2e: will fail, prerequisites missing (SPLICEPROXY_E2E_REQUIRE=1): {why}"]
    return [f"e2e: skipped, starts no daemon: {why}"]
