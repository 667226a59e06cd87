"""`mpswatch status --agent URL`: the running agent's report, read from its /status."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from mpswatch.analysis import SCHEMA

_TIMEOUT_SECONDS = 10.0
_MAX_BYTES = 16 * 1024 * 1024


class AgentUnreachable(Exception):
    """The agent could not be asked, or did not answer with a status report."""


def status_url(agent_url: str) -> tuple[str, dict[str, str]]:
    """The /status URL of an agent given as http(s)://[user:password@]HOST:PORT[/], and the headers
    that carry its credentials (basic auth, for an agent behind a web configuration file)."""
    parts = urllib.parse.urlsplit(agent_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise AgentUnreachable(f"--agent {agent_url!r}: expected http://HOST:PORT or https://HOST:PORT")
    headers = {}
    if parts.username is not None:
        credentials = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode()
    netloc = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/status", "", "")), headers


def fetch_status(agent_url: str) -> dict[str, Any]:
    url, headers = status_url(agent_url)
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=_TIMEOUT_SECONDS) as answer:
            body = answer.read(_MAX_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise AgentUnreachable(f"cannot ask the agent at {url}: {reason}") from None
    if len(body) > _MAX_BYTES:
        raise AgentUnreachable(f"the agent at {url} answered more than {_MAX_BYTES} bytes")
    try:
        report = json.loads(body)
    except ValueError as err:
        raise AgentUnreachable(f"the agent at {url} did not answer JSON: {err}") from None
    if not isinstance(report, dict) or report.get("schema") != SCHEMA:
        raise AgentUnreachable(f"the agent at {url} did not answer a {SCHEMA} report")
    return report
