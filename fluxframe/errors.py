"""Errors a fluxframe user can catch.

Every message names what is at fault: the file, the key, the config field or the plugin.
All of them derive from FluxframeError, so `except FluxframeError` catches anything
fluxframe raises on purpose; anything else escaping is a bug.
"""

from __future__ import annotations


class FluxframeError(Exception):
    """Base class of every error fluxframe raises on purpose."""


class ConfigError(FluxframeError):
    """A config file is unreadable, or a key is unknown, missing or of the wrong type."""

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None):
        self.path = path
        self.key = key
        self.message = message
        where = ": ".join(p for p in (path, key) if p)
        super().__init__(f"{where}: {message}" if where else message)


class PluginError(FluxframeError):
    """A plugin failed to import, registered something twice, or was asked for but is absent."""

    def __init__(self, message: str, *, plugin: str | None = None):
        self.plugin = plugin
        super().__init__(message)


class CheckpointError(FluxframeError):
    """A checkpoint is missing, pickled, truncated, or does not match the model it should fill."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        self.file = file
        self.key = key
        parts = []
        if file:
            parts.append(str(file))
        if key:
            parts.append(f"key {key!r}")
        super().__init__(f"{', '.join(parts)}: {message}" if parts else message)


class RequestError(FluxframeError):
    """A generation request is invalid (size, steps, seed, prompt, inputs)."""

    def __init__(self, message: str, *, field: str | None = None):
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class TrainingError(FluxframeError):
    """A training run cannot start or go on: its data set, options or saved state; the message names the file."""


class OutputError(FluxframeError):
    """An output could not be written."""


class AuditError(FluxframeError):
    """The audit log cannot be appended safely: it is not writable, not a regular file, its head cannot be
    written, its tail does not verify, or its head file is missing beside a non-empty log. Nothing is run."""

    def __init__(self, message: str, *, path: str | None = None):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class SafetyError(FluxframeError):
    """The safety layer cannot run as configured (a required filter is missing or fails to load)."""

    def __init__(self, message: str, *, filter: str | None = None):
        self.filter = filter
        super().__init__(f"filter {filter!r}: {message}" if filter else message)


class Blocked(FluxframeError):
    """A request was blocked by the safety policy; no image was written.

    ``decision`` holds the verdicts; ``audit`` the audit record written for it (if a log is configured).
    """

    def __init__(self, message: str, *, decision=None, audit: dict | None = None):
        self.decision = decision
        self.audit = audit
        super().__init__(message)


class Cancelled(FluxframeError):
    """A request was cancelled while it ran (``Pipeline.generate_many``'s ``cancelled``): it stopped at the next
    step, wrote no image, and its audit line's action is ``cancelled``."""


class ProvenanceError(FluxframeError):
    """Watermarking or signing cannot be done as configured (key, certificate, passphrase, signing failure).

    When signing is configured, this error means no output was written."""
