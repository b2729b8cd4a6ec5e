"""torchmagic without IPython: every magic's core is a plain function returning a result object.

Run: .venv/bin/python examples/plain_python.py   (tests/test_examples.py runs it too)
"""

import tempfile
from pathlib import Path

import torch

import torchmagic
from torchmagic.models import GPT, GPTConfig

torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=1000, block_size=64, n_layer=2, n_head=4, d_model=64))
ids = torch.randint(0, 1000, (2, 16))

s = torchmagic.summary(model, ids, depth=1)  # or input_size=(2, 16), dtypes=["long"]
print(s)  # the text table; s._repr_html_() is the HTML, s.to_dict() the data
assert s.total_params == sum(p.numel() for p in model.parameters())  # tied lm_head counted once
print(f"{s.total_flops:,} FLOPs = 2 x {s.total_macs:,} MACs")

print(torchmagic.params(model, depth=1, name="model"))

# Shapes on the meta device: nothing allocated, the namespace's objects untouched.
print(torchmagic.meta_shape("logits = model(torch.zeros(8, 64, dtype=torch.long))",
                            {"model": model, "torch": torch}))

# Where was the NaN born? (a context manager, or find_anomaly(fn))
with torchmagic.find_anomaly(namespace={"model": model}) as detector:
    h = model.wte(ids)
    loss = torch.log(h - 10).sum()  # log of negative numbers: NaN born in aten.log
print(detector.report)

with torchmagic.amp("cpu", "bf16") as run:  # autocast with a dtype report
    logits = model(ids)
print(run.report)

print(torchmagic.tensor_info(logits, "logits"))
print(torchmagic.device_report(model, "model"))
print(torchmagic.gpumem())

with tempfile.TemporaryDirectory() as tmp:
    print(torchmagic.save_checkpoint(model, Path(tmp) / "gpt.pt", name="model"))
    print(torchmagic.load_checkpoint(model, Path(tmp) / "gpt.pt", name="model"))

print(torchmagic.benchmark("model(ids)", {"model": model, "ids": ids}, min_time=0.1))

# Will a training step fit on a T4? Peak memory on fake tensors: nothing allocated.
est = torchmagic.estimate_memory(model, ids, train=True, optimizer="adamw", device="T4")
print(est.peak_bytes, est.by_kind["optimizer_state"], est.fits)
