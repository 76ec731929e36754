"""HostReads counts the reads that stall the host, and the LM techniques read back per token, not per layer."""

import pytest
import torch

import mmskip
from mmskip import schedules
from mmskip.analysis import HostReads

from ..conftest import tiny_lm

IDS = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(0))


def test_counts_each_kind_of_host_read():
    x = torch.randn(4)
    with HostReads() as reads:
        x.sum().item()
        x.tolist()
        bool(x[0] > 0)
        float(x[1])
        x[x > 0]
        torch.nonzero(x)
        (x + 1).mul(2)  # device work only
    assert reads.by_op == {"item": 1, "tolist": 1, "__bool__": 1, "__float__": 1, "__getitem__[bool mask]": 1,
                           "nonzero": 1}
    assert reads.total == 6


def _reads(layers: int, config) -> int:
    model = tiny_lm("llama", layers=layers)
    with mmskip.applied(model, config), HostReads() as reads:
        model.generate(IDS, max_new_tokens=6, do_sample=False)
    return reads.total


@pytest.mark.parametrize("config", [
    mmskip.LayerSkipConfig(schedule=schedules.unified(1.5)),
    mmskip.LayerSkipConfig(schedule=schedules.explicit(skip=[1, 2]), phase="all"),
    mmskip.VoidLayerConfig(),
], ids=["layer-skip-decode", "layer-skip-all", "void-layers"])
def test_reads_do_not_grow_with_depth(config):
    """Twice the layers, the same host reads: decisions are made once per token (or per prompt)."""
    assert _reads(4, config) == _reads(8, config)


@pytest.mark.parametrize("config", [mmskip.FFNSkipConfig(schedule=schedules.adaptive(threshold=1.5)),
                                    mmskip.FFNSkipConfig(schedule=schedules.adaptive(threshold=0.9, max_skip=0.0))],
                         ids=["unreachable-threshold", "no-budget"])
def test_ffn_skipping_that_cannot_skip_adds_no_reads(config):
    """No bookkeeping when nothing can be skipped: the same host reads as the plain model."""
    model = tiny_lm("llama", layers=8)
    with HostReads() as plain:
        model.generate(IDS, max_new_tokens=6, do_sample=False)
    assert _reads(8, config) == plain.total
