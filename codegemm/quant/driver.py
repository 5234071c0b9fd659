"""``quantize(model, config, calibration=...)``: block-sequential quantization of a causal LM.

For each decoder block in order: run the original block on the hidden states
produced by the already-quantized earlier blocks (recording ``XᵀX`` of every
linear's input and the block's outputs as targets), quantize each linear
against its ``XᵀX``, optionally fine-tune the block to the targets, then run
the quantized block to produce the next block's inputs. Optionally the whole
model is then fine-tuned end to end against the original's next-token
distributions (:mod:`codegemm.quant.global_finetune`). With ``state_dir``
every finished block and global epoch is saved, so a killed run resumes bit
for bit.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable

import torch
from torch import nn

from codegemm.config import CodebookConfig, as_config
from codegemm.data import DataSource, calibration_samples
from codegemm.errors import CheckpointError, ConfigError
from codegemm.nn import CodeGEMMLinear
from codegemm.quant.capture import capture_inputs, find_blocks, run_block
from codegemm.quant.determinism import reproducible_on_cpu
from codegemm.quant.finetune import finetune_block
from codegemm.quant.global_finetune import global_finetune, record_teacher, split_model
from codegemm.quant.layer import HessianAccumulator, check_linear, layer_generator, quantize_tensors
from codegemm.quant.options import PRESET_DATA, QuantOptions, make_options
from codegemm.quant.rtn import check_rtn_config
from codegemm.quant.state import ResumeState
from codegemm.surgery import iter_linears, set_module

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    rel_error: float
    seconds: float
    history: list[float]


@dataclasses.dataclass
class QuantReport:
    """What :func:`quantize` did: per-layer relative output error and time."""

    config: CodebookConfig
    options: QuantOptions
    layers: list[LayerReport] = dataclasses.field(default_factory=list)
    finetune: list[tuple[int, float, float]] = dataclasses.field(default_factory=list)
    global_finetune: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    """``(epoch, mean KL of the epoch)`` of global fine-tuning."""
    seconds: float = 0.0
    resumed_blocks: int = 0

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per quantized weight (codes, fp16 scales, fp16 codebooks), over all layers."""
        total = sum(n * k for _, (n, k) in ((r.name, r.shape) for r in self.layers))
        bits = sum(self.config.bits_per_weight(*r.shape) * r.shape[0] * r.shape[1] for r in self.layers)
        return bits / total if total else float("nan")

    def table(self) -> str:
        """Plain-text summary: one row per layer, then totals."""
        width = max([len(r.name) for r in self.layers] + [5])
        lines = [f"{'layer':<{width}}  {'shape':>11}  {'rel.err':>8}  {'sec':>6}"]
        for r in self.layers:
            shape = f"{r.shape[0]}x{r.shape[1]}"
            lines.append(f"{r.name:<{width}}  {shape:>11}  {r.rel_error:8.5f}  {r.seconds:6.1f}")
        if self.layers:
            mean = sum(r.rel_error for r in self.layers) / len(self.layers)
            lines.append(f"{'mean':<{width}}  {'':>11}  {mean:8.5f}  {self.seconds:6.1f}")
        if self.global_finetune:
            kls = [kl for _, kl in self.global_finetune]
            if len(kls) == 1:  # one mean over the steps of the only epoch: nothing to compare it with
                lines.append(f"global fine-tuning: 1 epoch, mean KL over its steps {kls[0]:.4f}")
            else:
                lines.append(f"global fine-tuning: mean KL {kls[0]:.4f} (epoch 0) -> {kls[-1]:.4f} "
                             f"(epoch {len(kls) - 1})")
        lines.append(f"config {self.config.name}, method {self.options.method}, "
                     f"{self.bits_per_weight:.3f} bits/weight, {self.seconds:.0f} s")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.name,
            "options": self.options.to_dict(),
            "bits_per_weight": self.bits_per_weight,
            "seconds": self.seconds,
            "layers": [dataclasses.asdict(r) for r in self.layers],
            "finetune": self.finetune,
            "global_finetune": self.global_finetune,
        }


