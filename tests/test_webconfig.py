"""The web configuration file (the exporter toolkit's format): what is read, what is refused and how,
and what the HTTP server does with it (TLS, client certificates, basic auth, headers) on every path."""

from __future__ import annotations

import base64
import http.client
import socket
import ssl
import subprocess

import bcrypt
import pytest
from mpswatch.exporter import cached_exposition, serve
from mpswatch.exposition import render
from mpswatch.snapshot import NodeSnapshot
from mpswatch.webconfig import BasicAuth, WebConfigError, load_web_config

from tests.kit.agentproc import agent_env, free_port, mpswatch_cmd
from tests.kit.tlscerts import OPENSSL, make_pki

needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="needs the openssl program to make test certificates")

PASSWORD = "s3cret pass"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if OPENSSL is None:
        pytest.skip("needs the openssl program to make test certificates")
    return make_pki(tmp_path_factory.mktemp("pki"))


def write(tmp_path, text, name="web.yml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def tls_lines(pki, **more):
    lines = [f"  cert_file: {pki.server_cert}", f"  key_file: {pki.server_key}"]
    lines += [f"  {key}: {value}" for key, value in more.items()]
    return "tls_server_config:\n" + "\n".join(lines) + "\n"


def test_an_empty_file_serves_plain_http_without_authentication(tmp_path):
    config = load_web_config(write(tmp_path, ""))
    assert (config.tls, dict(config.users), config.headers) == (None, {}, ())


@needs_openssl
def test_a_full_file_is_read_typed(tmp_path, pki):
    text = tls_lines(pki, client_auth_type="RequireAndVerifyClientCert", client_ca_file=pki.ca_cert, min_version="TLS13",
                     cipher_suites="[TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, TLS_AES_128_GCM_SHA256]")
    text += "http_server_config:\n  http2: false\n  headers:\n    X-Frame-Options: deny\n    X-XSS-Protection: ''\n"
    text += f"basic_auth_users:\n  prometheus: '{HASH}'\n"
    config = load_web_config(write(tmp_path, text))
    assert config.tls is not None
    assert (config.tls.client_auth_type, config.tls.min_version, config.tls.max_version) == (
        "RequireAndVerifyClientCert", "TLS13", "TLS13")
    assert config.tls.cipher_suites == ("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "TLS_AES_128_GCM_SHA256")
    assert dict(config.users) == {"prometheus": HASH.encode()}
    assert config.headers == (("X-Frame-Options", "deny"),)  # a blank header is unset, as in the toolkit


@needs_openssl
def test_relative_paths_are_relative_to_the_file_as_in_the_toolkit(tmp_path, pki):
    config = load_web_config(write(pki.ca_cert.parent, "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"))
    assert config.tls is not None and config.tls.cert_file == str(pki.server_cert)


@pytest.mark.parametrize(
    "text,needle",
    [
        ("tls_server_config: [\n", "is not valid YAML"),
        ("- a\n- b\n", "the file must be a mapping"),
        ("web_config:\n  x: 1\n", "web_config: unknown key; known keys: basic_auth_users, http_server_config"),
        ("tls_server_config:\n  cert_fil: x.crt\n", "tls_server_config.cert_fil: unknown key"),
        ("rate_limit:\n  interval: 1s\n  burst: 5\n", "rate_limit: not supported"),
        ("tls_server_config:\n  cert: '-----BEGIN'\n", "tls_server_config.cert: inline certificates are not supported"),
        ("tls_server_config:\n  curve_preferences: [X25519]\n", "tls_server_config.curve_preferences: not supported"),
        ("tls_server_config:\n  key_file: x.key\n", "tls_server_config.cert_file: missing"),
        ("tls_server_config:\n  cert_file: x.crt\n", "tls_server_config.key_file: missing"),
        ("tls_server_config:\n  cert_file: 5\n", "tls_server_config.cert_file: must be a string, got 5"),
        ("http_server_config:\n  headers:\n    Server: evil\n", "header 'Server' cannot be set"),
        ("http_server_config:\n  headers:\n    X-Frame-Options: allow\n", "X-Frame-Options: must be one of deny, sameorigin"),
        ("http_server_config:\n  http2: maybe\n", "http_server_config.http2: must be true or false"),
        ("http_server_config:\n  headers:\n    Content-Security-Policy: \"default-src 'self' …\"\n", "one line of printable ASCII"),
        ("basic_auth_users:\n  alice: plaintext\n", "basic_auth_users.alice: must be a bcrypt hash"),
        ("basic_auth_users:\n  alice: '$2y$99$" + "a" * 53 + "'\n", "basic_auth_users.alice: must be a bcrypt hash"),
        ("basic_auth_users:\n  'a:b': '" + HASH + "'\n", "without ':'"),
        ("basic_auth_users:\n  yes: '" + HASH + "'\n", "must be a non-empty string"),  # YAML 1.1 reads yes as true
        ("basic_auth_users:\n  alice: '" + HASH + "'\n  alice: '" + HASH + "'\n", "key 'alice' is given twice (line 3)"),
        ("basic_auth_users: [alice]\n", "basic_auth_users: must be a mapping"),
    ],
)
def test_a_file_that_cannot_be_served_as_written_is_refused_by_key(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(WebConfigError) as raised:
        load_web_config(path)
    message = str(raised.value)
    assert needle in message and message.startswith(path) and "\n" not in message


def test_a_value_grown_by_yaml_aliases_is_quoted_in_a_bounded_line(tmp_path):
    """Six levels of ten aliases each: a million items from a few hundred bytes."""
    levels = ["&l0 [x, x, x, x, x, x, x, x, x, x]"] + [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 6)]
    with pytest.raises(WebConfigError, match="http2: must be true or false") as raised:
        load_web_config(write(tmp_path, "http_server_config:\n  http2: [" + ", ".join(levels) + "]\n"))
    assert len(str(raised.value)) < 1000


def test_a_file_nested_too_deeply_is_refused_not_a_crash(tmp_path):
    with pytest.raises(WebConfigError, match="nested too deeply"):
        load_web_config(write(tmp_path, "http_server_config:\n  http2: " + "[" * 5000 + "]" * 5000 + "\n"))


@needs_openssl
@pytest.mark.parametrize(
    "more,needle",
    [
        ({"client_auth_type": "RequireAnyClientCert", "client_ca_file": "ca.crt"}, "accepts unverified client certificates"),
        ({"client_auth_type": "RequestClientCert"}, "accepts unverified client certificates"),
        ({"client_auth_type": "Always"}, "client_auth_type: must be one of NoClientCert"),
        ({"client_ca_file": "ca.crt"}, "a client CA is given without a client_auth_type that verifies"),
        ({"client_auth_type": "RequireAndVerifyClientCert"}, "needs client_ca_file"),
        ({"client_auth_type": "VerifyClientCertIfGiven", "client_ca_file": "missing.crt"}, "client_ca_file: cannot load the client CA"),
        ({"min_version": "TLS9"}, "min_version: must be one of TLS10, TLS11, TLS12, TLS13, got 'TLS9'"),
        ({"min_version": "TLS13", "max_version": "TLS12"}, "min_version: TLS13 is above max_version TLS12"),
        ({"cipher_suites": "[TLS_RSA_WITH_RC4_128_SHA]"}, "unknown cipher suite 'TLS_RSA_WITH_RC4_128_SHA'"),
        ({"prefer_server_cipher_suites": "sometimes"}, "prefer_server_cipher_suites: must be true or false"),
        ({"client_auth_type": "VerifyClientCertIfGiven", "client_ca_file": "ca.crt", "client_allowed_sans": "[a.test]"},
         "client_allowed_sans: needs client_auth_type RequireAndVerifyClientCert"),
        ({"client_auth_type": "RequireAndVerifyClientCert", "client_ca_file": "ca.crt", "client_allowed_sans": "[]"},
         "client_allowed_sans: must be a non-empty list"),
    ],
)
def test_tls_settings_python_cannot_honour_are_refused(pki, more, needle):
    with pytest.raises(WebConfigError, match=needle):
        load_web_config(write(pki.ca_cert.parent, tls_lines(pki, **more), name="bad.yml"))


@needs_openssl
def test_certificate_files_that_do_not_load_are_refused_at_start(tmp_path, pki):
    with pytest.raises(WebConfigError, match="cert_file/key_file: cannot load .*No such file"):
        load_web_config(write(tmp_path, f"tls_server_config:\n  cert_file: missing.crt\n  key_file: {pki.server_key}\n"))
    with pytest.raises(WebConfigError, match="cert_file/key_file: cannot load"):  # the client's key with the server's cert
        load_web_config(write(tmp_path, f"tls_server_config:\n  cert_file: {pki.server_cert}\n  key_file: {pki.client_key}\n"))


def basic(user: str | bytes, password: str | bytes) -> str:
    raw = (user if isinstance(user, bytes) else user.encode()) + b":" + (password if isinstance(password, bytes) else password.encode())
    return "Basic " + base64.b64encode(raw).decode()


def test_basic_auth_takes_the_right_password_only():
    auth = BasicAuth({"prometheus": HASH.encode()})
    assert auth.allows(basic("prometheus", PASSWORD))
    assert auth.allows(basic("prometheus", PASSWORD))  # remembered
    assert not auth.allows(basic("prometheus", "wrong"))
    assert not auth.allows(basic("nobody", PASSWORD))
    assert not auth.allows(basic("prometheus", PASSWORD + "x" * 100))
    for header in (None, "", "Bearer abc", "Basic", "Basic !!!notbase64", "Basic " + base64.b64encode(b"no-colon").decode(),
                   basic(b"\xff\xfe", PASSWORD)):
        assert not auth.allows(header)
    assert BasicAuth({}).allows(None)


def test_a_password_past_bcrypts_72_bytes_is_checked_on_those_as_go_and_htpasswd_do():
    long_password = "p" * 80
    auth = BasicAuth({"ops": bcrypt.hashpw(long_password[:72].encode(), bcrypt.gensalt(rounds=4))})
    assert auth.allows(basic("ops", long_password))
    assert not auth.allows(basic("ops", "q" * 80))


def test_basic_auth_remembers_a_bounded_few():
    auth = BasicAuth({"prometheus": HASH.encode()}, remembered=3)
    for attempt in range(10):
        auth.allows(basic("prometheus", f"guess {attempt}"))
    assert len(auth._results) == 3
    assert auth.allows(basic("prometheus", PASSWORD))


@pytest.fixture
def served(tmp_path, pki):
    """Starts the HTTP server with a web configuration; yields a function that starts it."""
    servers = []

    def start(text: str) -> int:
        port = free_port()
        exposition = cached_exposition(NodeSnapshot, lambda snapshot: render(snapshot, "9.9.9"))
        servers.append(serve(f"127.0.0.1:{port}", exposition, lambda: (True, "fine"), web=load_web_config(write(tmp_path, text))))
        return port

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


def client_context(pki, with_certificate: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    if with_certificate:
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return context


def get(port, path, context=None, authorization=None):
    connection = (http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context) if context
                  else http.client.HTTPConnection("127.0.0.1", port, timeout=10))
    connection.request("GET", path, headers={"Authorization": authorization} if authorization else {})
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response, body


@needs_openssl
def test_every_path_needs_the_password_over_tls(served, pki):
    port = served(tls_lines(pki) + f"basic_auth_users:\n  prometheus: '{HASH}'\n"
                  "http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n")
    context = client_context(pki)
    for path in ("/metrics", "/healthz", "/", "/nope"):
        response, body = get(port, path, context)
        assert (response.status, body) == (401, b"Unauthorized\n")
        assert response.getheader("WWW-Authenticate") == 'Basic realm="mpswatch"'
        assert get(port, path, context, basic("prometheus", "wrong"))[0].status == 401
    response, body = get(port, "/metrics", context, basic("prometheus", PASSWORD))
    assert response.status == 200 and b"mps_exporter_build_info" in body
    assert response.getheader("X-Content-Type-Options") == "nosniff"
    assert get(port, "/healthz", context, basic("prometheus", PASSWORD))[0].status == 200


@needs_openssl
def test_plain_http_to_a_tls_port_gets_400_and_the_server_keeps_serving(served, pki):
    port = served(tls_lines(pki))
    response, body = get(port, "/metrics")
    assert response.status == 400 and b"HTTP request to an HTTPS server" in body
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:  # a client that leaves mid-handshake
        sock.sendall(b"\x16\x03\x01\x00")
    assert get(port, "/metrics", client_context(pki))[0].status == 200


@needs_openssl
def test_a_client_that_never_says_hello_holds_up_no_one_else(served, pki):
    port = served(tls_lines(pki))
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        assert get(port, "/healthz", client_context(pki))[0].status == 200


@needs_openssl
def test_client_certificates_are_verified_when_required(served, pki):
    port = served(tls_lines(pki, client_auth_type="RequireAndVerifyClientCert", client_ca_file=pki.ca_cert))
    assert get(port, "/healthz", client_context(pki, with_certificate=True))[0].status == 200
    with pytest.raises((ssl.SSLError, ConnectionError)):  # TLS 1.3: the refusal arrives with the first read
        get(port, "/healthz", client_context(pki))


@needs_openssl
@pytest.mark.parametrize("allowed,admitted", [("[prometheus.test]", True), ("['0:0::1']", True), ("[other.test, 127.0.0.2]", False)])
def test_client_allowed_sans_admit_only_a_certificate_naming_one(served, pki, allowed, admitted):
    port = served(tls_lines(pki, client_auth_type="RequireAndVerifyClientCert", client_ca_file=pki.ca_cert,
                            client_allowed_sans=allowed))
    if admitted:
        assert get(port, "/healthz", client_context(pki, with_certificate=True))[0].status == 200
    else:  # closed after the handshake: the client sees it on its first read or write
        with pytest.raises((ssl.SSLError, ConnectionError)):
            get(port, "/healthz", client_context(pki, with_certificate=True))


@needs_openssl
def test_min_version_is_enforced(served, pki):
    port = served(tls_lines(pki, min_version="TLS13"))
    old = client_context(pki)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        get(port, "/healthz", old)
    assert get(port, "/healthz", client_context(pki))[0].status == 200


def run_agent(args, env=None):
    return subprocess.run(mpswatch_cmd("run", "--listen", f"127.0.0.1:{free_port()}", *args), env=agent_env(env),
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("by_env", [False, True])
def test_a_bad_web_config_file_exits_2_with_one_line_naming_the_setting_and_its_source(tmp_path, by_env):
    path = write(tmp_path, "rate_limit:\n  burst: 5\n")
    run = run_agent([] if by_env else ["--web.config.file", path], {"MPSWATCH_WEB_CONFIG_FILE": path} if by_env else None)
    source = "environment MPSWATCH_WEB_CONFIG_FILE" if by_env else "command line"
    assert run.returncode == 2
    assert run.stderr == f"mpswatch: invalid config: web.config_file (from {source}): {path}: rate_limit: not supported\n"


@needs_openssl
def test_tls_connections_stalled_before_or_in_the_handshake_are_closed_at_the_deadline(tmp_path, pki):
    port = free_port()
    exposition = cached_exposition(NodeSnapshot, lambda snapshot: render(snapshot, "9.9.9"))
    httpd = serve(f"127.0.0.1:{port}", exposition, lambda: (True, "fine"),
                  web=load_web_config(write(tmp_path, tls_lines(pki))), deadline_seconds=1.5)
    stalled = [socket.create_connection(("127.0.0.1", port), timeout=20) for _ in range(2)]
    try:
        stalled[1].sendall(b"\x16\x03\x01\x00")  # the first bytes of a ClientHello, then nothing
        assert get(port, "/healthz", client_context(pki))[0].status == 200
        for sock in stalled:
            try:
                assert sock.recv(65536) == b""
            except ConnectionResetError:
                pass
        assert httpd.drops() == {"deadline": 2}
    finally:
        for sock in stalled:
            sock.close()
        httpd.shutdown()
