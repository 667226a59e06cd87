"""mpswatch: a node agent that watches NVIDIA MPS daemons, servers, clients and the engines on them."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mpswatch")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
