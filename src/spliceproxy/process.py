"""The proxy process: what happens between dockerd's exec and exit.

dockerd starts one proxy per published port with a pipe on fd 3 and, from
28.0 on, the listening socket on fd 4 (see docs: docker-proxy's interface).
This module keeps docker-proxy's contract exactly:

* flag errors exit 2 with nothing on fd 3; ``-h`` and ``-v`` exit 0;
* once the listener is ready, ``0\\n`` is written to fd 3 in one write and
  fd 3 is closed; a startup failure writes ``1\\n<message>`` and exits 1;
* SIGINT and SIGTERM end the process with status 0 at once.

The order of start-up is what makes a failure cheap and harmless: the
command line, then every setting, then the identity to become, then the
files, and only then the listener, so a bad setting never leaves the port
bound.  SIGHUP reopens the log file (logrotate).

Imports are kept to the minimum: the process is started once per port.
"""

from __future__ import annotations

import _signal
import os

from spliceproxy import _engine, goflags, settings
from spliceproxy.helptext import HELP_POINTER
from spliceproxy.log import Logger
from spliceproxy.proxy import Proxy, StartupError, go_strerror
from spliceproxy.status import StatusPipe


class _Signals:
    """What the handlers saw; read by the loop between engine runs."""

    __slots__ = ("stop", "hup", "rfd")

    def __init__(self) -> None:
        self.stop = False
        self.hup = False
        # Handlers and the wakeup descriptor are in place before "0\n".
        self.rfd, wfd = os.pipe()
        os.set_blocking(wfd, False)
        os.set_blocking(self.rfd, False)
        _signal.signal(_signal.SIGINT, self._on_stop)
        _signal.signal(_signal.SIGTERM, self._on_stop)
        _signal.signal(_signal.SIGHUP, self._on_hup)
        _signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)

    def _on_stop(self, signum, frame) -> None:
        self.stop = True

    def _on_hup(self, signum, frame) -> None:
        self.hup = True

    def drain(self) -> None:
        try:
            while os.read(self.rfd, 256):
                pass
        except OSError:
            pass


FASTPATH_OFF = ("fast path not active: SPLICEPROXY_FASTPATH needs the host engine "
                "(engine mode, the default unless SPLICEPROXY_ENGINE is false), which owns "
                "the programs; every client of this proxy takes the relay")

# Set by the stub (csrc/stub/stub.c) when engine mode was wanted but no
# control socket is possible: the reason, logged once by the standalone proxy.
STANDALONE_WHY_ENV = "_SPLICEPROXY_STANDALONE_WHY"
STANDALONE_WHY = "engine mode not possible (%s): this port is served standalone, by this process"


def _start(argv: list[str], status: StatusPipe):
    """Everything up to a ready, unprivileged proxy; StartupError on failure."""
    from spliceproxy import files, identity

    config = goflags.parse(argv, HELP_POINTER)  # SystemExit(2/0) on flag errors, -h, -v
    try:
        conf = settings.load(mode="standalone")
    except settings.SettingError as e:
        # A setting of engine mode refused here says why this port is
        # standalone when it was meant for the engine (no socket possible).
        why = os.environ.get(STANDALONE_WHY_ENV)
        raise StartupError("%s (%s)" % (e, STANDALONE_WHY % why) if why and e.mode_refused
                           else str(e)) from None
    try:
        who = identity.choose(conf.user, conf.keep_privileges)
    except identity.IdentityError as e:
        raise StartupError(str(e)) from None
    try:
        log = Logger(conf.log_file)
    except files.FileRefused as e:
        raise StartupError("cannot open log file (SPLICEPROXY_LOG_FILE): %s" % e) from None
    why = os.environ.pop(STANDALONE_WHY_ENV, None)
    if why:
        # Meant for the host engine (the default), served here: say so once.
        log.log(STANDALONE_WHY % why)
    stats = None
    if conf.stats_file:
        from spliceproxy import statsfile

        try:
            stats = statsfile.open_for(conf.stats_file)
        except files.FileRefused as e:
            log.close()
            raise StartupError("cannot open counters file (SPLICEPROXY_STATS_FILE): %s"
                               % e) from None
    if conf.fastpath:
        # The programs are one set for the whole host, owned by the host
        # engine; a standalone proxy never loads them.
        log.log(FASTPATH_OFF)
    proxy = Proxy(config, conf, log, listen_fd_inherited=status.have_listen_fd)
    try:
        proxy.start(stats.fd if stats is not None else None)
    except StartupError as e:
        log.log(str(e))
        log.close()
        raise
    if who is not None:
        if os.geteuid() == 0 and who.uid != 0 and config.proto == "tcp":
            # Pipes made now count against root's pipe-user-pages limits;
            # made later they count against the uid's own budget.  Enough
            # for two busy connections; more are made on demand.
            proxy.reserve_pipes(4)
        try:
            _engine.drop_privileges(who.uid, who.gid)
        except OSError as e:
            msg = "cannot drop privileges to uid %d gid %d: %s: %s" % (
                who.uid, who.gid, e.filename, go_strerror(e.errno))
            log.log(msg)
            raise StartupError(msg) from None
    return proxy, log, stats


def main(argv: list[str]) -> None:
    """Run the proxy; never returns (exits with docker-proxy's codes)."""
    status = StatusPipe()
    try:
        # The launcher execs the interpreter; show the command's name instead.
        _engine.set_process_name(os.path.basename(argv[0]) if argv and argv[0] else "spliceproxy")
    except OSError:
        pass
    try:
        signals = _Signals()
        proxy, log, stats = _start(argv, status)
        proxy.watch(signals.rfd)
    except StartupError as e:
        status.failed(str(e))
        os._exit(1)
    except (OSError, ValueError) as e:
        # Not foreseen, but still a startup failure dockerd should be told
        # about in words, not an empty status pipe and a traceback.
        status.failed("cannot start: %s" % e)
        os._exit(1)
    status.ready()

    try:
        while not signals.stop and proxy.serving:
            rc = proxy.run()
            if rc == _engine.RUN_WATCH:
                signals.drain()
            if signals.hup:
                signals.hup = False
                log.reopen()
            log.flush()
    except KeyboardInterrupt:
        pass
    except OSError as e:
        log.log("Stopping proxy on %s for %s (engine: %s)" % (proxy.front, proxy.back,
                                                             go_strerror(e.errno or 5)))
    # Close every socket and free the engine (a few milliseconds even with
    # thousands of connections; it also lets leak checkers see a clean exit),
    # then skip interpreter teardown.  docker-proxy exits 0 on a stop signal
    # and when its listener fails.
    proxy.close()
    if stats is not None:
        stats.close()
    log.close()
    os._exit(0)
