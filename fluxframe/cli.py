"""The ``fluxframe`` command: a thin layer over the Python API (fluxframe.api).

The core commands (generate, encode, plugins, config check) are defined here; every other command group,
built-in (check, audit, verify, certs, train-demo) or third-party, joins through the ``register_commands`` hook.
The parser is built before any config is read, so commands come from a plugin host with default settings: every
installed plugin, whatever a config's [plugins] allow/block says (that applies when the config is loaded). A
plugin whose commands fail to register, or take a name already taken, is left out and listed by
``fluxframe plugins``; the rest of the CLI works.

Exit codes: 0 success, 1 a fluxframe error (bad config, checkpoint, request), 2 bad usage,
3 blocked by the safety policy (no image written).
Anything else escaping is a bug, and is reported as one.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

from fluxframe import __version__
from fluxframe.errors import Blocked, ConfigError, FluxframeError, PluginError, RequestError

RUN = "fluxframe_command"  # the parsed arguments' attribute holding the chosen command's run(args)


def _positive(name: str, kind=int, minimum=1):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be at least {minimum}, got {text}")
        return value

    return parse


def _lora(text: str) -> tuple[Path, float]:
    """``PATH[:WEIGHT]``; a path that itself contains ":" works when no weight follows it. The weight must be
    finite: float() also reads "nan" and "inf", which would otherwise reach the model (or a traceback)."""
    import math

    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
        except ValueError:
            if not Path(text).exists() and Path(head).exists():
                raise argparse.ArgumentTypeError(f"--lora {text!r}: the weight {tail!r} is not a number") from None
        else:
            if math.isfinite(weight):
                return Path(head), weight
            if not (Path(text).exists() and not Path(head).exists()):  # else a file named like "x:inf"
                raise argparse.ArgumentTypeError(f"--lora {text!r}: the weight {tail!r} is not a finite number")
    return Path(text), 1.0


def _json_or_text(text: str) -> Any:
    """The value as JSON when it parses (numbers, true/false, null, lists, objects, "quoted strings"), else the
    text itself; NaN and Infinity stay text (no conditioner input wants them)."""
    def refuse(constant: str):
        raise ValueError(constant)

    try:
        return json.loads(text, parse_constant=refuse)
    except ValueError:
        return text


def _cond(text: str) -> tuple[str, str, Any]:
    """``--cond NAME.KEY=VALUE`` as (conditioner, input, value)."""
    target, eq, raw = text.partition("=")
    name, dot, key = target.partition(".")
    if not (eq and dot and name.strip() and key.strip()):
        raise argparse.ArgumentTypeError(f"--cond {text!r}: expected CONDITIONER.INPUT=VALUE, e.g. "
                                         "control.strength=0.5 or reference.images='[\"a.png\", \"b.png\"]'")
    return name.strip(), key.strip(), _json_or_text(raw)


def _cond_json(text: str) -> dict[str, dict[str, Any]]:
    """``--cond-json '{"CONDITIONER": {"INPUT": VALUE, ...}, ...}'``."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--cond-json: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--cond-json: expected an object {{conditioner: {{input: value}}}}, "
                                         f"got {type(value).__name__}")
    for name, inputs in value.items():
        if not isinstance(inputs, dict):
            raise argparse.ArgumentTypeError(f"--cond-json {name}: expected an object of inputs, got "
                                             f"{type(inputs).__name__}")
    return value


