"""spliceproxy: a drop-in replacement for Docker's docker-proxy.

The proxy process itself starts through spliceproxy.__main__; this package
module stays empty so that starting a proxy imports nothing it does not use.
"""

from spliceproxy._version import __version__

__all__ = ["__version__"]
