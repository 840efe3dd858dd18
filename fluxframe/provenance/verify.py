"""``fluxframe verify``: check an image's C2PA manifest and invisible watermark.

The manifest is read and validated by the c2pa library (signature, hash binding of the manifest to the file's
bytes, certificate chain against the trust anchors given), offline: no OCSP, no remote manifests. The
watermark is decoded from the pixels and compared with every known message (fluxframe's own, the FLUX reference
code's, the one the manifest declares) or only with the ones the caller names — so a later, stronger method can
be added to the list while old marks keep being recognised: fluxframe's message is looked for as a
``fluxframe-rs`` mark (the default method), as a ``fluxframe-ss`` mark (the default before it) and as a ``dwtDct``
mark (what fluxframe wrote before those, and how the FLUX reference code marks its images). A message given as
bare bits is looked for with all three. A ``fluxframe-rs`` mark is reported with the rotation and scale it was
found at.

``ok`` means everything checks: a manifest is present, its signature is valid, it is bound to these exact
pixels (nothing altered since signing), its certificate chains to a trusted anchor, it declares the image
AI-generated, and the watermark agrees with it — found, or, when the signed manifest says none could be
embedded (image too small) or that it did not survive the file's encoding, consistently absent.
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxframe.errors import ProvenanceError, RequestError
from fluxframe.provenance.signing import ASSERTION_LABEL, TRAINED_ALGORITHMIC_MEDIA
from fluxframe.provenance.watermark import (
    FLUXFRAME_MESSAGE,
    KNOWN_MESSAGES,
    LATTICE_METHOD,
    ROBUST_METHOD,
    THRESHOLD,
    TILED,
    match,
    validate_message,
    validate_method,
)

_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"))
#: Reading settings: trust checked, nothing fetched over the network.
READ_SETTINGS = {"verify": {"verify_trust": True, "ocsp_fetch": False, "remote_manifest_fetch": False}}
_HASH_MATCH = ("assertion.dataHash.match", "assertion.boxesHash.match", "assertion.bmffHash.match")


@dataclass
class VerifyReport:
    """What ``verify`` found. ``ok`` is True only when every check passed; ``reasons`` says why not."""

    file: str
    media_type: str | None = None
    manifest_present: bool = False
    signature_valid: bool = False
    bound_to_pixels: bool = False  # the manifest's hash of the file matches: pixels unchanged since signing
    trusted: bool = False
    altered: bool | None = None  # None: cannot tell (no manifest)
    validation_state: str | None = None  # c2pa's: "Invalid", "Valid" (signature fine, signer not trusted), "Trusted"
    validation_codes: dict[str, list[str]] = field(default_factory=dict)  # success / informational / failure
    failures: list[dict[str, str]] = field(default_factory=list)  # failure codes with c2pa's explanations
    ai_generated: bool = False
    digital_source_type: str | None = None
    generator: str | None = None
    signer: dict[str, Any] | None = None
    fluxframe: dict[str, Any] | None = None  # the org.fluxframe.generation assertion
    watermark: dict[str, Any] = field(default_factory=dict)
    trust_anchors: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ok: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    def summary(self) -> str:
        lines = [f"{self.file}: {'OK' if self.ok else 'FAILED'}"]
        if not self.manifest_present:
            lines.append("  manifest:     none (never signed, or stripped by a re-encode)")
        else:
            who = ""
            if self.signer:
                who = ", ".join(str(self.signer[k]) for k in ("common_name", "issuer") if self.signer.get(k))
                who = f", signed by {who}" if who else ""
            lines.append(f"  manifest:     {self.validation_state or 'unreadable'}{who}")
            lines.append(f"  signature:    {'valid' if self.signature_valid else 'INVALID'}; signer "
                         f"{'trusted' if self.trusted else 'NOT trusted'}")
            state = "ALTERED since signing" if self.altered else "unchanged since signing"
            lines.append(f"  pixels:       {state}")
            lines.append(f"  AI-generated: {'yes' if self.ai_generated else 'not declared'}"
                         + (f" ({self.digital_source_type.rsplit('/', 1)[-1]})" if self.digital_source_type else ""))
            if self.generator:
                lines.append(f"  generator:    {self.generator}")
            if self.fluxframe:
                model = self.fluxframe.get("model") or {}
                lines.append(f"  model:        {model.get('family')} (checkpoint {model.get('checkpoint')})")
                verdicts = self.fluxframe.get("safety_verdicts") or []
                if verdicts:
                    passed = sum(1 for v in verdicts if isinstance(v, dict) and v.get("allowed"))
                    lines.append(f"  safety:       {passed} of {len(verdicts)} filter verdicts allowed")
        wm = self.watermark
        ss = wm.get("robust") or {}
        if wm.get("detected") and wm.get("method") in TILED:
            lines.append(f"  watermark:    {wm['message']} ({wm['method']}), message {wm['decoded']}, confidence "
                         f"{wm['confidence']:.1f} (threshold {wm['threshold']}), {wm['bit_errors']} bit errors "
                         "corrected")
            lines.append(f"  geometry:     {_geometry(wm)}")
        elif wm.get("detected"):
            lines.append(f"  watermark:    {wm['message']} ({wm['method']}), {wm['agreement']:.0%} of bits agree")
        elif ss.get("decoded"):
            lines.append(f"  watermark:    a {ss.get('method', ROBUST_METHOD)} mark with message {ss['decoded']} "
                         f"(confidence {ss['confidence']:.1f}), none of the messages looked for")
        else:
            lines.append(f"  watermark:    none found ({wm.get('reason') or 'not checked'})")
        if wm.get("matches_configured") is not None:
            verdict = "matches" if wm["matches_configured"] else "does NOT match"
            lines.append(f"  configured:   the watermark {verdict} the deployment's configured message")
        lines += [f"  note: {note}" for note in self.notes]
        lines += [f"  - {reason}" for reason in self.reasons]
        return "\n".join(lines)


def _geometry(result: dict) -> str:
    """The estimated rotation and scale of a tiled mark, in words."""
    parts = []
    if result.get("rotation") is not None:
        parts.append(f"rotated {round(result['rotation'], 1) + 0.0:+.1f}° (counter-clockwise)")  # + 0.0: no -0.0
    if result.get("scale"):
        x, y = result["scale"]
        parts.append(f"scale x {x:.3f}, y {y:.3f}")
    return ", ".join(parts) or "not estimated"


def sniff_media_type(data: bytes) -> str | None:
    for magic, media_type in _MAGIC:
        if data.startswith(magic):
            return media_type
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def read_image(path: Path) -> tuple[bytes, Any]:
    """The file's bytes, read once, and its pixels decoded from those same bytes (the manifest check hashes the
    bytes, the watermark check reads the pixels: both look at one copy, whatever happens to the file meanwhile).

    Reads through the shared input reader (fluxframe.core.inputs), so a missing file, a directory or a FIFO is
    refused without hanging; a file that is not a PNG, JPEG or WebP, a truncated one, or one claiming more
    pixels than Pillow's decompression-bomb limit is refused too. Every refusal is a one-line ProvenanceError
    that starts with the file's name."""
    from fluxframe.core.inputs import read_input

    try:
        item = read_input(path, "")  # no field name: the message starts with the file's name
        if sniff_media_type(item.data) is None:
            raise ProvenanceError(f"{path}: not a PNG, JPEG or WebP image")
        return item.data, item.image("")
    except RequestError as exc:
        raise ProvenanceError(str(exc)) from None


