"""``%estimate MODEL [INPUTS] [options]`` and ``%%estimate``: will it fit? The peak memory of a
training step or an inference (line), or of the user's own training-step cell (cell), on fake
tensors, with a verdict against the device.

Both only parse, call :func:`torchmagic.core.estimate.estimate_memory` /
:func:`torchmagic.core.estimate_cell.estimate_cell`, and display the result. An estimate that
runs longer than half a second shows a live panel (:mod:`torchmagic.display.live`: a status line
rewritten in place in a terminal, a progress widget in a notebook) naming the trace running (the
step, each what-if, each batch of the search), its phase and ops so far; the result replaces it.
"""

from __future__ import annotations

from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from torchmagic.core.errors import TorchMagicError
from torchmagic.magics._base import (
    INPUT_FLAGS,
    TorchMagics,
    flag_names,
    input_arguments,
    parse,
    user_errors,
)

_LINE_ONLY = (("--train", "train"), ("--optimizer", "optimizer"), ("--dtype", "dtype"),
              ("--amp", "amp"), ("--checkpointing", "checkpointing"), ("--batch", "batch"),
              ("--max-batch", "max_batch"), ("--loss", "loss"), *INPUT_FLAGS)


class _Progress:
    """Turns ``estimate_memory(progress=...)`` reports into the live panel's status line: which
    trace runs (the step itself, a what-if, a batch of the search), its phase and ops so far
    (a trace reports every 512 ops), so a long estimate shows what it is doing."""

    def __init__(self, panel: Any) -> None:
        self.panel = panel
        self.traces = 0
        self.label = ""

    def __call__(self, info: dict[str, Any]) -> None:
        from torchmagic.display.format import human_bytes

        stage = info.get("stage")
        if stage == "trace":
            self.traces += 1
            self.label = f"trace {self.traces}: the {info.get('what', 'step')}"
            self.panel.update(None, self.label)
        elif stage == "ops":
            if info.get("of") == "max-batch" and "largest batch" not in self.label:
                self.label = f"trace {self.traces + 1}: searching the largest batch that fits"
            self.panel.update(None, f"{self.label}: {info['phase']}, {info['ops']:,} ops")
        elif stage == "what-if":
            self.traces += 1
            self.label = (f"trace {self.traces}: what if {info.get('change')} "
                          f"({info.get('index', 0) + 1} of {info.get('count', '?')})")
            self.panel.update(None, self.label)
        elif stage == "max-batch":
            verdict = "fits" if info["fits"] else "does not fit"
            self.traces += 1
            self.label = (f"trace {self.traces + 1}: searching the largest batch that fits (batch "
                          f"{info['batch']:,}: {human_bytes(info['peak'])}, {verdict})")
            self.panel.update(None, self.label)


