"""Where an engine's HTTP server can be reached, from its process alone, in whatever network
namespace it runs (docs/engines.md, "Reaching an engine").

An engine in a Kubernetes pod has a network namespace of its own: its 127.0.0.1 is not the agent's.
With the host's PID namespace the agent still finds in /proc what it needs:
  - `<pid>/net/tcp` and `tcp6`: the sockets of the process's network namespace (listening: state
    0A), readable by all;
  - `<pid>/fd/*`: the socket inodes the process holds (its user or CAP_SYS_PTRACE);
  - `<pid>/ns/net`: the namespace's identity, compared with `self/ns/net` (likewise); without it,
    whether the engine's listening socket is in the agent's own tables tells the same;
  - `<pid>/net/fib_trie` and `if_inet6`: the namespace's own addresses (a pod's IP).

Pure parsers of those files and the choice of an address (choose_endpoint); find_endpoint is the
thin shell that reads them under the ProcFS root.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from mpswatch.procfs import ProcFS

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
LISTEN = "0A"
# Listening sockets come first in a table (the kernel walks its listening hash before the
# established one), so a cap cuts only the connections of a busy namespace.
TABLE_LIMIT = 4 << 20
_LOCAL = re.compile(r"([0-9A-Fa-f]{8}|[0-9A-Fa-f]{32}):([0-9A-Fa-f]{4})")
_STATE = re.compile(r"[0-9A-Fa-f]{2}")
_IF_INET6 = re.compile(r"([0-9a-fA-F]{32}) [0-9a-fA-F]{2,8} [0-9a-fA-F]{2} ([0-9a-fA-F]{2}) ([0-9a-fA-F]{2,8}) +\S+")
_SCOPE_GLOBAL = 0x00
_IFA_F_UNUSABLE = 0x08 | 0x40  # IFA_F_DADFAILED, IFA_F_TENTATIVE: not an address to connect to yet


@dataclass(frozen=True)
class Listener:
    """A listening TCP socket: the address it is bound to (an IPv4-mapped IPv6 address as its
    IPv4 address; 0.0.0.0 or :: for all), its port, and its inode."""

    address: IPAddress
    port: int
    inode: int

    def __str__(self) -> str:
        return _host_port(str(self.address), self.port)


@dataclass(frozen=True)
class SocketTable:
    listeners: tuple[Listener, ...]
    unreadable_lines: int  # neither the header nor a socket


@dataclass(frozen=True)
class Reach:
    """Where an engine's metrics are scraped, or why they cannot be."""

    url: str | None
    reason: str | None  # set when url is None
    shared: bool | None = None  # its network namespace is the agent's own; None: cannot tell
    unreadable_lines: int = 0  # of its namespace's tables, counted and logged by the collector


def kernel_address(hex_text: str) -> IPAddress:
    """An address as the socket tables print it: 32-bit words in the host's byte order."""
    raw = b"".join(int(hex_text[i : i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(hex_text), 8))
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw)
    address = ipaddress.IPv6Address(raw)
    return address.ipv4_mapped or address


def parse_socket_table(text: str) -> SocketTable:
    """The listening sockets (state 0A) of /proc/<pid>/net/tcp or tcp6 (the address's width says
    which); a line that is neither the header nor a socket is counted, never guessed at."""
    listeners = []
    unreadable = 0
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0] == "sl":
            continue
        local = _LOCAL.fullmatch(fields[1]) if len(fields) >= 10 else None
        inode = fields[9] if local else ""
        if local is None or not fields[0].endswith(":") or not _STATE.fullmatch(fields[3]) \
                or not (inode.isascii() and inode.isdigit()):
            unreadable += 1
        elif fields[3].upper() == LISTEN:
            listeners.append(Listener(kernel_address(local[1]), int(local[2], 16), int(inode)))
    return SocketTable(tuple(listeners), unreadable)


