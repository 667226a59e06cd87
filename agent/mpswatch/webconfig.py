"""TLS and basic auth for /metrics and /healthz, from a web configuration file in the Prometheus
exporter toolkit's format (node_exporter's `--web.config.file`), so one file serves both agents.

The file is read and checked once, at start: a key this module cannot honour is refused by name
rather than ignored, because a security setting that silently does nothing is worse than none.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import os
import re
import reprlib
import ssl
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import yaml

MAX_FILE_BYTES = 1 << 20

# exporter toolkit's names -> Python's; the toolkit defaults to TLS 1.2 up to TLS 1.3
TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}

# client_auth_type values Python's ssl can honour: it verifies every certificate it accepts, so the
# toolkit's RequestClientCert and RequireAnyClientCert (accept an unverified certificate) cannot be.
CLIENT_AUTH_TYPES = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}

# The cipher suites Go's tls.CipherSuites() lists (the only ones the toolkit accepts), by IANA code.
# Go ignores the TLS 1.3 ones in a configuration, and so does this module: TLS 1.3 suites are not
# configurable in either.
CIPHER_SUITES_TLS12 = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": 0xC009,
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": 0xC00A,
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": 0xC013,
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": 0xC014,
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": 0xC02B,
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": 0xC02C,
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": 0xC02F,
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": 0xC030,
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": 0xCCA8,
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": 0xCCA9,
}
CIPHER_SUITES_TLS13 = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}

# The toolkit's response headers and, where it restricts them, their allowed values.
HEADERS: dict[str, tuple[str, ...]] = {
    "Strict-Transport-Security": (),
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": (),
    "Content-Security-Policy": (),
}

# Keys of the toolkit's format that this agent refuses, and why.
UNSUPPORTED = {
    "tls_server_config.cert": "inline certificates are not supported; use cert_file",
    "tls_server_config.key": "inline keys are not supported; use key_file",
    "tls_server_config.curve_preferences": "not supported (Python's ssl sets no curve list)",
    "rate_limit": "not supported",
}
KNOWN = {
    "": {"tls_server_config", "http_server_config", "basic_auth_users", "rate_limit"},
    "tls_server_config": {"cert", "key", "client_ca", "cert_file", "key_file", "client_auth_type", "client_ca_file",
                          "client_allowed_sans", "min_version", "max_version", "cipher_suites",
                          "prefer_server_cipher_suites", "curve_preferences"},
    "http_server_config": {"http2", "headers"},
}

_BCRYPT_HASH = re.compile(r"\$2[abxy]?\$(\d\d)\$[./A-Za-z0-9]{53}")

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 120
_REPR.maxlevel = 2


def _shown(value: Any) -> str:
    """A value as an error message quotes it, bounded: YAML aliases can make a small file's value huge."""
    return _REPR.repr(value)


class WebConfigError(Exception):
    """A web configuration file that cannot be served as written; the message names the key."""


@dataclass(frozen=True)
class TlsSettings:
    cert_file: str
    key_file: str
    client_auth_type: str
    client_ca_file: str | None
    client_ca: str | None  # inline PEM
    min_version: str
    max_version: str
    cipher_suites: tuple[str, ...]
    prefer_server_cipher_suites: bool
    client_allowed_sans: frozenset[str] | None  # None: any client the CA vouches for


@dataclass(frozen=True)
class WebConfig:
    tls: TlsSettings | None
    users: Mapping[str, bytes]  # user name -> bcrypt hash; empty: no authentication
    headers: tuple[tuple[str, str], ...]


