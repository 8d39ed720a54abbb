"""Timing of ``gqsa bench e2e``: a streamer that timestamps every generated token, and what its times give (time to
first token, prefill and decode speed, CPU time per decode step)."""

from __future__ import annotations

import time


class TokenClock:
    """A streamer (``put`` / ``end``) that timestamps every new token; the first ``put`` is the prompt."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.times: list[float] = []
        self.cpu_times: list[float] = []  # time.process_time() at the same moments
        self._prompt_seen = False

    def put(self, value) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        count = max(1, int(getattr(value, "numel", lambda: 1)()))
        self.times.extend([now] * count)
        self.cpu_times.extend([cpu] * count)

    def end(self) -> None:
        pass

    def result(self, prompt_len: int) -> dict:
        if not self.times:
            raise RuntimeError("no token was generated")
        ttft = self.times[0] - self.start
        decode = self.times[-1] - self.times[0]
        steps = len(self.times) - 1
        cpu = self.cpu_times[-1] - self.cpu_times[0]
        return {"new_tokens": len(self.times), "ttft_s": ttft, "prefill_tok_s": prompt_len / ttft,
                "decode_s": decode, "decode_tok_s": steps / decode if steps and decode > 0 else float("nan"),
                "decode_cpu_ms": 1e3 * cpu / steps if steps else float("nan")}
