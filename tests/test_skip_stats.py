"""SkipStats counts work recorded inside torch.compile graphs and as device tensors exactly as
Python numbers recorded eagerly, and reads the device-side counts only when asked."""

import pytest
import torch

from mmskip._skip_stats import SkipStats


def test_records_inside_a_compiled_graph_are_counted_like_eager_ones():
    stats = SkipStats()
    stats.cost["layer"] = 10.0
    stats.fixed_cost = 5.0
    stats.record("layer", 4, 2)
    stats.record_fixed(2)

    @torch.compile(backend="eager", fullgraph=True)
    def step(x):
        stats.record("layer", x.shape[0], x.shape[0], like=x)
        stats.record_fixed(x.shape[0], like=x)
        return x + 1

    torch._dynamo.reset()
    step(torch.zeros(4))
    step(torch.zeros(4))
    d = stats.as_dict()
    assert d["items"]["layer"] == {"executed": 2.0, "skipped": 10.0}
    assert d["flops"] == {"spent": 20.0 + 50.0, "full": 120.0 + 50.0}  # fixed: 2 + 8 units of 5
    assert d["flops_fraction"] == pytest.approx(70.0 / 170.0)
    assert stats.as_dict() == d  # reading twice does not count twice


def test_tensor_counts_are_read_lazily_and_reset_clears_them():
    stats = SkipStats()
    stats.cost["ffn"] = 1.0
    mask = torch.tensor([True, False, True])
    stats.record("ffn", 0, mask.sum())
    stats.record("ffn", 3)
    assert stats.seen == {"ffn": 3} and not stats.skipped  # the tensor count is not read yet
    assert stats.as_dict()["items"]["ffn"] == {"executed": 1.0, "skipped": 2.0}
    stats.reset()
    stats.record("ffn", 2, torch.tensor(0))
    assert stats.as_dict()["items"] == {"ffn": {"executed": 2.0, "skipped": 0.0}}
    stats.reset()
    assert stats.as_dict()["items"] == {}  # a zeroed accumulator is no recorded item


def test_an_item_recorded_with_nothing_skipped_is_listed_as_in_eager():
    eager, dev = SkipStats(), SkipStats()
    eager.record("b", 3, 0)
    dev.record("b", torch.tensor(3), 0)
    assert dev.as_dict()["items"]["b"] == eager.as_dict()["items"]["b"]


def test_record_each_counts_like_a_record_per_item():
    names = ["layer.0", "layer.1", "layer.2"]
    one, each, dev = SkipStats(), SkipStats(), SkipStats()
    for s in (one, each, dev):
        s.cost.update(dict.fromkeys(names, 2.0))
    for n in names:
        one.record(n, 5)
    each.record_each(names, 5)
    dev.record_each(names, torch.tensor(5))
    assert each.as_dict() == one.as_dict() == dev.as_dict()
    assert each.as_dict()["items"]["layer.2"] == {"executed": 5.0, "skipped": 0.0}


def test_record_each_on_the_device_keeps_one_accumulator_per_stack():
    from mmskip._skip_stats import SkipStats

    stats = SkipStats()
    names = ["layer.0", "layer.1", "layer.2"]
    stats.cost.update({n: 1.0 for n in names})
    stats.declare(names, torch.device("cpu"))
    before = len(stats._pending)
    stats.record_each(names, torch.tensor(4))  # a count held on the device, as in a compiled graph
    stats.record_each(names, torch.tensor(2))
    stats.record("layer.1", 6, 3)
    assert len(stats._pending) == before and len(stats._groups) == 1  # no accumulator per item
    items = stats.as_dict()["items"]
    assert {n: items[n]["executed"] + items[n]["skipped"] for n in names} == {"layer.0": 6, "layer.1": 12, "layer.2": 6}
    assert items["layer.1"]["skipped"] == 3
    stats.record_each(names, torch.tensor(1))
    stats.reset()
    assert stats.as_dict()["items"] == {}
