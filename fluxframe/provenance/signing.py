"""C2PA signing of every output file with c2pa-python.

The manifest declares the image AI-generated — a ``c2pa.created`` action with digital source type
``trainedAlgorithmicMedia`` and fluxframe as its software agent — records the invisible watermark (a
``c2pa.watermarked.unbound`` action, when the mark is there) and carries fluxframe's own assertion,
``org.fluxframe.generation`` (schema in ``generation_assertion``): request id, model family and checkpoint id,
the watermark record, the safety verdicts, and a SHA-256 of the prompt (not the prompt itself, unless asked).

Everything that can be checked without an image is checked when the signer is built, so a deployment with a
bad key, passphrase or certificate refuses to start: files present, readable, key not readable by others,
passphrase right, certificate chain in its validity period, key matching the certificate, algorithm matching
the key, and finally one trial signature of a tiny image (which also reaches the timestamp authority, when
one is configured). A failure while signing an output raises ProvenanceError; the runner then deletes the
unsigned temporary file, so nothing unsigned is released.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import logging
import math
import os
import stat
import threading
from pathlib import Path
from typing import Any

from fluxframe.core.files import atomic_write
from fluxframe.core.hashing import sha256_text
from fluxframe.core.interfaces import OutputContext, Postprocessor
from fluxframe.errors import OutputError, ProvenanceError

log = logging.getLogger(__name__)

TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
ASSERTION_LABEL = "org.fluxframe.generation"
ASSERTION_SCHEMA_VERSION = 1
MEDIA_TYPES = ("image/png", "image/jpeg", "image/webp")
ALGORITHMS = ("es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519")
#: c2pa settings used for signing: no thumbnail (it adds ~160 KB and ~55 ms per image and shows the picture
#: to anyone reading the manifest after the pixels were stripped of it).
SIGN_SETTINGS = {"builder": {"thumbnail": {"enabled": False}}}

_CERT_KEY = "provenance.c2pa.certificate"
_KEY_KEY = "provenance.c2pa.private_key"
_ALG_KEY = "provenance.c2pa.algorithm"
_ENV_KEY = "provenance.c2pa.passphrase_env"


def _version() -> str:
    from fluxframe import __version__

    return __version__


def software_agent() -> dict[str, str]:
    return {"name": "fluxframe", "version": _version()}


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data: dataclasses as dicts, numpy scalars as numbers, NaN/inf as None, and
    anything else unknown as its string form (a manifest must always serialise)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return jsonable(value.item())
        except (TypeError, ValueError):
            pass
    return str(value)


def _sha256(text: str | None) -> str | None:
    return None if text is None else sha256_text(text)


def generation_assertion(context: OutputContext, *, include_prompt: bool = False) -> dict[str, Any]:
    """The data of the ``org.fluxframe.generation`` assertion (schema version 1):

    ``schema_version`` (1), ``generator`` ({name, version}), ``request_id``, ``model`` (the model family's
    ``describe()``: at least ``family`` and ``checkpoint``), ``prompt_sha256`` and ``negative_prompt_sha256``
    (hex SHA-256 of the UTF-8 text, None when absent), ``prompt`` and ``negative_prompt`` only when the deployment
    asks for them, ``watermark`` (the watermark postprocessor's record, or None when no watermark ran),
    ``safety_verdicts`` (the filters' verdicts: filter, version, allowed, target, scores, threshold, reason,
    action), ``created`` (UTC time of signing, ISO 8601); ``step_cache`` (its settings and the DiT evaluations
    computed and reused) only when a step cache ran.
    """
    request = context.request
    model = jsonable(dict(context.model or {}))
    data: dict[str, Any] = {
        "schema_version": ASSERTION_SCHEMA_VERSION,
        "generator": software_agent(),
        "request_id": getattr(request, "request_id", None),
        "model": {"family": model.pop("family", None), "checkpoint": model.pop("checkpoint", None), **model},
        "prompt_sha256": _sha256(getattr(request, "prompt", None)),
        "negative_prompt_sha256": _sha256(getattr(request, "negative_prompt", None)),
        "watermark": jsonable(context.records.get("watermark")),
        "safety_verdicts": jsonable(list(context.verdicts or [])),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }
    if getattr(context, "step_cache", None) is not None:
        data["step_cache"] = jsonable(context.step_cache)
    if include_prompt:
        data["prompt"] = getattr(request, "prompt", None)
        data["negative_prompt"] = getattr(request, "negative_prompt", None)
    return data


def _parse_generator(claim_generator: str | None) -> dict[str, str]:
    if claim_generator is None:
        return software_agent()
    name, _, version = claim_generator.strip().partition("/")
    if not name.strip():
        raise ProvenanceError(f"provenance.c2pa.claim_generator: must be 'name' or 'name/version', "
                              f"got {claim_generator!r}")
    return {"name": name.strip(), **({"version": version.strip()} if version.strip() else {})}


def _read(path: Path, key: str, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ProvenanceError(f"{key}: {path}: the {what} file does not exist") from None
    except IsADirectoryError:
        raise ProvenanceError(f"{key}: {path}: is a folder, not the {what} file") from None
    except OSError as exc:
        raise ProvenanceError(f"{key}: {path}: cannot read the {what} file: {exc.strerror or exc}") from None


def _fmt(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


def _subject(cert) -> str:
    from cryptography.x509.oid import NameOID

    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()


def load_certificates(path: Path) -> list:
    """The PEM certificates in ``path`` (signing certificate first), or ProvenanceError naming the config key."""
    from cryptography import x509

    data = _read(path, _CERT_KEY, "certificate")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ProvenanceError(f"{_CERT_KEY}: {path}: not a PEM certificate chain ({exc})") from None
    return certs


def check_validity(certs: list, path: Path, now: dt.datetime | None = None) -> None:
    now = now or dt.datetime.now(dt.timezone.utc)
    for position, cert in enumerate(certs):
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        which = "the signing certificate" if position == 0 else f"certificate {position + 1} of the chain"
        span = f"valid from {_fmt(start)} to {_fmt(end)}"
        if now > end:
            raise ProvenanceError(f"{_CERT_KEY}: {path}: {which} ({_subject(cert)!r}) expired on {_fmt(end)} "
                                  f"({span}); renew it")
        if now < start:
            raise ProvenanceError(f"{_CERT_KEY}: {path}: {which} ({_subject(cert)!r}) is not valid until "
                                  f"{_fmt(start)} ({span})")


def load_private_key(path: Path, passphrase_env: str | None):
    """The private key in ``path``, decrypted with the passphrase in the environment variable ``passphrase_env``.

    Refuses a key file that group or others may read or write (POSIX), an encrypted key without a passphrase,
    and a wrong passphrase — each with a message naming the file, the config key and what to do.
    """
    from cryptography.hazmat.primitives import serialization

    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ProvenanceError(f"{_KEY_KEY}: {path}: the private key file does not exist") from None
    except OSError as exc:
        raise ProvenanceError(f"{_KEY_KEY}: {path}: cannot read the private key file: {exc.strerror or exc}") from None
    if os.name == "posix" and stat.S_ISREG(mode) and mode & 0o077:
        raise ProvenanceError(f"{_KEY_KEY}: {path}: the private key file is accessible to group or others "
                              f"(mode {stat.S_IMODE(mode):04o}); refusing to use it. Run: chmod 600 {path}")
    data = _read(path, _KEY_KEY, "private key")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        pass  # encrypted: needs the passphrase
    except ValueError as exc:
        raise ProvenanceError(f"{_KEY_KEY}: {path}: not a PEM private key ({exc})") from None
    except Exception as exc:  # cryptography raises UnsupportedAlgorithm for keys it cannot use
        raise ProvenanceError(f"{_KEY_KEY}: {path}: cannot load the private key: {exc}") from None
    if not passphrase_env:
        raise ProvenanceError(f"{_KEY_KEY}: {path}: the private key is encrypted; set {_ENV_KEY} to the name of an "
                              "environment variable that holds its passphrase")
    passphrase = os.environ.get(passphrase_env)
    if not passphrase:
        raise ProvenanceError(f"{_ENV_KEY}: the private key {path} is encrypted, but the environment variable "
                              f"{passphrase_env} that should hold its passphrase is "
                              f"{'empty' if passphrase is not None else 'not set'}")
    try:
        return serialization.load_pem_private_key(data, password=passphrase.encode("utf-8"))
    except (ValueError, TypeError):
        raise ProvenanceError(f"{_ENV_KEY}: cannot decrypt the private key {path} with the passphrase in the "
                              f"environment variable {passphrase_env}: wrong passphrase") from None
    except Exception as exc:
        raise ProvenanceError(f"{_KEY_KEY}: {path}: cannot load the private key: {exc}") from None


def check_algorithm(algorithm: str, key, path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    curves = {"es256": "secp256r1", "es384": "secp384r1", "es512": "secp521r1"}
    if algorithm in curves:
        ok = isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == curves[algorithm]
        need = f"an EC key on curve {curves[algorithm]}"
    elif algorithm.startswith("ps"):
        ok = isinstance(key, rsa.RSAPrivateKey) and key.key_size >= 2048
        need = "an RSA key of at least 2048 bits"
    else:
        ok = isinstance(key, ed25519.Ed25519PrivateKey)
        need = "an Ed25519 key"
    if not ok:
        have = type(key).__name__.lstrip("_")
        if isinstance(key, ec.EllipticCurvePrivateKey):
            have = f"EC key on curve {key.curve.name}"
        elif isinstance(key, rsa.RSAPrivateKey):
            have = f"{key.key_size}-bit RSA key"
        raise ProvenanceError(f"{_ALG_KEY}: {algorithm} needs {need}, but the key in {path} is: {have}")


def _public_der(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _tiny_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (128, 128, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


def _resolve(path: str | Path, base_dir: Path | None) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() or base_dir is None else (Path(base_dir) / path).resolve()


class C2PASigner(Postprocessor):
    """Signs every output file with a C2PA manifest (PNG, JPEG, WebP)."""

    name = "c2pa"
    order = 200

    def __init__(self, certificate: Path, private_key: Path, algorithm: str = "es256",
                 passphrase_env: str | None = None, timestamp_url: str | None = None,
                 claim_generator: str | None = None, *, include_prompt: bool = False, base_dir: Path | None = None):
        """``base_dir``: the config file's folder, which relative certificate and key paths are taken from (given
        by fluxframe's options mechanism, fluxframe.core.options)."""
        from cryptography.hazmat.primitives import serialization

        self.algorithm = str(algorithm).lower()
        if self.algorithm not in ALGORITHMS:
            raise ProvenanceError(f"{_ALG_KEY}: unknown signing algorithm {algorithm!r}; "
                                  f"choose one of {', '.join(ALGORITHMS)}")
        self.certificate, self.private_key = (_resolve(p, base_dir) for p in (certificate, private_key))
        self.passphrase_env = passphrase_env or None
        self.timestamp_url = timestamp_url or None
        self.include_prompt = include_prompt
        self.generator = _parse_generator(claim_generator)

        certs = load_certificates(self.certificate)
        key = load_private_key(self.private_key, self.passphrase_env)
        check_algorithm(self.algorithm, key, self.private_key)
        check_validity(certs, self.certificate)
        if _public_der(certs[0].public_key()) != _public_der(key.public_key()):
            raise ProvenanceError(f"{_KEY_KEY}: {self.private_key} does not belong to the signing certificate "
                                  f"({_subject(certs[0])!r}, the first one in {self.certificate})")
        self.not_valid_after = certs[0].not_valid_after_utc
        if self.timestamp_url is None:
            days = (self.not_valid_after - dt.datetime.now(dt.timezone.utc)).days
            log.log(logging.WARNING if days < 30 else logging.INFO,
                    "no timestamp authority: the signatures read as invalid once the signing certificate expires "
                    "(%s, in %d days); set provenance.c2pa.timestamp_url", _fmt(self.not_valid_after), days)

        import c2pa

        chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        try:
            self._signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(
                alg=self.algorithm.encode(), sign_cert=chain, private_key=key_pem,
                ta_url=self.timestamp_url.encode() if self.timestamp_url else None))
            self._context = c2pa.Context.from_dict(SIGN_SETTINGS)
        except c2pa.C2paError as exc:
            raise ProvenanceError(f"{_CERT_KEY}: the c2pa library refuses this certificate and key: {exc}") from None
        finally:
            del key_pem
        self._lock = threading.Lock()
        # One trial signature: what the c2pa library itself refuses (certificate extensions, an unreachable
        # timestamp authority) stops the deployment now rather than at its first image.
        try:
            self.sign_stream(io.BytesIO(_tiny_png()), io.BytesIO(), "image/png", self._manifest({}, None))
        except ProvenanceError as exc:
            hint = (f"; the timestamp authority {self.timestamp_url} (provenance.c2pa.timestamp_url) must be "
                    "reachable" if self.timestamp_url else "")
            raise ProvenanceError(f"provenance.c2pa: a trial signature with {self.certificate} and "
                                  f"{self.private_key} failed: {exc}{hint}") from None

    # -- the manifest ------------------------------------------------------------------------------------------

    def _manifest(self, assertion: dict, watermark: dict | None) -> dict:
        agent = software_agent()
        actions: list[dict[str, Any]] = [{
            "action": "c2pa.created",
            "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
            "softwareAgent": agent,
            "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        }]
        if watermark and watermark.get("applied") and watermark.get("readable_after_encoding", True):
            actions.append({
                "action": "c2pa.watermarked.unbound",
                "softwareAgent": agent,
                "description": f"invisible watermark, method {watermark.get('method')}, "
                               f"{watermark.get('length')}-bit message (see {ASSERTION_LABEL})",
            })
        assertions: list[dict[str, Any]] = [{"label": "c2pa.actions", "data": {"actions": actions}}]
        if assertion:
            assertions.append({"label": ASSERTION_LABEL, "data": assertion})
        return {"claim_generator_info": [self.generator], "assertions": assertions}

    def manifest(self, context: OutputContext) -> dict:
        """The manifest definition this signer writes for ``context`` (c2pa-python's JSON form)."""
        assertion = generation_assertion(context, include_prompt=self.include_prompt)
        return self._manifest(assertion, assertion["watermark"])

    # -- signing -----------------------------------------------------------------------------------------------

    def sign_stream(self, source, dest, media_type: str, manifest: dict) -> None:
        """Sign ``source`` (a readable binary stream) into ``dest`` (a writable, seekable one)."""
        import c2pa

        if media_type not in MEDIA_TYPES:
            raise ProvenanceError(f"cannot sign {media_type}: fluxframe signs {', '.join(MEDIA_TYPES)}")
        try:
            with c2pa.Builder(manifest, context=self._context) as builder, self._lock:
                builder.sign(self._signer, media_type, source, dest)
        except c2pa.C2paError as exc:
            raise ProvenanceError(f"C2PA signing failed: {exc}") from exc

    def process_file(self, path: Path, media_type: str, context: OutputContext) -> None:
        """Sign ``path`` in place: the signed file is written beside it and renamed over it."""
        path = Path(path)
        manifest = self.manifest(context)

        def sign(signed: Path) -> None:
            with open(signed, "w+b") as dest, open(path, "rb") as source:
                self.sign_stream(source, dest, media_type, manifest)

        try:
            atomic_write(path, sign, mode=stat.S_IMODE(os.stat(path).st_mode))
        except ProvenanceError as exc:
            raise ProvenanceError(f"{path}: {exc}") from exc.__cause__
        except (OSError, OutputError) as exc:
            raise ProvenanceError(f"{path}: cannot sign the file: {exc}") from exc
        context.records["c2pa"] = {"signed": True, "summary": f"signed ({self.algorithm}, {self.certificate.name})",
                                   "algorithm": self.algorithm,
                                   "certificate": str(self.certificate),
                                   "timestamp_authority": self.timestamp_url}