def parse_fib_trie(text: str) -> list[ipaddress.IPv4Address]:
    """The namespace's own IPv4 addresses, in the order /proc/<pid>/net/fib_trie lists them, each
    once: the leaves (`|-- 10.231.7.11`) with a `/32 host LOCAL` entry below them. Everything else
    in the file (table headers, inner nodes, routes) names no address of its own."""
    found: dict[ipaddress.IPv4Address, None] = {}
    leaf = None
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] in ("|--", "+--"):
            leaf = None
            if words[0] == "|--":
                try:
                    leaf = ipaddress.IPv4Address(words[1])
                except ValueError:
                    pass
        elif leaf is not None and len(words) >= 3 and words[0] == "/32" and words[-1] == "LOCAL":
            found[leaf] = None
    return list(found)


def parse_if_inet6(text: str) -> tuple[list[ipaddress.IPv6Address], int]:
    """The namespace's global IPv6 addresses one can connect to (not tentative, not failed), in the
    order /proc/<pid>/net/if_inet6 lists them, and the number of lines that are not an address."""
    found = []
    unreadable = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        match = _IF_INET6.fullmatch(line.strip())
        if match is None:
            unreadable += 1
        elif int(match[2], 16) == _SCOPE_GLOBAL and not int(match[3], 16) & _IFA_F_UNUSABLE:
            found.append(ipaddress.IPv6Address(bytes.fromhex(match[1])))
    return found, unreadable


def choose_endpoint(
    port: int,
    listeners: Sequence[Listener],
    owned: frozenset[int] | None,
    shared: bool | None,
    ipv4: Sequence[ipaddress.IPv4Address],
    ipv6: Sequence[ipaddress.IPv6Address],
    namespace: str,
) -> Reach:
    """The URL of the engine's metrics, from its namespace's listening sockets (`owned`: the inodes
    its processes hold, None when unknown), whether that namespace is the agent's, and the
    namespace's addresses; or why the agent cannot reach it. The address is always one the engine's
    own socket listens on, never one its command line names; where the ownership of sockets cannot
    be read, only a namespace other than the agent's is trusted to be the engine's (a pod's).

    In the agent's own namespace loopback reaches a socket bound to all addresses or to loopback.
    In another, only a socket bound to a non-loopback address can be reached: a specific one at that
    address, one bound to all at the namespace's first global address (its pod IP)."""
    on_port = [listener for listener in listeners if listener.port == port]
    own = sorted((listener for listener in on_port if owned is None or listener.inode in owned),
                 key=lambda listener: (listener.address.version, int(listener.address)))
    if not on_port:
        return Reach(None, f"no socket listens on port {port} in {namespace} (yet: still starting?)", shared)
    if not own:
        return Reach(None, f"port {port} in {namespace} is held by a socket of another process", shared)
    if owned is None and shared is not False:
        # in the agent's own namespace (or one it cannot tell from it) the port may be anyone's: the
        # command line names it, so only the engine's own socket may be scraped (trust model, README)
        return Reach(None, f"cannot tell whether the engine's processes hold the socket on port {port} in {namespace} "
                           "(their fd tables are closed to this agent: another user's, without CAP_SYS_PTRACE); "
                           "not scraped: name it with --engine", shared)
    v4 = [address for address in ipv4 if not (address.is_loopback or address.is_link_local)]
    for listener in own:
        host = _host(listener.address, shared, v4, ipv6)
        if host is not None:
            return Reach(f"http://{_host_port(host, port)}/metrics", None, shared)
    if any(not listener.address.is_loopback for listener in own):
        return Reach(None, f"listens on {own[0]} inside {namespace}, which has no address but loopback", shared)
    if shared is None:
        return Reach(None, f"listens on {own[0]} only, inside {namespace}, which this agent cannot tell from its "
                           "own (neither namespace's link is readable, nor its own socket tables)", shared)
    return Reach(None, f"listens on {own[0]} inside {namespace}, which this agent cannot reach; "
                       "start it with --host 0.0.0.0", shared)


