"""`spliceproxy help`: the subcommands and every SPLICEPROXY_* variable.

``ENVIRONMENT`` lists the environment variables the project reads, with
their defaults and meanings; the help text is made from it and a test checks
that every variable the code reads is in it.  The proxy's own rows come from
``settings.VARIABLES`` (the one table the proxy parses them with); the build
and test variables, which the proxy never reads, are listed here.

On the proxy's start-up path for HELP_POINTER alone, so it imports nothing
costly (settings, for the proxy's rows, is on that path anyway).
"""

from __future__ import annotations

# The line -h adds to docker-proxy's usage (goflags.parse's footer), for the
# standalone proxy and the engine alike.
HELP_POINTER = "Run 'spliceproxy help' for the subcommands and the SPLICEPROXY_* variables.\n"


# Plain classes, not typing.NamedTuple: HELP_POINTER puts this module on
# every proxy's start-up path, where importing typing (or collections) would
# cost more than the rest of the module.
class Subcommand:
    __slots__ = ("usage", "meaning")

    def __init__(self, usage: str, meaning: str):
        self.usage = usage
        self.meaning = meaning


class Variable:
    __slots__ = ("name", "default", "meaning", "group", "note")

    def __init__(self, name: str, default: str, meaning: str, group: str = "proxy",
                 note: str = ""):
        self.name = name
        self.default = default
        self.meaning = meaning
        self.group = group  # proxy (read at start-up), engine, build (and install), or tests
        self.note = note


SUBCOMMANDS = (
    Subcommand("spliceproxy -proto P -host-ip IP -host-port N -container-ip IP "
               "-container-port N [-use-listen-fd]",
               "serve one published port, as dockerd starts docker-proxy (`spliceproxy -h`)"),
    Subcommand("spliceproxy bench [--quick] ...",
               "compare native, iptables DNAT, spliceproxy, docker-proxy and peers on this "
               "machine (needs the bench extra: pip install 'spliceproxy[bench]')"),
    Subcommand("spliceproxy bench gate BASELINE CURRENT",
               "compare two benchmark result files, exit 1 on a regression"),
    Subcommand("spliceproxy install-path",
               "print the real path of this installed command: the value for "
               "\"userland-proxy-path\" in /etc/docker/daemon.json"),
    Subcommand("spliceproxy engine [--socket PATH]",
               "run the host engine in the foreground (engine mode, the default; "
               "the proxies start it themselves when none runs)"),
    Subcommand("spliceproxy status [--socket PATH] [--json | --prometheus]",
               "every mapping the host engine serves, with its connections, bytes and errors"),
    Subcommand("spliceproxy help", "this text"),
    Subcommand("spliceproxy -v", "print the version"),
)

# Variables being added alongside this table; the note goes once they are read.
_PENDING = "new: read by releases that have it, ignored by earlier ones"


def _proxy_rows() -> tuple[Variable, ...]:
    from spliceproxy.settings import ENV_PREFIX, VARIABLES

    return tuple(Variable(ENV_PREFIX + v.name, v.shown, v.help) for v in VARIABLES)


ENVIRONMENT = _proxy_rows() + (
    Variable("SPLICEPROXY_ENGINE_DIR",
             "/run/spliceproxy (root), $XDG_RUNTIME_DIR/spliceproxy",
             "directory of the engines' control sockets, engine-netns-<dev>-<inode>.sock for "
             "each network namespace; it must be the user's own, mode 0700",
             group="engine"),
    Variable("SPLICEPROXY_ENGINE_SOCKET", "derived from the namespace (SPLICEPROXY_ENGINE_DIR)",
             "one engine's control socket outright; its directory must be the user's own, "
             "mode 0700; the engine serves only its own network namespace's proxies",
             group="engine"),
    Variable("SPLICEPROXY_ENGINE_IDLE_EXIT", "5s",
             "how long the engine stays up without mappings; never: until stopped",
             group="engine"),
    Variable("SPLICEPROXY_VENV", "/opt/spliceproxy",
             "the virtualenv scripts/install-venv installs into", group="build"),
    Variable("SPLICEPROXY_PYTHON", "/usr/bin/python3",
             "the interpreter scripts/install-venv makes that virtualenv with", group="build"),
    Variable("SPLICEPROXY_CFLAGS", "none",
             "extra C compiler flags for the engine (e.g. sanitizers)", group="build"),
    Variable("SPLICEPROXY_WERROR", "off", "1 makes C warnings errors", group="build"),
    Variable("SPLICEPROXY_E2E_PROXY", "the installed spliceproxy",
             "absolute path of the proxy the dockerd scenarios run against", group="tests"),
    Variable("SPLICEPROXY_E2E_REQUIRE", "off",
             "1 fails instead of skipping when dockerd, root or busybox-static is missing",
             group="tests"),
    Variable("SPLICEPROXY_E2E_SUBNET", "198.18.77.0/24 and 198.18.78.0/24",
             "the range whose halves become the two private daemons' bridges", group="tests",
             note=_PENDING),
    Variable("SPLICEPROXY_E2E_NETNS_PREFIX", "spe2e-",
             "name prefix of the dockerd scenarios' network namespaces", group="tests",
             note=_PENDING),
    Variable("SPLICEPROXY_DOCKER_SID", "/var/cache/spliceproxy/docker-sid",
             "where scripts/fetch-docker-sid unpacks Debian unstable's docker.io (dockerd "
             "and docker-proxy 28.5): the dockerd suite runs that dockerd, and "
             "`spliceproxy bench` takes that docker-proxy as its reference", group="tests"),
    Variable("SPLICEPROXY_BENCH_TEST_PREFIX", "bt-l<pid>-",
             "name prefix of the bench harness test's loopback namespaces", group="tests",
             note=_PENDING),
    Variable("SPLICEPROXY_BENCH_TEST_SUBNET", "198.19.241.0/24",
             "the range of the bench harness test's loopback namespaces", group="tests",
             note=_PENDING),
)

_GROUPS = (
    ("proxy", "Environment (read by the proxy at start-up, inherited from dockerd; an invalid "
              "value is a start-up failure reported on fd 3):"),
    ("engine", "Engine mode (read by the stub and the engine; docs/engine-mode.md):"),
    ("build", "Installing and building (scripts/install-venv, pip install):"),
    ("tests", "Test suite:"),
)


def _wrap(text: str, indent: int, width: int = 79) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width, initial_indent=" " * indent,
                         subsequent_indent=" " * indent) or [""]


def help_text() -> str:
    from spliceproxy._version import __version__

    out = ["spliceproxy %s: a drop-in replacement for docker-proxy." % __version__, "",
           "Commands:"]
    for cmd in SUBCOMMANDS:
        out.append("  " + cmd.usage)
        out += _wrap(cmd.meaning, 6)
    for group, title in _GROUPS:
        out += ["", title]
        for var in ENVIRONMENT:
            if var.group != group:
                continue
            out.append("  %s (default: %s)" % (var.name, var.default))
            meaning = var.meaning + (" (%s)" % var.note if var.note else "")
            out += _wrap(meaning, 6)
    out += [""] + _wrap("Documentation: README.md of the project (Quick start, Use with "
                        "Docker), and the manual in its docs/ (docs/README.md lists the "
                        "pages).", 0)
    return "\n".join(out) + "\n"
