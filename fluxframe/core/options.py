"""Plugin options from the config: one mechanism for every plugin kind.

A factory's keyword parameters are its options. Each plugin the config enables has a table of them —
``[[conditioners]]`` entries, ``[memory.NAME]``, ``[safety.filters.NAME]`` (beside the policy's own keys),
``[postprocessors.NAME]`` and the built-in postprocessors' ``[provenance.watermark]`` / ``[provenance.c2pa]`` —
and ``instantiate`` calls the factory with it. A ``base_dir`` parameter receives the config file's folder (so
relative paths among the options resolve as every path in a config does; it is never a key of the table); a
``**kwargs`` parameter accepts any key, and the factory then names the ones it does not know itself.

Unknown and missing keys are found from the signature before the factory runs; a bad value (a TypeError or
ValueError from the factory, or a ConfigError or ProvenanceError it raises) comes back naming its key path
(``postprocessors.my-stamp.colour``) — the option the message starts with ("colour: ..."), else the one option it
mentions, else the table.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

from fluxframe.errors import ConfigError, ProvenanceError

_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def instantiate(factory: Any, options: Any, *, key: str, source: str | None = None,
                base_dir: Path | None = None) -> Any:
    """``factory(**options)`` (plus ``base_dir`` where the factory takes it); ``key`` is the options' table in
    the config (``memory.group-offload``), ``source`` the config file, both for messages."""
    if not isinstance(options, dict):
        raise ConfigError(f"expected a table of options, got {type(options).__name__}", path=source, key=key)
    if "base_dir" in options:
        raise ConfigError("unknown key (fluxframe passes the config's folder itself)", path=source,
                          key=f"{key}.base_dir")
    params = _parameters(factory)
    if params is not None:
        keyword = {name for name, p in params.items() if p.kind in _KEYWORD} - {"base_dir"}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            unknown = [name for name in options if name not in keyword]
            if unknown:
                known = ", ".join(sorted(keyword)) or "none"
                raise ConfigError(f"unknown key (known: {known})", path=source, key=f"{key}.{unknown[0]}")
        missing = [name for name in keyword if params[name].default is inspect.Parameter.empty and name not in options]
        if missing:
            raise ConfigError("required key is missing", path=source, key=f"{key}.{sorted(missing)[0]}")
        if base_dir is not None and "base_dir" in params and params["base_dir"].kind in _KEYWORD:
            options = {**options, "base_dir": base_dir}
    try:
        return factory(**options)
    except ConfigError as exc:
        if exc.path is not None:  # it names a file of its own (a word list, a lexicon): already precise
            raise
        if exc.key is None:
            where = blame(key, options, exc.message)
        elif exc.key == key or exc.key.startswith(f"{key}."):
            where = exc.key
        else:  # relative to the table: "colour" for postprocessors.my-stamp.colour
            where = f"{key}.{exc.key}"
        raise ConfigError(exc.message, path=source, key=where) from None
    except ProvenanceError as exc:
        if key in str(exc):
            raise
        raise ProvenanceError(f"{blame(key, options, str(exc))}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc), path=source, key=blame(key, options, str(exc))) from None


def blame(key: str, options: dict[str, Any], message: str) -> str:
    """The key path a factory's message is about: the option it starts with ("colour: must be ..."), else the one
    option it names, else the whole table."""
    names = [name for name in options if name != "base_dir"]
    first = message.split(":", 1)[0].strip() if ":" in message else None
    if first in names:
        return f"{key}.{first}"
    named = [name for name in names if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", message)]
    return f"{key}.{named[0]}" if len(named) == 1 else key


def _parameters(factory: Any) -> dict[str, inspect.Parameter] | None:
    """The factory's parameters, or None when Python cannot tell (some builtins): then every key is passed on."""
    try:
        return dict(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return None