@magics_class
class EstimateMagics(TorchMagics):
    """``%estimate`` / ``%%estimate``."""

    @magic_arguments()
    @input_arguments
    @argument("--train", action="store_true",
              help="a training step: forward, loss, backward, optimizer step (default: an "
                   "inference under torch.no_grad(), eval mode)")
    @argument("--optimizer", metavar="NAME",
              help="with --train: any torch.optim class name (adamw, adam, sgd, adagrad, "
                   "rmsprop ...) or sgd-momentum (default adamw)")
    @argument("--dtype", metavar="DT", help="cast the weights to fp32, bf16 or fp16")
    @argument("--amp", metavar="DT", help="forward and loss under torch.autocast in bf16 or fp16")
    @argument("--checkpointing", action="store_true",
              help="with --train: activation checkpointing of each repeated block")
    @argument("--loss", metavar="L", default="auto",
              help="auto (the output's .loss, else cross-entropy against integer inputs, else "
                   "the mean), mean or cross_entropy")
    @argument("--batch", type=int, metavar="N", help="set the inputs' batch (dim 0) to N")
    @argument("--max-batch", action="store_true",
              help="also find the largest batch that fits (bisection on fake tensors)")
    @argument("--device", metavar="D",
              help="check against cuda / cuda:N or an accelerator: h100, a100, a100-80gb, h200, "
                   "l4, t4, rtx4090, mi300x ... (default: the current CUDA device; without one, "
                   "every accelerator of the table)")
    @argument("--memory", metavar="SIZE", help="check against this much memory: 80GiB, 24GB ...")
    @argument("--reserve", metavar="SIZE",
              help="memory left for the CUDA context and workspaces (default 1GiB; with "
                   "--memory, the smaller of 1GiB and an eighth of it)")
    @argument("--what-if", dest="what_if", action="store_true", default=None,
              help="always trace the alternatives (default: only when it does not fit)")
    @argument("--no-what-if", dest="what_if", action="store_false",
              help="never trace the alternatives")
    @argument("--first-step", action="store_true",
              help="%%%%estimate: measure the optimizer's very first step (no state made first)")
    @argument("--top", type=int, default=8, metavar="N",
              help="modules listed by activation memory (default 8)")
    @argument("-o", dest="output", metavar="VAR", help="also store the MemoryEstimate in VAR")
    @argument("model", nargs="?", metavar="MODEL", help="an nn.Module (any expression)")
    @argument("inputs", nargs="*", metavar="INPUTS",
              help="shapes like (8,3,224,224), or tensors / an argument tuple / a dict or "
                   "tokenizer output (keyword arguments) from the namespace, name=EXPR: as "
                   "%%summary takes them")
    @line_cell_magic
    def estimate(self, line: str, cell: str | None = None) -> None:
        """Will it fit? The peak memory of a training step or an inference, on fake tensors.

        ``%estimate MODEL INPUTS [--train] ...`` runs one step of a fake twin of the model (no
        weight allocated or read: a 70B model built on meta takes seconds) under torch's
        MemTracker and shows the peak split by kind (parameters, gradients, optimizer state,
        activations, temporaries, buffers, inputs), where it happens (phase, module, op), the
        modules holding the most activation memory, a timeline of live memory, and a verdict
        against the device (--device, --memory; the current CUDA device by default) with what
        would change it, each alternative traced again as far as it changes the step: bf16
        weights, autocast, checkpointing, an optimizer without state, a smaller batch
        (--max-batch: the largest that fits), and FSDP sharding over N GPUs (arithmetic). The
        header gives the step's ops and time, then the what-ifs' traces and time.

        ``%%estimate`` runs your own training-step cell (forward, loss, backward, opt.step(),
        gradient accumulation) on fake twins of every model, optimizer (state included) and
        tensor it uses, like %%meta_shape --fake, and reports that cell's peak. Nothing real is
        allocated or changed.

        Examples::

            %estimate model (8,3,224,224)
            %estimate gpt (8,1024) --dtypes long --train --optimizer adamw --device H100
            %estimate llama70b (1,4096) --dtypes long --train --dtype bf16 --checkpointing
            %estimate model (32,3,224,224) --train --device a100 --max-batch
        """
        __tracebackhide__ = True
        args = parse(self.estimate, line)
        if cell is not None:
            return self._cell(args, cell)
        if args.model is None:
            raise UsageError("%estimate: give a model and its inputs, e.g. %estimate model "
                             "(8,3,224,224) --train (or use %%estimate on a training cell; see "
                             "%estimate? for every option)")
        if args.first_step:
            raise UsageError("%estimate: --first-step applies to %%estimate (a cell with your "
                             "own optimizer)")
        from torchmagic.core.estimate import estimate_memory

        with user_errors("%estimate"), flag_names():
            self.check_output_name(args.output)
            if args.top < 0:
                raise TorchMagicError(f"--top must be >= 0; got {args.top}")
            model = self.evaluate(args.model, "model")
            values, given = self.model_inputs(args)
            if not args.train:
                for flag, on in (("--optimizer", args.optimizer), ("--checkpointing",
                                                                     args.checkpointing)):
                    if on:
                        raise TorchMagicError(f"{flag} applies to a training step: add --train")
            from torchmagic.display.live import live

            # several traces (--max-batch, the alternatives): a live panel, replaced by the result
            with live("%estimate", delay=0.5) as panel:
                result = estimate_memory(
                    model, *values, **given, train=args.train,
                    optimizer=args.optimizer or "adamw", dtype=args.dtype, amp=args.amp,
                    checkpointing=args.checkpointing, loss=args.loss, batch=args.batch,
                    max_batch=args.max_batch, device=args.device, memory=args.memory,
                    reserve=args.reserve, what_if=args.what_if, top=args.top,
                    name=args.model.strip(), progress=_Progress(panel))
                self.store(args.output, result)
                panel.finish(result)
        return None

    def _cell(self, args: Any, cell: str) -> None:
        from torchmagic.core.estimate_cell import estimate_cell

        bad = [flag for flag, attr in _LINE_ONLY if getattr(args, attr) not in (None, False,
                                                                                   "auto")]
        if args.model is not None or args.inputs:
            bad.insert(0, "MODEL/INPUTS")
        if bad:
            verb = "belongs" if len(bad) == 1 else "belong"
            raise UsageError(f"%%estimate: {', '.join(bad)} {verb} to the line form (%estimate "
                             "MODEL INPUTS ...); the cell runs your own code and takes --device, "
                             "--memory, --reserve, --what-if, --first-step, --top and -o")
        with user_errors("%%estimate"), flag_names():
            self.check_output_name(args.output)
            if args.top < 0:
                raise TorchMagicError(f"--top must be >= 0; got {args.top}")
            source = self.transform(cell)
            result = estimate_cell(source, self.shell.user_ns, device=args.device,
                                   memory=args.memory, reserve=args.reserve,
                                   what_if=args.what_if, top=args.top,
                                   first_step=args.first_step)
            self.store(args.output, result)
        self.show(result)
        return None


MAGICS = [EstimateMagics]
