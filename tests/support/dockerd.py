"""A private dockerd in its own network namespace, and what the dockerd suite
(tests/e2e) needs around it.

- ``DockerBuild``: which daemon: the system's dockerd 20.10 (Debian 12's
  docker.io) or Debian unstable's dockerd 28.5 unpacked by
  scripts/fetch-docker-sid (its own containerd and shim first on PATH, the
  system's runc).
- ``Netns``: a named network namespace and the client (netns_client.py) run
  inside it.
- ``Daemon``: dockerd + containerd with private paths (data-root, exec-root,
  socket, pidfile, containerd's root and state) in one temporary directory and
  one network namespace, started with the proxy under test as userland proxy;
  ``close()`` removes containers, stops both daemons, kills whatever is still
  running in the namespace (and records it as a leak), unmounts what is left
  under the directory, deletes the namespace and the directory.
- ``clean_stale``: what an interrupted run of the suite left behind.

The daemons are started with the parent-death signal set, so a test run that
is killed takes its daemons with it; its namespaces, cgroups and directories
are removed by the next run (``clean_stale``).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from spliceproxy import fastpath as fastpath_mod
from spliceproxy.bench import procs, topology

E2E = Path(__file__).resolve().parent.parent / "e2e"
CLIENT = E2E / "netns_client.py"
BUSYBOX = Path("/bin/busybox")
IMAGE = "local/spe2e-busybox:test"
NETNS_DIR = Path("/var/run/netns")
# Moves the shell into the cgroup ($0), then becomes the command.
CGROUP_LAUNCH = 'echo $$ > "$0/cgroup.procs" && exec "$@"'

CMD_TIMEOUT = 60.0
START_TIMEOUT = 40.0
STOP_TIMEOUT = 25.0

# Where scripts/fetch-docker-sid unpacks dockerd 28.5 unless told otherwise.
DOCKER_SID_DEFAULT = "/var/cache/spliceproxy/docker-sid"
# The names a run gives its daemons' namespaces after <prefix><pid>: the
# shared daemon's (none) and the scratch daemon's.
NETNS_TAIL = r"(?:-b)?"


def required() -> bool:
    """In CI (SPLICEPROXY_E2E_REQUIRE=1) a missing prerequisite is an error."""
    return os.environ.get("SPLICEPROXY_E2E_REQUIRE") == "1"


def unmet(why: str) -> None:
    """Skip with why, or fail with it when the suite is required to run."""
    if required():
        pytest.fail(f"e2e prerequisite missing with SPLICEPROXY_E2E_REQUIRE=1: {why}",
                    pytrace=False)
    pytest.skip(f"e2e: {why}")


# --------------------------------------------------------------------------
# which dockerd


@dataclass(frozen=True)
class DockerBuild:
    """One dockerd to run the suite against.

    root None: the system's (dockerd, containerd from PATH); else a tree
    unpacked by scripts/fetch-docker-sid, whose usr/bin goes first on the
    daemons' PATH (its containerd and containerd-shim-runc-v2; runc stays the
    system's)."""

    label: str
    root: Path | None = None

    @property
    def dockerd(self) -> str | None:
        if self.root is None:
            return shutil.which("dockerd")
        return str(self.root / "usr/sbin/dockerd")

    @property
    def containerd(self) -> str | None:
        if self.root is None:
            return shutil.which("containerd")
        return str(self.root / "usr/bin/containerd")

    @property
    def docker_proxy(self) -> str:
        """This release's own docker-proxy (the reference)."""
        if self.root is None:
            return "/usr/sbin/docker-proxy"
        return str(self.root / "usr/sbin/docker-proxy")

    def env(self, base: dict | None = None) -> dict:
        env = dict(os.environ if base is None else base)
        if self.root is not None:
            env["PATH"] = f"{self.root / 'usr/bin'}:{env.get('PATH', '/usr/sbin:/usr/bin')}"
        return env

    def missing(self) -> str | None:
        """Why this build cannot run here, or None."""
        if self.root is None:
            return None
        if not (self.root / ".complete").exists():
            return (f"dockerd {self.label}: {self.root} holds no complete unpack; run "
                    f"`sudo scripts/fetch-docker-sid {self.root}` (or set "
                    "SPLICEPROXY_DOCKER_SID to its directory)")
        for prog in (self.dockerd, self.containerd,
                     str(self.root / "usr/bin/containerd-shim-runc-v2")):
            if not os.access(prog, os.X_OK):
                return f"dockerd {self.label}: {prog} is missing"
        if shutil.which("runc") is None:
            return f"dockerd {self.label}: no runc on PATH (apt-get install runc)"
        return None


