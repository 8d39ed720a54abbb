"""A fused decode step for the Llama family: the model's forward rewritten with as few torch calls as it needs.

A transformers ``forward`` makes over a thousand small eager calls per token, which at batch 1 on the CPU cost
about as much as the packed layers. ``FusedDecoder`` computes the same function, gpt-fast style, from the
model's own tensors (``gqsa.models.llama_parts.llama_family_parts``): its own static KV cache (per block a
(1, n_kv_heads, max_len, head_dim) key and value tensor; ``scaled_dot_product_attention`` with ``enable_gqa``);
rotary tables computed once by the model's rotary module, then indexed (bit for bit the model's rotation);
residual add + RMSNorm in one native call (``gqsa.ops.norm.add_rms_norm``; elsewhere ``F.rms_norm``); every
layer through its cheapest exact call (bound kernels for packed layers, ``F.linear`` for ``nn.Linear``, the
module otherwise); q/k/v and gate/up as one shared-rows call each when they are small ``PackedLinear`` layers
(``gqsa.format.concat_rows``, a copy, see ``SHARED_ROWS_MAX_BYTES``; prompts above the native batch limit call
the parts one by one); the final norm and the LM head on the last position only.

On the native CPU kernel with one thread, at batch 1, a shared-rows output is bit for bit the separate layers'
when every part before the last keeps an even number of groups (otherwise equal to float32 rounding).

    decoder = FusedDecoder(model)               # raises UnsupportedArchitectureError for other models
    decoder.check_length(max_len)               # and for sequences longer than a sliding attention window
    cache = decoder.new_cache(max_len)
    logits = decoder.prefill(input_ids, cache)  # (1, vocab): the last prompt position
    logits = decoder.decode_one_token(token, position, cache)

``fused_decoder(model)`` caches one per model, rebuilt when its layers, tensors or backends change.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gqsa.models.adapter import UnsupportedArchitectureError
from gqsa.models.llama_parts import BlockParts, DecoderParts, RMSNormParts, llama_family_parts, rotary_tables
from gqsa.ops.cpu import native_batch_limit
from gqsa.ops.norm import add_rms_norm
from gqsa.ops.tensor_cache import tensor_version

logger = logging.getLogger(__name__)

Linear = Callable[[torch.Tensor], torch.Tensor]


class KVCache:
    """Keys and values of one sequence, per decoder block: ``keys[i]``, ``values[i]`` (1, n_kv_heads, max_len,
    head_dim), zeros until written. Positions ``0 .. filled - 1`` hold the tokens seen so far."""

    def __init__(self, num_blocks: int, num_kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        shape = (1, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_blocks)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_blocks)]
        self.max_len = max_len
        self.positions = torch.arange(max_len, device=device)  # (max_len,): the static step's attention mask


def _linear_fn(module: nn.Module) -> Linear:
    """The cheapest call of ``module`` that gives its forward's result for a plain inference input."""
    from gqsa.nn.packed_linear import PackedLinear

    if isinstance(module, PackedLinear) and module.fast_path:
        return module.bound()  # the kernel bound to the layer's buffers, bit for bit its forward
    if type(module) is nn.Linear:
        return functools.partial(F.linear, weight=module.weight, bias=module.bias)
    return module  # anything else (torch.ao, a trainable layer, fast_path off): its own forward


def _module_call(module: nn.Module) -> Linear:
    return module


# Shared-rows layers copy their parts' packed tensors. They save one call's fixed cost (Python, dispatch, thread
# start) per part, which matters only where the kernel itself is short. Parts holding more than this many packed
# bytes in all stay separate calls: for large layers the copies would grow the resident model much more than they
# save (docs/RESULTS.md, "Measurements behind code constants").
SHARED_ROWS_MAX_BYTES = 4 << 20


