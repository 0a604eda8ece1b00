"""A real rootless dockerd (RootlessKit, slirp4netns) run by a user of its own.

- ``missing(build)``: why a rootless dockerd of that build cannot run here.
- ``RootlessDaemon``: a throwaway user (with /etc/subuid and /etc/subgid
  ranges and its own XDG_RUNTIME_DIR), and docker.io's dockerd-rootless.sh
  run as that user with private paths and the proxy under test; ``close()``
  removes the containers, stops the daemon, kills whatever of the user's is
  still running (recorded in ``leaks``), and removes the user, its ranges, its
  runtime directory and the work directory.

slirp4netns and RootlessKit open /dev/net/tun as the user.  Where the
device is root's alone (mode 0600, a host without udev's rule), the daemon
is started in a mount namespace of its own over which a node of the same
device with mode 0666 is bound: the host's device stays as it is.

The ports dockerd publishes reach the host's namespace through RootlessKit's
port driver (builtin): dockerd 28 asks RootlessKit's API itself and starts
the userland proxy as given; dockerd 20.10 needs RootlessKit's
rootlesskit-docker-proxy as its userland proxy, which asks the API and then
runs `docker-proxy` from PATH, here a link to the proxy under test.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

from support import dockerd as dk

TOOLS = ("rootlesskit", "slirp4netns", "newuidmap", "newgidmap", "useradd", "userdel",
         "unshare", "setpriv")
TUN = Path("/dev/net/tun")
START_TIMEOUT = 40.0
STOP_TIMEOUT = 20.0
SUBID_COUNT = 65536


def script(build: dk.DockerBuild) -> Path:
    """The build's dockerd-rootless.sh."""
    base = Path("/") if build.root is None else build.root
    return base / "usr/share/docker.io/contrib/dockerd-rootless.sh"


def missing(build: dk.DockerBuild) -> str | None:
    """Why a rootless dockerd of build cannot run here, or None."""
    why = dk.missing_prerequisite() or build.missing()
    if why:
        return why
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return (f"rootless dockerd: `{tool}` not found "
                    "(apt-get install rootlesskit slirp4netns uidmap)")
    for tool in ("newuidmap", "newgidmap"):
        st = os.stat(shutil.which(tool))
        if not st.st_mode & stat.S_ISUID or st.st_uid != 0:
            return f"rootless dockerd: {tool} is not setuid root"
    if not script(build).is_file():
        return f"rootless dockerd {build.label}: no {script(build)}"
    if dk.major(build.label) < 28 and shutil.which("rootlesskit-docker-proxy") is None:
        return "rootless dockerd 20.10: no rootlesskit-docker-proxy (apt-get install rootlesskit)"
    if not TUN.exists():
        return f"rootless dockerd: no {TUN} (slirp4netns needs the tun driver)"
    return None


def _subid_ranges(path: str) -> list[tuple[int, int]]:
    out = []
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            parts = line.strip().split(":")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                out.append((int(parts[1]), int(parts[2])))
    return out


def _drop_subids(name: str) -> None:
    """Remove name's lines from /etc/subuid and /etc/subgid (userdel may keep them)."""
    for path in ("/etc/subuid", "/etc/subgid"):
        with contextlib.suppress(OSError):
            with open(path) as f:
                lines = f.readlines()
            keep = [ln for ln in lines if not ln.startswith(name + ":")]
            if keep != lines:
                tmp = f"{path}.{os.getpid()}"
                with open(tmp, "w") as f:
                    f.writelines(keep)
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)


def user_pids(uid: int) -> list[int]:
    """The live processes whose real uid is uid."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid and dk.alive(int(entry)):
                            out.append(int(entry))
                        break
        except (OSError, ValueError):
            continue
    return out


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0")[:-1]]
    except OSError:
        return []


def netns_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def remove_user(name: str) -> None:
    """Kill name's processes, delete the user, its group and its subordinate ranges."""
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        uid = None
    if uid is not None:
        pids = user_pids(uid)
        for pid in pids:
            dk.signal_pid(pid, signal.SIGKILL)
        dk.wait_gone(pids, 5.0)
        subprocess.run(["userdel", name], capture_output=True, timeout=30)
        shutil.rmtree(f"/run/user/{uid}", ignore_errors=True)
    _drop_subids(name)


