"""DepthReport.plot draws on standalone figures: pyplot's global backend and state are left alone."""

from __future__ import annotations

import pytest

from mmskip.analysis.depth import DepthReport


def _report(L: int = 3) -> DepthReport:
    ramp = [0.1 * (i + 1) for i in range(L)]
    return DepthReport(
        model="synthetic", num_layers=L, tokens=10,
        contributions={"attn": ramp, "mlp": ramp, "layer": ramp, "attn_cosine": ramp, "mlp_cosine": ramp},
        skip_effect={"residual": [[0.1] * L for _ in range(L)], "output_agreement": ramp, "output_kl": ramp,
                     "attn_output_agreement": ramp, "mlp_output_agreement": ramp},
        voids={"prompt": ramp, "response": ramp, "alpha": 0.8},
        curve=[{"skipped": [0], "output_agreement": 0.9, "output_kl": 0.1}],
        min_agreement=0.9, suggested_skip=[0],
    )


def test_plot_leaves_the_global_backend_and_pyplot_alone(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    plt = pytest.importorskip("matplotlib.pyplot")
    before = matplotlib.get_backend()
    figs_before = plt.get_fignums()
    matplotlib.use("svg")  # a non-Agg backend: the old plot() switched it to Agg
    try:
        paths = _report().plot(tmp_path)
        assert matplotlib.get_backend() == "svg"
        assert plt.get_fignums() == figs_before  # no figure left open in pyplot
    finally:
        matplotlib.use(before)
    assert [p.name for p in paths] == ["contributions.png", "skip_effect.png", "voids.png", "skip_curve.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