def _shared_rows(modules: list[nn.Module], max_bytes: int = SHARED_ROWS_MAX_BYTES) -> nn.Module | None:
    """One ``PackedLinear`` computing ``torch.cat([m(x) for m in modules], -1)``, or None when they cannot share
    rows (not all packed on the bound fast path, more than ``max_bytes`` packed bytes in all, or different
    in_features, group_size, bits, symmetry, backend, bias presence or bias dtype)."""
    from gqsa.format.packed import concat_rows
    from gqsa.nn.packed_linear import PackedLinear

    if not all(isinstance(m, PackedLinear) and m.fast_path for m in modules):
        return None
    if sum(m.packed_weight().nbytes() for m in modules) > max_bytes:
        return None
    first = modules[0]
    same = ("in_features", "group_size", "bits", "symmetric", "backend")
    if any(getattr(m, a) != getattr(first, a) for m in modules for a in same):
        return None
    biases = [m.bias for m in modules]
    if any((b is None) != (biases[0] is None) or (b is not None and b.dtype != biases[0].dtype) for b in biases):
        return None
    try:
        packed = concat_rows([m.packed_weight() for m in modules])
    except ValueError:  # e.g. parts on different devices
        return None
    bias = None if biases[0] is None else torch.cat(biases)  # (sum out_features,)
    return PackedLinear.from_packed(packed, bias=bias, backend=first.backend)


class _Block:
    """One decoder block as the step runs it: norms as (weight, eps), linear layers as callables (``None`` where
    the shared-rows layer replaces them, or where there is none)."""

    __slots__ = ("input_norm", "qkv", "qkv_parts", "q_norm", "k_norm", "scaling", "o_proj", "post_norm",
                 "gate_up", "gate", "up", "down", "intermediate")

    def __init__(self, parts: BlockParts, shared: tuple[nn.Module | None, nn.Module | None],
                 call: Callable[[nn.Module], Linear]) -> None:
        self.input_norm, self.post_norm = parts.input_norm, parts.post_attention_norm
        self.q_norm, self.k_norm, self.scaling = parts.q_norm, parts.k_norm, parts.scaling
        qkv, gate_up = shared
        self.qkv = None if qkv is None else call(qkv)
        self.qkv_parts = None if qkv is not None else tuple(call(m) for m in (parts.q_proj, parts.k_proj,
                                                                             parts.v_proj))
        self.o_proj = call(parts.o_proj)
        self.intermediate = None if gate_up is None else gate_up.out_features // 2  # gate rows, then up rows
        self.gate_up = None if gate_up is None else call(gate_up)
        self.gate, self.up = (None, None) if gate_up is not None else (call(parts.gate_proj), call(parts.up_proj))
        self.down = call(parts.down_proj)