def clean_stale(prefix: str) -> list[str]:
    """The users of runs of this prefix whose process is gone (<prefix>rl<pid>)."""
    shape = re.compile(re.escape(prefix) + r"rl(\d+)$")
    gone = []
    for entry in pwd.getpwall():
        m = shape.match(entry.pw_name)
        if m and not dk._creator_alive(int(m.group(1))):
            remove_user(entry.pw_name)
            gone.append(entry.pw_name)
    return gone


class RootlessDaemon:
    """dockerd-rootless.sh of build, run by a user created for it."""

    def __init__(self, build: dk.DockerBuild, proxy: str, prefix: str, bip: str,
                 env: dict | None = None):
        self.build = build
        self.env = dict(env or {})
        self.proxy = proxy
        self.user = f"{prefix}rl{os.getpid()}"
        self.bip = bip
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-rootless-",
                                             dir="/tmp"))
        self.workdir.chmod(0o755)
        self.log = self.workdir / "dockerd.log"
        self.uid = self.gid = -1
        self.runtime: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.leaks: list[str] = []
        self.made_run_user = False

    @property
    def mode(self) -> str:
        return "standalone" if self.env.get("SPLICEPROXY_ENGINE") == "0" else "engine"

    # -- the user ------------------------------------------------------

    def _create_user(self) -> None:
        home = self.workdir / "home"
        r = subprocess.run(["useradd", "--create-home", "--home-dir", str(home),
                            "--shell", "/usr/sbin/nologin", "--user-group", self.user],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"useradd {self.user}: {r.stderr.strip()}")
        entry = pwd.getpwnam(self.user)
        self.uid, self.gid = entry.pw_uid, entry.pw_gid
        # useradd gives a new user subordinate ranges where login.defs says
        # so; otherwise one above every range there is.
        for path in ("/etc/subuid", "/etc/subgid"):
            with open(path) as f:
                if any(ln.startswith(self.user + ":") for ln in f):
                    continue
            ranges = _subid_ranges("/etc/subuid") + _subid_ranges("/etc/subgid")
            start = max([100000] + [s + c for s, c in ranges])
            with open(path, "a") as f:
                f.write(f"{self.user}:{start}:{SUBID_COUNT}\n")
        runtime = Path(f"/run/user/{self.uid}")
        if runtime.exists():
            raise RuntimeError(f"{runtime} exists already (a user {self.uid} logged in?)")
        if not runtime.parent.exists():
            runtime.parent.mkdir(mode=0o755)
            self.made_run_user = True
        runtime.mkdir(mode=0o700)
        os.chown(runtime, self.uid, self.gid)
        self.runtime = runtime
        data = self.workdir / "data"
        data.mkdir(mode=0o700)
        os.chown(data, self.uid, self.gid)

    def as_user(self, argv, **env) -> list[str]:
        base = {"HOME": str(self.workdir / "home"), "USER": self.user,
                "XDG_RUNTIME_DIR": str(self.runtime),
                "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"}
        base.update(env)
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups",
                "env", "-i", *[f"{k}={v}" for k, v in base.items()], *map(str, argv)]

    # -- the daemon ----------------------------------------------------

    @property
    def sock(self) -> str:
        return f"{self.runtime}/rl-docker.sock"

    @property
    def pidfile(self) -> Path:
        return Path(f"{self.runtime}/rl-docker.pid")

    def start(self) -> None:
        self._create_user()
        front = Path(self.proxy).parent / "spliceproxy-front"
        r = subprocess.run(self.as_user(["sh", "-c", 'test -x "$0" && test -r "$1"',
                                         self.proxy, front]), capture_output=True, timeout=10)
        if r.returncode != 0:
            raise RuntimeError(f"{self.proxy} or {front} cannot be run by another user "
                               "(install spliceproxy where every user can read it)")
        path = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
        env = {"SPLICEPROXY_ENGINE_IDLE_EXIT": "1s", **self.env}
        args = ["--data-root", self.workdir / "data", "--exec-root", f"{self.runtime}/rl-exec",
                "-H", f"unix://{self.sock}", "--pidfile", self.pidfile, "--bip", self.bip,
                "--exec-opt", "native.cgroupdriver=cgroupfs"]
        if self.build.root is not None:
            path = f"{self.build.root / 'usr/bin'}:{path}"
            env["DOCKERD"] = str(self.build.dockerd)
        if dk.major(self.build.label) >= 28:
            args += ["--userland-proxy-path", self.proxy]
        else:
            bindir = self.workdir / "bin"
            bindir.mkdir(mode=0o755)
            (bindir / "docker-proxy").symlink_to(self.proxy)
            path = f"{bindir}:{path}"
        launch = self.as_user([script(self.build), *args], PATH=path, **env)
        # setpriv's parent-death signal: a killed test run takes RootlessKit
        # (and with it dockerd) along.
        launch.insert(1, "--pdeathsig=SIGTERM")
        tun_mode = os.stat(TUN).st_mode & 0o777
        if tun_mode & 0o006 != 0o006:
            node = self.workdir / "tun"
            st = os.stat(TUN)
            os.mknod(node, stat.S_IFCHR | 0o666, st.st_rdev)
            os.chmod(node, 0o666)
            launch = ["unshare", "--mount", "--propagation", "private", "sh", "-ec",
                      'mount --bind "$0" /dev/net/tun && exec "$@"', str(node), *launch]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(launch, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, cwd="/")
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rootless dockerd exited ({self.proc.returncode}):\n"
                                   + dk.tail(self.log, 40))
            if os.path.exists(self.sock) and self.docker("version", check=False,
                                                         timeout=10).returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError("rootless dockerd did not answer within "
                           f"{START_TIMEOUT:.0f} s:\n{dk.tail(self.log, 40)}")

    def docker(self, *args, check: bool = True, timeout: float = dk.CMD_TIMEOUT,
               stdin=None) -> subprocess.CompletedProcess:
        r = subprocess.run(self.as_user(["docker", "-H", f"unix://{self.sock}", *args]),
                           capture_output=True, text=True, timeout=timeout, stdin=stdin)
        if check and r.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed rc={r.returncode}: "
                                 f"{r.stderr.strip()}\n--- daemon log\n{dk.tail(self.log, 30)}")
        return r

    def dockerd_pid(self) -> int:
        return int(self.pidfile.read_text().strip())

    def child_pid(self) -> int:
        """RootlessKit's child: the process that holds its namespaces (dockerd's parent)."""
        with open(f"/proc/{self.dockerd_pid()}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])

    def in_namespaces(self, argv) -> list[str]:
        """argv as the user, in RootlessKit's user, network and mount namespaces."""
        return self.as_user(["nsenter", "-U", "--preserve-credentials", "-n", "-m",
                             "-t", str(self.child_pid()), *argv])

    # -- teardown ------------------------------------------------------

    def close(self) -> None:
        try:
            self._stop()
        finally:
            if self.uid >= 0:
                left = user_pids(self.uid)
                if left:
                    self.leaks += [f"{p} {' '.join(cmdline(p))}" for p in left]
                remove_user(self.user)
            else:
                _drop_subids(self.user)
            if self.made_run_user:
                with contextlib.suppress(OSError):
                    os.rmdir("/run/user")
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None and os.path.exists(self.sock):
            r = self.docker("ps", "-aq", check=False, timeout=20)
            ids = r.stdout.split() if r.returncode == 0 else []
            if ids:
                self.docker("rm", "-f", *ids, check=False, timeout=30)
        with contextlib.suppress(OSError, ValueError):
            dk.signal_pid(self.dockerd_pid(), signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.leaks.append("RootlessKit did not exit after dockerd's SIGTERM")
            self.proc.kill()
            self.proc.wait(timeout=10)
        # What outlives RootlessKit by design: an engine exits once idle
        # (1 s here); anything else of the user's is a leak.
        dk.wait_gone(user_pids(self.uid), 10.0)
