"""What the tests share: one package, imported as ``support``.

``tests/conftest.py`` puts ``tests/`` on ``sys.path`` (the tests run with
``--import-mode=importlib`` against the installed package, so nothing else
does), and every test module imports what it needs from here:

    from support import servers as srv

- ``support.servers``: the "container" side (TCP echo, source/sink and
  accepting backends, the one UDP echo, the C echo in a child process), the
  proxy under test started as dockerd starts it (``srv.Proxy``, over the
  product's own launcher ``spliceproxy.bench.launch``, whose ``spawn``,
  ``proxy_argv`` and ``ProxyStartError`` it re-exports for the tests that
  need the raw launch), and small socket utilities.
- ``support.guard``: the check behind the autouse fixture that fails a test
  leaving descriptors, child processes or network namespaces behind.
- ``support.cc``: the project's C flags (``csrc/cflags.txt``) for the tests
  that compile C.
- ``support.dockerd``: the dockerd suite's private daemon (``Daemon``), its
  network namespace (``Netns``), which dockerd (20.10 or 28.5), and what a
  killed run of the suite left behind (``clean_stale``).
- ``support.fastpath_env``: the kernel fast-path tests' setting: the container
  namespace behind a veth pair with echo servers on its IPv4 and IPv6
  addresses, the child cgroup a test's clients join, the client launcher.
"""
