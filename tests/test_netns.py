"""Where an engine can be reached, from its process alone: the /proc net tables of a pod-shaped
namespace (tests/fixtures/netns, recorded), the choice of an address, and the shell on a /proc the
test writes, privileged (namespace links and fd tables readable) and not."""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mpswatch.netns import (
    Listener,
    choose_endpoint,
    find_endpoint,
    parse_fib_trie,
    parse_if_inet6,
    parse_socket_table,
)
from mpswatch.procfs import ProcFS, parse_socket_link

NETNS = Path(__file__).resolve().parent / "fixtures" / "netns"
POD_NS = "net:[4026532174]"
AGENT_NS = "net:[4026531833]"
V4, V6 = ipaddress.IPv4Address, ipaddress.IPv6Address
POD_IP = V4("10.231.77.11")
little_endian_only = pytest.mark.skipif(sys.byteorder != "little", reason="the tables were recorded on x86_64")


@little_endian_only
def test_the_listening_sockets_of_a_pod_s_tables_are_read_and_connections_left_out():
    tcp = parse_socket_table((NETNS / "tcp").read_text())
    tcp6 = parse_socket_table((NETNS / "tcp6").read_text())
    assert [(str(s), s.inode) for s in tcp.listeners] == [("127.0.0.1:8001", 408536), ("0.0.0.0:8000", 408535)]
    assert [(str(s), s.inode) for s in tcp6.listeners] == [("[::]:8002", 408537), ("[::1]:8003", 408538)]
    assert tcp.unreadable_lines == tcp6.unreadable_lines == 0


@little_endian_only
def test_an_ipv4_mapped_listener_reads_as_its_ipv4_address():
    line = "   0: 0000000000000000FFFF00000B4DE70A:1F40 00000000000000000000000000000000:0000 0A 0 0 0 0 0 77 1\n"
    [listener] = parse_socket_table(line).listeners
    assert listener.address == POD_IP and listener.port == 8000 and listener.inode == 77


def test_lines_that_are_not_sockets_are_counted_not_guessed_at():
    text = (NETNS / "tcp").read_text() + "   9: 0100007F:1F4 00000000:0000 0A x\n   10: ٠١٠٠٠٠7F:1F40 0:0 0A 0 0 0 0 0 1 1\n"
    table = parse_socket_table(text)
    assert len(table.listeners) == 2 and table.unreadable_lines == 2


def test_the_namespace_s_own_ipv4_addresses_are_its_local_host_routes():
    assert parse_fib_trie((NETNS / "fib_trie").read_text()) == [POD_IP, V4("127.0.0.1")]  # not 127.0.0.0/8


def test_only_global_ipv6_addresses_ready_for_use_are_kept():
    addresses, unreadable = parse_if_inet6((NETNS / "if_inet6").read_text())
    assert addresses == [V6("fd31:77::11")] and unreadable == 0  # not the link-local one, not ::1
    tentative = "fd310077000000000000000000000012 0a 40 00 c0     eth0\n"  # IFA_F_TENTATIVE: DAD not done
    assert parse_if_inet6(tentative + "garbage\n") == ([], 1)


@given(st.text())
def test_the_net_parsers_take_any_text_without_failing(text):
    parse_socket_table(text)
    parse_fib_trie(text)
    parse_if_inet6(text)
    parse_socket_link(text)


def listener(address: str, port: int = 8000, inode: int = 1) -> Listener:
    return Listener(ipaddress.ip_address(address), port, inode)


@pytest.mark.parametrize("listeners, shared, url", [
    pytest.param(["0.0.0.0"], True, "http://127.0.0.1:8000/metrics", id="all addresses, agent's namespace: loopback"),
    pytest.param(["127.0.0.1"], True, "http://127.0.0.1:8000/metrics", id="loopback, agent's namespace"),
    pytest.param(["::"], True, "http://[::1]:8000/metrics", id="IPv6 all, agent's namespace: ::1"),
    pytest.param(["0.0.0.0"], False, "http://10.231.77.11:8000/metrics", id="all addresses, a pod: the pod IP"),
    pytest.param(["10.231.77.11"], False, "http://10.231.77.11:8000/metrics", id="the pod IP itself"),
    pytest.param(["::"], False, "http://[fd31:77::11]:8000/metrics", id="IPv6 all, a pod: its global IPv6"),
    pytest.param(["0.0.0.0"], None, "http://10.231.77.11:8000/metrics", id="namespace unknown: the pod IP reaches it"),
    pytest.param(["127.0.0.1", "0.0.0.0"], False, "http://10.231.77.11:8000/metrics", id="loopback and all: the pod IP"),
])
def test_the_address_the_agent_scrapes(listeners, shared, url):
    reach = choose_endpoint(8000, [listener(a, inode=i) for i, a in enumerate(listeners)],
                            frozenset(range(len(listeners))), shared,
                            [V4("127.0.0.1"), POD_IP], [V6("fd31:77::11")], f"network namespace {POD_NS}")
    assert (reach.url, reach.reason) == (url, None)


def test_an_ipv6_wildcard_in_a_pod_without_ipv6_is_tried_at_the_pod_s_ipv4_address():
    reach = choose_endpoint(8000, [listener("::")], None, False, [POD_IP], [], "ns")
    assert reach.url == "http://10.231.77.11:8000/metrics"  # dual-stack unless IPV6_V6ONLY


