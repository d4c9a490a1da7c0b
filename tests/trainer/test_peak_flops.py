"""The cached matmul peak: measured once, reused, and raised (never lowered) when re-measured."""

import json

import torch

from trainer.peak_flops import peak_flops_per_s

CPU = torch.device("cpu")


def test_peak_is_cached_and_a_remeasure_replaces_a_too_low_value(tmp_path):
    cache = tmp_path / "peak.json"
    first = peak_flops_per_s(torch.float32, CPU, cache)
    assert first > 1e8  # any real CPU multiplies faster than 0.1 GFLOP/s
    (key,) = json.loads(cache.read_text())
    cache.write_text(json.dumps({key: 1.0}))  # a peak "measured under load"
    assert peak_flops_per_s(torch.float32, CPU, cache) == 1.0  # cached values are reused as they are
    raised = peak_flops_per_s(torch.float32, CPU, cache, remeasure=True)
    assert raised > 1e8 and json.loads(cache.read_text())[key] == raised
    cache.write_text(json.dumps({key: 1e18}))  # a re-measure never lowers the peak
    assert peak_flops_per_s(torch.float32, CPU, cache, remeasure=True) == 1e18

