"""SkipStats never reports work it could not count (inside torch.compile graphs) as unskipped."""

import torch

from mmskip._skip_stats import SkipStats


def test_records_inside_a_compiled_graph_make_the_stats_say_they_are_partial():
    stats = SkipStats()
    stats.cost["layer"] = 10.0
    stats.record("layer", 4, 2)
    assert stats.as_dict()["flops_fraction"] == 0.5 and "counted" not in stats.as_dict()

    @torch.compile(backend="eager", fullgraph=True)
    def step(x):
        stats.record("layer", 4, 4)
        return x + 1

    torch._dynamo.reset()
    step(torch.zeros(2))
    d = stats.as_dict()
    assert d["flops_fraction"] is None and d["flops"] is None and "torch.compile" in d["counted"]
    assert d["items"]["layer"] == {"executed": 2.0, "skipped": 2.0}  # the eager record is kept
    stats.reset()
    stats.record("layer", 2, 1)
    assert stats.as_dict()["flops_fraction"] == 0.5 and "counted" not in stats.as_dict()
