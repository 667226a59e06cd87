"""A throwaway certificate authority for TLS tests, made with the openssl program: a CA, a server
certificate for 127.0.0.1, a client certificate, and the agent's web configuration files using them."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL = shutil.which("openssl")
EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(work: Path, *args: str) -> None:
    subprocess.run([OPENSSL or "openssl", *args], cwd=work, check=True, capture_output=True, timeout=60)


def _signed(work: Path, name: str, extensions: str) -> None:
    """`name`.key and `name`.crt, signed by the CA in `work`."""
    _openssl(work, "req", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
    (work / f"{name}.ext").write_text(extensions)
    _openssl(work, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext")


def make_pki(work: Path) -> Pki:
    work.mkdir(parents=True, exist_ok=True)
    _openssl(work, "req", "-x509", *EC_KEY, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=mpswatch test CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    _signed(work, "server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _signed(work, "client", "subjectAltName=DNS:prometheus.test,IP:::1\nextendedKeyUsage=clientAuth\n")
    return Pki(work / "ca.crt", work / "server.crt", work / "server.key", work / "client.crt", work / "client.key")