def load_trust_anchors(paths: list[Path] | None) -> str:
    """The PEM text of the trust anchor files, each checked to hold certificates."""
    from cryptography import x509

    pems = []
    for path in paths or []:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ProvenanceError(f"{path}: cannot read the trust anchor file: {exc.strerror or exc}") from None
        try:
            x509.load_pem_x509_certificates(data)
        except ValueError:
            raise ProvenanceError(f"{path}: not a PEM certificate file (trust anchors must be PEM)") from None
        pems.append(data.decode("ascii", "replace").strip() + "\n")
    return "".join(pems)


def default_messages() -> dict[str, list[tuple[str, str]]]:
    """What ``verify`` looks for when not told: fluxframe's message in its current and its former method, and
    the FLUX reference code's dwtDct message."""
    return {name: [(LATTICE_METHOD, bits), (ROBUST_METHOD, bits), ("dwtDct", bits)] if name == "fluxframe"
            else [("dwtDct", bits)] for name, bits in KNOWN_MESSAGES.items()}


def _normalise_messages(messages: dict[str, Any]) -> dict[str, list[tuple[str, str]]]:
    """name → the (method, bits) pairs to look for. A value is bits (looked for as a ``fluxframe-rs`` and a
    ``fluxframe-ss`` mark when those can carry that length, and as a ``dwtDct`` mark), a (method, bits) pair, or
    a list of pairs."""
    from fluxframe.provenance import robust

    out: dict[str, list[tuple[str, str]]] = {}
    for name, value in messages.items():
        if isinstance(value, str):
            pairs = [("dwtDct", value)]
            if robust.MIN_MESSAGE_BITS <= len(value) <= robust.MAX_MESSAGE_BITS:
                pairs[:0] = [(LATTICE_METHOD, value), (ROBUST_METHOD, value)]
        elif value and not isinstance(value[0], str):
            pairs = [tuple(pair) for pair in value]
        else:
            pairs = [tuple(value)]
        out[str(name)] = pairs
    return out