def block_targets(model: nn.Module, options: QuantOptions) -> tuple[str, nn.ModuleList, list[list[tuple[str, nn.Linear]]]]:
    """Blocks and, per block, the ``(full name, linear)`` pairs to quantize (skip list applied)."""
    prefix, blocks = find_blocks(model)
    chosen = dict(iter_linears(model, options.skip))
    per_block = []
    for i, block in enumerate(blocks):
        base = f"{prefix}.{i}"
        names = [f"{base}.{n}" for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        per_block.append([(n, chosen[n]) for n in names if n in chosen])
    return prefix, blocks, per_block


def validate(model: nn.Module, config: CodebookConfig, options: QuantOptions) -> list[list[tuple[str, nn.Linear]]]:
    """Every check that can fail, before any long work: config vs each layer, finite weights."""
    if options.method == "rtn":
        check_rtn_config(config)
    _, _, per_block = block_targets(model, options)
    if not any(per_block):
        raise ConfigError("no nn.Linear left to quantize in the decoder blocks (check the skip list)")
    if options.global_epochs and options.method == "aq":
        split_model(model)
    for layers in per_block:
        for name, linear in layers:
            check_linear(linear, config, name)
    return per_block


def _block_state(block: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in block.state_dict().items()}


def _restore_block(block: nn.Module, base: str, config: CodebookConfig, tensors: dict[str, torch.Tensor],
                   layers: list[tuple[str, nn.Linear]], dtype: torch.dtype) -> None:
    """Swap a finished block's linears for saved CodeGEMM layers and load its other parameters."""
    for name, linear in layers:
        rel = name[len(base) + 1 :]
        bias = tensors.get(f"{rel}.bias")
        layer = CodeGEMMLinear.from_unpacked(
            tensors[f"{rel}.codes"], tensors[f"{rel}.codebooks"], tensors[f"{rel}.scales"], bias, config
        ).to(linear.weight.device)
        set_module(block, rel, layer)
    block.load_state_dict(tensors, strict=True)


@reproducible_on_cpu
def quantize(
    model: nn.Module,
    config: CodebookConfig | str,
    calibration: DataSource = None,
    *,
    tokenizer: Any = None,
    nsamples: int | None = None,
    seqlen: int | None = None,
    preset: str | None = None,
    options: QuantOptions | None = None,
    state_dir: str | os.PathLike | None = None,
    fingerprint: dict[str, Any] | None = None,
    progress: bool = False,
    on_layer: Callable[[LayerReport], None] | None = None,
    **overrides: Any,
) -> QuantReport:
    """Quantize every ``nn.Linear`` of ``model``'s decoder blocks in place; returns a :class:`QuantReport`.

    ``calibration``: a text file path, a list of strings, a token tensor
    (``[n, seqlen]`` used as is), ``"wikitext2"``/``"c4"`` (online), or None
    for the offline default (see :mod:`codegemm.data`); text needs
    ``tokenizer``. ``nsamples``/``seqlen`` default to the preset's. Options
    come from ``options`` or ``preset`` plus keyword overrides (see
    :class:`QuantOptions`). ``lm_head`` and embeddings stay dense.
    ``state_dir`` makes the run resumable (see :mod:`codegemm.quant.state`).
    On the CPU the result is bit-reproducible (:mod:`codegemm.quant.determinism`).
    """
    from codegemm.loading import check_seqlen

    start_time = time.perf_counter()
    config = as_config(config)
    if options is None:
        options = make_options(preset, **overrides)
    elif overrides:
        raise ConfigError("pass either options= or keyword overrides, not both")
    data = PRESET_DATA.get(preset or "fast")
    nsamples = nsamples or data["nsamples"]
    seqlen = seqlen or data["seqlen"]
    check_seqlen(model, seqlen)
    per_block = validate(model, config, options)
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if bos is not None and not getattr(tokenizer, "add_bos_token", True):
        bos = None
    samples = calibration_samples(calibration, tokenizer, nsamples, seqlen, seed=options.seed, bos_token_id=bos)

    prefix, blocks = find_blocks(model)
    report = QuantReport(config=config, options=options)
    state = None
    done = 0
    if state_dir is not None:
        fp = dict(fingerprint or {})
        fp.update(config=config.name, options=options.to_dict(), nsamples=nsamples, seqlen=seqlen,
                  samples_sum=int(samples.sum()), samples_shape=list(samples.shape), blocks=len(blocks))
        state = ResumeState(state_dir, fp)
        done = state.load()
        report.resumed_blocks = done
        for row in state.extra().get("layers", []):
            report.layers.append(LayerReport(row["name"], tuple(row["shape"]), row["rel_error"], row["seconds"],
                                             row["history"]))
        report.finetune = [tuple(x) for x in state.extra().get("finetune", [])]
        report.global_finetune = [tuple(x) for x in state.extra().get("global_finetune", [])]
    dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()

    tuning = options.method == "aq"
    teacher = None
    if tuning and options.global_epochs:
        teacher = state.load_teacher() if state is not None else None
        if teacher is None:
            if done:
                raise CheckpointError(f"resume state in {state_dir} lacks the teacher hidden states")
            logger.info("recording the unquantized model's final hidden states for global fine-tuning")
            teacher = record_teacher(model, samples)
            if state is not None:
                state.save_teacher(teacher)
    with torch.no_grad():
        hidden, calls = capture_inputs(model, blocks, samples, need_hidden=done == 0)
    mix = options.finetune_teacher if tuning and options.finetune_epochs else 0.0
    # The unquantized model's trajectory through the blocks (block fine-tuning's other target).
    trajectory = hidden.clone() if mix and hidden is not None else None
    if done:
        logger.info("resuming after %d of %d finished blocks", done, len(blocks))
        for i in range(done):
            _restore_block(blocks[i], f"{prefix}.{i}", config, state.load_block(i), per_block[i], dtype)
        if done < len(blocks):
            device = next(blocks[done].parameters()).device
            hidden = state.load_hidden(done - 1).to(device)
            trajectory = state.load_hidden(done - 1, "teacher").to(device) if mix else None

    block_bar = _bar(progress, total=len(blocks), initial=done, desc="blocks", unit="block")
    for index in range(done, len(blocks)):
        block = blocks[index]
        layers = per_block[index]
        base = f"{prefix}.{index}"
        accs = {name: HessianAccumulator(lin.in_features, lin.weight.device) for name, lin in layers}
        # q/k/v (and gate/up) read the same tensor: compute its XᵀX once. The cache keeps the
        # tensor alive so its address cannot be reused by another input within the same sample.
        cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

        def make_hook(name: str):
            def hook(module, args, _out):
                x = args[0].detach()
                key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
                hit = cache.get(key)
                cache[key] = (x, accs[name].add(x, None if hit is None else hit[1]))
            return hook

        handles = [lin.register_forward_hook(make_hook(name)) for name, lin in layers]
        targets = torch.empty_like(hidden)
        with torch.no_grad():
            for row in range(hidden.shape[0]):
                cache.clear()
                targets[row : row + 1] = run_block(block, hidden[row : row + 1], calls, index)
        cache.clear()
        for handle in handles:
            handle.remove()
        if trajectory is not None:
            with torch.no_grad():
                for row in range(trajectory.shape[0]):
                    trajectory[row : row + 1] = run_block(block, trajectory[row : row + 1], calls, index)

        layer_bar = _bar(progress, total=len(layers), desc=f"block {index}", unit="layer", leave=False)
        for name, linear in layers:
            new, result = quantize_tensors(linear, config, accs.pop(name).mean(), options, name)
            set_module(model, name, new.to(linear.weight.device))
            row = LayerReport(name, (linear.out_features, linear.in_features), result.rel_error, result.seconds,
                              result.history)
            report.layers.append(row)
            logger.debug("%s: rel error %.5f in %.1fs", name, result.rel_error, result.seconds)
            if on_layer is not None:
                on_layer(row)
            if layer_bar is not None:
                layer_bar.set_postfix_str(f"{name.rsplit('.', 2)[-2]}.{name.rsplit('.', 1)[-1]} err={result.rel_error:.4f}")
                layer_bar.update(1)
        if layer_bar is not None:
            layer_bar.close()
        del accs

        tune = bool(options.finetune_epochs and options.method == "aq" and layers)
        if tune:
            gen = layer_generator(options.seed, f"{base}.finetune")
            goal = targets if trajectory is None else torch.lerp(targets, trajectory, mix)
            first_epoch = finetune_block(block, hidden, goal, calls, index, options.finetune_epochs,
                                         options.finetune_lr, options.finetune_batch, gen)
            del goal
        scale = float(targets.float().pow(2).mean().clamp_min(1e-30))
        block_err = 0.0
        with torch.no_grad():
            for row in range(hidden.shape[0]):
                hidden[row : row + 1] = run_block(block, hidden[row : row + 1], calls, index)
                block_err += float((hidden[row : row + 1].float() - targets[row : row + 1].float()).pow(2).mean())
        block_err /= hidden.shape[0] * scale
        if tune:
            report.finetune.append((index, first_epoch, block_err))
        logger.info("block %d: relative output MSE %.5f", index, block_err)
        del targets
        if state is not None:
            extra = {"layers": [dataclasses.asdict(r) for r in report.layers], "finetune": report.finetune}
            state.save_block(index, _block_state(block), hidden, extra, trajectory)
        if block_bar is not None:
            errs = [r.rel_error for r in report.layers if r.name.startswith(base + ".")]
            block_bar.set_postfix_str(f"mean err={sum(errs) / max(1, len(errs)):.4f}")
            block_bar.update(1)
    if block_bar is not None:
        block_bar.close()
    del hidden, trajectory
    if teacher is not None:
        _global_stage(model, blocks, samples, teacher, options, state, report, progress)
    model.train(was_training)
    report.seconds = time.perf_counter() - start_time
    return report


def cast_quantized(model: nn.Module, dtype: torch.dtype) -> int:
    """Store every :class:`CodeGEMMLinear`'s codebooks and scales in ``dtype`` (biases keep the model's); returns the count.

    Quantizing runs in the model's dtype (fp32 by default) for accuracy; the
    checkpoint only needs fp16, which the GPU kernels read anyway.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, CodeGEMMLinear):
            module.codebooks = nn.Parameter(module.codebooks.detach().to(dtype), requires_grad=False)
            module.scales = nn.Parameter(module.scales.detach().to(dtype), requires_grad=False)
            count += 1
    return count


def cast_dense(model: nn.Module, dtype: torch.dtype) -> int:
    """Store every floating parameter outside the quantized tables (embeddings, ``lm_head``, norms, biases) in ``dtype``
    and record it as the model's dtype; returns the count.

    Why: the dense parts of a model quantized in fp32 are most of a small model's checkpoint (Gemma 3 270M's tied
    embedding is 168 M weights), so a bf16 copy of them halves the file. Codebooks and scales are left as
    :func:`cast_quantized` stored them (casting them twice would round twice); buffers keep their dtype (rotary
    frequencies are recomputed at load anyway).
    """
    cast: dict[int, nn.Parameter] = {}  # by the old parameter's id: tied weights (embedding and lm_head) stay tied
    for module in model.modules():
        names = ("bias",) if isinstance(module, CodeGEMMLinear) else [n for n, _ in module.named_parameters(recurse=False)]
        for name in names:
            param = getattr(module, name, None)
            if isinstance(param, nn.Parameter) and param.is_floating_point() and param.dtype != dtype:
                if id(param) not in cast:
                    cast[id(param)] = nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad)
                setattr(module, name, cast[id(param)])
    count = len(cast)
    config = getattr(model, "config", None)
    if config is not None:
        config.dtype = dtype
    return count


def _global_stage(model: nn.Module, blocks: nn.ModuleList, samples: torch.Tensor, teacher: torch.Tensor,
                  options: QuantOptions, state: ResumeState | None, report: QuantReport, progress: bool) -> None:
    """End-to-end fine-tuning after the last block, resumable epoch by epoch."""
    start = state.global_epochs if state is not None else 0
    if start:
        logger.info("resuming global fine-tuning after %d of %d epochs", start, options.global_epochs)

    def on_epoch(epoch: int, loss: float, tensors: dict[str, torch.Tensor]) -> None:
        report.global_finetune.append((epoch, loss))
        if state is not None:
            extra = {"layers": [dataclasses.asdict(r) for r in report.layers], "finetune": report.finetune,
                     "global_finetune": report.global_finetune}
            state.save_global(epoch, tensors, extra)

    global_finetune(model, blocks, samples, teacher, options.global_epochs, options.global_lr, options.global_batch,
                    options.seed, start_epoch=start, resume_tensors=state.load_global() if state else None,
                    on_epoch=on_epoch, progress=progress)


def _bar(enabled: bool, **kwargs: Any):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(dynamic_ncols=True, **kwargs)
