"""How fast would trace prefetching be if predicting cost the host nothing? (a diagnosis probe)

Runs `scripts/bench_prefetch.py` (same flags) with two more prefetcher names for `--configs`:
  record  trace+lookahead, which also keeps the list it predicts at every layer step (it predicts at
          every step, so it runs a little slower than trace+lookahead);
  free    replays the lists `record` kept in its last run, step by step, with no host work: the same
          copies as trace+lookahead (the predictions depend only on the routing, which the bench
          replays identically), without the cost of observing and predicting.
`record` must run before `free` in each round. `free` against trace+lookahead bounds what moving the
prediction off the host (or making it free) can gain end to end.

  XLA_CLIENT_MEM_FRACTION=0.95 XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=40 PYTHONPATH=. python scripts/probe_free_prediction.py \\
      --traces .data/traces/deepseek_v2_lite_prefill.npz --lookahead-accuracy 0.783 --sequences 3 --budgets 0.25 \\
      --rounds 2 --configs activation:record,lru:none,activation:trace+lookahead,activation:free --out $OUT/free.json
"""

from __future__ import annotations

from moejax.runtime.policies import ExpertKey
from moejax.routing.prefetchers import Prefetcher, TracePrefetcher
from scripts import bench_prefetch

RECORDED: list[list[ExpertKey]] = []  # per layer step of the last `record` run: the keys it predicted
bench_prefetch_make_prefetcher = bench_prefetch.make_prefetcher  # the bench's own, before main() replaces it


class RecordingPrefetcher(Prefetcher):
    """trace+lookahead, predicting at every layer step and keeping the lists in RECORDED."""

    name = "record"
    uses_lookahead = True

    def __init__(self, inner: TracePrefetcher):
        self.inner = inner
        RECORDED.clear()

    def on_sequence_start(self, task=None):
        self.inner.on_sequence_start(task)

    def refit(self):
        self.inner.refit()

    def observe(self, layer, counts, lookahead=None):
        self.inner.observe(layer, counts, lookahead)
        RECORDED.append(self.inner.predict(layer))

    def predict(self, layer):
        return RECORDED[-1]


class FreePrefetcher(Prefetcher):
    """The recorded lists, one per layer step, at no host cost."""

    name = "free"
    uses_lookahead = True  # the executor computes the guess as it would for trace+lookahead

    def __init__(self):
        self.step = -1

    def observe(self, layer, counts, lookahead=None):
        self.step += 1

    def predict(self, layer):
        return RECORDED[self.step]


def make_prefetcher(name: str, **kwargs) -> Prefetcher:
    if name == "record":
        return RecordingPrefetcher(bench_prefetch_make_prefetcher("trace+lookahead", **kwargs))
    if name == "free":
        if not RECORDED:
            raise SystemExit("--configs: run activation:record before activation:free")
        return FreePrefetcher()
    return bench_prefetch_make_prefetcher(name, **kwargs)


if __name__ == "__main__":
    bench_prefetch.make_prefetcher = make_prefetcher
    bench_prefetch.main()