def check_watermark(image, messages: dict[str, Any]) -> dict[str, Any]:
    """The best of ``messages`` (name → bits, (method, bits) or a list of those) found in ``image``, trying each
    method. For ``fluxframe-rs`` and ``fluxframe-ss`` the result also has ``decoded`` (the message read),
    ``confidence``, ``bit_errors``, ``scale`` and (``fluxframe-rs``) ``rotation``; ``matches_configured`` says
    whether the message read is the one named "configured" (None when no "configured" message was given)."""
    by_method: dict[str, dict[str, str]] = {}
    for name, pairs in _normalise_messages(messages).items():
        for method, bits in pairs:
            by_method.setdefault(method, {})[name] = bits
    results = [match(image, group, method) for method, group in by_method.items()]
    if not results:
        return {"checked": False, "detected": False, "message": None, "method": None, "agreement": None,
                "scores": {}, "reason": "no watermark messages to look for", "threshold": THRESHOLD}
    found = [r for r in results if r["detected"]]
    # A decoded, error-corrected fluxframe-rs / -ss message outranks a bit agreement of the other methods.
    best = max(found or results, key=lambda r: (r["method"] in TILED and r["detected"],
                                                r["agreement"] or 0.0))
    scores: dict[str, float] = {}
    for r in results:
        for name, score in r["scores"].items():
            scores[name] = max(score, scores.get(name, 0.0))
    out = {"checked": all(r["agreement"] is not None for r in results), **best, "scores": scores}
    tiled = [r for r in results if r["method"] in TILED]
    if tiled:
        # What the fluxframe-rs / -ss readings found, whichever result is the best: a message read that is none
        # of those looked for (another deployment's) is still reported, with its confidence (the reading that
        # decoded, else the most confident).
        robust_result = max(tiled, key=lambda r: (r["decoded"] is not None, r["confidence"] or 0.0))
        out["robust"] = {key: robust_result.get(key) for key in ("method", "confidence", "decoded", "bit_errors",
                                                                 "scale", "rotation", "reason")}
    out["matches_configured"] = None
    if "configured" in messages:
        out["matches_configured"] = bool(best["detected"] and best["message"] == "configured")
    return out


def _codes(results: dict | None, status: list | None) -> tuple[dict[str, list[str]], list[dict[str, str]]]:
    active = (results or {}).get("activeManifest") or {}
    codes = {kind: [item.get("code", "") for item in active.get(kind) or []]
             for kind in ("success", "informational", "failure")}
    failures = [{"code": item.get("code", ""), "explanation": item.get("explanation", "")}
                for item in active.get("failure") or []]
    if not results and status:  # older report form: a flat list of problems
        failures = [{"code": item.get("code", ""), "explanation": item.get("explanation", "")} for item in status]
        codes["failure"] = [f["code"] for f in failures]
    return codes, failures


def _created_source_type(manifest: dict) -> str | None:
    for assertion in manifest.get("assertions") or []:
        if str(assertion.get("label", "")).split(".v")[0] != "c2pa.actions":
            continue
        for action in (assertion.get("data") or {}).get("actions") or []:
            if action.get("action") == "c2pa.created":
                return action.get("digitalSourceType")
    return None