def docker_builds() -> dict[str, DockerBuild]:
    """The daemons the suite runs against, by label."""
    sid = os.environ.get("SPLICEPROXY_DOCKER_SID") or DOCKER_SID_DEFAULT
    return {"20.10": DockerBuild("20.10"), "28.5": DockerBuild("28.5", Path(sid))}


def major(version: str) -> int:
    """20 of "20.10.24+dfsg1"."""
    m = re.match(r"(\d+)\.", version)
    return int(m.group(1)) if m else 0


# --------------------------------------------------------------------------
# a killed run's leftovers


def clean_stale(prefix: str) -> list[str]:
    """Remove what a run of the suite whose process is gone left behind.

    Namespaces of the suite's own shape (<prefix><pid>[-b]) and whatever runs
    in them go the way the bench's go (topology.clean_stale); then the
    containers of that run's daemons (should the daemons have been killed
    before they could stop them), the mounts under its directories, the
    directories and the clients' cgroups.
    """
    removed = topology.clean_stale(prefix, tail=NETNS_TAIL)
    shape = re.compile(re.escape(prefix) + r"(\d+)(?:-.*)?$")
    stale_pids = set()
    dirs = []
    for entry in Path("/tmp").iterdir():
        m = shape.match(entry.name)
        if m and entry.is_dir() and not _creator_alive(int(m.group(1))):
            dirs.append(entry)
            stale_pids.add(int(m.group(1)))
    removed += [f"{prefix}{pid}" for pid in stale_pids]
    # Containers run in mount namespaces of their own (their root shows as
    # "/"): they are found by their ids, which name their cgroups.
    ids = set()
    for d in dirs:
        with contextlib.suppress(OSError):
            ids.update(os.listdir(d / "data" / "containers"))
    killed: list[int] = []
    if ids:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cgroup") as f:
                    groups = f.read()
            except OSError:
                continue
            if any(f"/{cid}\n" in groups or f"-{cid}.scope" in groups for cid in ids):
                signal_pid(int(entry), signal.SIGKILL)
                killed.append(int(entry))
        wait_gone(killed, 5.0)
        for cid in ids:  # their cgroups, empty now (cgroupfs driver: <hierarchy>/docker/<id>)
            for cg in glob.glob(f"/sys/fs/cgroup/docker/{cid}") + \
                    glob.glob(f"/sys/fs/cgroup/*/docker/{cid}"):
                with contextlib.suppress(OSError):
                    os.rmdir(cg)
    for d in dirs:
        unmount_under(d)
        shutil.rmtree(d, ignore_errors=True)
    cgroot = fastpath_mod.default_cgroup_path()
    if cgroot and os.path.isdir(cgroot):
        for entry in Path(cgroot).iterdir():
            m = shape.match(entry.name)
            if m and entry.name.endswith("-fp") and not _creator_alive(int(m.group(1))):
                with contextlib.suppress(OSError):
                    for p in (entry / "cgroup.procs").read_text().split():
                        signal_pid(int(p), signal.SIGKILL)
                    wait_gone([int(p) for p in (entry / "cgroup.procs").read_text().split()],
                              5.0)
                    entry.rmdir()
    return sorted(set(removed))


def _creator_alive(pid: int) -> bool:
    return pid == os.getpid() or procs.alive(pid)


def unmount_under(path: Path) -> None:
    """Lazily unmount every mount point at or below path, deepest first."""
    prefix = str(path)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    mine = [p for p in points if p == prefix or p.startswith(prefix + "/")]
    for point in sorted(set(mine), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=10)

# --------------------------------------------------------------------------
# prerequisites


def is_static_elf(path: Path) -> bool:
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


def proxy_program() -> tuple[str | None, str]:
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


