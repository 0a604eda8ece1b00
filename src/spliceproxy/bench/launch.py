"""Start a userland proxy exactly the way dockerd does.

dockerd runs `<path> -proto P -host-ip IP -host-port N -container-ip IP
-container-port N [-use-listen-fd]` with stdin/stdout/stderr on /dev/null, the
write end of a pipe as fd 3 and, from 28.0 on, a bound (UDP) or listening (TCP)
socket as fd 4.  It reads the status with a single 2-byte read: b"0\\n" means
ready, anything else is followed by the error text up to EOF.  This module
reproduces that for tests and benchmarks, for spliceproxy and the reference
docker-proxy alike.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time

DOCKERD_STATUS_TIMEOUT = 16.0


class ProxyStartError(RuntimeError):
    """The proxy reported a startup failure on fd 3 (or timed out)."""

    def __init__(self, message: str, returncode: int | None = None):
        super().__init__(message)
        self.returncode = returncode


class LaunchedProxy:
    """A proxy process started like dockerd starts one."""

    def __init__(self, proc: subprocess.Popen, status: bytes, ready_s: float, argv: list[str]):
        self.proc = proc
        self.status = status
        self.ready_s = ready_s
        self.argv = argv

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, sig: int = signal.SIGINT, timeout: float = 5.0) -> int:
        """Stop it as dockerd does (SIGINT, then wait); returns the exit code."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def __enter__(self) -> LaunchedProxy:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            try:
                self.stop()
            except subprocess.TimeoutExpired:
                pass


def proxy_argv(path: str, proto: str, host_ip: str, host_port: int, container_ip: str,
               container_port: int, use_listen_fd: bool = False) -> list[str]:
    argv = [path, "-proto", proto, "-host-ip", host_ip, "-host-port", str(host_port),
            "-container-ip", container_ip, "-container-port", str(container_port)]
    if use_listen_fd:
        argv.append("-use-listen-fd")
    return argv


def spawn(argv: list[str], *, listen_sock=None, env: dict | None = None,
          stderr=subprocess.DEVNULL, status_pipe: bool = True,
          timeout: float = DOCKERD_STATUS_TIMEOUT, check: bool = True,
          preexec_fn=None) -> LaunchedProxy:
    """Spawn argv with a status pipe on fd 3 (and listen_sock on fd 4).

    Waits for the status like dockerd: one read of up to 2 bytes, then, if it
    is not b"0\\n", the rest up to EOF.  With check=True a failure raises
    ProxyStartError carrying the text; otherwise the LaunchedProxy is returned
    with .status holding whatever was read.
    """
    r = w = None
    pass_fds: list[int] = []
    if status_pipe:
        r, w = os.pipe()
    listen_fd = listen_sock.fileno() if listen_sock is not None else None

    def child_setup():
        # dockerd's children start with every signal at its default action
        # (Go resets handled signals on exec): undo what the caller may
        # ignore, e.g. SIGHUP under nohup or SIGINT in a background job.
        for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        # Put the status pipe on 3 and the socket on 4, inheritable, as Go's
        # ExtraFiles does; everything else stays close-on-exec.
        if listen_fd is not None:
            tmp = os.dup(listen_fd)
        if w is not None:
            os.dup2(w, 3)
            os.set_inheritable(3, True)
        if listen_fd is not None:
            os.dup2(tmp, 4)
            os.set_inheritable(4, True)
            os.close(tmp)
        if preexec_fn is not None:
            preexec_fn()

    if w is not None:
        pass_fds.append(3)
    if listen_fd is not None:
        pass_fds.append(4)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
        env=env, preexec_fn=child_setup, pass_fds=pass_fds, close_fds=True,
    )
    if w is None:
        return LaunchedProxy(proc, b"", 0.0, argv)
    os.close(w)
    try:
        status = _read_status(r, timeout)
    finally:
        os.close(r)
    ready = time.perf_counter() - t0
    lp = LaunchedProxy(proc, status, ready, argv)
    if check and status != b"0\n":
        _raise_status(lp, status)
    return lp


