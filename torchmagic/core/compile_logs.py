"""``TORCH_LOGS`` artifacts for one compile report, captured instead of printed on stderr.

``TORCH_LOGS=graph_breaks,recompiles`` must be set before ``import torch`` and prints to stderr.
:func:`captured_logs` turns the same artifacts on with ``torch._logging.set_logs`` for the duration of
a block, sends every record of torch's loggers to one in-memory handler (so nothing reaches stderr:
dynamo's own warnings, e.g. the ``Tensor.item()`` hint, are captured too), and afterwards puts back
the logging state exactly: torch's log settings (``torch._logging._internal.log_state``), and the
level, ``propagate`` flag and handlers of every ``torch`` logger.

Settings use ``TORCH_LOGS``'s syntax: artifacts (``graph_breaks``, ``recompiles``, ``guards``,
``output_code``, ...) and log names with an optional ``+`` (DEBUG) or ``-`` (ERROR) prefix
(``+dynamo``, ``inductor``). :func:`parse_log_settings` checks them against torch's registry.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from torchmagic.core.errors import TorchMagicError


@dataclass
class LogRecordLine:
    """One captured log record: the artifact (``graph_breaks``) or logger name, level, text."""

    source: str
    level: str
    message: str


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[LogRecordLine] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record must not break the compile
            message = str(record.msg)
        artifact = getattr(logging.getLogger(record.name), "artifact_name", None)
        self.lines.append(LogRecordLine(artifact or record.name, record.levelname, message))


@dataclass
class LogCapture:
    """What :func:`captured_logs` collected (``lines`` in order)."""

    settings: dict[str, Any] = field(default_factory=dict)
    lines: list[LogRecordLine] = field(default_factory=list)

    def by_source(self) -> dict[str, list[str]]:
        """Messages grouped by artifact (or logger) name, in order of first appearance."""
        out: dict[str, list[str]] = {}
        for line in self.lines:
            out.setdefault(line.source, []).append(line.message)
        return out

    def warnings(self) -> list[str]:
        """Messages logged at WARNING or above (torch's own hints during the compile)."""
        return [ln.message for ln in self.lines if ln.level in ("WARNING", "ERROR", "CRITICAL")]


def parse_log_settings(spec: str | Sequence[str] | None) -> dict[str, Any]:
    """``"graph_breaks,recompiles,+dynamo"`` -> keyword arguments of ``torch._logging.set_logs``.

    Raises :class:`TorchMagicError` naming an unknown artifact/log and listing the valid ones.
    """
    import inspect

    import torch._logging
    from torch._logging import _internal

    if spec is None:
        return {}
    tokens = spec.split(",") if isinstance(spec, str) else [str(s) for s in spec]
    tokens = [t.strip() for t in tokens if t.strip()]
    accepted = set(inspect.signature(torch._logging.set_logs).parameters) - {"modules"}
    registry = _internal.log_registry
    out: dict[str, Any] = {}
    for tok in tokens:
        prefix = tok[0] if tok[0] in "+-" else ""
        name = tok[len(prefix):]
        if registry.is_artifact(name) and name in accepted:
            if prefix:
                raise TorchMagicError(f"--logs {tok}: + and - set a log's level; artifacts like "
                                      f"{name} take no prefix")
            out[name] = True
        elif (registry.is_log(name) or name == "all") and name in accepted:
            out[name] = {"+": logging.DEBUG, "-": logging.ERROR}.get(prefix, logging.INFO)
        else:
            artifacts = sorted(a for a in registry.artifact_names if a in accepted)
            common = [a for a in ("graph_breaks", "recompiles", "recompiles_verbose", "guards",
                                  "graph_code", "output_code", "dynamic", "perf_hints")
                      if a in artifacts or a in accepted]
            raise TorchMagicError(f"--logs: unknown TORCH_LOGS name {name!r}; use artifacts such "
                                  f"as {', '.join(common)} (all {len(artifacts)}: "
                                  "torch._logging._internal.log_registry.artifact_names) or logs "
                                  "like dynamo, +dynamo, inductor")
    return out


def _torch_loggers() -> dict[str, logging.Logger]:
    manager = logging.Logger.manager
    out = {}
    for name, obj in list(manager.loggerDict.items()):
        if (name == "torch" or name.startswith("torch.")) and isinstance(obj, logging.Logger):
            out[name] = obj
    out["torch"] = logging.getLogger("torch")
    return out


@contextlib.contextmanager
def captured_logs(spec: str | Sequence[str] | None = None) -> Iterator[LogCapture]:
    """Enable the ``TORCH_LOGS`` settings ``spec`` for the block and capture every torch log
    record (also warnings when ``spec`` is empty); restore the logging state afterwards.

    Raises :class:`TorchMagicError` for unknown names, and when ``TORCH_LOGS`` is set in the
    environment (torch then ignores ``set_logs``; its settings already print to stderr).
    """
    import torch._logging
    from torch._logging import _internal

    settings = parse_log_settings(spec)
    if settings and _internal.LOG_ENV_VAR in os.environ:
        raise TorchMagicError(f"--logs cannot work while the environment sets "
                              f"TORCH_LOGS={os.environ[_internal.LOG_ENV_VAR]!r} (torch then "
                              "ignores set_logs and prints those logs on stderr); unset it to "
                              "capture logs per cell")
    state = _internal.log_state
    saved_levels = dict(state.log_qname_to_level)
    saved_artifacts = set(state.artifact_names)
    before = _torch_loggers()
    saved = {name: (lg.level, lg.propagate, list(lg.handlers), lg.disabled)
             for name, lg in before.items()}
    handler = _Capture()
    capture = LogCapture(settings)
    roots: list[logging.Logger] = []
    try:
        if settings:
            torch._logging.set_logs(**settings)
        for qname in sorted(_internal.log_registry.get_log_qnames()):
            lg = logging.getLogger(qname)
            for h in list(lg.handlers):
                if _internal._is_torch_handler(h):
                    lg.removeHandler(h)  # torch's stderr handler: ours takes its place
            lg.addHandler(handler)
            roots.append(lg)
        yield capture
    finally:
        for lg in roots:
            lg.removeHandler(handler)
        if settings:
            state.clear()
            state.log_qname_to_level.update(saved_levels)
            state.artifact_names.update(saved_artifacts)
        for name, lg in _torch_loggers().items():
            if name in saved:
                level, propagate, handlers, disabled = saved[name]
                lg.setLevel(level)
                lg.propagate = propagate
                lg.handlers[:] = handlers
                lg.disabled = disabled
            elif getattr(lg, "artifact_name", None) is not None:
                # an artifact logger created during the block: configure it as torch would now
                lg.setLevel(logging.NOTSET)
                lg.propagate = True
                if handler in lg.handlers:
                    lg.removeHandler(handler)
                _internal.configure_artifact_log(lg)
        capture.lines = handler.lines


__all__ = ["LogCapture", "LogRecordLine", "captured_logs", "parse_log_settings"]