def build_parser(host=None) -> argparse.ArgumentParser:
    """The whole command line: the core commands, then every command the plugins of ``host`` register
    (default: a host with default settings, see the module docstring)."""
    parser = argparse.ArgumentParser(prog="fluxframe", description="FLUX.2 image generation with plugins, "
                                     "safety filters and provenance.")
    parser.add_argument("--version", action="version", version=f"fluxframe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is loaded and how long it takes")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate an image from a prompt")
    gen.add_argument("--config", required=True, type=Path, help="deployment config (TOML)")
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="what to draw")
    what.add_argument("--prompt-embeds", type=Path, metavar="FILE",
                      help="embeddings written by `fluxframe encode` (the text encoder is then not loaded)")
    gen.add_argument("--upsample-prompt", action="store_true",
                     help="let the text encoder rewrite the prompt into a detailed one first (recorded)")
    gen.add_argument("--seed", type=_positive("--seed", minimum=0))
    gen.add_argument("--steps", type=_positive("--steps"))
    gen.add_argument("--guidance", type=_positive("--guidance", float, 0.0))
    gen.add_argument("--width", type=_positive("--width", minimum=16))
    gen.add_argument("--height", type=_positive("--height", minimum=16))
    gen.add_argument("--output", type=Path, help="output file, .png, .jpg or .webp (default: the config's [output] "
                     "dir and name)")
    gen.add_argument("--overwrite", action="store_true", help="replace --output if it exists (never a file the "
                     "deployment itself reads or writes: config, audit log, keys, checkpoint)")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    gen.add_argument("--negative-prompt", help="what to steer away from (models with true guidance)")
    gen.add_argument("--lora", action="append", type=_lora, default=[], metavar="PATH[:WEIGHT]",
                     help="a LoRA for the DiT, weight 1 unless given (repeatable; added to the config's [[lora]])")
    cond = gen.add_argument_group("conditioning (each enables its conditioner for this request)")
    cond.add_argument("--reference", action="append", type=Path, metavar="IMAGE",
                      help="a reference image for editing (repeatable, FLUX.2)")
    cond.add_argument("--inpaint-image", type=Path, metavar="IMAGE", help="the image to inpaint (Flex.2)")
    cond.add_argument("--mask", type=Path, metavar="IMAGE", help="inpaint mask, white = regenerate (Flex.2)")
    cond.add_argument("--control", type=Path, metavar="IMAGE", help="a control image (Flex.2)")
    cond.add_argument("--control-kind", help="how to read --control: a ready map, or a preprocessor (e.g. line)")
    cond.add_argument("--control-strength", type=_positive("--control-strength", float, 0.0))
    cond.add_argument("--control-stop", type=_positive("--control-stop", float, 0.0),
                      help="fraction of the steps after which control is switched off (0-1)")
    cond.add_argument("--cond", action="append", type=_cond, default=[], metavar="NAME.INPUT=VALUE",
                      help="any conditioner's input, e.g. control.strength=0.5, reference.images='[\"a.png\"]'; "
                           "VALUE is read as JSON when it parses, else kept as text; repeatable, each input once")
    cond.add_argument("--cond-json", action="append", type=_cond_json, default=[], metavar="JSON",
                      help="inputs of several conditioners as one JSON object: '{\"control\": {\"strength\": 0.5}}'")

    enc = sub.add_parser("encode", help="run only the text encoder; write prompt embeddings for --prompt-embeds")
    enc.add_argument("--config", required=True, type=Path, help="deployment config (TOML)")
    enc.add_argument("--prompt", required=True)
    enc.add_argument("--negative-prompt", help="also encoded, for models with true guidance")
    enc.add_argument("--output", required=True, type=Path, help="the embeddings file (.safetensors)")
    enc.add_argument("--overwrite", action="store_true", help="replace --output if it exists")

    bat = sub.add_parser("batch", help="generate every request of a .txt, .jsonl or .csv file with one model load",
                         description="See docs/batch.md. Exit codes: 0 all written, 3 some blocked and none failed, "
                                     "1 any failed (or the file cannot run at all).")
    bat.add_argument("--config", required=True, type=Path, help="deployment config (TOML)")
    bat.add_argument("requests", type=Path, metavar="REQUESTS", help="a .txt (one prompt a line), .jsonl (one "
                     "request object a line) or .csv (with a header; a prompt column) file")
    bat.add_argument("--batch-size", type=_positive("--batch-size"), default=1,
                     help="consecutive requests run together (capped by [sampler] max_batch_size; default 1)")
    bat.add_argument("--resume", action="store_true", help="continue the results file: skip the items already "
                     "released or blocked (by the results file, else by the audit log)")
    bat.add_argument("--fail-fast", action="store_true", help="stop at the first failed item (not at a block)")
    bat.add_argument("--results", type=Path, metavar="FILE",
                     help="the results file (default: results.jsonl in the config's output folder)")
    bat.add_argument("--no-progress", action="store_true", help="no progress bar or per-item lines")

    gen.set_defaults(**{RUN: cmd_generate})
    bat.set_defaults(**{RUN: cmd_batch})
    enc.set_defaults(**{RUN: cmd_encode})
    if host is None:
        from fluxframe.core.plugins import PluginHost

        host = PluginHost()
    plugins = sub.add_parser("plugins", help="list loaded plugins, where they come from and what they provide")
    plugins.add_argument("--json", action="store_true")
    plugins.set_defaults(**{RUN: functools.partial(cmd_plugins, host=host)})

    config = sub.add_parser("config", help="config file tools")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    check = config_sub.add_parser("check", help="validate a config without loading weights")
    check.add_argument("file", type=Path)
    config.set_defaults(**{RUN: cmd_config_check})

    add_serve_command(sub)
    add_plugin_commands(sub, host)
    return parser


