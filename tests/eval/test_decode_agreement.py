import torch

import mmskip
from mmskip import registry, schedules
from mmskip.eval.decode_agreement import decode_agreement

from .._reference import recompute_logits
from ..conftest import tiny_lm


def test_decode_agreement_matches_a_skipped_recompute_of_the_reference(padded_batch):
    ids, mask = padded_batch
    model = tiny_lm("llama", layers=8)
    with torch.no_grad():
        base = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    reference = base[:, ids.shape[1]:]
    assert decode_agreement(model, ids, mask, reference) == 1.0

    with mmskip.applied(model, mmskip.LayerSkipConfig(schedule=schedules.unified(2.0))) as handle:
        rate = decode_agreement(model, ids, mask, reference)
        assert handle.stats()["skipped"] > 0
    # same thing computed without a cache: prompt through every layer, reference tokens skipping
    P = ids.shape[1]
    ref = recompute_logits(model, registry.get_adapter(model), base, mask, P, skip_layers=[1, 3, 5, 6])
    expected = (ref[:, P - 1 : -1].argmax(-1) == reference).float().mean()
    assert rate == float(expected) and rate < 1.0