def missing_prerequisite() -> str | None:
    if sys.platform != "linux":
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root (network namespaces, dockerd)"
    for tool in ("dockerd", "docker", "containerd", "runc", "nsenter", "ip", "iptables", "gcc"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (apt-get install docker.io iproute2 iptables gcc libc6-dev)"
    if not BUSYBOX.exists() or not is_static_elf(BUSYBOX):
        return f"{BUSYBOX} is missing or not static (apt-get install busybox-static)"
    path, why = proxy_program()
    if path is None:
        return why
    return None


def require_prerequisites() -> None:
    why = missing_prerequisite()
    if why is not None:
        unmet(why)


def busybox_rootfs(root: Path, page: str, applets) -> None:
    """Lay out an image root in root: busybox-static with links for applets,
    /www/index.html holding page (and a newline), an empty /tmp."""
    (root / "bin").mkdir()
    (root / "www").mkdir()
    (root / "tmp").mkdir()
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in applets:
        (root / "bin" / applet).symlink_to("busybox")
    (root / "www" / "index.html").write_text(page + "\n")


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


def alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pids, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    left = [p for p in pids if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if alive(p)]
    return left


def signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def tail(path: Path, lines: int) -> str:
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
            line = readline_with_timeout(p, 10.0)
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
        line = readline_with_timeout(p, 15.0)
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
            if (st.st_dev, st.st_ino) == want and alive(int(entry)):
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

    def listeners(self, proto: str, port: int) -> dict[str, int]:
        """Local address -> socket inode of the sockets bound to port (TCP:
        listening) in the namespace, from ss."""
        flag = "-t" if proto == "tcp" else "-u"
        r = self.run(["ss", "-H", "-l", "-n", "-e", flag, "sport", "=", f":{port}"],
                     check=True)
        out = {}
        for line in r.stdout.splitlines():
            words = line.split()
            ino = [w for w in words if w.startswith("ino:")]
            if len(words) > 3 and ino:
                out[words[3].rsplit(":", 1)[0].strip("[]")] = int(ino[0][4:])
        return out

    def delete(self) -> None:
        if self.path.exists():
            subprocess.run(["ip", "netns", "del", self.name], timeout=10, capture_output=True)


def readline_with_timeout(p: subprocess.Popen, timeout: float) -> str:
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
    build: DockerBuild = field(default_factory=lambda: DockerBuild("system"))
    dockerd: subprocess.Popen | None = None
    containerd: subprocess.Popen | None = None
    leaks: list[str] = field(default_factory=list)
    #: more dockerd flags (e.g. --iptables=false) and environment for the proxies
    extra_args: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)
    #: what `docker version` says of the server, once started
    version: str = ""
    #: engine mode: the directory of every namespace's engine socket, shared with
    #: the session's other daemons and an engine of the host's namespace, as
    #: /run/spliceproxy is on a host; the socket is this namespace's own in it
    engine_dir: Path | None = None

    @property
    def major(self) -> int:
        return major(self.version)

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
        """The control socket of the engine of this daemon's namespace (engine
        mode), named after the namespace in the session's engine directory."""
        from spliceproxy import control

        assert self.engine_dir is not None, "engine mode needs the session's engine_dir"
        return self.engine_dir / control.socket_name(self.netns.ino())

    @property
    def metrics_socket(self) -> Path:
        """Where the engine of this daemon's namespace serves /metrics (engine mode)."""
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
        env = self.build.env()
        env["SPLICEPROXY_LOG_FILE"] = str(self.proxy_log)
        for k in ("SPLICEPROXY_ENGINE", "SPLICEPROXY_ENGINE_SOCKET", "SPLICEPROXY_ENGINE_DIR",
                  "SPLICEPROXY_ENGINE_IDLE_EXIT", "SPLICEPROXY_FASTPATH",
                  "SPLICEPROXY_FASTPATH_CGROUP", "SPLICEPROXY_METRICS_ADDR"):
            env.pop(k, None)
        if self.proxy.engine:
            env["SPLICEPROXY_ENGINE"] = "1"
            # No socket named: each stub finds its own namespace's engine.
            env["SPLICEPROXY_ENGINE_DIR"] = str(self.engine_dir)
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
            self.build.dockerd,
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
        # SIGTERM when the test run dies (killed, cancelled): dockerd goes with it.
        with open(self.log, "ab") as logf:
            self.dockerd = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                            stderr=subprocess.STDOUT, env=env,
                                            preexec_fn=topology.child_preexec(None))
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.dockerd.poll() is not None:
                raise RuntimeError(f"dockerd exited with {self.dockerd.returncode}"
                                   f" during startup\n{self.diagnostics()}")
            r = self.docker("version", "--format", "{{.Server.Version}}", check=False,
                            timeout=10)
            if r.returncode == 0:
                self.version = r.stdout.strip()
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
                        signal_pid(int(pid), signal.SIGKILL)
                    wait_gone([int(p) for p in procs], 5.0)
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
        argv = self.netns.cmd([self.build.containerd, "--config", c / "config.toml"])
        with open(self.containerd_log, "ab") as logf:
            self.containerd = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                               stderr=subprocess.STDOUT, env=self.build.env(),
                                               preexec_fn=topology.child_preexec(None))
        deadline = time.monotonic() + START_TIMEOUT
        while not (c / "containerd.sock").exists():
            if self.containerd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("containerd did not come up\n"
                                   + tail(self.containerd_log, 40))
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
            left = wait_gone(self.netns.pids(), 5.0)
            if left:
                self.leaks.append("processes left in the namespace after dockerd and containerd"
                                  " stopped:\n" + "\n".join(map(str, self.netns.ps())))
                for pid in left:
                    signal_pid(pid, signal.SIGKILL)
                wait_gone(left, 5.0)
        finally:
            self._remove_cgroup()
            self._unmount_all()
            self.netns.delete()
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _unmount_all(self) -> None:
        unmount_under(self.workdir)

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
        return [e for e in self._ours() if not is_engine(e)]

    def engines(self) -> list[PsEntry]:
        """The host engine(s) serving this daemon's mappings (engine mode)."""
        return [e for e in self._ours() if is_engine(e)]

    def status(self) -> dict:
        """`spliceproxy status --json` run in this daemon's namespace, as a user
        there runs it: its namespace's engine."""
        r = subprocess.run(self.status_argv("--json"), capture_output=True, text=True,
                           timeout=20, env=self.status_env())
        assert r.returncode == 0, f"spliceproxy status rc={r.returncode}: {r.stderr}"
        return json.loads(r.stdout)

    def status_argv(self, *flags: str) -> list[str]:
        return self.netns.cmd([self.proxy.path, "status", *flags])

    def status_env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "SPLICEPROXY_ENGINE_SOCKET"}
        env["SPLICEPROXY_ENGINE_DIR"] = str(self.engine_dir)
        return env

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
            f"--- dockerd {self.version or self.build.label} ({self.build.dockerd}),"
            f" proxy under test: {self.proxy.path}\n"
            f"--- processes in netns {self.netns.name}:\n{procs}\n"
            f"--- dockerd log ({self.log}), last {lines} lines:\n{tail(self.log, lines)}\n"
            f"--- proxy log (SPLICEPROXY_LOG_FILE), last {lines} lines:\n"
            f"{tail(self.proxy_log, lines)}"
        )