class FusedDecoder:
    """The forward pass of a Llama-family causal LM (llama, mistral, qwen2, qwen3) for batch 1, from its tensors.

    Built once per model (see :func:`fused_decoder`); holds no per-sequence state: the KV cache is an argument.
    Run it under ``torch.inference_mode()`` (``generate`` does). The eager step reads ``blocks`` (per block its
    linear layers as callables: ``qkv`` or ``qkv_parts``, ``o_proj``, ``gate_up`` or ``gate`` and ``up``, ``down``)
    and ``lm_head`` at every call.

    Args:
        model: a supported transformers causal LM in eval mode, dense or with ``PackedLinear`` layers.

    Raises:
        UnsupportedArchitectureError: anything the step does not compute exactly as the model does (see
            ``gqsa.models.llama_parts.llama_family_parts``).
    """

    def __init__(self, model: nn.Module) -> None:
        parts: DecoderParts = llama_family_parts(model)
        self.parts = parts
        self.num_heads, self.num_kv_heads, self.head_dim = parts.num_heads, parts.num_kv_heads, parts.head_dim
        embedding = parts.embedding
        self.hidden_size = embedding.embedding_dim
        if isinstance(embedding, nn.Embedding):
            self.dtype, self.device = embedding.weight.dtype, embedding.weight.device
            self.embed = functools.partial(F.embedding, weight=embedding.weight)
        else:  # a PackedEmbedding: its lookup dequantizes the rows it reads
            self.dtype, self.device = embedding.dtype, embedding.values.device
            self.embed = embedding
        self.sliding_window = parts.sliding_window
        self.grouped = bool(self.num_heads != self.num_kv_heads)  # grouped-query attention
        # the shared-rows layers (q/k/v, gate/up) own new buffers: kept here as long as their bound kernels
        self.shared = [(_shared_rows([b.q_proj, b.k_proj, b.v_proj]), _shared_rows([b.gate_proj, b.up_proj]))
                       for b in parts.blocks]
        self.fused_linears = sum((q is not None) + (g is not None) for q, g in self.shared)
        self.blocks = [_Block(b, shared, _linear_fn) for b, shared in zip(parts.blocks, self.shared)]
        # Long prompts: the packed layers one by one. Above the native kernel's batch limit a packed call
        # dequantizes its whole weight and multiplies densely; through the shared-rows layers that is twice the
        # dequantized weight per call, which was slower (docs/RESULTS.md, "Measurements behind code constants").
        self.prompt_blocks = self.blocks if self.fused_linears == 0 else \
            [_Block(b, (None, None), _linear_fn) for b in parts.blocks]
        self.shared_rows_max_tokens = min((native_batch_limit(m.out_features, m.in_features)
                                           for pair in self.shared for m in pair if m is not None), default=0)
        self.final_norm = parts.final_norm
        self.lm_head = _linear_fn(parts.lm_head)
        self._cos = self._sin = torch.empty(0, 1, self.head_dim, dtype=self.dtype, device=self.device)
        self._compiled = None
        # CUDA graphs of the decode step by cache length (gqsa.engine.generate.graph_step_for): they go with the
        # decoder, and the decoder with its model
        self.graph_steps: dict[int, object] = {}

    # ---- cache and rotary tables ---------------------------------------------------------------------------
    def check_length(self, tokens: int) -> None:
        """Raises UnsupportedArchitectureError when a sequence of ``tokens`` tokens would outgrow a block's
        sliding attention window (the step attends to the whole prefix); call it before generating."""
        if self.sliding_window is not None and tokens > self.sliding_window:
            raise UnsupportedArchitectureError(
                f"the fused decode step attends to the whole sequence, but this model's sliding-window attention "
                f"sees only the last {self.sliding_window} tokens and the sequence may reach {tokens}"
            )

    def new_cache(self, max_len: int) -> KVCache:
        """An empty KV cache for up to ``max_len`` tokens (and the rotary tables that long); see
        :meth:`check_length` for models with sliding-window attention."""
        if self._cos.shape[0] < max_len:
            cos, sin = rotary_tables(self.parts.rotary, max_len, self.dtype, self.device)  # (L, head_dim) each
            half = self.head_dim // 2
            # rotate_half(x) * sin == roll(x, half) * sin' with sin' = cat(-sin[:, :half], sin[:, half:])
            signed = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
            self._cos, self._sin = cos.unsqueeze(1), signed.unsqueeze(1)  # (L, 1, head_dim): broadcast over heads
        return KVCache(len(self.blocks), self.num_kv_heads, max_len, self.head_dim, self.dtype, self.device)

    # ---- the step ------------------------------------------------------------------------------------------
    @staticmethod
    def _norm(x: torch.Tensor, norm: RMSNormParts, delta: torch.Tensor | None = None) -> torch.Tensor:
        """``x += delta`` (in place, when given), then the norm of x (``gqsa.ops.norm.add_rms_norm``: one native
        call for float32 on the CPU; in half precision transformers' order: normalise in float32, cast back,
        then scale)."""
        return add_rms_norm(x, norm.weight, norm.eps, delta)

    def forward(self, input_ids: torch.Tensor, start: int, cache: KVCache) -> torch.Tensor:
        """Run ``input_ids`` at positions ``start ..`` through the model, writing their keys and values to ``cache``.

        Args:
            input_ids: (1, T) int64, T >= 1.
            start: position of the first token; positions ``0 .. start - 1`` of ``cache`` must be filled.
            cache: from :meth:`new_cache`, with room for ``start + T`` tokens.

        Returns:
            (1, vocab) logits of the last position.
        """
        blocks = self.blocks if input_ids.shape[1] <= self.shared_rows_max_tokens else self.prompt_blocks
        return self._run(blocks, self.lm_head, input_ids, start, cache)

    def _run(self, blocks: list[_Block], lm_head: Linear, input_ids: torch.Tensor, start: int,
             cache: KVCache) -> torch.Tensor:
        """``forward`` with these blocks and LM head (bound kernels when eager, modules when compiled)."""
        return self._run_embedded(blocks, lm_head, self.embed(input_ids), start, cache)

    def _run_embedded(self, blocks: list[_Block], lm_head: Linear, x: torch.Tensor, start: int | torch.Tensor,
                      cache: KVCache) -> torch.Tensor:
        """``_run`` from the token embeddings x (1, T, D), a new tensor that is updated in place.

        ``start`` an int: positions ``start .. start + T - 1``, attention over the filled prefix. ``start`` a (1,)
        int64 tensor on the device (one token, T = 1): the static form a CUDA graph can replay for any position:
        the rotary rows and the cache slot chosen by index, attention over the whole cache with the positions
        after ``start`` masked out (their weights are exactly 0).
        """
        t = x.shape[1]
        h, kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        half = d // 2
        static = isinstance(start, torch.Tensor)
        mask = None
        if static:
            end = cache.max_len
            cos, sin = self._cos.index_select(0, start), self._sin.index_select(0, start)  # (1, 1, d)
            mask = (cache.positions <= start).view(1, 1, 1, end)
            causal = False
        else:
            end = start + t
            cos, sin = self._cos[start:end], self._sin[start:end]  # (T, 1, d)
            # a prompt from position 0 is causal as SDPA means it; a later chunk needs an explicit mask
            causal = t > 1 and start == 0
            if t > 1 and start > 0:
                mask = torch.ones(t, end, dtype=torch.bool, device=x.device).tril(start)  # (T, end)
        delta = None  # the last block's MLP output, added to x by the next norm
        for block, keys, values in zip(blocks, cache.keys, cache.values):
            n = self._norm(x, block.input_norm, delta)
            if block.qkv is not None:
                qkv = block.qkv(n)  # (1, T, (h + 2 kv) d)
            else:
                qkv = torch.cat([f(n) for f in block.qkv_parts], dim=-1)
            qkv = qkv.view(1, t, h + 2 * kv, d)
            qk = qkv[:, :, : h + kv]  # (1, T, h + kv, d)
            if block.q_norm is not None:
                qk = torch.cat([self._norm(qk[:, :, :h], block.q_norm), self._norm(qk[:, :, h:], block.k_norm)],
                               dim=2)
            qk = qk * cos + qk.roll(half, -1) * sin  # rotary, q and k at once
            if static:
                keys.index_copy_(2, start, qk[:, :, h:].transpose(1, 2))  # (1, kv, 1, d) into slot start
                values.index_copy_(2, start, qkv[:, :, h + kv:].transpose(1, 2))
            else:
                keys[:, :, start:end] = qk[:, :, h:].transpose(1, 2)  # (1, kv, T, d)
                values[:, :, start:end] = qkv[:, :, h + kv:].transpose(1, 2)
            attn = F.scaled_dot_product_attention(
                qk[:, :, :h].transpose(1, 2), keys[:, :, :end], values[:, :, :end], attn_mask=mask,
                is_causal=causal, scale=block.scaling, enable_gqa=self.grouped)  # (1, h, T, d)
            n = self._norm(x, block.post_norm, block.o_proj(attn.transpose(1, 2).reshape(1, t, h * d)))
            if block.gate_up is not None:
                gate_up = block.gate_up(n)  # (1, T, 2 I)
                act = F.silu(gate_up[..., : block.intermediate])
                act.mul_(gate_up[..., block.intermediate:])
            else:
                act = F.silu(block.gate(n))
                act.mul_(block.up(n))
            delta = block.down(act)  # (1, T, D)
        last = self._norm(x[:, -1:], self.final_norm, None if delta is None else delta[:, -1:])  # (1, 1, D)
        return lm_head(last)[:, -1]  # (1, V)

    def prefill(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The prompt (1, T) from position 0 into ``cache``; (1, vocab) logits of its last position."""
        return self.forward(input_ids, 0, cache)

    def decode_one_token(self, token: torch.Tensor, position: int, cache: KVCache) -> torch.Tensor:
        """One token (1, 1) at ``position``; (1, vocab) logits for the next one."""
        return self.forward(token, position, cache)

    def static_decode_one_token(self, token: torch.Tensor, position: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """``decode_one_token`` with the position as a (1,) int64 tensor on the device and every shape fixed by
        the cache (what ``gqsa.engine.graph_step`` captures in a CUDA graph); (1, vocab) logits."""
        return self._run_embedded(self.blocks, self.lm_head, self.embed(token), position, cache)

    def compiled_decode_one_token(self) -> Callable[[torch.Tensor, int, KVCache], torch.Tensor]:
        """``decode_one_token`` compiled by ``torch.compile`` (compiled on its first call; the position is a
        dynamic integer, so one graph serves every step). The linear layers are called as modules: packed ones
        emit ``gqsa::linear_direct`` (they were bound by the eager step's construction). Slower than the eager
        step on the CPU, the op calls costing more than the eager calls that inductor fuses (docs/RESULTS.md,
        "End to end: generation on the CPU")."""
        if self._compiled is None:
            blocks = [_Block(b, shared, _module_call) for b, shared in zip(self.parts.blocks, self.shared)]
            lm_head = self.parts.lm_head

            def core(x: torch.Tensor, position: int, cache: KVCache) -> torch.Tensor:
                return self._run_embedded(blocks, lm_head, x, position, cache)

            compiled = torch.compile(core, dynamic=True, fullgraph=True)

            def step(token: torch.Tensor, position: int, cache: KVCache) -> torch.Tensor:
                # the lookup stays eager: a packed embedding reads its rows through the native extension
                return compiled(self.embed(token), position, cache)

            self._compiled = step
        return self._compiled


# one decoder per model, rebuilt when what it was built from changes
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fingerprint(model: nn.Module) -> tuple:
    """What a FusedDecoder depends on: the modules, their tensors (storage, in-place version) and backends."""
    from gqsa.nn.packed_linear import PackedLinear

    key: list = [model.training]
    for module in model.modules():
        key.append(id(module))
        if isinstance(module, PackedLinear):
            key += [module.backend, module.fast_path]
        for t in (*module._parameters.values(), *module._buffers.values()):
            if t is not None:
                key += [t.data_ptr(), tensor_version(t)]
    return tuple(key)


def fused_decoder(model: nn.Module) -> FusedDecoder:
    """The FusedDecoder of ``model``, built on first use and again when the model's modules, their tensors
    (replaced or changed in place) or their backends have changed since.

    Raises:
        UnsupportedArchitectureError: see :class:`FusedDecoder`.
    """
    key = _fingerprint(model)
    cached = _DECODERS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    decoder = FusedDecoder(model)
    _DECODERS[model] = (key, decoder)
    logger.info("fused decode step: %d blocks, %d of %d q/k/v and gate/up groups in one packed call each",
                len(decoder.blocks), decoder.fused_linears, 2 * len(decoder.blocks))
    return decoder
