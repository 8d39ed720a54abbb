"""The fused decode step captured in a CUDA graph and replayed for every token (as gpt-fast does).

A decode step at batch 1 is hundreds of small kernel launches; on a GPU their launch cost, not the kernels,
sets the speed unless the whole step is one graph replay. ``GraphDecodeStep`` runs
``FusedDecoder.static_decode_one_token`` (every shape fixed by the KV cache, the position a device tensor) from
static input buffers:

* the first call runs the step eagerly (on a side stream, as capture requires: this also compiles the Triton
  kernels, checks the packed indices once and builds the kernels' layouts), then captures it into a CUDA graph;
* every later call copies the token and position into the static buffers and replays the graph.

Off CUDA (or with ``capture=False``) it runs the static step eagerly: the same numbers, which is how the CPU
tests check it. The graph belongs to one cache: a new cache needs a new ``GraphDecodeStep``.

    step = GraphDecodeStep(decoder, cache)
    logits = step(token, position)  # token (1, 1) int64, position int; (1, vocab) logits, valid until the next call
"""

from __future__ import annotations

import logging

import torch

from gqsa.engine.fused import FusedDecoder, KVCache

logger = logging.getLogger(__name__)


class GraphDecodeStep:
    """``decoder.decode_one_token`` for ``cache``, replayed from a CUDA graph on CUDA devices.

    Args:
        decoder: the model's FusedDecoder.
        cache: its KV cache (the graph reads and writes these tensors).
        capture: capture a CUDA graph (default: when the cache is on a CUDA device).
    """

    def __init__(self, decoder: FusedDecoder, cache: KVCache, capture: bool | None = None) -> None:
        device = cache.keys[0].device if cache.keys else decoder.device
        self.decoder, self.cache = decoder, cache
        self.capture = device.type == "cuda" if capture is None else capture
        if self.capture and device.type != "cuda":
            raise ValueError(f"a CUDA graph needs a CUDA device; the cache is on {device}")
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def _step(self) -> torch.Tensor:
        return self.decoder.static_decode_one_token(self.token, self.position, self.cache)

    def __call__(self, token: torch.Tensor, position: int) -> torch.Tensor:
        """Logits (1, vocab) after ``token`` (1, 1) at ``position`` (its key and value go to the cache)."""
        if not 0 <= position < self.cache.max_len:
            raise ValueError(f"position {position} is outside the cache of {self.cache.max_len} tokens")
        self.token.copy_(token.view(1, 1))
        self.position.fill_(position)
        if not self.capture:
            return self._step()
        if self.graph is None:
            return self._first_call()
        self.graph.replay()
        return self.logits

    def _first_call(self) -> torch.Tensor:
        """Run the step for real on a side stream (warm-up), then capture it; returns the real call's logits.
        The capture records the same step for the same inputs, so replaying it rewrites the same cache slot."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = self._step().clone()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._step()
        self.graph = graph
        logger.info("decode step captured in a CUDA graph (%d-token cache)", self.cache.max_len)
        return logits