class ChildProcess:
    """A child started by spawn_dockerd, with the part of subprocess.Popen's
    interface LaunchedProxy and the benchmark use (pid, poll, wait, signals)."""

    def __init__(self, pid: int, argv: list[str]):
        self.pid = pid
        self.args = argv
        self.returncode: int | None = None
        self.stdin = self.stdout = self.stderr = None

    def _reaped(self, status: int) -> int:
        self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._reaped(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is not None:
            return self.returncode
        if timeout is not None:
            fd = os.pidfd_open(self.pid)
            try:
                if not select.select([fd], [], [], timeout)[0]:
                    raise subprocess.TimeoutExpired(self.args, timeout)
            finally:
                os.close(fd)
        return self._reaped(os.waitpid(self.pid, 0)[1])

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def spawn_dockerd(argv: list[str], *, env: dict | None = None, listen_sock=None,
                  netns: str | None = None, timeout: float = DOCKERD_STATUS_TIMEOUT,
                  check: bool = True) -> LaunchedProxy:
    """Spawn argv exactly as dockerd does and time it to the status, for benchmarks.

    The benchmark's load generator (lg_spawn) does what Go's os/exec does:
    clone(CLONE_VM | CLONE_VFORK), /dev/null on 0-2, the status pipe on fd 3
    and listen_sock on fd 4, SIGTERM as parent-death signal, every signal at
    its default.  spawn() above forks the Python process and runs a
    preexec_fn, which costs every path about 3 ms more than dockerd's start
    and so flattens the ratios between proxies.  ready_s runs from the call
    to the first (2-byte) status read.  netns: the namespace the calling
    thread enters first (dockerd is already in its own), outside the timing.
    argv[0] must be a path, as dockerd passes one.
    """
    from spliceproxy.bench import topology as topo_mod
    from spliceproxy.bench.loadgen import load

    ffi, lib = load()
    env = os.environ if env is None else env
    keep = [ffi.new("char[]", os.fsencode(a)) for a in argv]
    keep_env = [ffi.new("char[]", os.fsencode(k) + b"=" + os.fsencode(v))
                for k, v in env.items()]
    c_argv = ffi.new("char *[]", keep + [ffi.NULL])
    c_env = ffi.new("char *[]", keep_env + [ffi.NULL])
    cap = 65536
    buf = ffi.new("char[]", cap)
    got = ffi.new("int *")
    ready = ffi.new("double *")
    listen_fd = listen_sock.fileno() if listen_sock is not None else -1
    with topo_mod.in_netns(netns):
        pid = lib.lg_spawn(keep[0], c_argv, c_env, listen_fd, int(timeout * 1000), buf, cap,
                           got, ready)
    if pid < 0:
        raise ProxyStartError("cannot start %s: %s" % (argv[0], os.strerror(-pid)))
    status = bytes(ffi.buffer(buf, got[0])) if got[0] >= 0 else None
    lp = LaunchedProxy(ChildProcess(pid, argv), status, max(0.0, ready[0]) / 1e9, argv)
    if check and status != b"0\n":
        _raise_status(lp, status)
    return lp


def _raise_status(lp: LaunchedProxy, status: bytes | None) -> None:
    """The start failed: reap (or kill) the proxy and raise ProxyStartError with its text."""
    rc = None
    try:
        rc = lp.proc.wait(2.0)
    except subprocess.TimeoutExpired:
        lp.stop(signal.SIGKILL)
    if status is None:
        raise ProxyStartError("timed out starting the userland proxy", rc)
    text = status[2:].decode(errors="replace") if status.startswith(b"1\n") else status.decode(
        errors="replace")
    raise ProxyStartError(text or "proxy exited without a status (rc=%s)" % rc, rc)


def _read_status(fd: int, timeout: float) -> bytes | None:
    """dockerd's reader: one read into a 2-byte buffer, then ReadAll on failure."""
    deadline = time.monotonic() + timeout
    if not select.select([fd], [], [], timeout)[0]:
        return None
    first = os.read(fd, 2)
    if first == b"0\n":
        return first
    chunks = [first]
    while first:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        first = os.read(fd, 65536)
        chunks.append(first)
    return b"".join(chunks)
