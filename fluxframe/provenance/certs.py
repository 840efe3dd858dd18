"""Development certificates for C2PA signing: a local test CA and a signing certificate it issued.

For trying fluxframe out only. Images signed with these read back "Valid" but not "Trusted" anywhere except
where the reader is given ``ca.pem`` as a trust anchor (``fluxframe verify --trust ca.pem``). Production needs
a signing certificate from a CA on the C2PA trust list (or one your verifiers are told to trust).

The recipe is the one the c2pa library accepts: a root CA (basicConstraints CA, keyUsage keyCertSign and
cRLSign, subject key id) and a leaf (not a CA, keyUsage digitalSignature, extendedKeyUsage emailProtection,
subject and authority key ids). ``chain.pem`` holds the leaf then the root, as c2pa wants the chain.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from fluxframe.errors import ProvenanceError

ALGORITHMS = ("es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519")


def _new_key(algorithm: str):
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if algorithm == "es256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "es384":
        return ec.generate_private_key(ec.SECP384R1())
    if algorithm == "es512":
        return ec.generate_private_key(ec.SECP521R1())
    if algorithm.startswith("ps"):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048 if algorithm == "ps256" else 3072)
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ProvenanceError(f"unknown signing algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")


def _hash_for(algorithm: str):
    from cryptography.hazmat.primitives import hashes

    return {"es256": hashes.SHA256(), "es384": hashes.SHA384(), "es512": hashes.SHA512(),
            "ps256": hashes.SHA256(), "ps384": hashes.SHA384(), "ps512": hashes.SHA512()}.get(algorithm)


def _key_usage(*, sign: bool):
    from cryptography import x509

    return x509.KeyUsage(digital_signature=sign, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=not sign, crl_sign=not sign,
                         encipher_only=False, decipher_only=False)


def issue_certificates(*, algorithm: str = "es256", not_before: dt.datetime | None = None,
                       not_after: dt.datetime | None = None, days: int = 365,
                       organization: str = "fluxframe development") -> dict[str, bytes]:
    """A fresh root CA and a signing certificate, as PEM bytes: ``{"ca", "chain", "key", "ca_key"}``.

    Validity runs from ``not_before`` (default: an hour ago) to ``not_after`` (default: ``days`` later). The CA
    is valid a day on either side of the leaf. ``key`` is the leaf's unencrypted PKCS#8 private key.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    algorithm = algorithm.lower()
    if algorithm not in ALGORITHMS:
        raise ProvenanceError(f"unknown signing algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    start = not_before or dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
    end = not_after or start + dt.timedelta(days=days)
    if end <= start:
        raise ProvenanceError("the certificate must end after it starts")
    root_key, leaf_key = _new_key(algorithm), _new_key(algorithm)
    digest = _hash_for(algorithm)
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fluxframe dev root CA (NOT FOR PRODUCTION)"),
                           x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)])
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name).issuer_name(root_name).public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - dt.timedelta(days=1)).not_valid_after(end + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(sign=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
        .sign(root_key, digest)
    )
    leaf_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fluxframe dev signing (NOT FOR PRODUCTION)"),
                           x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)])
    leaf = (
        x509.CertificateBuilder()
        .subject_name(leaf_name).issuer_name(root_name).public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(sign=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
        .sign(root_key, digest)
    )
    pem = serialization.Encoding.PEM
    return {
        "ca": root.public_bytes(pem),
        "chain": leaf.public_bytes(pem) + root.public_bytes(pem),
        "key": leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        "ca_key": root_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    }


def write_private(path: Path, data: bytes, *, force: bool = False) -> None:
    """Write ``data`` to a file only its owner can read (mode 0600 from the moment it exists)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file overwritten with force keeps its old mode otherwise
        os.write(fd, data)
    finally:
        os.close(fd)


def make_dev_certificates(out_dir: Path, *, days: int = 365, algorithm: str = "es256",
                          force: bool = False) -> dict[str, Path]:
    """Write a test CA (``ca.pem``), a signing chain (``chain.pem``: leaf + root) and the leaf's private key
    (``key.pem``, mode 0600) into ``out_dir``. The CA's private key is not kept.

    Existing files are not overwritten unless ``force``. Returns ``{"ca", "chain", "key"}`` → paths.
    """
    if days < 1:
        raise ProvenanceError(f"--days must be at least 1, got {days}")
    out_dir = Path(out_dir)
    paths = {"ca": out_dir / "ca.pem", "chain": out_dir / "chain.pem", "key": out_dir / "key.pem"}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not force:
        raise ProvenanceError(f"{', '.join(existing)}: already exists; pass --force (force=True) to replace")
    made = issue_certificates(algorithm=algorithm, days=days)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_private(paths["key"], made["key"], force=force)
        for name in ("chain", "ca"):
            paths[name].write_bytes(made[name])
    except OSError as exc:
        raise ProvenanceError(f"{out_dir}: cannot write the certificates: {exc}") from exc
    return paths
