"""Commands this layer adds to the `fluxframe` CLI.

    fluxframe check --config deploy.toml --prompt TEXT [--negative-prompt TEXT] [--image F ...]
                    [--output-image F] [--json]
        runs the configured filters alone (no model is loaded) and prints every verdict;
        exit 0 allowed, 3 blocked, 1 error.
    fluxframe audit verify LOG [--no-head] [--key-env VAR]
        checks the audit log's hash chain; exit 0 intact, 1 broken (with the line where it breaks).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from fluxframe.errors import FluxframeError

EXIT_BLOCKED = 3


def add_commands(subparsers) -> dict:
    check = subparsers.add_parser("check", help="run the safety filters on a prompt and images, print the verdicts")
    check.add_argument("--config", required=True, type=Path, help="deployment config (TOML) with a [safety] section")
    check.add_argument("--prompt", required=True, help="the prompt to check")
    check.add_argument("--negative-prompt", help="a negative prompt to check too")
    check.add_argument("--image", action="append", default=[], type=Path, metavar="FILE",
                       help="an input image (reference, control, inpaint) to check; repeatable")
    check.add_argument("--output-image", action="append", default=[], type=Path, metavar="FILE",
                       help="check FILE as a generated output (where blur applies); repeatable")
    check.add_argument("--json", action="store_true", help="print the verdicts as JSON")

    audit = subparsers.add_parser("audit", help="audit log tools")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="SUBCOMMAND")
    verify = audit_sub.add_parser("verify", help="check an audit log's hash chain and head")
    verify.add_argument("log", type=Path)
    verify.add_argument("--no-head", action="store_true", help="check the chain only, not the head file "
                        "(deleted trailing lines then go unnoticed)")
    verify.add_argument("--key-env", default="FLUXFRAME_AUDIT_KEY", metavar="VAR",
                        help="environment variable holding the log's HMAC key, if it has one "
                             "(default FLUXFRAME_AUDIT_KEY; ignored when unset)")
    return {"check": cmd_check, "audit": cmd_audit}


def _host(config):
    from fluxframe.core.plugins import PluginHost

    return PluginHost(block=config.plugins.block, allow=config.plugins.allow, required=config.plugins.require)


def _print_decision(decision) -> None:
    for verdict, subject in zip(decision.verdicts, decision.subjects, strict=True):
        shown = {k: v for k, v in verdict.scores.items() if v}
        top = ", ".join(f"{k} {v:.2f}" for k, v in sorted(shown.items(), key=lambda kv: -kv[1])[:4])
        action = verdict.action.upper() if verdict.action != "allow" else "allow"
        print(f"  {verdict.filter:<12} {subject:<22} {action:<6} {verdict.reason}" + (f"  [{top}]" if top else ""))


def cmd_check(args) -> int:
    try:
        from fluxframe.core.config import load_config
        from fluxframe.core.images import open_image
        from fluxframe.safety.policy import SafetyPolicy

        config = load_config(args.config)
        policy = SafetyPolicy.from_config(config.safety, _host(config), base_dir=config.base_dir)
        prompts = {"prompt": args.prompt}
        if args.negative_prompt is not None:
            prompts["negative_prompt"] = args.negative_prompt
        # The one reader every input goes through: a missing file, a directory, a FIFO, a file that is not an
        # image or a decompression bomb is a one-line RequestError naming the file, never a traceback.
        inputs = [(f"input[{i}] {p.name}", open_image(p, "--image")) for i, p in enumerate(args.image)]
        outputs = [(p.name, open_image(p, "--output-image")) for p in args.output_image]
        decisions = [policy.check_prompts(prompts)]
        if inputs:
            decisions.append(policy.check_input_images(inputs))
        for _name, image in outputs:
            decisions.append(policy.check_output(image))
    except FluxframeError as exc:
        print(f"fluxframe: error: {exc}", file=sys.stderr)
        return 1

    allowed = all(d.allowed for d in decisions)
    order = ("allow", "flag", "blur", "block")
    action = max((d.action for d in decisions), key=order.index)
    if args.json:
        print(json.dumps({"allowed": allowed, "action": action, "filters": policy.describe(),
                          "decisions": [d.to_record() for d in decisions]}, indent=2))
    else:
        if not policy.filters:
            print("no safety filters configured ([safety] is empty or absent)")
        for f in policy.describe():
            state = f"version {f['version']}" if f["loaded"] else f"NOT LOADED: {f['error']}"
            print(f"{f['name']:<12} {'required' if f['required'] else 'optional':<8} action={f['action']:<5} {state}")
        for decision in decisions:
            print(f"{decision.stage}: {decision.action}")
            _print_decision(decision)
        print(f"result: {'allowed' if allowed else 'BLOCKED'} ({action})")
        for reason in (r for d in decisions for r in d.reasons):
            print(f"  - {reason}")
    return 0 if allowed else EXIT_BLOCKED


def cmd_audit(args) -> int:
    from fluxframe.safety.audit import verify_log

    key = os.environ.get(args.key_env) if args.key_env else None
    result = verify_log(args.log, key=key, head=not args.no_head)
    if result.ok:
        print(f"{args.log}: ok: {result.reason}")
        return 0
    where = f" at line {result.broken_at}" if result.broken_at else ""
    print(f"{args.log}: BROKEN{where}: {result.reason}", file=sys.stderr)
    return 1
