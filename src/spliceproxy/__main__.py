"""Entry point: `spliceproxy <docker-proxy flags>` or `spliceproxy bench ...`."""

import sys


def main(argv=None):
    argv = sys.argv if argv is None else argv
    if len(argv) > 1 and argv[1] == "bench":
        # dockerd never passes a positional argument first, so "bench" cannot
        # collide with the proxy's own command line.
        from spliceproxy.bench.cli import main as bench_main

        return bench_main(argv[2:])
    if len(argv) > 1 and argv[1] in ("engine", "status"):
        # The host engine (SPLICEPROXY_ENGINE=1) and its status report.
        if argv[1] == "engine":
            from spliceproxy.engine_service import main as engine_main

            return engine_main(argv[2:])
        from spliceproxy.engine_status import main as status_main

        return status_main(argv[2:])
    from spliceproxy.proxy import main as proxy_main

    proxy_main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
