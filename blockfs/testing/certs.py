"""X.509 certificates for TLS tests, made with the ``openssl`` command.

:func:`make_tls_certs` writes a throwaway PKI into a directory, laid out the
way libnbd (``tls-certificates=DIR`` in an ``nbds`` URI) and QEMU
(``--object tls-creds-x509,dir=DIR,endpoint=client``) look for files::

    DIR/ca-cert.pem          the CA everything good is signed by
    DIR/ca-key.pem
    DIR/server-cert.pem      CN=localhost, SAN DNS:localhost, IP:127.0.0.1, ::1
    DIR/server-key.pem
    DIR/client-cert.pem      a client certificate signed by the CA
    DIR/client-key.pem
    DIR/wrong/ca-cert.pem    the *right* CA (so this client still trusts the server)
    DIR/wrong/client-cert.pem  a client certificate signed by another CA
    DIR/wrong/client-key.pem
    DIR/wrong-ca/ca-cert.pem   that other CA (and its key)

Keys are ECDSA P-256 (quick to generate). The extensions are the ones GnuTLS
(libnbd, QEMU) checks: CA basic constraints and keyCertSign on the CAs,
serverAuth / clientAuth extended key usage on the leaves.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import attrs

__all__ = ["TlsCerts", "make_tls_certs", "openssl_unavailable_reason"]

_DAYS = "2"

_CA_EXT = """\
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""

_SERVER_EXT = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""

_CLIENT_EXT = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


@attrs.frozen
class TlsCerts:
    """Where :func:`make_tls_certs` put everything."""

    #: libnbd / QEMU client directory of the good client (also holds the server's files).
    dir: Path
    #: A client directory whose client certificate is signed by the wrong CA.
    wrong_client_dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca-cert.pem"

    @property
    def server_cert(self) -> Path:
        return self.dir / "server-cert.pem"

    @property
    def server_key(self) -> Path:
        return self.dir / "server-key.pem"

    @property
    def client_cert(self) -> Path:
        return self.dir / "client-cert.pem"

    @property
    def client_key(self) -> Path:
        return self.dir / "client-key.pem"


def openssl_unavailable_reason() -> str | None:
    if shutil.which("openssl") is None:
        return "no 'openssl' command (Debian package openssl)"
    return None


def _openssl(*args: str | Path) -> None:
    cmd = ["openssl", *(str(a) for a in args)]
    done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with status {done.returncode}:\n{done.stdout}{done.stderr}")


def _key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path)
    path.chmod(0o600)


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert, ext = directory / "ca-key.pem", directory / "ca-cert.pem", directory / "ca.ext"
    ext.write_text(_CA_EXT)
    _key(key)
    _openssl(
        "req", "-new", "-x509", "-key", key, "-out", cert, "-days", _DAYS, "-subj", f"/O=blockfs tests/CN={name}",
        "-extensions", "v3_ca", "-config", _req_config(directory, ext),
    )
    return cert, key


def _req_config(directory: Path, ext: Path) -> Path:
    config = directory / "req.cnf"
    config.write_text(
        "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = unused\n[v3_ca]\n" + ext.read_text()
    )
    return config


def _leaf(directory: Path, stem: str, cn: str, ext_text: str, ca_cert: Path, ca_key: Path, serial: int) -> None:
    key, csr, cert = directory / f"{stem}-key.pem", directory / f"{stem}.csr", directory / f"{stem}-cert.pem"
    ext = directory / f"{stem}.ext"
    ext.write_text(ext_text)
    _key(key)
    _openssl("req", "-new", "-key", key, "-out", csr, "-subj", f"/O=blockfs tests/CN={cn}")
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-set_serial", str(serial),
        "-days", _DAYS, "-extfile", ext, "-out", cert,
    )
    csr.unlink()
    ext.unlink()


def make_tls_certs(directory: str | Path) -> TlsCerts:
    """Create a CA, a server certificate for localhost, a client certificate
    signed by the CA, and a client certificate signed by a second, unrelated
    CA, in `directory` (created if missing). Needs the ``openssl`` command."""
    reason = openssl_unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    root = Path(directory)
    wrong_ca_dir, wrong = root / "wrong-ca", root / "wrong"
    for d in (root, wrong_ca_dir, wrong):
        d.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _ca(root, "blockfs test CA")
    _leaf(root, "server", "localhost", _SERVER_EXT, ca_cert, ca_key, serial=2)
    _leaf(root, "client", "blockfs good client", _CLIENT_EXT, ca_cert, ca_key, serial=3)
    wrong_cert, wrong_key = _ca(wrong_ca_dir, "blockfs WRONG CA")
    _leaf(wrong, "client", "blockfs wrong client", _CLIENT_EXT, wrong_cert, wrong_key, serial=4)
    shutil.copyfile(ca_cert, wrong / "ca-cert.pem")  # this client trusts the server; the server must not trust it
    for d in (root, wrong_ca_dir):
        (d / "req.cnf").unlink()
        (d / "ca.ext").unlink()
    return TlsCerts(dir=root, wrong_client_dir=wrong)
