"""A lean decode loop over any transformers causal LM, with a static KV cache.

Prefill runs the prompt through the model's ordinary forward (the large-batch
matmul path). Each decode step feeds one token per row from fixed buffers, so on
CUDA the step (``torch.compile``-d, plus argmax for greedy decoding) is captured
once as a CUDA graph and replayed: no Python, no kernel launches and no host
sync per token unless the caller streams text or stops on a token. On CPU the
same step runs eagerly (or compiled, on request).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import time
import types
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import nn

from codegemm.errors import ConfigError, DTypeError, RangeError, ShapeError, UnsupportedError
from codegemm.generation.attention import decode_attention_enabled, supports_decode_attention
from codegemm.generation.cache import (
    forward_parameters,
    make_static_cache,
    replay_safe,
    share_write_position,
    text_config,
)
from codegemm.generation.sampling import SamplingParams, greedy_tokens, select_next
from codegemm.siblings import fuse_siblings
from codegemm.tiling import tile_for_gpu

_LOG = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_SIZE = 64
"""Rows one generator serves at once; larger batches are refused before anything is allocated."""

CACHE_LEN_MULTIPLE = 256
"""Cache lengths are rounded up to this, so nearby requests reuse one cache and one captured graph."""

COMPILE_OPTIONS_CUDA = {"combo_kernels": True}
"""Inductor options of the compiled step on CUDA. Combo kernels fuse independent small kernels horizontally (q
and k rotary with the cache write): Llama-3-8B at batch 1 went from 2.33 to 2.20 ms per step (H100, 2026-11-21).
``triton.multi_kernel`` (persistent RMSNorm reductions, another -0.03 ms there) is left off: with torch 2.11 /
Triton 3.6 it fails to compile some steps (fp32 models: "'NoneType' object does not support the context manager
protocol" in Triton's ``cache_key``)."""

COMPILE_WARMUP_CALLS = 2
"""Calls of the compiled step before capture: the first compiles, the second checks nothing recompiles."""


class Streamer(Protocol):
    """transformers' streamer interface (``TextStreamer`` fits): the prompt first, then each new token."""

    def put(self, value: torch.Tensor) -> None: ...

    def end(self) -> None: ...


@dataclasses.dataclass
class GenerationOutput:
    """What one :meth:`FastGenerator.generate` call produced, with its timings.

    ``sequences``: int64 ``[B, P + n]``, the prompt followed by ``n`` new tokens;
    after a row's first stop token the rest of the row holds ``pad_token_id``.
    ``step_s``: seconds of each decode step after the first token (empty unless
    timings were requested). ``setup_s``: compile and capture time spent in
    this call (0 when an earlier call already paid it).
    """

    sequences: torch.Tensor
    prompt_len: int
    prefill_s: float
    time_to_first_token_s: float
    step_s: list[float]
    setup_s: float
    logits: torch.Tensor | None = None  # float32 [B, n, V] when keep_logits=True

    @property
    def new_tokens(self) -> torch.Tensor:
        """int64 ``[B, n]``: the generated tokens only."""
        return self.sequences[:, self.prompt_len :]


def _decode_forward(model: nn.Module, kwargs: dict) -> torch.Tensor:
    """One decode step of the model: last-position logits ``[B, V]``."""
    return model(**kwargs).logits[:, -1, :]


_STEP_COPIES = itertools.count()


def _private_step_function() -> Callable[[nn.Module, dict], torch.Tensor]:
    """A copy of :func:`_decode_forward` with its own code object.

    torch.compile caches compiled code, and caps recompilations, per code
    object; a private copy per generator keeps one generator's models and batch
    sizes from using up another's budget (which would silently fall back to eager).
    """
    code = _decode_forward.__code__.replace(co_name=f"_decode_forward_{next(_STEP_COPIES)}")
    return types.FunctionType(code, _decode_forward.__globals__, code.co_name)


@dataclasses.dataclass
class _DecodeState:
    """Everything tied to one (batch size, cache length): cache, fixed buffers, captured graphs."""

    batch_size: int
    cache_len: int
    cache: object
    ids: torch.Tensor  # int64 [B, 1]: the token the next step consumes
    pos: torch.Tensor  # int64 [B, 1]: its position
    cache_pos: torch.Tensor  # int64 [1]: its cache slot (passed only to models that take cache_position)
    tokens: torch.Tensor  # int64 [B, cache_len]: generated tokens, written on the device
    count: torch.Tensor  # int64 [1]: how many of them are written
    graphs: dict = dataclasses.field(default_factory=dict)  # greedy flag -> (CUDAGraph, logits)
    replay_ok: bool = True
    initialized: bool = False


class FastGenerator:
    """Generates from a causal LM through a static KV cache and a replayed decode step.

    One generator serves one model; the cache and captured graphs are built on the
    first request of a given batch size and cache length and reused after that.
    ``compile``/``cuda_graph`` default to on for CUDA models and off on CPU.
    ``decode_attention`` (default: on wherever it applies) makes the captured
    step attend only over the filled cache slots (:mod:`codegemm.generation.attention`).
    ``group_siblings`` (default on) groups the model's quantized q/k/v and gate/up projections so that
    each set runs as one kernel launch where a grouped kernel fits (:mod:`codegemm.siblings`; this marks
    the model's layers, :func:`codegemm.siblings.unfuse_siblings` undoes it). ``tile_layers`` (default on)
    switches the quantized layers on a GPU to the tiled layout its CUDA kernels read fastest
    (:mod:`codegemm.tiling`; :func:`codegemm.tiling.untile` undoes it; checkpoints stay row-major).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_cache_len: int | None = None,
        compile: bool | None = None,
        cuda_graph: bool | None = None,
        decode_attention: bool | None = None,
        group_siblings: bool = True,
        tile_layers: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module) or not hasattr(model, "config"):
            raise ConfigError(f"model must be a transformers causal LM (nn.Module with .config); got {type(model)}")
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be a positive int; got {max_batch_size!r}")
        first = next(model.parameters(), None)
        if first is None:
            raise ConfigError("model has no parameters; cannot infer its device")
        self.model = model.eval()
        if group_siblings:
            fuse_siblings(model)
        if tile_layers:
            tile_for_gpu(model)
        self.device = first.device
        self.dtype = getattr(model, "dtype", first.dtype)
        self.max_batch_size = max_batch_size
        self.max_positions = getattr(text_config(model), "max_position_embeddings", None)
        if max_cache_len is not None:
            self._check_int("max_cache_len", max_cache_len)
            if self.max_positions and max_cache_len > self.max_positions:
                raise ConfigError(
                    f"max_cache_len must be at most the model's max_position_embeddings={self.max_positions}; "
                    f"got {max_cache_len}"
                )
        self.max_cache_len = max_cache_len
        on_cuda = self.device.type == "cuda"
        self.cuda_graph = on_cuda if cuda_graph is None else bool(cuda_graph)
        if self.cuda_graph and not on_cuda:
            raise ConfigError(f"cuda_graph=True needs a model on a CUDA device; the model is on {self.device}")
        self.compile = on_cuda if compile is None else bool(compile)
        reason = supports_decode_attention(model)
        if not reason and not self.cuda_graph and decode_attention is None:
            reason = "it is used by default on the CUDA-graph path only"
        if decode_attention and reason:
            raise UnsupportedError(f"decode_attention=True is not possible here: {reason}")
        self.decode_attention = not reason if decode_attention is None else bool(decode_attention)
        if reason and decode_attention is None and self.cuda_graph:
            _LOG.info("decode steps use the model's own attention: %s", reason)
        params = forward_parameters(model)
        self._takes_cache_position = "cache_position" in params
        self._takes_position_ids = "position_ids" in params
        self._keep_arg = next((n for n in ("logits_to_keep", "num_logits_to_keep") if n in params), None)
        options = COMPILE_OPTIONS_CUDA if on_cuda else None
        self._step = (
            torch.compile(_private_step_function(), dynamic=False, options=options) if self.compile else _decode_forward
        )
        self._state: _DecodeState | None = None
        self._last_len = 0  # tokens in the cache after the last generate()

    # ------------------------------------------------------------------ checks

    @staticmethod
    def _check_int(name: str, value: object, minimum: int = 1) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{name} must be an int >= {minimum}; got {value!r}")

    def cache_len_for(self, prompt_len: int, max_new_tokens: int) -> int:
        """The cache length a request of this size gets (without allocating anything)."""
        if self.max_cache_len is not None:
            return self.max_cache_len
        need = prompt_len + max_new_tokens
        length = -(-need // CACHE_LEN_MULTIPLE) * CACHE_LEN_MULTIPLE
        return min(length, self.max_positions) if self.max_positions else length

    def check_request(self, input_ids: torch.Tensor, max_new_tokens: int) -> tuple[int, int, int]:
        """Validate a request before any allocation; returns ``(batch, prompt_len, cache_len)``."""
        if not isinstance(input_ids, torch.Tensor):
            raise DTypeError(f"input_ids must be a torch.Tensor; got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise DTypeError(f"input_ids must be int64 or int32 token ids; got {input_ids.dtype}")
        if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ShapeError(f"input_ids must have shape (batch, prompt_len) with both >= 1; got {tuple(input_ids.shape)}")
        self._check_int("max_new_tokens", max_new_tokens)
        batch, prompt_len = input_ids.shape
        if batch > self.max_batch_size:
            raise ConfigError(f"batch size must be at most max_batch_size={self.max_batch_size}; got {batch}")
        vocab = getattr(text_config(self.model), "vocab_size", None)
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or (vocab is not None and hi >= vocab):
            raise RangeError(f"input_ids must lie in [0, vocab_size={vocab}); got values in [{lo}, {hi}]")
        total = prompt_len + max_new_tokens
        if self.max_positions and total > self.max_positions:
            raise ConfigError(
                f"prompt_len + max_new_tokens must be at most max_position_embeddings={self.max_positions}; "
                f"got {prompt_len} + {max_new_tokens} = {total}"
            )
        cache_len = self.cache_len_for(prompt_len, max_new_tokens)
        if total > cache_len:
            raise ConfigError(
                f"prompt_len + max_new_tokens must fit the KV cache of {cache_len} tokens; "
                f"got {prompt_len} + {max_new_tokens} = {total}"
            )
        return batch, prompt_len, cache_len

    # ------------------------------------------------------------------ state

    def release(self) -> None:
        """Free the cache and captured graphs (the next request rebuilds them)."""
        self._state = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _ensure_state(self, batch: int, cache_len: int) -> _DecodeState:
        st = self._state
        if st is not None and st.batch_size == batch and st.cache_len == cache_len:
            return st
        self.release()
        dev = self.device
        st = _DecodeState(
            batch_size=batch,
            cache_len=cache_len,
            cache=make_static_cache(self.model, batch, cache_len, dev, self.dtype, self.decode_attention),
            ids=torch.zeros(batch, 1, dtype=torch.long, device=dev),
            pos=torch.zeros(batch, 1, dtype=torch.long, device=dev),
            cache_pos=torch.zeros(1, dtype=torch.long, device=dev),
            tokens=torch.zeros(batch, cache_len, dtype=torch.long, device=dev),
            count=torch.zeros(1, dtype=torch.long, device=dev),
        )
        share_write_position(st.cache)
        self._state = st
        return st

    def _step_kwargs(self, st: _DecodeState) -> dict:
        kwargs = {"input_ids": st.ids, "past_key_values": st.cache, "use_cache": True}
        if self._takes_position_ids:
            kwargs["position_ids"] = st.pos
        if self._takes_cache_position:
            kwargs["cache_position"] = st.cache_pos
        return kwargs

    @staticmethod
    def _advance(st: _DecodeState, next_tokens: torch.Tensor) -> None:
        """Record ``next_tokens [B]`` and make them the next step's input; device ops only."""
        st.ids.copy_(next_tokens.view(-1, 1))
        st.pos.add_(1)
        st.cache_pos.add_(1)
        st.tokens.index_copy_(1, st.count, next_tokens.view(-1, 1))
        st.count.add_(1)

    def _attention(self) -> contextlib.AbstractContextManager:
        return decode_attention_enabled(self.model) if self.decode_attention else contextlib.nullcontext()

    def _graph_body(self, st: _DecodeState, greedy: bool) -> torch.Tensor:
        # A step that cannot be replayed would recompile on every call: run it eagerly.
        step = self._step if st.replay_ok else _decode_forward
        with self._attention():
            logits = step(self.model, self._step_kwargs(st))
        if greedy:
            self._advance(st, greedy_tokens(logits))
        return logits

    def _capture(self, st: _DecodeState, greedy: bool) -> None:
        """Compile (by warm-up calls) and capture the decode step; leaves the cache empty."""
        with torch.no_grad():
            if not st.initialized:
                # An eager call lets lazily-sized caches allocate outside compiled code.
                _decode_forward(self.model, self._step_kwargs(st))
                st.initialized = True
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(COMPILE_WARMUP_CALLS):
                    st.cache.reset()
                    st.count.zero_()
                    self._graph_body(st, greedy)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            st.cache.reset()
            st.count.zero_()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self._graph_body(st, greedy)
        st.graphs[greedy] = (graph, logits)

    def prepare(self, batch: int, cache_len: int, greedy: bool = True) -> float:
        """Build the cache and compile/capture the step ahead of time; returns seconds spent."""
        st = self._ensure_state(batch, cache_len)
        if not self.cuda_graph or greedy in st.graphs or not st.replay_ok:
            return 0.0
        start = time.perf_counter()
        self._capture(st, greedy)
        torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def replay_greedy_steps(self, steps: int) -> None:
        """Run ``steps`` more greedy decode steps after the last :meth:`generate`, with no host sync.

        For profiling and benchmarks: the tokens are not returned. Needs the
        greedy step captured (CUDA graphs on) and room left in the cache.
        """
        st = self._state
        if st is None or True not in st.graphs or not st.replay_ok:
            raise ConfigError("replay_greedy_steps needs a previous greedy generate() on the CUDA-graph path")
        self._check_int("steps", steps)
        if self._last_len + steps > st.cache_len:
            raise ConfigError(
                f"steps must fit the KV cache of {st.cache_len} tokens after {self._last_len}; got {steps}"
            )
        graph = st.graphs[True][0]
        for _ in range(steps):
            graph.replay()
        self._last_len += steps

    # ------------------------------------------------------------------ generation

    def _prefill(self, st: _DecodeState, input_ids: torch.Tensor) -> torch.Tensor:
        batch, prompt_len = input_ids.shape
        positions = torch.arange(prompt_len, device=self.device)
        kwargs = {"input_ids": input_ids, "past_key_values": st.cache, "use_cache": True}
        if self._takes_position_ids:
            kwargs["position_ids"] = positions.unsqueeze(0).expand(batch, prompt_len)
        if self._takes_cache_position:
            kwargs["cache_position"] = positions
        if self._keep_arg:
            kwargs[self._keep_arg] = 1
        return self.model(**kwargs).logits[:, -1, :]

    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        sampling: SamplingParams | None = None,
        *,
        stop_token_ids: Sequence[int] | None = None,
        pad_token_id: int | None = None,
        streamer: Streamer | None = None,
        timings: bool = False,
        keep_logits: bool = False,
    ) -> GenerationOutput:
        """Continue each row of ``input_ids`` (int64 ``[B, P]``, no padding) by ``max_new_tokens`` tokens.

        Stops early once every row has produced one of ``stop_token_ids``.
        ``streamer`` (batch 1 only) receives the prompt, then each token as it
        is made. ``timings=True`` times every decode step (CUDA events on GPU).
        ``keep_logits=True`` also returns every step's logits (a copy per step:
        for tests, not for speed).
        """
        sampling = sampling or SamplingParams()
        if not isinstance(sampling, SamplingParams):
            raise ConfigError(f"sampling must be a SamplingParams; got {type(sampling).__name__}")
        batch, prompt_len, cache_len = self.check_request(input_ids, max_new_tokens)
        if streamer is not None and batch != 1:
            raise ConfigError(f"streaming needs batch size 1; got {batch}")
        stops = [int(t) for t in (stop_token_ids or [])]
        pad = pad_token_id if pad_token_id is not None else (stops[0] if stops else 0)

        st = self._ensure_state(batch, cache_len)
        st.replay_ok = replay_safe(st.cache, prompt_len + max_new_tokens)
        greedy = sampling.greedy
        setup_s = self.prepare(batch, cache_len, greedy) if st.replay_ok else 0.0
        graph = st.graphs.get(greedy) if (self.cuda_graph and st.replay_ok) else None
        generator = sampling.make_generator(self.device)
        input_ids = input_ids.to(self.device, torch.long)
        on_cuda = self.device.type == "cuda"
        stop_tensor = torch.tensor(stops, device=self.device) if stops else None
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)

        with torch.no_grad():
            st.cache.reset()
            if streamer is not None:
                streamer.put(input_ids.cpu())
            clock = _Clock(self.device, timings)
            clock.mark()
            logits = self._prefill(st, input_ids)
            kept = [logits.float()] if keep_logits else []
            st.pos.fill_(prompt_len - 1)
            st.cache_pos.fill_(prompt_len - 1)
            st.count.zero_()
            self._advance(st, select_next(logits, sampling, generator))
            clock.mark(sync=True)
            steps = 1
            while steps < max_new_tokens:
                if stop_tensor is not None or streamer is not None:
                    last = st.ids[:, 0]
                    if streamer is not None:
                        streamer.put(last.cpu())
                    if stop_tensor is not None:
                        finished |= torch.isin(last, stop_tensor)
                        if bool(finished.all()):
                            break
                if graph is not None:
                    graph[0].replay()
                    step_logits = graph[1]
                else:
                    step_logits = self._graph_body(st, greedy)
                if not greedy:
                    self._advance(st, select_next(step_logits, sampling, generator))
                if keep_logits:
                    kept.append(step_logits.float().clone())
                clock.mark()
                steps += 1
            if streamer is not None:
                if stop_tensor is None or not bool(finished.all()):
                    streamer.put(st.ids[:, 0].cpu())
                streamer.end()
            new = st.tokens[:, :steps].clone()
            if on_cuda:
                torch.cuda.synchronize(self.device)
        self._last_len = prompt_len + steps
        if stops:
            new = _pad_after_stop(new, torch.tensor(stops, device=new.device), pad)
        marks = clock.elapsed()
        return GenerationOutput(
            sequences=torch.cat([input_ids, new], dim=1),
            prompt_len=prompt_len,
            prefill_s=marks[0] if marks else 0.0,
            time_to_first_token_s=marks[0] if marks else 0.0,
            step_s=marks[1:],
            setup_s=setup_s,
            logits=torch.stack(kept, dim=1) if keep_logits else None,
        )


def _pad_after_stop(tokens: torch.Tensor, stops: torch.Tensor, pad: int) -> torch.Tensor:
    """Replace everything after each row's first stop token by ``pad`` (the stop token itself stays)."""
    is_stop = torch.isin(tokens, stops).long()
    after = (is_stop.cumsum(dim=1) - is_stop) > 0
    return tokens.masked_fill(after, pad)


class _Clock:
    """Marks between phases: CUDA events on GPU (no sync per step), wall clock on CPU."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.enabled = enabled
        self.cuda = device.type == "cuda"
        self.device = device
        self.marks: list = []

    def mark(self, sync: bool = False) -> None:
        if not self.enabled:
            return
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
            if sync:
                event.synchronize()
        else:
            self.marks.append(time.perf_counter())

    def elapsed(self) -> list[float]:
        """Seconds between consecutive marks."""
        if len(self.marks) < 2:
            return []
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]
