"""50 consecutive refits (in-process pairs, shared buckets, a weight-update group in turn) do
not grow the process: staging arenas are reused, shared segments and mappings released."""

from __future__ import annotations

from refit_workers import GROUP, SenderProcess, Step, tensors_for

from engine_core import Engine
from weight_sync import ColocatedBuckets, free_port, list_segments

SIZE = dict(hidden_size=256, intermediate_size=512)  # ~5.4 MB of fp32 weights
KINDS = ["pairs", "handles", "distributed"]
WARMUP, MEASURED = 6, 51  # multiples of len(KINDS)
BOUND_KB = 12 << 10  # one leaked copy per refit would be ~270 MB


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def test_no_memory_growth_over_50_refits(model_dir, tmp_path):
    paths = [model_dir("llama", **SIZE), model_dir("llama", seed=1, **SIZE)]
    weights = [tensors_for(Step(p, "x")) for p in paths]
    total = WARMUP + MEASURED
    steps = [Step(paths[i % 2], f"v{i}") for i in range(total) if KINDS[i % 3] == "distributed"]
    port = free_port()
    sender = SenderProcess(tmp_path, port, 2, steps, bucket_bytes=1 << 20)
    dist_k = 0
    try:
        with Engine(paths[0], device="cpu", max_total_tokens=256) as engine:
            engine.init_weights_update_group("127.0.0.1", port, 1, 2, GROUP)
            for i in range(total):
                if i == WARMUP:
                    base = rss_kb()
                named, version = weights[i % 2], f"v{i}"
                if KINDS[i % 3] == "pairs":
                    engine.update_weights_from_tensor(named, weight_version=version)
                elif KINDS[i % 3] == "handles":
                    with ColocatedBuckets(named, "rlr-mem", bucket_bytes=1 << 20) as buckets:
                        engine.update_weights_from_tensor(
                            buckets.handles, load_format="flattened_bucket", weight_version=version
                        )
                else:
                    engine.update_weights_from_distributed(sender.plan(dist_k), group_name=GROUP)
                    dist_k += 1
                assert engine.weight_version == version
                engine.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 4})
            growth = rss_kb() - base
    finally:
        result = sender.close()
    assert result["ok"], result
    assert growth < BOUND_KB, f"RSS grew by {growth} kB over {MEASURED} refits"
    assert list_segments("rlr-") == []


def test_memory_is_flat_from_the_first_distributed_refit(model_dir, tmp_path):
    """The arena's spare buffer is made (and touched) at the first refit, so the second does
    not grow the process by another copy of the model."""
    size = dict(hidden_size=512, intermediate_size=1536)
    paths = [model_dir("llama", **size), model_dir("llama", seed=1, **size)]
    model_kb = sum(t.nbytes for t in tensors_for(Step(paths[0], "x")).values()) >> 10
    steps = [Step(paths[i % 2], f"v{i}") for i in range(8)]
    port = free_port()
    sender = SenderProcess(tmp_path, port, 2, steps, bucket_bytes=4 << 20)
    try:
        with Engine(paths[0], device="cpu", max_total_tokens=256) as engine:
            engine.init_weights_update_group("127.0.0.1", port, 1, 2, GROUP)
            for k in range(len(steps)):
                engine.update_weights_from_distributed(sender.plan(k), group_name=GROUP)
                if k == 0:
                    base = rss_kb()
            growth = rss_kb() - base
    finally:
        result = sender.close()
    assert result["ok"], result
    assert model_kb > 16 << 10, model_kb  # big enough for a second copy to show
    assert growth < model_kb // 2, f"RSS grew by {growth} kB (model: {model_kb} kB)"