def add_serve_command(sub) -> None:
    srv = sub.add_parser("serve", help="serve the deployment over HTTP: a durable job queue, auth, progress events, "
                         "metrics and a web page (see docs/serve.md)",
                         description="Serve the deployment over HTTP. `fluxframe serve token add NAME --config ...` "
                                     "makes an API token (shown once); the server needs at least one.")
    srv.add_argument("--config", type=Path, help="deployment config (TOML); [serve] holds the service's settings")
    srv.add_argument("--host", help="address to listen on (default: [serve] host, 127.0.0.1)")
    srv.add_argument("--port", type=_positive("--port", minimum=0), help="port (default: [serve] port, 8000)")
    srv.add_argument("--insecure-no-auth", action="store_true",
                     help="serve without tokens, on a loopback address only (demos)")
    srv.add_argument("--ray", action="store_true", help="serve with Ray Serve replicas ([serve.ray])")
    srv.set_defaults(**{RUN: cmd_serve})
    tokens = srv.add_subparsers(dest="serve_command", metavar="SUBCOMMAND")
    token = tokens.add_parser("token", help="API tokens: add, list, remove")
    token_sub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    for action, text in (("add", "make a token for NAME; it is printed once, as the last word of the output"),
                         ("remove", "revoke NAME's token"), ("list", "the names that have tokens")):
        parser = token_sub.add_parser(action, help=text)
        if action != "list":
            parser.add_argument("name", metavar="NAME")
        parser.add_argument("--config", required=True, type=Path, help="deployment config (TOML)")
        parser.set_defaults(**{RUN: cmd_serve_token})


_TOKEN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


def cmd_serve_token(args) -> int:
    from fluxframe.core.config import load_config
    from fluxframe.serve.store import Store

    store = Store.for_config(load_config(args.config))
    if args.token_command == "list":
        for name in store.token_names():
            print(name)
        return 0
    if not _TOKEN_NAME.match(args.name):
        print(f"fluxframe: error: NAME: 1-64 letters, digits, '_', '.', '@' or '-', got {args.name!r}",
              file=sys.stderr)
        return 1
    if args.token_command == "remove":
        if not store.remove_token(args.name):
            print(f"fluxframe: error: NAME: no token named {args.name!r}", file=sys.stderr)
            return 1
        print(f"removed the token of {args.name}")
        return 0
    token = store.add_token(args.name)
    print(f"API token for {args.name} (shown only now; the server keeps its hash): {token}")
    return 0


def cmd_serve(args) -> int:
    from fluxframe.core.config import load_config

    if args.config is None:
        print("fluxframe: error: serve: --config is required", file=sys.stderr)
        return 2
    config = load_config(args.config)
    if args.ray:
        from fluxframe.serve.ray import serve_ray

        serve_ray(config, host=args.host, port=args.port, insecure_no_auth=args.insecure_no_auth)
        return 0
    from fluxframe.serve import serve

    serve(config, host=args.host, port=args.port, insecure_no_auth=args.insecure_no_auth,
          log_level="info" if args.verbose else "warning")
    return 0


def add_plugin_commands(sub, host) -> None:
    """The commands of every plugin (``register_commands``), built-in or not, in the order the host collected them.
    A command whose name is a core command's, or whose setup raises, is left out and recorded in
    ``host.failures``: one plugin's mistake must not take the command line down."""
    for name, registration in host.collect("command").items():
        command = registration.factory
        if name in sub.choices:
            host.record_failure(registration.plugin, f"register_commands: command {name!r} is fluxframe's own")
            continue
        try:
            # a dry run on a parser of its own first, so a setup that raises leaves no half-built command behind
            scratch = {k: v for k, v in command.parser_options.items() if k != "help"}
            command.setup(argparse.ArgumentParser(prog=f"fluxframe {name}", **scratch))
            parser = sub.add_parser(name, **command.parser_options)
            command.setup(parser)
        except Exception as exc:  # noqa: BLE001 - anything a plugin's setup raises is the plugin's failure
            message = f"command {name!r} of plugin {registration.plugin!r}: {type(exc).__name__}: {exc}"
            host.record_failure(registration.plugin, f"register_commands: {message}")
            if name in sub.choices:  # failed only on the second setup: the command says so instead of running
                sub.choices[name].set_defaults(**{RUN: functools.partial(_failed_command, message)})
            continue
        parser.set_defaults(**{RUN: command.run})


