"""Certificates and site keys for a TLS federation with SuperNode authentication, made with `cryptography`.

- a CA (self-signed, EC P-384) and a SuperLink server certificate it signs, valid for the given hosts (SAN);
- per site, an EC P-384 key pair: the private key (PEM) stays at the site (`flower-supernode
  --auth-supernode-private-key`), the public key (OpenSSH format, what `flwr supernode register` takes) is registered
  at the SuperLink; a SuperNode whose key is not registered is refused.

For the loopback federation and tests. In production the hospitals' own PKI issues the SuperLink certificate; the
site keys are made the same way (`ssh-keygen -t ecdsa -b 384 -N "" -f site`).
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP384R1())


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_tls(out: str | Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), days: int = 30) -> dict[str, Path]:
    """CA + server certificate for `hosts`. Returns {"ca", "cert", "key"} paths under `out`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, srv_key = _key(), _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vlmtrain federation CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA384()))
    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    srv = (x509.CertificateBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
           .issuer_name(ca_name).public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
           .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=days))
           .add_extension(x509.SubjectAlternativeName(sans), critical=False)
           .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
           .sign(ca_key, hashes.SHA384()))
    paths = {"ca": out / "ca.crt", "cert": out / "server.pem", "key": out / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(srv.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(_pem_key(srv_key))
    paths["key"].chmod(0o600)
    return paths


def make_site_key(out: str | Path, name: str) -> dict[str, Path]:
    """A site's EC P-384 key pair, both in OpenSSH format: {"private", "public"}."""
    from cryptography.hazmat.primitives import serialization

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key = _key()
    priv, pub = out / f"{name}.key", out / f"{name}.pub"
    # OpenSSH format, as `ssh-keygen` writes it: the SuperNode reads its key with `load_ssh_private_key`
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    priv.chmod(0o600)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                  serialization.PublicFormat.OpenSSH))
    return {"private": priv, "public": pub}