@pytest.mark.parametrize("listeners, owned, shared, ipv4, reason", [
    pytest.param(["127.0.0.1"], None, False, [POD_IP],
                 f"listens on 127.0.0.1:8000 inside network namespace {POD_NS}, which this agent cannot reach; "
                 "start it with --host 0.0.0.0", id="loopback inside a pod"),
    pytest.param(["::1"], None, False, [POD_IP],
                 f"listens on [::1]:8000 inside network namespace {POD_NS}, which this agent cannot reach; "
                 "start it with --host 0.0.0.0", id="IPv6 loopback inside a pod"),
    pytest.param([], None, False, [POD_IP],
                 f"no socket listens on port 8000 in network namespace {POD_NS} (yet: still starting?)", id="no socket"),
    pytest.param(["0.0.0.0"], frozenset({99}), True, [],
                 f"port 8000 in network namespace {POD_NS} is held by a socket of another process", id="not its own"),
    pytest.param(["0.0.0.0"], None, False, [V4("127.0.0.1")],
                 f"listens on 0.0.0.0:8000 inside network namespace {POD_NS}, which has no address but loopback",
                 id="a pod without an address"),
    pytest.param(["127.0.0.5"], None, True, [],
                 f"cannot tell whether the engine's processes hold the socket on port 8000 in network namespace "
                 f"{POD_NS} (their fd tables are closed to this agent: another user's, without CAP_SYS_PTRACE); "
                 "not scraped: name it with --engine", id="the agent's namespace, sockets' owners unknown"),
    pytest.param(["127.0.0.1"], frozenset({1}), None, [POD_IP],
                 f"listens on 127.0.0.1:8000 only, inside network namespace {POD_NS}, which this agent cannot tell "
                 "from its own (neither namespace's link is readable, nor its own socket tables)", id="cannot tell"),
])
def test_an_engine_the_agent_cannot_reach_says_exactly_why(listeners, owned, shared, ipv4, reason):
    reach = choose_endpoint(8000, [listener(a) for a in listeners], owned, shared, ipv4, [],
                            f"network namespace {POD_NS}")
    assert (reach.url, reach.reason) == (None, reason)


def test_a_socket_on_another_port_is_not_the_engine_s():
    reach = choose_endpoint(8000, [listener("0.0.0.0", port=8001)], None, True, [], [], "ns")
    assert reach.url is None and "no socket listens on port 8000" in reach.reason


# ---------------------------------------------------------------- the shell, on a /proc the test writes


def write_pod(proc: Path, pid: int, *, ns: str | None, fds: list[str] | None, tables: Path = NETNS) -> None:
    """A process of the recorded pod: its net files; its ns link and fd links when `ns` and `fds` are
    given (readable), else absent as they are to an agent without CAP_SYS_PTRACE."""
    (proc / str(pid) / "net").mkdir(parents=True)
    for name in ("tcp", "tcp6", "fib_trie", "if_inet6"):
        (proc / str(pid) / "net" / name).write_text((tables / name).read_text())
    if ns is not None:
        (proc / str(pid) / "ns").mkdir()
        os.symlink(ns, proc / str(pid) / "ns" / "net")
    if fds is not None:
        (proc / str(pid) / "fd").mkdir()
        for i, target in enumerate(fds):
            os.symlink(target, proc / str(pid) / "fd" / str(i))


def write_agent(proc: Path, *, ns: str | None, tcp: str) -> None:
    (proc / "self" / "net").mkdir(parents=True)
    (proc / "self" / "net" / "tcp").write_text(tcp)
    if ns is not None:
        (proc / "self" / "ns").mkdir()
        os.symlink(ns, proc / "self" / "ns" / "net")


AGENT_TCP = "  sl  local_address rem_address   st\n   0: 00000000:4D97 00000000:0000 0A 0 0 0 0 0 5000 1\n"


@little_endian_only
def test_a_privileged_agent_tells_namespaces_apart_by_their_links_and_keeps_to_the_engine_s_own_socket(tmp_path):
    proc = tmp_path / "proc"
    write_agent(proc, ns=AGENT_NS, tcp=AGENT_TCP)
    write_pod(proc, 100, ns=POD_NS, fds=["socket:[408535]", "pipe:[7]", "/dev/null"])
    reach = find_endpoint(ProcFS(proc), 100, [100], 8000)
    assert (reach.url, reach.shared) == ("http://10.231.77.11:8000/metrics", False)
    other = find_endpoint(ProcFS(proc), 100, [100], 8001)  # 127.0.0.1:8001 is held by a socket not among its fds
    assert other.url is None and other.reason == f"port 8001 in network namespace {POD_NS} is held by a socket of another process"


@little_endian_only
def test_an_unprivileged_agent_finds_an_engine_s_namespace_by_its_socket_in_the_agent_s_own_tables(tmp_path):
    proc = tmp_path / "proc"
    write_agent(proc, ns=None, tcp=AGENT_TCP)  # links and fd tables of others unreadable
    write_pod(proc, 100, ns=None, fds=None)
    reach = find_endpoint(ProcFS(proc), 100, [100], 8001)
    assert reach.url is None and reach.shared is False
    assert reach.reason == ("listens on 127.0.0.1:8001 inside the network namespace of pid 100, which this agent "
                            "cannot reach; start it with --host 0.0.0.0")
    (proc / "self" / "net" / "tcp").write_text((NETNS / "tcp").read_text())  # the agent in the pod's namespace
    shared = find_endpoint(ProcFS(proc), 100, [100], 8001)
    # there any process may hold the port the command line names: without the engine's fd table, not scraped
    assert (shared.url, shared.shared) == (None, True)
    assert shared.reason is not None and shared.reason.startswith("cannot tell whether the engine's processes hold")


def test_unreadable_socket_tables_make_the_reason(tmp_path):
    proc = tmp_path / "proc"
    write_agent(proc, ns=AGENT_NS, tcp=AGENT_TCP)
    (proc / "100").mkdir()
    reach = find_endpoint(ProcFS(proc), 100, [100], 8000)
    assert reach.url is None and reach.reason.startswith("cannot read the sockets of the network namespace of pid 100: ")
