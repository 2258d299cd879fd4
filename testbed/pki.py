"""A throw-away certificate authority for the simulated hosts (testbed/harness.py): the
files an operator's PKI (or the Ansible role) gives a real host for migration over TLS
(README "Migration transport security"), made with openssl.

Each host gets one key and one certificate, valid as TLS server AND client (its libvirtd
serves peers with it; its libvirtd and QEMU present it to peers), with the host's
migration address as subjectAltName IP (peers check it). Two layouts of the same files:

- libvirt's (``pkipath``): cacert.pem, servercert.pem, serverkey.pem, clientcert.pem,
  clientkey.pem: libvirtd.conf's ca_file/cert_file/key_file and a client URI's ``pkipath``;
- QEMU's (``qemu.conf`` default_tls_x509_cert_dir): ca-cert.pem, server-cert.pem,
  server-key.pem, client-cert.pem, client-key.pem, readable by the QEMU user.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

DAYS = 2  # a test CA outlives no test run
QEMU_USER = "libvirt-qemu"  # Debian's qemu.conf default user: QEMU reads its TLS key itself
LIBVIRT_NAMES = {"ca": "cacert.pem", "cert": ("servercert.pem", "clientcert.pem"),
                 "key": ("serverkey.pem", "clientkey.pem")}
QEMU_NAMES = {"ca": "ca-cert.pem", "cert": ("server-cert.pem", "client-cert.pem"),
              "key": ("server-key.pem", "client-key.pem")}


def _openssl(*argv: str) -> None:
    r = subprocess.run(["openssl", *argv], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(argv[:2])} failed: {r.stderr.strip()[-800:]}")


class TestCA:
    """A CA in ``directory`` (ca.pem, ca.key); ``issue`` signs a key pair for a peer."""

    __test__ = False  # not a pytest class

    def __init__(self, directory: Path, name: str = "nodeagent test migration CA"):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cert, self.key = self.dir / "ca.pem", self.dir / "ca.key"
        if not self.cert.exists():
            _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                     "-keyout", str(self.key), "-out", str(self.cert), "-days", str(DAYS), "-subj", f"/CN={name}",
                     "-addext", "basicConstraints=critical,CA:TRUE",
                     "-addext", "keyUsage=critical,keyCertSign,cRLSign")
            os.chmod(self.key, 0o600)

    def issue(self, directory: Path, cn: str, ip: str | None = None, *, server: bool = True) -> tuple[Path, Path]:
        """A key and certificate for ``cn`` (SAN IP ``ip``) in ``directory``: (cert, key)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        key, csr, cert, ext = d / "key.pem", d / "req.csr", d / "cert.pem", d / "ext.cnf"
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn}")
        ext.write_text("basicConstraints=critical,CA:FALSE\n"
                       "keyUsage=critical,digitalSignature,keyEncipherment\n"
                       f"extendedKeyUsage={'serverAuth,clientAuth' if server else 'clientAuth'}\n"
                       + (f"subjectAltName=IP:{ip}\n" if ip else ""))
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
                 "-CAcreateserial", "-days", str(DAYS), "-out", str(cert), "-extfile", str(ext))
        csr.unlink()
        ext.unlink()
        os.chmod(key, 0o600)
        return cert, key

    def host_files(self, directory: Path, cn: str, ip: str) -> Path:
        """A host's files in both layouts: ``directory`` (libvirt's) and ``directory``/qemu."""
        d = Path(directory)
        cert, key = self.issue(d / "issued", cn, ip)
        _lay_out(d, self.cert, cert, key, LIBVIRT_NAMES)
        _lay_out(d / "qemu", self.cert, cert, key, QEMU_NAMES, group=QEMU_USER)
        shutil.rmtree(d / "issued")
        return d

    def client_files(self, directory: Path, cn: str) -> Path:
        """A client-only identity in libvirt's layout (a URI's ``pkipath``)."""
        d = Path(directory)
        cert, key = self.issue(d / "issued", cn, server=False)
        shutil.copyfile(self.cert, d / "cacert.pem")
        shutil.copyfile(cert, d / "clientcert.pem")
        shutil.copyfile(key, d / "clientkey.pem")
        os.chmod(d / "clientkey.pem", 0o600)
        shutil.rmtree(d / "issued")
        return d


def _lay_out(d: Path, ca: Path, cert: Path, key: Path, names: dict, group: str | None = None) -> None:
    d.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ca, d / names["ca"])
    for n in names["cert"]:
        shutil.copyfile(cert, d / n)
    for n in names["key"]:
        shutil.copyfile(key, d / n)
        os.chmod(d / n, 0o640 if group else 0o600)
        if group:
            shutil.chown(d / n, group=group)
    os.chmod(d, 0o750 if group else 0o711)  # 0711: QEMU reaches its qemu/ subdir
    if group:
        shutil.chown(d, group=group)


def subject(cn: str) -> str:
    """The DN libvirtd compares with tls_allowed_dn_list (gnutls' RFC 4514 form)."""
    return f"CN={cn}"
