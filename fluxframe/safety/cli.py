"""Commands this layer adds to the `fluxframe` CLI, through ``register_commands`` (see fluxframe.safety).

    fluxframe check --config deploy.toml --prompt TEXT [--negative-prompt TEXT] [--image F ...]
                    [--output-image F] [--json]
        runs the configured filters alone (no model is loaded) and prints every verdict;
        exit 0 allowed, 3 blocked, 1 error.
    fluxframe audit verify [LOG | FOLDER] [--config FILE] [--no-head] [--key-env VAR] [--glob PATTERN]
        checks the audit log's hash chain and head, and lists its re-anchor lines; exit 0 intact, 1 broken
        (with the line where it breaks). Given a FOLDER (the logs of `fluxframe serve --ray`'s replicas, one
        chain each), checks every log in it matching --glob (default *.jsonl) and reports each; exit 1 when
        any is broken, or when there is none. The key comes from --key-env VAR, else from the config's
        [safety] audit_key_env, else from FLUXFRAME_AUDIT_KEY when that is set; a variable named by
        --key-env or the config must be set. LOG defaults to the config's [safety] audit_log.
    fluxframe audit reanchor [LOG] --reason TEXT [--config FILE] [--key-env VAR] [--discard-incomplete-tail]
        the audited way past a refused tail (missing, stale or edited head): if the whole chain verifies,
        appends a re-anchor line recording the reason and what the head said, and writes a new head.
        The key comes from --key-env or the config only (never a default: a re-anchor writes).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from fluxframe.errors import FluxframeError

EXIT_BLOCKED = 3


def register_commands(register) -> None:
    register("check", setup_check, cmd_check, help="run the safety filters on a prompt and images, print the verdicts")
    register("audit", setup_audit, cmd_audit, help="audit log tools")


def setup_check(check) -> None:
    check.add_argument("--config", required=True, type=Path, help="deployment config (TOML) with a [safety] section")
    check.add_argument("--prompt", required=True, help="the prompt to check")
    check.add_argument("--negative-prompt", help="a negative prompt to check too")
    check.add_argument("--image", action="append", default=[], type=Path, metavar="FILE",
                       help="an input image (reference, control, inpaint) to check; repeatable")
    check.add_argument("--output-image", action="append", default=[], type=Path, metavar="FILE",
                       help="check FILE as a generated output (where blur applies); repeatable")
    check.add_argument("--json", action="store_true", help="print the verdicts as JSON")


def setup_audit(audit) -> None:
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="SUBCOMMAND")
    verify = audit_sub.add_parser("verify", help="check an audit log's hash chain and head")
    verify.add_argument("log", type=Path, nargs="?", help="the log, or a folder of logs (one per replica of "
                        "`fluxframe serve --ray`) (default: the config's [safety] audit_log)")
    verify.add_argument("--config", type=Path, metavar="FILE",
                        help="deployment config: its [safety] audit_log and audit_key_env")
    verify.add_argument("--no-head", action="store_true", help="check the chain only, not the head file "
                        "(deleted trailing lines then go unnoticed)")
    verify.add_argument("--key-env", metavar="VAR",
                        help="environment variable holding the log's HMAC key, which must then be set (default: "
                             "the config's audit_key_env with --config, else FLUXFRAME_AUDIT_KEY if it is set)")
    verify.add_argument("--glob", default="*.jsonl", metavar="PATTERN",
                        help="with a folder: which files in it are logs (default: *.jsonl)")
    reanchor = audit_sub.add_parser("reanchor", help="record a new head, in the log, for a log refused at its tail "
                                    "(its chain must verify)")
    reanchor.add_argument("log", type=Path, nargs="?", help="the log (default: the config's [safety] audit_log)")
    reanchor.add_argument("--reason", required=True, help="why: who looked at the log, and what they found")
    reanchor.add_argument("--config", type=Path, metavar="FILE",
                          help="deployment config: its [safety] audit_log and audit_key_env")
    reanchor.add_argument("--key-env", metavar="VAR", help="environment variable holding the log's HMAC key "
                          "(default: the config's audit_key_env; none without either)")
    reanchor.add_argument("--discard-incomplete-tail", action="store_true",
                          help="cut off a last line without its newline (a write cut short); its length, hash and "
                               "text go into the re-anchor line")


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
        from fluxframe.core.plugins import PluginHost
        from fluxframe.core.policy import SafetyPolicy

        config = load_config(args.config)
        policy = SafetyPolicy.from_config(config.safety, PluginHost.for_config(config), base_dir=config.base_dir,
                                           source=config.source)
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


def _audit_target(args, default_env: str | None) -> tuple[Path, bytes | None, str | None]:
    """The log, its key and where the key came from: --key-env, else the config's audit_key_env, else
    ``default_env`` if that variable is set. A variable named by --key-env or the config must be set."""
    from fluxframe.core.config import load_config
    from fluxframe.errors import AuditError, ConfigError

    config = load_config(args.config) if args.config is not None else None
    safety = config.safety if config is not None else None
    if args.log is not None:
        log = args.log
    elif safety is not None and safety.audit_log is not None:
        log = config.resolve(safety.audit_log)
    else:
        raise AuditError("name the log, or give --config with a [safety] audit_log" if config is None else
                         f"{config.source} has no [safety] audit_log: name the log")
    if args.key_env is not None:
        name, source = args.key_env, "--key-env"
    elif config is not None:
        name, source = (safety.audit_key_env if safety is not None else None), "config"
    else:
        name, source = default_env, None
    key = os.environ.get(name) if name else None
    if name and not key and source == "config":
        raise ConfigError(f"the environment variable {name} is not set (or empty): it must hold the audit log's key",
                          path=config.source, key="safety.audit_key_env")
    if name and not key and source is not None:
        raise AuditError(f"--key-env {name}: the variable is not set (or empty)")
    return log, (key.encode("utf-8") if key else None), (name if key else None)


def cmd_audit(args) -> int:
    try:
        return _AUDIT_COMMANDS[args.audit_command](args)
    except FluxframeError as exc:
        print(f"fluxframe: error: {exc}", file=sys.stderr)
        return 1


def _cmd_verify(args) -> int:
    from fluxframe.core.audit import DEFAULT_KEY_ENV, verify_log

    log, key, key_name = _audit_target(args, DEFAULT_KEY_ENV)
    how = f"HMACs checked with the key in {key_name}" if key else "no key: HMACs not checked"
    if log.is_dir():
        return _verify_folder(log, args, key, how)
    result = verify_log(log, key=key, head=not args.no_head)
    if result.ok:
        print(f"{log}: ok: {result.reason} ({how})")
        return 0
    _print_broken(log, result)
    return 1


def _print_broken(log: Path, result) -> None:
    where = f" at line {result.broken_at}" if result.broken_at else ""
    print(f"{log}: BROKEN{where}: {result.reason}", file=sys.stderr)


def _verify_folder(folder: Path, args, key: bytes | None, how: str) -> int:
    """Each log in ``folder`` on its own line (its own chain); exit 1 if any is broken or there is none."""
    from fluxframe.core.audit import verify_logs

    checks = verify_logs(folder, pattern=args.glob, key=key, head=not args.no_head)
    if not checks:
        print(f"{folder}: no audit logs matching {args.glob}", file=sys.stderr)
        return 1
    for log, result in checks:
        if result.ok:
            print(f"{log}: ok: {result.reason}")
        else:
            _print_broken(log, result)
    broken = sum(not result.ok for _, result in checks)
    print(f"{folder}: {len(checks)} logs, {len(checks) - broken} intact, {broken} broken ({how})",
          file=sys.stderr if broken else sys.stdout)
    return 1 if broken else 0


def _cmd_reanchor(args) -> int:
    from fluxframe.core.audit import AuditLog

    log, key, key_name = _audit_target(args, None)
    written = AuditLog(log, key=key).reanchor(args.reason, discard_incomplete_tail=args.discard_incomplete_tail)
    previous = written["previous_head"]
    said = "no head file" if previous is None else f"the head said {json.dumps(previous, sort_keys=True)}"
    signed = f", signed with the key in {key_name}" if key else ""
    print(f"{log}: re-anchored at line {written['seq']} after {written['lines']} lines ({said}{signed})")
    return 0


_AUDIT_COMMANDS = {"verify": _cmd_verify, "reanchor": _cmd_reanchor}
