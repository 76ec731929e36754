"""mmskip.train.checkpoint: tied weights, trainers without a scheduler, the note on an old checkpoint.pt."""

import torch

from mmskip.train.checkpoint import STATE_PATH, legacy_note, load_checkpoint, save_checkpoint, weights_under


def test_tied_weights_and_no_scheduler_round_trip(tmp_path):
    emb = torch.nn.Embedding(5, 3)
    head = torch.nn.Linear(3, 5, bias=False)
    head.weight = emb.weight  # tied, as in Florence-2 / BART
    opt = torch.optim.AdamW([emb.weight], lr=1e-2, betas=(0.9, 0.98))
    emb(torch.tensor([1, 2])).sum().backward()
    opt.step()
    weights = {"model.emb": emb.weight, "model.head": head.weight, "aux.x": torch.ones(2)}
    save_checkpoint(tmp_path, 3, weights, opt, None, {"losses": [0.5, 0.25]})
    assert (tmp_path / STATE_PATH).is_file()
    state, loaded, opt_state = load_checkpoint(tmp_path)
    assert state["step"] == 3 and state["losses"] == [0.5, 0.25] and state["scheduler"] is None
    model = weights_under(loaded, "model.")
    assert set(model) == {"emb", "head"} and torch.equal(model["emb"], emb.weight.detach())
    fresh = torch.optim.AdamW([torch.nn.Parameter(emb.weight.detach().clone())], lr=1e-2, betas=(0.9, 0.98))
    fresh.load_state_dict(opt_state)
    torch.testing.assert_close(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_legacy_note_names_an_old_checkpoint(tmp_path):
    assert legacy_note(tmp_path) == ""
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    assert "checkpoint.pt" in legacy_note(tmp_path) and load_checkpoint(tmp_path) is None
