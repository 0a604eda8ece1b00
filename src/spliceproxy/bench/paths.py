"""The paths a client can take to the container's servers, and their proxies.

Each proxy is started exactly as dockerd 20.10 starts it (argv, fd 3 status
pipe, /dev/null stdio, SIGTERM as parent-death signal, clone with CLONE_VM |
CLONE_VFORK as Go's os/exec: launch.spawn_dockerd), one process per
published port, in the host namespace.  The spliceproxy paths run in
engine mode, the default users run: their stubs hand the mappings to an
engine of the path's own (bench.engine.PrivateEngine), whose process is the
one measured; spliceproxy-standalone serves each port in its own process.
The reference docker-proxy is 28.5 (scripts/fetch-docker-sid) when fetched,
and the system's (Debian 12: 20.10) is a second reference path.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

from spliceproxy.bench import topology as topo_mod
from spliceproxy.bench.launch import LaunchedProxy, proxy_argv, spawn_dockerd

# Backend ports in the container (each path gets its own set, ECHO + 10 * i
# and so on: connections of one path then never compete with another's
# TIME_WAIT sockets for 4-tuples), published ports on the host per path.
ECHO, SINK, UDP = 7001, 7002, 7003
PORT_BASE = {"iptables": 8100, "spliceproxy": 8200, "docker-proxy": 8300,
             "haproxy": 8400, "socat": 8500, "spliceproxy-spin": 8600,
             "fastpath": 8700, "spliceproxy-standalone": 8800, "docker-proxy-20.10": 8900}
USERLAND = ("spliceproxy", "docker-proxy", "haproxy", "socat", "spliceproxy-spin",
            "spliceproxy-standalone", "docker-proxy-20.10")
# The aggregate group's published ports per path: AGG_PORTS to the echo
# server, as many to the sink, each its own mapping (roles aggN, aggsinkN).
AGG_PORTS = 4
AGG_OFFSET = 10
# docker-proxy 28.5 as scripts/fetch-docker-sid unpacks it, the reference;
# the system's docker-proxy (Debian 12: 20.10) is the second one.
DOCKER_SID_DEFAULT = "/var/cache/spliceproxy/docker-sid"
SYSTEM_DOCKER_PROXY = "/usr/sbin/docker-proxy"
DOCKER_PROXY_OLD = "docker-proxy-20.10"
# The busy-poll the spliceproxy-spin path runs with (SPLICEPROXY_SPIN).
SPIN = "50us"
# The path table: name -> the Paths method that starts it and returns its
# PathRuntime (or None, with the reason in Paths.skipped).  A new path (e.g.
# spliceproxy's fast path) is one entry here, one starter method and, for a
# proxy, a PORT_BASE entry.
PATHS = {
    "native": "_start_native",
    "iptables": "_start_iptables",
    "spliceproxy": "_start_spliceproxy",
    "docker-proxy": "_start_docker_proxy",
    "haproxy": "_start_haproxy",
    "socat": "_start_socat",
    "spliceproxy-spin": "_start_spliceproxy_spin",
    "fastpath": "_start_fastpath",
    "spliceproxy-standalone": "_start_spliceproxy_standalone",
    "docker-proxy-20.10": "_start_docker_proxy_old",
}
ALL_PATHS = tuple(PATHS)


@dataclass
class Endpoint:
    echo: tuple | None
    sink: tuple | None
    udp: tuple | None


@dataclass
class PathRuntime:
    name: str
    procs: dict = field(default_factory=dict)  # role -> LaunchedProxy or Popen
    stats_files: dict = field(default_factory=dict)  # role -> counters file (spliceproxy)
    external: Endpoint | None = None
    loopback: Endpoint | None = None
    note: str = ""
    fastpath: object = None  # the fastpath path's spliceproxy.fastpath.FastPath
    engine: object = None  # engine mode: the bench.engine.PrivateEngine relaying every role
    agg: dict = field(default_factory=dict)  # "echo"/"sink" -> the aggregate group's addresses

    def pid(self, role: str) -> int | None:
        """The process relaying role: the engine in engine mode (the stubs only wait)."""
        if self.engine is not None:
            return self.engine.pid
        p = self.procs.get(role) or self.procs.get("all")
        return p.pid if p is not None else None

    def pids(self, roles) -> list[int]:
        """The distinct processes relaying roles (one engine, or one process per port)."""
        out = []
        for role in roles:
            pid = self.pid(role)
            if pid is not None and pid not in out:
                out.append(pid)
        return out

    @property
    def tree(self) -> bool:
        return self.name == "socat"


def docker_proxy_sid(env=None) -> str | None:
    """docker-proxy 28.5 as scripts/fetch-docker-sid left it (SPLICEPROXY_DOCKER_SID,
    else its default directory), or None."""
    env = os.environ if env is None else env
    d = env.get("SPLICEPROXY_DOCKER_SID") or DOCKER_SID_DEFAULT
    exe = os.path.join(d, "usr", "sbin", "docker-proxy")
    return exe if os.access(exe, os.X_OK) else None


def find_docker_proxy(given: str | None = None) -> str | None:
    """The reference: given, else the fetched 28.5, else PATH's or /usr/sbin's."""
    for cand in (given, docker_proxy_sid(), shutil.which("docker-proxy"), SYSTEM_DOCKER_PROXY):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def find_old_docker_proxy(reference: str | None) -> str | None:
    """The system's docker-proxy (Debian 12's 20.10) as a second reference,
    when installed and not the reference itself."""
    cand = SYSTEM_DOCKER_PROXY
    if not os.access(cand, os.X_OK):
        return None
    if reference and os.path.realpath(reference) == os.path.realpath(cand):
        return None
    return cand


def find_spliceproxy(given: str | None = None) -> str | None:
    import sysconfig

    # The console script itself: a version manager's shim would add its own
    # start-up time to spawn-to-ready.
    scripts = os.path.join(sysconfig.get_path("scripts"), "spliceproxy")
    for cand in (given, scripts, shutil.which("spliceproxy")):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def wait_listening(ip: str, port: int, netns: str | None, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with topo_mod.in_netns(netns):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.settimeout(0.5)
            s.connect((ip, port))
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("nothing listening on %s:%d" % (ip, port)) from None
            time.sleep(0.02)
        finally:
            s.close()


class Paths:
    """Starts and stops every available path; knows each one's endpoints."""

    def __init__(self, topo, *, spliceproxy: str | None, docker_proxy: str | None,
                 peers: bool = True, proxy_env: dict | None = None, only=None,
                 spin: str = SPIN):
        self.spin = spin
        self.topo = topo  # None: no namespaces (loopback only, current netns)
        self.sp_exe = spliceproxy
        self.dp_exe = docker_proxy
        self.dp_old_exe = find_old_docker_proxy(docker_proxy)
        self.peers = peers
        self.proxy_env = dict(os.environ)
        # dockerd's environment, not the harness's: no source-tree import path.
        self.proxy_env.pop("PYTHONPATH", None)
        self.proxy_env.update(proxy_env or {})
        # Each path says its mode: engine mode for spliceproxy and
        # spliceproxy-spin (an engine each), standalone for the path of
        # that name and the spawn group.
        self.standalone_env = dict(self.proxy_env, SPLICEPROXY_ENGINE="0")
        self.engines: list = []
        self.only = only
        self.runtimes: dict[str, PathRuntime] = {}
        self.skipped: dict[str, str] = {}
        self.tmp = tempfile.mkdtemp(prefix="spb-")
        self.server_procs: list = []
        self.cleanups: list = []  # undo steps of paths that hold more than processes

    # -- addresses -----------------------------------------------------------
    @property
    def backend_ip(self) -> str:
        return self.topo.addr.container if self.topo else "127.0.0.1"

    @property
    def host_ns(self):
        return self.topo.host if self.topo else None

    @property
    def client_ns(self):
        return self.topo.client if self.topo else None

    def _port(self, name: str, role: int) -> int:
        if self.topo:
            return PORT_BASE[name] + role
        with socket.socket() as s:  # no private namespace: take free ports
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    # -- lifecycle -----------------------------------------------------------
    def start(self, progress=lambda msg: None) -> None:
        wanted = self.only or ALL_PATHS
        for i, name in enumerate(wanted):
            try:
                progress("starting %s" % name)
                self._start_servers(i)
                rt = getattr(self, PATHS[name])()
            except Exception as exc:  # noqa: BLE001 - reported, path skipped
                self.skipped[name] = "failed to start: %s" % exc
                continue
            if rt is not None:
                self.runtimes[name] = rt

    def stop(self) -> None:
        for rt in self.runtimes.values():
            for p in rt.procs.values():
                _stop(p)
        self.runtimes.clear()
        # The stubs are gone: now their engines, each checked gone.
        errors = []
        while self.engines:
            try:
                self.engines.pop().stop()
            except RuntimeError as exc:
                errors.append(str(exc))
        for proc in self.server_procs:
            _stop(proc)
        self.server_procs.clear()
        while self.cleanups:
            self.cleanups.pop()()
        shutil.rmtree(self.tmp, ignore_errors=True)
        if errors:
            raise RuntimeError("; ".join(errors))

    def _start_servers(self, index: int) -> None:
        """The backend servers of one path; sets echo_port, sink_port, udp_port."""
        import sys

        ns = self.topo.container if self.topo else None
        pre = topo_mod.child_preexec(ns)
        ports = [p + 10 * index for p in (ECHO, SINK, UDP)] if self.topo else [0, 0, 0]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "spliceproxy.bench.servers", self.backend_ip]
                + [str(p) for p in ports], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                preexec_fn=pre, env=env)
        finally:
            if pre.fd >= 0:
                os.close(pre.fd)
        self.server_procs.append(proc)
        line = proc.stdout.readline().split()
        if len(line) != 3:
            raise RuntimeError("backend servers failed to start")
        self.echo_port, self.sink_port, self.udp_port = (int(p) for p in line)

    def _argv(self, exe: str, port: int, proto: str = "tcp") -> list[str]:
        return proxy_argv(exe, proto, "0.0.0.0", port, self.backend_ip, self.echo_port)

    def _spawn(self, exe: str, proto: str, port: int, backend_port: int, env=None,
               check: bool = True) -> LaunchedProxy:
        return spawn_dockerd(proxy_argv(exe, proto, "0.0.0.0", port, self.backend_ip,
                                        backend_port),
                             env=env if env is not None else self.proxy_env,
                             netns=self.host_ns, check=check)

    def _endpoints(self, ports) -> tuple[Endpoint, Endpoint]:
        e, s, u = ports
        h = self.topo.addr.host_ext if self.topo else None
        ext = Endpoint((h, e), (h, s), (h, u) if u else None) if self.topo else None
        lo = Endpoint(("127.0.0.1", e), ("127.0.0.1", s), ("127.0.0.1", u) if u else None)
        return ext, lo

    def _start_native(self) -> PathRuntime:
        b = self.backend_ip
        ep = Endpoint((b, self.echo_port), (b, self.sink_port), (b, self.udp_port))
        return PathRuntime("native", external=ep if self.topo else None, loopback=ep)

    def _start_iptables(self):
        if not self.topo:
            self.skipped["iptables"] = "needs root and network namespaces"
            return None
        base = PORT_BASE["iptables"]
        for proto, off, to in (("tcp", 0, self.echo_port), ("tcp", 1, self.sink_port),
                               ("udp", 2, self.udp_port)):
            self.topo.add_dnat(proto, base + off, self.topo.addr.container, to)
            # Host-local clients as dockerd serves them with the userland
            # proxy off: the reference the fast path must beat on loopback.
            self.topo.add_local_dnat(proto, base + off, self.topo.addr.container, to)
        ext, lo = self._endpoints([base, base + 1, base + 2])
        return PathRuntime("iptables", external=ext, loopback=lo,
                           note="loopback: nat OUTPUT DNAT, route_localnet, MASQUERADE")

    def _start_dockerish(self, name: str, exe: str, env_for, agg: bool = False) -> PathRuntime:
        rt = PathRuntime(name)
        try:
            ports = []
            for role, proto, backend in ((0, "tcp", self.echo_port), (1, "tcp", self.sink_port),
                                         (2, "udp", self.udp_port)):
                port = self._port(name, role)
                rt.procs[("echo", "sink", "udp")[role]] = self._spawn(
                    exe, proto, port, backend, env=env_for(rt, role))
                ports.append(port)
            rt.external, rt.loopback = self._endpoints(ports)
            if agg and self.topo:
                self._start_agg(rt, exe, env_for(rt, None))
        except BaseException:
            for p in rt.procs.values():
                _stop(p)
            raise
        return rt

    def _start_agg(self, rt, exe: str, env) -> None:
        """The aggregate group's mappings: AGG_PORTS published ports to the
        echo server and as many to the sink, each its own mapping (its own
        process for docker-proxy, one more mapping of the engine for
        spliceproxy); external clients only."""
        h = self.topo.addr.host_ext
        for kind, backend in (("echo", self.echo_port), ("sink", self.sink_port)):
            addrs = []
            for i in range(AGG_PORTS):
                port = self._port(rt.name, AGG_OFFSET + i + (AGG_PORTS if kind == "sink" else 0))
                rt.procs["agg%s%d" % (kind, i)] = self._spawn(exe, "tcp", port, backend, env=env)
                addrs.append((h, port))
            rt.agg[kind] = addrs

    def _start_spliceproxy(self, name: str = "spliceproxy", extra_env=None):
        """Engine mode: the stubs hand every mapping to an engine of this path's
        own, started by the first of them in the host namespace."""
        if not self.sp_exe:
            self.skipped[name] = "spliceproxy is not installed (no console script)"
            return None
        from spliceproxy.bench.engine import PrivateEngine

        eng = PrivateEngine(dict(self.proxy_env, **(extra_env or {})), self.tmp)
        self.engines.append(eng)
        rt = self._start_dockerish(name, self.sp_exe, lambda rt, role: eng.env,
                                   agg=name == "spliceproxy")
        rt.engine = eng
        eng.attach()
        rt.note = "engine mode, an engine of its own"
        return rt

    def _start_spliceproxy_standalone(self):
        """One relay process per port (SPLICEPROXY_ENGINE=0), each writing its
        counters file."""
        name = "spliceproxy-standalone"
        if not self.sp_exe:
            self.skipped[name] = "spliceproxy is not installed (no console script)"
            return None

        def env_for(rt, role):
            path = os.path.join(self.tmp, "stats-%s-%d" % (name, role))
            rt.stats_files[("echo", "sink", "udp")[role]] = path
            return dict(self.standalone_env, SPLICEPROXY_STATS_FILE=path)

        rt = self._start_dockerish(name, self.sp_exe, env_for)
        rt.note = "SPLICEPROXY_ENGINE=0"
        return rt

    def _start_spliceproxy_spin(self):
        """The same engine with the busy-poll on: compared with the plain relay
        in the same run, ratio by ratio."""
        rt = self._start_spliceproxy("spliceproxy-spin", {"SPLICEPROXY_SPIN": self.spin})
        if rt is not None:
            rt.note = "engine mode, SPLICEPROXY_SPIN=%s" % self.spin
        return rt

    def _start_docker_proxy(self):
        if not self.dp_exe:
            self.skipped["docker-proxy"] = ("docker-proxy not found (scripts/fetch-docker-sid, "
                                            "PATH, /usr/sbin)")
            return None
        return self._start_dockerish("docker-proxy", self.dp_exe, lambda rt, role: None,
                                     agg=True)

    def _start_docker_proxy_old(self):
        if not self.dp_old_exe:
            self.skipped[DOCKER_PROXY_OLD] = ("no second docker-proxy: %s is missing or is the "
                                              "reference" % SYSTEM_DOCKER_PROXY)
            return None
        return self._start_dockerish(DOCKER_PROXY_OLD, self.dp_old_exe, lambda rt, role: None)

    def _peer(self, name: str) -> str | None:
        """A peer's executable: none without peers, or (a skip noted) not installed."""
        exe = shutil.which(name) if self.peers else None
        if not exe and self.peers:
            self.skipped[name] = "%s not installed" % name
        return exe

    def _start_haproxy(self):
        exe = self._peer("haproxy")
        if not exe:
            return None
        ports = [self._port("haproxy", r) for r in (0, 1)]
        import resource

        # haproxy reserves about 2.5 fds per maxconn and refuses to start above
        # the hard limit.
        self.haproxy_maxconn = int((resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 600) / 2.5)
        cfg = os.path.join(self.tmp, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write("global\n  maxconn %d\n  nbthread 1\n" % self.haproxy_maxconn
                    +
                    "defaults\n  mode tcp\n  option splice-auto\n  timeout connect 5s\n"
                    "  timeout client 1h\n  timeout server 1h\n")
            for name, port, backend in (("echo", ports[0], self.echo_port),
                                        ("sink", ports[1], self.sink_port)):
                f.write("listen %s\n  bind 0.0.0.0:%d\n  server s %s:%d\n"
                        % (name, port, self.backend_ip, backend))
        pre = topo_mod.child_preexec(self.host_ns)
        try:
            p = subprocess.Popen([exe, "-db", "-f", cfg], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 preexec_fn=pre)
        finally:
            if pre.fd >= 0:
                os.close(pre.fd)
        rt = PathRuntime("haproxy", procs={"all": p}, note="one process, option splice-auto")
        for port in ports:
            wait_listening("127.0.0.1", port, self.host_ns)
        rt.external, rt.loopback = self._endpoints(ports + [None])
        return rt

    def _start_socat(self):
        exe = self._peer("socat")
        if not exe:
            return None
        rt = PathRuntime("socat", note="fork per connection")
        ports = []
        for role, proto, backend in ((0, "TCP", self.echo_port), (1, "TCP", self.sink_port),
                                     (2, "UDP", self.udp_port)):
            port = self._port("socat", role)
            listen = "%s-LISTEN:%d,fork,reuseaddr" % (proto, port)
            if proto == "TCP":
                listen += ",nodelay"
            pre = topo_mod.child_preexec(self.host_ns)
            try:
                p = subprocess.Popen([exe, listen, "%s:%s:%d" % (proto, self.backend_ip, backend)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, preexec_fn=pre)
            finally:
                if pre.fd >= 0:
                    os.close(pre.fd)
            rt.procs[("echo", "sink", "udp")[role]] = p
            ports.append(port)
        for port in ports[:2]:
            wait_listening("127.0.0.1", port, self.host_ns)
        time.sleep(0.05)
        rt.external, rt.loopback = self._endpoints(ports)
        return rt

    def _start_fastpath(self):
        """The relay with the kernel fast path in front (spliceproxy.fastpath).

        The relay adopts listeners made here (-use-listen-fd, as dockerd 28
        hands them over), which are tagged for the programs.  The programs
        sit on a child cgroup that this process joins, since the loopback
        clients run here; every path's clients then pay the hook, as every
        process on a host with the fast path does.  Only host-local clients
        are rewritten, so the path has no external endpoint; the relay's
        processes are not measured (no traffic crosses them)."""
        if not self.topo:
            self.skipped["fastpath"] = "needs root and network namespaces"
            return None
        if not self.sp_exe:
            self.skipped["fastpath"] = "spliceproxy is not installed (no console script)"
            return None
        from spliceproxy import fastpath

        root = fastpath.default_cgroup_path()
        if root is None:
            self.skipped["fastpath"] = "cgroup v2 is not mounted"
            return None
        cg = os.path.join(root, "spb-fastpath-%d" % os.getpid())
        os.mkdir(cg)
        self.cleanups.append(lambda: _remove_cgroup(cg))
        with topo_mod.in_netns(self.host_ns):
            fp = fastpath.load(cg)
        if not fp:
            self.skipped["fastpath"] = str(fp)
            return None
        self.cleanups.append(fp.close)
        ports = []
        for role, proto, backend in ((0, "tcp", self.echo_port), (1, "tcp", self.sink_port),
                                     (2, "udp", self.udp_port)):
            port = self._port("fastpath", role)
            kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
            with topo_mod.in_netns(self.host_ns):
                ls = socket.socket(socket.AF_INET, kind)
            self.cleanups.append(ls.close)
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind(("0.0.0.0", port))
            if kind == socket.SOCK_STREAM:
                ls.listen(4096)
            relay = spawn_dockerd(proxy_argv(self.sp_exe, proto, "0.0.0.0", port,
                                             self.backend_ip, backend, use_listen_fd=True),
                                  listen_sock=ls, env=self.standalone_env,
                                  netns=self.host_ns)
            self.cleanups.append(lambda r=relay: _stop(r))
            with topo_mod.in_netns(self.host_ns):
                m = fp.add_mapping(proto, "0.0.0.0", port, self.backend_ip, backend, ls)
            if "127.0.0.1" not in m.addresses:
                raise RuntimeError("fast path: no entry for 127.0.0.1 (%s)" % m.reason)
            ports.append(port)
        home = _join_cgroup(root, cg)
        self.cleanups.append(lambda: _join_cgroup(root, home))
        return PathRuntime("fastpath", loopback=self._endpoints(ports)[1], fastpath=fp,
                           note="kernel fast path; host-local clients only")


def _join_cgroup(root: str, path: str) -> str:
    """Move this process into cgroup v2 directory ``path``; return where it was."""
    with open("/proc/self/cgroup") as f:
        here = next(ln.split(":", 2)[2].strip() for ln in f if ln.startswith("0::"))
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    return os.path.join(root, here.lstrip("/"))


def _remove_cgroup(path: str) -> None:
    # Processes started while this one was inside are gone by now; a moment
    # may pass before the kernel lets the directory go.
    for _ in range(100):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)


def _stop(p) -> None:
    proc = p.proc if isinstance(p, LaunchedProxy) else p
    if proc.poll() is None:
        try:
            proc.terminate() if not isinstance(p, LaunchedProxy) else proc.send_signal(2)
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for s in (getattr(proc, "stdin", None), getattr(proc, "stdout", None)):
        if s is not None:
            s.close()
