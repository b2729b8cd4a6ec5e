"""torchmagic's plain-Python core: imports torch only (no IPython, no ipywidgets).

One module per concern; each public function returns a result dataclass (see ``_result.Result``).
"""