def _read_manifest(report: VerifyReport, data: bytes, trust_pem: str) -> None:
    import c2pa

    settings = json.loads(json.dumps(READ_SETTINGS))
    if trust_pem:
        settings["trust"] = {"user_anchors": trust_pem}
    try:
        context = c2pa.Context.from_dict(settings)
        reader = c2pa.Reader(report.media_type, io.BytesIO(data), context=context)
    except c2pa.C2paError.ManifestNotFound:
        report.reasons.append("no C2PA manifest: the file was never signed, or a re-encode or edit stripped it")
        return
    except c2pa.C2paError as exc:
        report.manifest_present = True
        report.validation_state = "Invalid"
        report.altered = True
        report.reasons.append(f"the C2PA manifest cannot be read: {exc}")
        return
    report.manifest_present = True
    try:
        with reader:
            report.validation_state = reader.get_validation_state()
            parsed = json.loads(reader.json())
            report.validation_codes, report.failures = _codes(parsed.get("validation_results"),
                                                              parsed.get("validation_status"))
        manifests = parsed.get("manifests") or {}
        manifest = manifests.get(parsed.get("active_manifest") or "") or {}
        if not manifest:
            raise ValueError("it has no active manifest")
    except (c2pa.C2paError, ValueError, TypeError, AttributeError) as exc:
        report.validation_state = "Invalid"
        report.altered = True
        report.reasons.append(f"the C2PA manifest cannot be read: {exc}")
        return
    failure = report.validation_codes.get("failure", [])
    success = report.validation_codes.get("success", [])
    report.signature_valid = "claimSignature.validated" in success and not any(
        code.startswith(("claimSignature.", "timeStamp."))
        or (code.startswith("signingCredential.") and code != "signingCredential.untrusted")
        for code in failure)
    hash_failures = [c for c in failure if "Hash." in c or c.startswith("assertion.hashedURI")]
    report.bound_to_pixels = any(code in success for code in _HASH_MATCH) and not hash_failures
    report.altered = bool(hash_failures) or not report.bound_to_pixels
    # Trust of the signer is judged on its own: c2pa reports "signingCredential.trusted" even when the state is
    # "Invalid" for another reason (an altered file), and the report should not blame the certificate for that.
    report.trusted = ("signingCredential.trusted" in success or report.validation_state == "Trusted") and not any(
        code in ("signingCredential.untrusted", "signingCredential.expired", "signingCredential.revoked")
        for code in failure)
    report.digital_source_type = _created_source_type(manifest)
    report.ai_generated = report.digital_source_type == TRAINED_ALGORITHMIC_MEDIA
    info = manifest.get("claim_generator_info") or []
    if info and isinstance(info[0], dict):
        report.generator = " ".join(str(info[0][k]) for k in ("name", "version") if info[0].get(k))
    else:
        report.generator = manifest.get("claim_generator")
    report.signer = manifest.get("signature_info")
    for assertion in manifest.get("assertions") or []:
        if assertion.get("label") == ASSERTION_LABEL:
            report.fluxframe = assertion.get("data")

    explain = {f["code"]: f["explanation"] for f in report.failures}
    if report.altered:
        codes = ", ".join(hash_failures) or "no hash binding"
        report.reasons.append(f"the file was altered after signing: its bytes no longer match the manifest ({codes})")
    if not report.signature_valid:
        bad = [c for c in failure if c.startswith(("claimSignature.", "signingCredential.", "timeStamp."))
               and c != "signingCredential.untrusted"]
        why = "; ".join(f"{c}: {explain.get(c, '')}".rstrip(": ") for c in bad) or "not validated"
        report.reasons.append(f"the signature is not valid ({why})")
        if "signingCredential.expired" in failure:
            report.notes.append("the signing certificate has expired and the signature carries no trusted "
                                "timestamp, so it can no longer be validated")
    if not report.trusted:
        if "signingCredential.expired" in failure:
            report.reasons.append("the signing certificate has expired, so the signer can no longer be trusted")
        elif "signingCredential.revoked" in failure:
            report.reasons.append("the signing certificate has been revoked")
        elif trust_pem:
            report.reasons.append("the signing certificate does not chain to any of the trust anchors given "
                                  "(signingCredential.untrusted)")
        else:
            report.reasons.append("the signer is not trusted: no trust anchor vouches for its certificate "
                                  "(pass --trust CA.pem for a private CA)")
    if not report.ai_generated:
        report.reasons.append("the manifest does not declare the image AI-generated (no c2pa.created action with "
                              "digitalSourceType trainedAlgorithmicMedia)")
    other = [c for c in failure if c not in hash_failures and not c.startswith(
        ("claimSignature.", "signingCredential.", "timeStamp."))]
    if other:
        report.reasons.append("other validation failures: " + ", ".join(other))


