"""Build the example notebooks from the cell lists below and execute them (outputs saved).

Every torchmagic output is saved as self-contained HTML plus plain text (no widget views, no widget
state), so the notebooks read the same in JupyterLab after reopening, on GitHub and in nbconvert.

    .venv/bin/python examples/build.py            # all notebooks
    .venv/bin/python examples/build.py quickstart # one

Notebooks use only models built in the notebook or shipped in ``torchmagic.models`` (no downloads).
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent

SETUP = """%load_ext torchmagic
import torch, torch.nn as nn, torch.nn.functional as F
from torchmagic.models import SmallCNN, GPT, GPTConfig, Llama
_ = torch.manual_seed(0)"""

NOTEBOOKS: dict[str, list[tuple[str, str]]] = {
    "quickstart": [
        ("md", "# torchmagic quickstart\n\nEvery magic on a small CNN and a small GPT-style decoder "
               "(both built here, no downloads). `%load_ext torchmagic` once, then ask."),
        ("code", SETUP),
        ("code", "cnn = SmallCNN()\ngpt = GPT(GPTConfig(vocab_size=1000, block_size=64, n_layer=2, "
                 "n_head=4, d_model=64))\nx = torch.randn(8, 3, 32, 32)\n"
                 "ids = torch.randint(0, 1000, (2, 16))"),
        ("md", "## `%summary`: shapes, parameters and FLOPs per module"),
        ("code", "%summary cnn (1,3,32,32)"),
        ("code", "%summary gpt (2,16) --dtypes long --depth 2"),
        ("md", "## `%params`: where the parameters are (tied weights counted once)"),
        ("code", "%params gpt"),
        ("md", "## `%%meta_shape`: every shape a cell produces, no memory, no weights touched"),
        ("code", "%%meta_shape\nbig = torch.randn(100000, 100000)\nfeats = cnn.features(x)\n"
                 "logits = cnn.head(feats)"),
        ("md", "## `%%detect_anomaly`: where a NaN was born"),
        ("code", "%%detect_anomaly\nz = torch.randn(4, 8)\nloss = torch.log(-z.abs() - 1).sum()"),
        ("md", "## `%%amp`: a cell in mixed precision, with a dtype report"),
        ("code", "%%amp --dtype bf16 --device cpu --report\nlogits = gpt(ids)"),
        ("md", "## `%gpumem`: memory per device (CPU RSS here)"),
        ("code", "%gpumem"),
        ("md", "## Everyday tools"),
        ("code", "%tensor x"),
        ("code", "%tensors"),
        ("code", "%device gpt"),
        ("code", "%freeze gpt.wte gpt.wpe"),
        ("code", "%unfreeze gpt"),
        ("code", "%checkpoint save cnn cnn.pt"),
        ("code", "%checkpoint load cnn cnn.pt"),
        ("code", "%%benchmark --min-time 0.2\ncnn(x)"),
        ("code", "%%profile --rows 8\ncnn(x)"),
    ],
    "debugging_nans": [
        ("md", "# Debugging NaNs with `%%detect_anomaly`\n\ntorch's `detect_anomaly` only sees "
               "non-finite values in backward; the magic checks every forward op too and names "
               "where the first NaN/Inf was born."),
        ("code", SETUP),
        ("md", "## A forward overflow inside an MLP"),
        ("code", "mlp = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))\n"
                 "with torch.no_grad():\n    mlp[2].weight.mul_(1e37)  # huge, still finite\n"
                 "inp = torch.randn(8, 16) * 100"),
        ("code", "%%detect_anomaly\nout = mlp(inp)\nloss = out.softmax(-1).sum()"),
        ("md", "## A NaN born in functional code between modules"),
        ("code", "%%detect_anomaly\nh = mlp[0](inp)\nh = torch.log(h)\nloss = h.sum()"),
        ("md", "## A backward NaN: `sqrt(0)` has an infinite gradient"),
        ("code", "%%detect_anomaly\nw = torch.zeros(3, requires_grad=True)\n"
                 "(w.sqrt() * 0).sum().backward()"),
        ("md", "## A clean run says so"),
        ("code", "%%detect_anomaly\nlin = nn.Linear(4, 2)\nlin(torch.randn(3, 4)).sum().backward()"),
    ],
    "big_models_on_meta": [
        ("md", "# Big models on the meta device\n\nBuild a 70B-parameter Llama-style decoder "
               "without allocating its weights, then size it with `%summary --meta` and trace its "
               "shapes with `%%meta_shape`."),
        ("code", SETUP),
        ("code", "with torch.device('meta'):\n    llama70b = Llama(Llama.config_70b())\n"
                 "sum(p.numel() for p in llama70b.parameters()) / 1e9"),
        ("md", "The 80 identical decoder layers fold into one row (`layers.0-79 ×80`, with their "
               "totals); open it for the first layer, and any other layer from the list under it."),
        ("code", "%params llama70b"),
        ("code", "%summary llama70b (1,2048) --dtypes long --meta"),
        ("code", "%%meta_shape --depth 1\nids = torch.zeros(1, 4096, dtype=torch.long)\n"
                 "logits = llama70b(ids)"),
        ("md", "A 7B decoder built inside the cell costs no memory either:"),
        ("code", "%%meta_shape --depth 1\nm = Llama(Llama.config_7b())\n"
                 "out = m(torch.zeros(2, 512, dtype=torch.long))"),
    ],
    "mixed_precision": [
        ("md", "# Mixed precision with `%%amp`\n\nRun a cell under autocast and see which ops ran "
               "in low precision, which stayed in float32 and why."),
        ("code", SETUP),
        ("code", "gpt = GPT(GPTConfig(vocab_size=1000, block_size=64, n_layer=2, n_head=4, "
                 "d_model=64))\nids = torch.randint(0, 1000, (2, 32))"),
        ("code", "%%amp --dtype bf16 --device cpu --report\nlogits = gpt(ids)\n"
                 "loss = F.cross_entropy(logits.flatten(0, 1), ids.flatten())\nloss"),
        ("code", "%%amp --dtype fp16 --device cpu --report\nlogits = gpt(ids)\n"
                 "loss = F.cross_entropy(logits.flatten(0, 1), ids.flatten())\nloss.backward()"),
        ("md", "Autocast for every following cell, then off again:"),
        ("code", "%amp on --dtype bf16 --device cpu"),
        ("code", "gpt.lm_head(torch.randn(2, 64)).dtype"),
        ("code", "%amp off"),
        ("code", "gpt.lm_head(torch.randn(2, 64)).dtype"),
    ],
}


def build(name: str, execute: bool = True) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                 "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for kind, src in NOTEBOOKS[name]:
        nb.cells.append(nbformat.v4.new_markdown_cell(src) if kind == "md"
                        else nbformat.v4.new_code_cell(src))
    path = HERE / f"{name}.ipynb"
    if execute:
        # No saved widget state: outputs are HTML + text; a live panel (a long benchmark) has
        # already been replaced by its result through its display id.
        NotebookClient(nb, timeout=600, kernel_name="python3", store_widget_state=False,
                       resources={"metadata": {"path": str(HERE)}}).execute()
        for cell in nb.cells:  # checkpoint files written by the quickstart stay out of the repo
            cell.metadata.pop("execution", None)
    nbformat.write(nb, path)
    return path


if __name__ == "__main__":
    for n in sys.argv[1:] or list(NOTEBOOKS):
        print("built", build(n))
