"""Build the C relay engine (csrc/) as the Cython extension spliceproxy._engine.

A failed compile fails the install: there is no slow pure-Python fallback.
Set SPLICEPROXY_CFLAGS to add compiler flags (e.g. the sanitizer build) and
SPLICEPROXY_WERROR=1 to make C warnings errors.
"""

import os
import shlex
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def warning_flags():
    """The project's C dialect and warning flags, from their one definition
    (csrc/cflags.txt, also read by the C lint), without -D_GNU_SOURCE, which
    the extension passes as a macro."""
    with open(os.path.join(HERE, "csrc", "cflags.txt")) as f:
        words = [w for line in f if not line.startswith("#") for w in line.split()]
    return [w for w in words if w != "-D_GNU_SOURCE"]


# The engine, floor by floor (csrc/core.h draws the picture).
CSRC = [
    "csrc/core.c", "csrc/listener.c", "csrc/pipe.c",     # ground floor
    "csrc/mover_splice.c", "csrc/mover_copy.c",          # byte movers
    "csrc/portreuse.c", "csrc/transparent.c",            # beside the protocols
    "csrc/tcp.c", "csrc/udp.c",                          # protocols
    "csrc/protos.c", "csrc/loop.c",                      # the loop
    "csrc/process.c", "csrc/stats.c",                    # beside the engine
    "csrc/fastpath.c",                                   # the kernel fast path
]


STUB_SRC = "csrc/stub/stub.c"
# The stub is the installed `spliceproxy` command (what dockerd is given):
# an engine-mode port then starts no shell and no interpreter, and anything
# else is exec'd to the Python launcher beside it, spliceproxy-front.
STUB_OUT = os.path.join("build", "stub", "spliceproxy")


def build_stub():
    """The engine mode's per-port process (csrc/stub/stub.c): plain C, no
    Python, linked static when the C library allows it, so that the private
    memory a published port costs is a few pages (shared text aside)."""
    import subprocess

    cc = shlex.split(os.environ.get("CC", "cc"))
    flags = warning_flags() + ["-D_GNU_SOURCE", "-O2", "-s"]
    if os.environ.get("SPLICEPROXY_WERROR") == "1":
        flags.append("-Werror")
    os.makedirs(os.path.dirname(STUB_OUT), exist_ok=True)
    base = cc + flags + ["-o", STUB_OUT, STUB_SRC]
    if subprocess.call(base[:1] + ["-static"] + base[1:]) != 0:
        sys.stderr.write("*** spliceproxy: no static C library; linking the stub dynamically\n")
        subprocess.check_call(base)


class LoudBuildExt(build_ext):
    """build_ext that explains what to install when the compiler fails."""

    def run(self):
        build_stub()
        super().run()

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001 - re-raised after the hint
            sys.stderr.write(
                "\n*** spliceproxy: building the C engine (%s) failed: %s\n"
                "*** It needs a C11 compiler and the Python headers, e.g. on Debian:\n"
                "***     apt-get install gcc python3-dev\n"
                "*** There is no pure-Python fallback by design.\n\n" % (ext.name, exc)
            )
            raise


def extensions():
    from Cython.Build import cythonize

    cflags = warning_flags() + ["-O2", "-fno-strict-aliasing"]
    ldflags = []
    if os.environ.get("SPLICEPROXY_WERROR") == "1":
        cflags.append("-Werror")
    extra = os.environ.get("SPLICEPROXY_CFLAGS", "").split()
    cflags += extra
    ldflags += [f for f in extra if f.startswith("-fsanitize")]
    engine = Extension(
        "spliceproxy._engine",
        sources=["src/spliceproxy/_engine.pyx"] + CSRC,
        include_dirs=["csrc"],
        define_macros=[("_GNU_SOURCE", "1")],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
    )
    # The kernel fast path (csrc/fastpath.c) has its own small binding, so
    # it can be loaded and tested apart from the relay.
    fastpath = Extension(
        "spliceproxy._fastpath",
        sources=["src/spliceproxy/_fastpath.pyx", "csrc/fastpath.c"],
        include_dirs=["csrc"],
        define_macros=[("_GNU_SOURCE", "1")],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
    )
    exts = cythonize([engine, fastpath], language_level=3, compiler_directives={"binding": False})
    return exts


def launcher():
    """The Python front end, `spliceproxy-front`, which the `spliceproxy`
    stub execs: a /bin/sh-and-Python file that starts the interpreter of
    the environment it is installed in with -I -S (see
    scripts/spliceproxy.in).

    A plain console-script wrapper cannot pass interpreter flags, and site
    processing would double the proxy's start-up time.  The launcher finds its
    interpreter and site directory from its own real path, so a wheel runs
    wherever pip installs it; the build's interpreter and platlib are written
    in only as the fallback for installs whose prefix has no interpreter
    (pip --user, /usr/local beside /usr/bin/python3)."""
    with open("scripts/spliceproxy.in") as f:
        text = f.read()
    text = text.replace("@PYTHON@", shlex.quote(sys.executable))
    text = text.replace("@PLATLIB@", repr(sysconfig.get_path("platlib")))
    out = os.path.join("build", "launcher", "spliceproxy-front")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    os.chmod(out, 0o755)
    return [out]


# install_scripts installs everything in the scripts build directory, not
# just what this build lists.  setuptools' default, build/scripts-X.Y, still
# holds the old launcher named `spliceproxy` in a tree built before the stub
# became the command, and would install it over the stub; a directory of its
# own holds exactly the launcher.
SCRIPTS_BUILD_DIR = os.path.join("build", "front-scripts")

setup(
    options={"build": {"build_scripts": SCRIPTS_BUILD_DIR}},
    scripts=launcher(),
    # The `spliceproxy` command, beside the launcher it execs.
    data_files=[("bin", [STUB_OUT])],
    ext_modules=extensions(),
    cmdclass={"build_ext": LoudBuildExt},
)
