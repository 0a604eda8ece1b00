"""Entry point: `spliceproxy <docker-proxy flags>`, or a subcommand.

dockerd never passes a positional argument first, so a subcommand name
cannot collide with the proxy's own command line.  Subcommands import what
they need themselves: the proxy's start-up path stays as lean as it was.
"""

import sys

# What `spliceproxy bench` needs beyond the package (the bench extra).
_BENCH_MODULES = (("_cffi_backend", "cffi"), ("pyroute2", "pyroute2"))


def _broken(what: str) -> int:
    """Report an unusable install on fd 3 (if open) and stderr; exit status 1."""
    import os

    msg = "spliceproxy: cannot start: " + what
    try:
        os.write(3, b"1\n" + msg.encode("utf-8", "replace"))
    except OSError:
        pass  # no status pipe: started by hand
    sys.stderr.write(msg + "\n")
    return 1


def _bench(argv0: str, argv: list[str]) -> int:
    # The gate reads JSON only and needs no extra; nor does reading the help.
    if argv[:1] != ["gate"] and not {"-h", "--help"} & set(argv):
        import importlib.util

        missing = [pkg for mod, pkg in _BENCH_MODULES if importlib.util.find_spec(mod) is None]
        if missing:
            sys.stderr.write(
                "spliceproxy bench needs the bench extra, which is not installed (missing: "
                "%s). Install it into this environment:\n    %s -m pip install "
                "'spliceproxy[bench]'\n(from a source tree: pip install '.[bench]').\n"
                % (", ".join(missing), sys.executable))
            return 1
        # Measure this very command.  The harness would look for it in the
        # interpreter's scripts directory, which under the launcher's -S is
        # the base interpreter's (/usr/bin), then on PATH, where a venv's
        # command is not and a pyenv shim may be.
        given = any(a == "--spliceproxy" or a.startswith("--spliceproxy=") for a in argv)
        path = None if given else install_path(argv0)
        if path is not None:
            argv = ["--spliceproxy", path, *argv]
    from spliceproxy.bench.cli import main as bench_main

    return bench_main(argv)


def _is_launcher(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return False
    return head.startswith(b"#!/bin/sh\n''':'\n# spliceproxy launcher.")


def _is_entry(path: str) -> bool:
    """Is path the installed `spliceproxy` command: the C stub (an ELF
    executable) with the Python launcher, spliceproxy-front, beside it?"""
    import os

    if os.path.basename(path) != "spliceproxy" or not os.access(path, os.X_OK):
        return False
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"\x7fELF":
                return False
    except OSError:
        return False
    return _is_launcher(os.path.join(os.path.dirname(path), "spliceproxy-front"))


def install_path(argv0: str) -> "str | None":
    """The real path of the `spliceproxy` command of this environment.

    Run through the command, argv[0] is the name the stub was run by (it
    passes it on; pipx's and uv's symlinks already resolved), or the
    launcher beside it when that is run itself; run as `python -m
    spliceproxy`, it is the command in this interpreter's scripts directory.
    """
    import os

    path = os.path.realpath(argv0)
    if _is_launcher(path):
        path = os.path.join(os.path.dirname(path), "spliceproxy")
    if _is_entry(path):
        return path
    import sysconfig

    path = os.path.realpath(os.path.join(sysconfig.get_path("scripts"), "spliceproxy"))
    return path if _is_entry(path) else None


def _install_path(argv0: str) -> int:
    import os
    import shutil

    path = install_path(argv0)
    if path is None:
        sys.stderr.write("spliceproxy install-path: no spliceproxy command is installed for %s\n"
                         % sys.executable)
        return 1
    sys.stdout.write(path + "\n")
    on_path = shutil.which("spliceproxy")
    if on_path and os.path.realpath(on_path) != path:
        sys.stderr.write(
            "note: `spliceproxy` on PATH is %s, %s; give dockerd the path above\n"
            % (on_path, "another install" if _is_entry(os.path.realpath(on_path))
               else "a wrapper (shim) that costs a shell and more per start"))
    return 0


def _incomplete(e: ImportError) -> int:
    if not (e.name or "").startswith("spliceproxy"):
        raise e  # not a part of this package: a bug, not a broken install
    return _broken(
        "the spliceproxy package at %s is incomplete (%s). Reinstall it: %s -m pip "
        "install --force-reinstall spliceproxy (a C compiler and the Python headers are "
        "needed to build it, see the README's Quick start)."
        % (__file__.rpartition("/")[0], e, sys.executable))


def main(argv=None):
    argv = sys.argv if argv is None else argv
    cmd = argv[1] if len(argv) > 1 else None
    if cmd == "bench":
        return _bench(argv[0], argv[2:])
    if cmd == "help":
        from spliceproxy.helptext import help_text

        sys.stdout.write(help_text())
        return 0
    if cmd == "install-path":
        return _install_path(argv[0])
    if cmd in ("engine", "status"):
        # The host engine (engine mode, the default) and its status report.
        # A stub that starts the engine reads its fd 3: a broken install
        # says so there, as for a proxy.
        try:
            if cmd == "engine":
                from spliceproxy.engine_service import main as sub_main
            else:
                from spliceproxy.engine_status import main as sub_main
        except ImportError as e:
            return _incomplete(e)
        return sub_main(argv[2:])
    try:
        from spliceproxy.process import main as proxy_main
    except ImportError as e:
        return _incomplete(e)
    proxy_main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