def _failed_command(message: str, args) -> int:
    print(f"fluxframe: error: {message}", file=sys.stderr)
    return 1


SHORTCUTS = {  # flag -> (conditioner, input); argparse's attribute is the flag's name
    "--reference": ("reference", "images"),
    "--inpaint-image": ("inpaint", "image"), "--mask": ("inpaint", "mask"),
    "--control": ("control", "image"), "--control-kind": ("control", "kind"),
    "--control-strength": ("control", "strength"), "--control-stop": ("control", "stop"),
}


def request_conditioning(args) -> tuple[dict[str, dict[str, Any]], dict[tuple[str, str], str]]:
    """The per-request conditioner inputs the flags ask for, by conditioner name, and which flag gave each input
    (for messages). The shortcut flags, --cond-json and --cond merge; one input given twice is a RequestError
    naming both flags (a list is one JSON value, not a repeated flag)."""
    out: dict[str, dict[str, Any]] = {}
    origins: dict[tuple[str, str], str] = {}

    def put(name: str, key: str, value: Any, flag: str) -> None:
        if (name, key) in origins:
            raise RequestError(f"also given by {origins[name, key]}; give each input once (a list as one JSON "
                               "value)", field=f"{flag} {name}.{key}")
        origins[name, key] = flag if flag in SHORTCUTS else f"{flag} {name}.{key}"
        out.setdefault(name, {})[key] = value

    for flag, (name, key) in SHORTCUTS.items():
        value = getattr(args, flag.removeprefix("--").replace("-", "_"))
        if value is not None:
            put(name, key, list(value) if isinstance(value, list) else value, flag)
    for table in args.cond_json:
        for name, inputs in table.items():
            for key, value in inputs.items():
                put(name, key, value, "--cond-json")
    for name, key, value in args.cond:
        put(name, key, value, "--cond")
    return out, origins


def _given_by(exc: FluxframeError, origins: dict[tuple[str, str], str]) -> str | None:
    """The flag behind a runner error about a conditioner input (the runner names conditioning.NAME.INPUT)."""
    where = exc.field if isinstance(exc, RequestError) else exc.key if isinstance(exc, ConfigError) else None
    if isinstance(exc, PluginError) and exc.plugin:
        where = f"conditioning.{exc.plugin}"
    match = re.match(r"(?:request\.)?conditioning\.([^.\[]+)(?:\.([^.\[]+))?", where or "")
    if match is None:
        return None
    name, key = match.groups()
    if key is not None:
        return origins.get((name, key))
    return next((flag for (n, _), flag in origins.items() if n == name), None)


def cmd_generate(args) -> int:
    from tqdm import tqdm

    from fluxframe import api

    conditioning, origins = request_conditioning(args)
    config = api.with_loras(args.config, args.lora) if args.lora else api.load_config(args.config)
    if args.output is not None:  # before weights load: a run must not end in an image it may not write
        api.check_output(config, args.output, overwrite=args.overwrite)
    pipeline = api.load(config)
    bar = None

    def progress(info):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=info.num_steps, desc="denoising", unit="step", file=sys.stderr,
                       disable=args.no_progress)
        bar.update(1)

    try:
        result = pipeline.generate(
            api.GenerationRequest(prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
                                  prompt_embeds=args.prompt_embeds, upsample_prompt=args.upsample_prompt,
                                  steps=args.steps, guidance=args.guidance, width=args.width, height=args.height,
                                  output=args.output, overwrite=args.overwrite, conditioning=conditioning),
            progress=progress,
        )
    except (RequestError, ConfigError, PluginError) as exc:
        if (flag := _given_by(exc, origins)) is None:
            raise
        raise RequestError(f"{exc} (given by {flag})") from None
    finally:
        if bar is not None:
            bar.close()
    for verdict in result.verdicts:
        print(format_verdict(verdict), file=sys.stderr)
    for note in result.notes:
        print(note, file=sys.stderr)
    if result.upsampled_prompt is not None:
        print(f"upsampled prompt: {result.upsampled_prompt}", file=sys.stderr)
    print(f"seed {result.seed}, {result.steps} steps, guidance {result.guidance}, "
          f"{result.width}x{result.height}, {result.timings['total']:.1f} s", file=sys.stderr)
    print(result.path)
    return 0