def _host(address: IPAddress, shared: bool | None, ipv4: Sequence[ipaddress.IPv4Address],
          ipv6: Sequence[ipaddress.IPv6Address]) -> str | None:
    if shared:
        if address.is_unspecified:
            return "127.0.0.1" if address.version == 4 else "::1"
        return str(address)
    if address.is_loopback:
        return None
    if not address.is_unspecified:
        return str(address)
    if address.version == 4:
        return str(ipv4[0]) if ipv4 else None
    # `::` takes IPv4 connections too unless the socket is IPV6_V6ONLY: an IPv6 address is surer
    return str(ipv6[0]) if ipv6 else str(ipv4[0]) if ipv4 else None


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---------------------------------------------------------------- the shell


def find_endpoint(procfs: ProcFS, pid: int, pids: Sequence[int], port: int) -> Reach:
    """Reads what choose_endpoint needs for the engine whose API server is `pid` (its processes:
    `pids`) and which serves on `port`."""
    link = procfs.link(f"{pid}/ns/net")
    namespace = f"network namespace {link}" if link else f"the network namespace of pid {pid}"
    try:
        table = _socket_tables(procfs, f"{pid}/net")
    except OSError as err:
        return Reach(None, f"cannot read the sockets of {namespace}: {err}")
    on_port = [listener for listener in table.listeners if listener.port == port]
    own_link = procfs.link("self/ns/net")
    shared: bool | None
    if link and own_link:
        shared = link == own_link
    else:  # a socket is in the tables of its own namespace only
        try:
            own_inodes = {listener.inode for listener in _socket_tables(procfs, "self/net").listeners}
            shared = any(listener.inode in own_inodes for listener in on_port) if on_port else None
        except OSError:
            shared = None
    owned = _owned_sockets(procfs, pids) if on_port else None
    unreadable = table.unreadable_lines
    ipv4: list[ipaddress.IPv4Address] = []
    ipv6: list[ipaddress.IPv6Address] = []
    if on_port and not shared:
        try:
            ipv4 = parse_fib_trie(procfs.read_text_or_raise(f"{pid}/net/fib_trie", TABLE_LIMIT))
        except OSError as err:
            return Reach(None, f"cannot read the addresses of {namespace}: {err}", shared, unreadable)
        try:
            ipv6, bad = parse_if_inet6(procfs.read_text_or_raise(f"{pid}/net/if_inet6"))
            unreadable += bad
        except FileNotFoundError:
            pass  # IPv6 is off
        except OSError as err:
            return Reach(None, f"cannot read the addresses of {namespace}: {err}", shared, unreadable)
    reach = choose_endpoint(port, on_port, owned, shared, ipv4, ipv6, namespace)
    return Reach(reach.url, reach.reason, reach.shared, unreadable)


def _socket_tables(procfs: ProcFS, net_dir: str) -> SocketTable:
    """tcp and tcp6 of one namespace (tcp6 is absent where IPv6 is off); OSError when tcp is unreadable."""
    texts = [procfs.read_text_or_raise(f"{net_dir}/tcp", TABLE_LIMIT)]
    try:
        texts.append(procfs.read_text_or_raise(f"{net_dir}/tcp6", TABLE_LIMIT))
    except FileNotFoundError:
        pass
    # a read cut by the cap ends mid-line: that line is left out rather than counted
    tables = [parse_socket_table(text[: text.rfind("\n") + 1] if len(text) >= TABLE_LIMIT else text) for text in texts]
    return SocketTable(tuple(listener for table in tables for listener in table.listeners),
                       sum(table.unreadable_lines for table in tables))


def _owned_sockets(procfs: ProcFS, pids: Sequence[int]) -> frozenset[int] | None:
    """The socket inodes the engine's processes hold; None when no fd table of theirs is readable."""
    found: set[int] | None = None
    for pid in pids:
        inodes = procfs.socket_inodes(pid)
        if inodes is not None:
            found = (found or set()) | inodes
    return None if found is None else frozenset(found)
