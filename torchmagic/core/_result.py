"""Base class of every result object.

Result objects are dataclasses that carry data. Rendering lives in ``torchmagic.display``: each result
class names its renderer module in ``_display_module``; that module defines ``text(obj) -> str``,
``html(obj) -> str`` and optionally ``widget(obj)`` (an ipywidgets object). The renderer modules are
imported only when something is shown, so the core stays importable with torch alone.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
from typing import Any, ClassVar


def _plain(value: Any) -> Any:
    """Convert a value to JSON-friendly Python (used by ``to_dict``)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not f.name.startswith("_")}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)  # torch.dtype, torch.device, torch.Size ... -> readable string


class Result:
    """Mixin for result dataclasses: text, HTML, widget and ``to_dict``."""

    _display_module: ClassVar[str] = ""

    def _renderer(self) -> Any:
        return importlib.import_module(self._display_module)

    def to_dict(self) -> dict[str, Any]:
        """The result as plain JSON-friendly Python data."""
        return _plain(self)

    def __str__(self) -> str:
        return self._renderer().text(self)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(f"{type(self).__name__}(...)" if cycle else str(self))

    def _repr_html_(self) -> str:
        return self._renderer().html(self)

    def _ipython_display_(self) -> None:
        from torchmagic.display import show

        show(self)