def verify(path: Path, *, trust: list[Path] | None = None, messages: dict[str, Any] | None = None) -> VerifyReport:
    """Check ``path``'s C2PA manifest and watermark. ``trust``: PEM files of CA certificates to trust.
    ``messages``: the watermark messages that count (name → bits, looked for with ``fluxframe-rs``,
    ``fluxframe-ss`` and ``dwtDct``; name → (method, bits); or name → a list of those); default:
    ``default_messages()`` (fluxframe's message in all three methods, the FLUX reference's in dwtDct) plus the
    one the signed manifest declares. A message named "configured" (what ``fluxframe verify --config`` passes)
    sets ``matches_configured``.

    A file that cannot be checked at all — missing, unreadable, a directory, not a PNG, JPEG or WebP image,
    truncated, undecodable, or a decompression bomb (see ``read_image``) — raises ProvenanceError naming it; any
    verdict on an image is a report (``ok`` and ``reasons``), never an exception.
    """
    path = Path(path)
    data, image = read_image(path)
    return _verify(str(path), data, image, trust=trust, messages=messages)


def configured_messages(config: Any) -> dict | None:
    """The watermark message a deployment embeds, as ``verify``'s ``messages`` (named "configured"); None when it
    embeds none (the known messages still count then). A deployment on ``fluxframe-rs`` also wrote its message
    as ``fluxframe-ss`` before that was the default: both count."""
    settings = config.provenance.watermark if config.provenance else None
    if settings is None:
        return None
    method = validate_method(settings.method)
    bits = validate_message(settings.message or FLUXFRAME_MESSAGE, method)
    if method == LATTICE_METHOD:
        return {"configured": [(LATTICE_METHOD, bits), (ROBUST_METHOD, bits)]}
    return {"configured": (method, bits)}


def verify_bytes(data: bytes, *, name: str, trust: list[Path] | None = None,
                 messages: dict[str, Any] | None = None) -> VerifyReport:
    """``verify`` for an image held in memory (an upload); ``name`` stands for its file name in the report and
    in a ProvenanceError (not a PNG, JPEG or WebP, undecodable, a decompression bomb)."""
    from fluxframe.core.inputs import InputFile

    if sniff_media_type(data) is None:
        raise ProvenanceError(f"{name}: not a PNG, JPEG or WebP image")
    try:
        image = InputFile(name, data).image("")
    except RequestError as exc:
        raise ProvenanceError(str(exc)) from None
    return _verify(name, data, image, trust=trust, messages=messages)


def _verify(name: str, data: bytes, image: Any, *, trust: list[Path] | None,
            messages: dict[str, Any] | None) -> VerifyReport:
    report = VerifyReport(file=name, media_type=sniff_media_type(data),
                          trust_anchors=[str(p) for p in trust or []])
    trust_pem = load_trust_anchors(trust)

    _read_manifest(report, data, trust_pem)

    declared: Any = None
    trustworthy = report.signature_valid and report.bound_to_pixels and report.fluxframe is not None
    if trustworthy:
        declared = report.fluxframe.get("watermark")
    candidates: dict[str, Any]
    if messages is None:
        candidates = default_messages()
        if isinstance(declared, dict) and declared.get("bits"):
            pair = (declared.get("method", "dwtDct"), declared["bits"])
            try:
                validate_method(pair[0])
                validate_message(pair[1], pair[0])
            except ProvenanceError:
                report.notes.append("the watermark message the manifest declares is not a valid message; ignored")
            else:
                if not any(pair in pairs for pairs in _normalise_messages(candidates).values()):
                    candidates["declared"] = pair
    else:
        candidates = dict(messages)
    try:
        report.watermark = check_watermark(image, candidates)
    except ProvenanceError as exc:  # an invalid message among ``messages``
        raise ProvenanceError(f"watermark messages: {exc}") from None
    report.watermark["declared"] = declared

    watermark_ok = bool(report.watermark.get("detected"))
    if not watermark_ok and trustworthy:
        if declared is None:
            watermark_ok = True
            report.notes.append("the manifest records that no watermark was embedded (none configured)")
        elif isinstance(declared, dict) and not declared.get("applied"):
            watermark_ok = True
            report.notes.append(f"the manifest records that no watermark was embedded: {declared.get('reason')}")
        elif isinstance(declared, dict) and declared.get("readable_after_encoding") is False:
            watermark_ok = True
            report.notes.append("the manifest records that the watermark did not survive this file's encoding")
    if not watermark_ok:
        report.reasons.append(f"no expected watermark: {report.watermark.get('reason') or 'not found'}")

    report.ok = (report.manifest_present and report.signature_valid and report.bound_to_pixels
                 and report.trusted and not report.altered and report.ai_generated and watermark_ok
                 and not report.reasons)
    return report
