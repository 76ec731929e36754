"""Packed question batches for training ``digits-video``: several questions about one video in one row.

A row is the video's prompt head (``<s> USER :`` + its clips' ``<video>`` tokens) followed by one block per
question (``QUESTION ASSISTANT : ANSWER </s>``). A 4-D attention mask lets each block see the head and
itself only, and each block's positions restart where the head ends, so every block is computed exactly
as the one-question prompt of :func:`mmskip.zoo.video_data.prompt_ids` would be (the head is shared, not
repeated). The video tokens are most of a prompt, so a row of ``q`` questions costs far less than ``q``
rows: the recipe trains on many more answers a second. Evaluation and the benchmarks keep one question a
prompt.
"""

from __future__ import annotations

import torch

from mmskip.zoo import video_data as D

__all__ = ["PER_VIDEO", "packed_questions", "packed_batch"]

PER_VIDEO = {"digit": 3, "count": 3, "first": 2, "any": 2}  # questions of each type about each training video


def packed_questions(videos: D.Videos, g: torch.Generator, per_video: dict[str, int] = PER_VIDEO
                     ) -> list[list[tuple[str, str]]]:
    """``per_video[t]`` random questions of each type ``t`` about each video (drawn like
    :func:`mmskip.zoo.video_data.sample_questions`) -> one list of ``(question, answer)`` per video."""
    out: list[list[tuple[str, str]]] = [[] for _ in range(len(videos))]
    for t, k in per_video.items():
        for _ in range(k):
            qs, ans, _ = D.sample_questions(videos, g, [t] * len(videos))
            for i, qa in enumerate(zip(qs, ans, strict=True)):
                out[i].append(qa)
    return out


def packed_batch(tokenizer, videos: D.Videos, questions: list[list[tuple[str, str]]]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded rows, one per video: ``(input_ids, mask, position_ids, labels)``. ``mask`` is the additive
    ``(n, 1, L, L)`` float mask (0 where a token may attend, the dtype's minimum elsewhere; a padding token
    sees only itself); ``labels`` are -100 except each block's answer token and ``</s>``."""
    vocab = tokenizer.get_vocab()
    rows, allows, positions, targets = [], [], [], []
    for qa, c in zip(questions, videos.n_clips.tolist(), strict=True):
        head = D.prefix_ids(tokenizer) + D.clip_ids(tokenizer) * int(c)
        blocks = [D.question_ids(tokenizer, q) + [vocab[a], tokenizer.eos_token_id] for q, a in qa]
        h, n = len(head), len(head) + sum(map(len, blocks))
        allow = torch.zeros(n, n, dtype=torch.bool)
        allow[:h, :h] = torch.ones(h, h, dtype=torch.bool).tril()
        pos, lab, s = list(range(h)), [-100] * h, h
        for b in blocks:
            k = len(b)
            allow[s:s + k, :h] = True
            allow[s:s + k, s:s + k] = torch.ones(k, k, dtype=torch.bool).tril()
            pos += range(h, h + k)
            lab += [-100] * (k - 2) + b[-2:]
            s += k
        rows.append(head + sum(blocks, []))
        allows.append(allow)
        positions.append(pos)
        targets.append(lab)
    width = max(map(len, rows))
    m = len(rows)
    ids = torch.full((m, width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((m, width), -100, dtype=torch.long)
    position_ids = torch.zeros(m, width, dtype=torch.long)
    allow = torch.eye(width, dtype=torch.bool).repeat(m, 1, 1)  # padding tokens see themselves
    for i, (r, a, p, t) in enumerate(zip(rows, allows, positions, targets, strict=True)):
        n = len(r)
        ids[i, :n], labels[i, :n], position_ids[i, :n] = torch.tensor(r), torch.tensor(t), torch.tensor(p)
        allow[i, :n, :n] = a
    mask = torch.zeros(m, 1, width, width).masked_fill(~allow[:, None], torch.finfo(torch.float32).min)
    return ids, mask, position_ids, labels