def is_engine(e: PsEntry) -> bool:
    return " engine --socket " in f" {e.args} "



# --------------------------------------------------------------------------
# what dockerd 28+ hands the proxy


@dataclass
class Bind:
    """One bind(2) of an IPv4 or IPv6 socket seen by BindTrace."""

    pid: int  # the thread's id, as strace -f prints it
    family: str
    port: int
    addr: str
    ok: bool


_BIND_RE = re.compile(r"^(\d+)\s+bind\(\d+, \{sa_family=(AF_INET6?), sin6?_port=htons\((\d+)\)"
                      r".*?(?:inet_addr\(\"([^\"]+)\"\)|inet_pton\(AF_INET6, \"([^\"]+)\")"
                      r"(?:.*\)\s+=\s+(-?\d+)|.*<unfinished \.\.\.>)")
# The end of a call strace printed as unfinished (another thread's came between).
_RESUMED_RE = re.compile(r"^(\d+)\s+<\.\.\. bind resumed>.*\)\s+=\s+(-?\d+)")


class BindTrace:
    """Every bind(2) made by a process (dockerd), all its threads and whatever
    it starts meanwhile (the proxies, an engine a stub starts), from
    `strace -f -p`.  Detached at the end: what it started keeps running,
    untraced.

        with BindTrace(d.pid, d.workdir / "binds.trace") as t:
            d.docker("run", ...)
        t.binds(port)
    """

    def __init__(self, pid: int, log: Path):
        self.pid, self.log = pid, log
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> BindTrace:
        if shutil.which("strace") is None:
            unmet("`strace` not found (apt-get install strace)")
        self.proc = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=bind", "-e",
                                      "signal=none", "-o", str(self.log), "-p", str(self.pid)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10.0
        while not self._traced():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._stop()
                raise AssertionError(f"strace did not attach to {self.pid}: "
                                     f"{self.proc.stderr.read().decode(errors='replace')}")
            time.sleep(0.01)
        return self

    def _traced(self) -> bool:
        """Every thread of the process has a tracer."""
        try:
            tasks = os.listdir(f"/proc/{self.pid}/task")
            for tid in tasks:
                with open(f"/proc/{self.pid}/task/{tid}/status") as f:
                    if "\nTracerPid:\t0\n" in f.read():
                        return False
        except OSError:
            return False
        return True

    def _stop(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5.0)
        self.proc.stderr.close()

    def __exit__(self, *exc) -> None:
        self._stop()

    def binds(self, port: int | None = None) -> list[Bind]:
        out = []
        pending: dict[int, Bind] = {}
        for line in self.log.read_text(errors="replace").splitlines():
            m = _BIND_RE.match(line)
            if m:
                b = Bind(int(m.group(1)), m.group(2), int(m.group(3)), m.group(4) or m.group(5),
                         m.group(6) == "0")
                if m.group(6) is None:
                    pending[b.pid] = b
                elif port is None or b.port == port:
                    out.append(b)
                continue
            m = _RESUMED_RE.match(line)
            if m and int(m.group(1)) in pending:
                b = pending.pop(int(m.group(1)))
                b.ok = m.group(2) == "0"
                if port is None or b.port == port:
                    out.append(b)
        return out


def socket_inodes(pid: int) -> set[int]:
    """The socket inodes among pid's descriptors."""
    out = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    out.add(int(target[8:-1]))
    return out