@cache
def _unique_key_loader() -> type[yaml.SafeLoader]:
    """A YAML loader that refuses a key given twice (Go's strict decoder does): a second entry for
    one user must not quietly replace the first. PyYAML is imported here, by an agent given a web
    configuration file, and only then."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, str) and key in seen:
                    raise WebConfigError(f"key {_shown(key)} is given twice (line {key_node.start_mark.line + 1})")
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def _table(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise WebConfigError(f"{where or 'the file'} must be a mapping, got {_shown(value)}")
    prefix = f"{where}." if where else ""
    for key in value:
        if not isinstance(key, str) or key not in KNOWN[where]:
            raise WebConfigError(f"{prefix}{key}: unknown key; known keys: {', '.join(sorted(KNOWN[where]))}")
        if f"{prefix}{key}" in UNSUPPORTED and value[key] not in (None, "", [], {}):
            raise WebConfigError(f"{prefix}{key}: {UNSUPPORTED[prefix + key]}")
    return value


def _string(table: Mapping[str, Any], key: str, where: str) -> str:
    value = table.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise WebConfigError(f"{where}.{key}: must be a string, got {_shown(value)}")
    return value


def _choice(table: Mapping[str, Any], key: str, where: str, options: Mapping[str, Any], default: str) -> str:
    value = _string(table, key, where) or default
    if value not in options:
        raise WebConfigError(f"{where}.{key}: must be one of {', '.join(options)}, got {_shown(value)}")
    return value


def _file(table: Mapping[str, Any], key: str, where: str, directory: str) -> str:
    """A relative path is relative to the web configuration file, as in the toolkit."""
    value = _string(table, key, where)
    return os.path.join(directory, value) if value else ""


def _tls(table: dict[str, Any], directory: str) -> TlsSettings | None:
    where = "tls_server_config"
    cert_file, key_file = _file(table, "cert_file", where, directory), _file(table, "key_file", where, directory)
    client_ca_file = _file(table, "client_ca_file", where, directory) or None
    client_ca = _string(table, "client_ca", where) or None
    client_auth_type = _string(table, "client_auth_type", where)
    if not (cert_file or key_file or client_ca_file or client_ca or client_auth_type):
        return None  # as in the toolkit: no TLS setting at all serves plain HTTP
    if not cert_file:
        raise WebConfigError(f"{where}.cert_file: missing (TLS needs a certificate and its key)")
    if not key_file:
        raise WebConfigError(f"{where}.key_file: missing (TLS needs a certificate and its key)")
    if client_auth_type in ("RequestClientCert", "RequireAnyClientCert", "RequireClientCert"):
        raise WebConfigError(f"{where}.client_auth_type: {client_auth_type} accepts unverified client certificates, "
                             "which Python's ssl cannot; use VerifyClientCertIfGiven or RequireAndVerifyClientCert")
    client_auth_type = _choice(table, "client_auth_type", where, CLIENT_AUTH_TYPES, "NoClientCert")
    if client_auth_type == "NoClientCert" and (client_ca_file or client_ca):
        raise WebConfigError(f"{where}.client_ca_file: a client CA is given without a client_auth_type that verifies "
                             "client certificates")
    if client_auth_type != "NoClientCert" and not (client_ca_file or client_ca):
        raise WebConfigError(f"{where}.client_auth_type: {client_auth_type} needs client_ca_file to verify clients against")
    min_version = _choice(table, "min_version", where, TLS_VERSIONS, "TLS12")
    max_version = _choice(table, "max_version", where, TLS_VERSIONS, "TLS13")
    if TLS_VERSIONS[min_version] > TLS_VERSIONS[max_version]:
        raise WebConfigError(f"{where}.min_version: {min_version} is above max_version {max_version}")
    suites = table.get("cipher_suites") or []
    if not isinstance(suites, list) or not all(isinstance(s, str) for s in suites):
        raise WebConfigError(f"{where}.cipher_suites: must be a list of cipher suite names, got {_shown(suites)}")
    for suite in suites:
        if suite not in CIPHER_SUITES_TLS12 and suite not in CIPHER_SUITES_TLS13:
            raise WebConfigError(f"{where}.cipher_suites: unknown cipher suite {_shown(suite)}; known: "
                                 f"{', '.join([*CIPHER_SUITES_TLS12, *sorted(CIPHER_SUITES_TLS13)])}")
    prefer = table.get("prefer_server_cipher_suites", True)
    if not isinstance(prefer, bool):
        raise WebConfigError(f"{where}.prefer_server_cipher_suites: must be true or false, got {_shown(prefer)}")
    return TlsSettings(cert_file, key_file, client_auth_type, client_ca_file, client_ca, min_version, max_version,
                       tuple(suites), prefer, _allowed_sans(table.get("client_allowed_sans"), client_auth_type))


def _allowed_sans(value: Any, client_auth_type: str) -> frozenset[str] | None:
    where = "tls_server_config.client_allowed_sans"
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise WebConfigError(f"{where}: must be a non-empty list of DNS names, IP addresses, e-mail addresses or URIs, "
                             f"got {_shown(value)}")
    if client_auth_type != "RequireAndVerifyClientCert":
        raise WebConfigError(f"{where}: needs client_auth_type RequireAndVerifyClientCert (a client without a "
                             "certificate has no SAN to match)")
    return frozenset(_san(v) for v in value)


def _san(value: str) -> str:
    """An IP address in one spelling (Go compares its own, Python's ssl writes IPv6 in another)."""
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        return value


def _users(value: Any) -> dict[str, bytes]:
    users: dict[str, bytes] = {}
    for name, hashed in _mapping(value, "basic_auth_users").items():
        if not isinstance(name, str) or not name or ":" in name:
            raise WebConfigError(f"basic_auth_users: a user name must be a non-empty string without ':' (quote it), "
                                 f"got {_shown(name)}")
        match = _BCRYPT_HASH.fullmatch(hashed) if isinstance(hashed, str) else None
        if match is None or not 4 <= int(match.group(1)) <= 31:
            raise WebConfigError(f"basic_auth_users.{name}: must be a bcrypt hash such as `htpasswd -nBC 10 \"\"` "
                                 "prints ($2y$10$ and 53 characters)")
        users[name] = hashed.encode()
    return users


def _mapping(value: Any, where: str) -> dict[Any, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise WebConfigError(f"{where}: must be a mapping, got {_shown(value)}")
    return value


def _headers(value: Any) -> tuple[tuple[str, str], ...]:
    headers = []
    for name, text in _mapping(value, "http_server_config.headers").items():
        allowed = HEADERS.get(name) if isinstance(name, str) else None
        if allowed is None:
            raise WebConfigError(f"http_server_config.headers: header {_shown(name)} cannot be set; these can: "
                                 f"{', '.join(HEADERS)}")
        if not isinstance(text, str) or not (text.isascii() and text.isprintable()) or (allowed and text not in allowed):
            expected = f"one of {', '.join(allowed)}" if allowed else "one line of printable ASCII"
            raise WebConfigError(f"http_server_config.headers.{name}: must be {expected}, got {_shown(text)}")
        if text:  # blank: unset, as in the toolkit
            headers.append((name, text))
    return tuple(headers)


def load_web_config(path: str) -> WebConfig:
    """Reads and checks the file; the TLS files are checked by building the context once here."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise WebConfigError(f"cannot read {path}: {err.strerror or err}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise WebConfigError(f"{path} is larger than {MAX_FILE_BYTES} bytes")
    import yaml

    try:
        document = yaml.load(raw, Loader=_unique_key_loader())  # noqa: S506 - a SafeLoader
    except WebConfigError as err:
        raise WebConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise WebConfigError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    except RecursionError:
        raise WebConfigError(f"{path} is nested too deeply") from None
    try:
        top = _table(document, "")
        tls = _tls(_table(top.get("tls_server_config"), "tls_server_config"), os.path.dirname(os.path.abspath(path)))
        http = _table(top.get("http_server_config"), "http_server_config")
        http2 = http.get("http2", True)  # accepted for the toolkit's sake: this server speaks HTTP/1.0 only
        if not isinstance(http2, bool):
            raise WebConfigError(f"http_server_config.http2: must be true or false, got {_shown(http2)}")
        config = WebConfig(tls, _users(top.get("basic_auth_users")), _headers(http.get("headers")))
        if tls is not None:
            server_context(tls)
    except WebConfigError as err:
        raise WebConfigError(f"{path}: {err}") from None
    return config


def server_context(tls: TlsSettings) -> ssl.SSLContext:
    """The SSL context that serves `tls`; an unreadable or mismatched file is a WebConfigError."""
    where = "tls_server_config"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_VERSIONS[tls.min_version]
    context.maximum_version = TLS_VERSIONS[tls.max_version]
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    except OSError as err:
        reason = err.strerror if not isinstance(err, ssl.SSLError) else err.reason or str(err)
        raise WebConfigError(f"{where}.cert_file/key_file: cannot load {tls.cert_file} with {tls.key_file}: {reason}") from None
    context.verify_mode = CLIENT_AUTH_TYPES[tls.client_auth_type]
    if tls.client_ca_file or tls.client_ca:
        try:
            context.load_verify_locations(cafile=tls.client_ca_file, cadata=tls.client_ca)
        except (OSError, ValueError) as err:
            key = "client_ca_file" if tls.client_ca_file else "client_ca"
            raise WebConfigError(f"{where}.{key}: cannot load the client CA: {getattr(err, 'strerror', None) or err}") from None
    suites = [CIPHER_SUITES_TLS12[name] for name in tls.cipher_suites if name in CIPHER_SUITES_TLS12]
    if suites:
        context.set_ciphers(_openssl_cipher_names(suites))
    if tls.prefer_server_cipher_suites:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    return context


def _openssl_cipher_names(codes: list[int]) -> str:
    """IANA codes -> OpenSSL's names, in the order given (the server's preference)."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    probe.set_ciphers("ALL:@SECLEVEL=0")
    by_code = {cipher["id"] & 0xFFFF: cipher["name"] for cipher in probe.get_ciphers()}
    missing = [hex(code) for code in codes if code not in by_code]
    if missing:
        raise WebConfigError(f"tls_server_config.cipher_suites: this Python's OpenSSL ({ssl.OPENSSL_VERSION}) "
                             f"lacks {', '.join(missing)}")
    return ":".join(by_code[code] for code in codes)


class BasicAuth:
    """Checks an Authorization header against bcrypt hashes. bcrypt costs tens of milliseconds by
    design, so results are remembered per (user, hash, password) digest, a bounded few, as the toolkit
    does; an unknown user costs a bcrypt check all the same, so that timing does not reveal names."""

    def __init__(self, users: Mapping[str, bytes], remembered: int = 100) -> None:
        self.users = users
        self.remembered = remembered
        self._results: OrderedDict[bytes, bool] = OrderedDict()
        self._lock = threading.Lock()
        self._decoy = b""
        if users:
            import bcrypt  # here: only an agent with basic_auth_users loads it

            cost = max(int(h.split(b"$")[2]) for h in users.values())
            self._decoy = bcrypt.hashpw(os.urandom(16), bcrypt.gensalt(rounds=cost))

    def allows(self, authorization: str | None) -> bool:
        if not self.users:
            return True
        import bcrypt

        credentials = _basic_credentials(authorization)
        if credentials is None:
            return False
        user, password = credentials
        known = user in self.users
        hashed = self.users.get(user, self._decoy)
        key = hashlib.sha256(b"\0".join([user.encode(), hashed, password])).digest()
        with self._lock:  # one bcrypt at a time: a flood of guesses costs one core, not all
            result = self._results.get(key)
            if result is None:
                # bcrypt uses a password's first 72 bytes: so do Go's check and htpasswd (this
                # binding refuses longer ones instead, and the same file must work for both)
                matches = bcrypt.checkpw(password[:72], hashed)
                result = known and matches
                self._results[key] = result
                while len(self._results) > self.remembered:
                    self._results.popitem(last=False)
        return result


def _basic_credentials(authorization: str | None) -> tuple[str, bytes] | None:
    """(user, password) from `Basic base64(user:password)`; None for anything else."""
    scheme, _, encoded = (authorization or "").strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None
    try:
        return user.decode(), password
    except UnicodeDecodeError:
        return None


def is_tls_record(first: bytes) -> bool:
    return first[:1] == b"\x16"  # a TLS handshake record: a ClientHello


PLAIN_HTTP_TO_TLS_ANSWER = (b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
                            b"Client sent an HTTP request to an HTTPS server.\n")  # as Go's server answers


class TlsServer:
    """The server side of TLS: the context the handshake uses, and the check of the client
    certificate's SANs that follows it (client_allowed_sans)."""

    def __init__(self, tls: TlsSettings) -> None:
        self.tls = tls
        self.context = server_context(tls)

    def refusal(self, peercert: Mapping[str, Any] | None) -> str | None:
        """Why a client that finished its handshake is refused, None when it is admitted."""
        allowed = self.tls.client_allowed_sans
        if allowed is None:
            return None
        entries = (peercert or {}).get("subjectAltName", ())
        sans = {_san(entry[1]) for entry in entries if isinstance(entry, tuple) and isinstance(entry[1], str)}
        if sans & allowed:
            return None
        return f"client certificate has none of client_allowed_sans (it has {sorted(sans)})"
