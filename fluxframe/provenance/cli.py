"""Commands this layer adds to the `fluxframe` CLI through ``register_commands`` (see fluxframe.provenance):
``verify`` and ``certs dev``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fluxframe.errors import FluxframeError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def register_commands(register) -> None:
    register("verify", setup_verify, cmd_verify, help="check an image's C2PA manifest and invisible watermark",
             description="Validate the C2PA manifest (signature, binding to the pixels, trust of the signer), "
                         "decode the invisible watermark, and say whether the image was altered since signing. "
                         "Exit code 0 only when everything checks.")
    register("certs", setup_certs, cmd_certs, help="signing certificate tools")


def setup_verify(verify) -> None:
    verify.add_argument("file", type=Path, metavar="FILE", help="the image (PNG, JPEG or WebP)")
    verify.add_argument("--trust", type=Path, action="append", default=[], metavar="CA.pem",
                        help="a PEM file of CA certificates to trust (repeatable)")
    verify.add_argument("--config", type=Path, help="deployment config: its watermark message is the one that "
                        "must match")
    verify.add_argument("--json", action="store_true", help="print the full report as JSON")


def setup_certs(certs) -> None:
    certs_sub = certs.add_subparsers(dest="certs_command", required=True, metavar="SUBCOMMAND")
    dev = certs_sub.add_parser(
        "dev", help="make a local test CA and signing certificate (NOT for production)",
        description="Write ca.pem (a test root CA), chain.pem (signing certificate + root) and key.pem (its "
                    "private key, mode 0600). For trying fluxframe out only: images signed with these are trusted "
                    "only by readers given ca.pem; production needs a certificate from a recognised CA.")
    dev.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to write the files into")
    dev.add_argument("--days", type=_positive_int, default=365, help="validity in days (default 365)")
    dev.add_argument("--algorithm", default="es256",
                     choices=("es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519"))
    dev.add_argument("--force", action="store_true", help="replace existing files")


def _configured_messages(config_path: Path) -> dict | None:
    from fluxframe.core.config import load_config
    from fluxframe.provenance.verify import configured_messages

    return configured_messages(load_config(config_path))


def cmd_verify(args) -> int:
    from fluxframe.provenance.verify import verify

    try:
        messages = _configured_messages(args.config) if args.config else None
        report = verify(args.file, trust=args.trust, messages=messages)
    except FluxframeError as exc:
        print(f"fluxframe: error: {exc}", file=sys.stderr)
        return 1
    print(report.to_json() if args.json else report.summary())
    return 0 if report.ok else 1


def cmd_certs(args) -> int:
    from fluxframe.provenance.certs import make_dev_certificates

    try:
        paths = make_dev_certificates(args.out, days=args.days, algorithm=args.algorithm, force=args.force)
    except FluxframeError as exc:
        print(f"fluxframe: error: {exc}", file=sys.stderr)
        return 1
    print(f"test CA:             {paths['ca']}")
    print(f"signing chain:       {paths['chain']}")
    print(f"signing key (0600):  {paths['key']}")
    print()
    print("[provenance.c2pa]")
    print(f'certificate = "{paths["chain"]}"')
    print(f'private_key = "{paths["key"]}"')
    print(f'algorithm = "{args.algorithm}"')
    print()
    print(f"Check signed images with: fluxframe verify IMAGE --trust {paths['ca']}", file=sys.stderr)
    print("These are for testing only. Production needs a signing certificate from a CA on the C2PA trust "
          "list (or one your verifiers trust); without a timestamp authority, signatures read as invalid once "
          "the certificate expires.", file=sys.stderr)
    return 0