def cmd_batch(args) -> int:
    """Check the file and the results file, load once, run (fluxframe.core.batch), report per item."""
    from fluxframe import api
    from fluxframe.core import batch
    from fluxframe.core.pipeline import build_guard

    config = api.load_config(args.config)
    results = (args.results or config.output_dir / "results.jsonl").absolute()
    total = batch.scan(args.requests)  # a file that cannot run at all stops here, before weights load
    batch.check_results(results, args.requests, build_guard(config))
    if not args.resume and results.exists() and results.stat().st_size:
        raise RequestError(f"{results} exists: --resume to continue that run, or --results for another file",
                           field="--results")
    results.parent.mkdir(parents=True, exist_ok=True)
    pipeline = api.load(config)
    bar = None
    if not args.no_progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, desc="batch", unit="item", file=sys.stderr)

    def report(outcome, summary) -> None:
        record = outcome.record
        if outcome.status == "error":  # above the bar, when there is one
            (bar.write if bar is not None else print)(f"fluxframe: error: {record['error']}", file=sys.stderr)
        seen = summary.done + summary.blocked + summary.failed + summary.skipped
        if bar is not None:
            bar.update(seen - bar.n)
            bar.set_postfix(done=summary.done, blocked=summary.blocked, failed=summary.failed, refresh=False)
        elif not args.no_progress:
            where = record["output"] or "; ".join(record["reasons"])
            print(f"[{seen}/{total}] line {record['line']} {outcome.status}: {where}",
                  file=sys.stderr, flush=True)

    try:
        summary = batch.run_batch(pipeline, args.requests, results=results, output_dir=config.output_dir,
                                  batch_size=args.batch_size, resume=args.resume, fail_fast=args.fail_fast,
                                  report=report)
    finally:
        if bar is not None:
            bar.close()
    print(f"{summary.done} written, {summary.blocked} blocked, {summary.failed} failed, {summary.skipped} skipped "
          f"(already done){'; stopped at the first failure' if summary.stopped else ''}; results: {results}",
          file=sys.stderr)
    return summary.exit_code


def cmd_encode(args) -> int:
    from fluxframe import api

    print(api.encode(args.config, args.prompt, args.output, negative_prompt=args.negative_prompt,
                     overwrite=args.overwrite))
    return 0


def format_verdict(v) -> str:
    scores = ", ".join(f"{k} {s:.2f}" for k, s in sorted(v.scores.items(), key=lambda kv: -kv[1])[:3])
    state = "allowed" if v.allowed else f"VIOLATION ({v.action})"
    return f"filter {v.filter} {v.version} on {v.target}: {state}" + (f" [{scores}]" if scores else "") + \
        (f" - {v.reason}" if v.reason else "")


def cmd_plugins(args, host) -> int:
    """The plugins of the host the command line was built from (default settings: see the module docstring)."""
    report = host.report()
    rows, failures = report["plugins"], report["failed"]
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for row in rows:
        kind = "built-in" if row["builtin"] else "third-party"
        print(f"{row['name']:<16} {kind:<12} {row['source']}")
        for item in row["provides"]:
            print(f"    {item}")
    for failure in failures:
        print(f"{failure['name']:<16} FAILED       {failure['source']}: {failure['error']}")
    return 0


def cmd_config_check(args) -> int:
    from fluxframe import api

    warnings = api.check_config(args.file)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{args.file}: ok")
    return 0


def main(argv: list[str] | None = None, *, host=None) -> int:
    """Run one command; ``host``: the plugin host whose commands join the parser (tests pass their own)."""
    parser = build_parser(host)
    args = parser.parse_args(argv)
    # An argument that is not valid UTF-8 reaches Python as lone surrogates: print such paths as their bytes
    # rather than fail after the work is done.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # transformers' own progress bars and notices would bury fluxframe's output
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        return getattr(args, RUN)(args)
    except Blocked as exc:
        if exc.decision is not None:
            for verdict in exc.decision.verdicts:
                print(format_verdict(verdict), file=sys.stderr)
        print(f"fluxframe: blocked: {exc}", file=sys.stderr)
        return 3
    except FluxframeError as exc:
        print(f"fluxframe: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fluxframe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
