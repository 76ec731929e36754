"""SWIFT's layer-set optimisation: random search, then Bayesian optimisation of the matchness."""

from __future__ import annotations

import torch

__all__ = ["LayerSetSearch"]


class LayerSetSearch:
    """SWIFT's layer-set optimisation over a binary mask of ``n_skip`` skipped candidate sublayers.

    The first ``random_trials`` masks are uniform random; after that each trial fits a Gaussian
    process (kernel ``exp(-4 * hamming / D)``, small noise) to the observed matchness scores and
    evaluates the candidate with the largest expected improvement among random masks and
    single swaps of the best masks seen.
    """

    def __init__(self, units: list[tuple[str, int]], n_skip: int, random_trials: int, seed: int) -> None:
        self.units = units
        self.n_skip = n_skip
        self.random_trials = random_trials
        self.gen = torch.Generator().manual_seed(seed)
        self.X: list[torch.Tensor] = []
        self.y: list[float] = []

    @property
    def D(self) -> int:
        return len(self.units)

    def _random(self, n: int) -> torch.Tensor:
        order = torch.rand(n, self.D, generator=self.gen).argsort(-1)[:, : self.n_skip]
        return torch.zeros(n, self.D).scatter_(1, order, 1.0)

    def _swaps(self, mask: torch.Tensor, n: int) -> torch.Tensor:
        on, off = mask.nonzero().flatten(), (mask == 0).nonzero().flatten()
        if len(on) == 0 or len(off) == 0:
            return mask.unsqueeze(0)
        a = on[torch.randint(len(on), (n,), generator=self.gen)]
        b = off[torch.randint(len(off), (n,), generator=self.gen)]
        out = mask.repeat(n, 1)
        rows = torch.arange(n)
        out[rows, a], out[rows, b] = 0.0, 1.0
        return out

    def propose(self) -> torch.Tensor:
        if len(self.y) < self.random_trials:
            return self._random(1)[0]
        X, y = torch.stack(self.X), torch.tensor(self.y)
        mu, sd = y.mean(), y.std().clamp(min=1e-6)
        ys = (y - mu) / sd
        best = torch.tensor(self.y).argsort(descending=True)[:3]
        pool = torch.cat([self._random(128)] + [self._swaps(self.X[int(i)], 64) for i in best])
        pool = torch.unique(pool, dim=0)
        seen = {tuple(x.tolist()) for x in self.X}
        pool = torch.stack([p for p in pool if tuple(p.tolist()) not in seen] or [self._random(1)[0]])

        def kern(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.exp(-4.0 * torch.cdist(a, b, p=1) / self.D)

        K = kern(X, X) + 1e-2 * torch.eye(len(X))
        chol = torch.linalg.cholesky(K)
        ks = kern(pool, X)
        alpha = torch.cholesky_solve(ys.unsqueeze(1), chol).squeeze(1)
        mean = ks @ alpha
        v = torch.cholesky_solve(ks.T, chol)
        var = (1.0 - (ks * v.T).sum(1)).clamp(min=1e-9)
        s = var.sqrt()
        z = (mean - ys.max() - 0.01) / s
        normal = torch.distributions.Normal(0.0, 1.0)
        ei = (mean - ys.max() - 0.01) * normal.cdf(z) + s * normal.log_prob(z).exp()
        return pool[int(ei.argmax())]

    def observe(self, mask: torch.Tensor, score: float) -> None:
        self.X.append(mask)
        self.y.append(score)

    def best(self) -> tuple[torch.Tensor, float]:
        i = max(range(len(self.y)), key=self.y.__getitem__)
        return self.X[i], self.y[i]

    def to_sets(self, mask: torch.Tensor) -> tuple[frozenset[int], frozenset[int]]:
        chosen = [self.units[int(j)] for j in mask.nonzero().flatten()]
        return (frozenset(i for kind, i in chosen if kind == "attn"), frozenset(i for kind, i in chosen if kind == "mlp"))
