"""Calibration statistics of one input group: Gram matrices over the valid rows of its input.

The pipeline's hooks hand every batch's rows to a GramAccumulator, dropping masked rows (padded
encoder frames, pad tokens) with `valid_rows`; the accumulator's means are the GramStats the
solvers read (docs/methods.md, "Statistics").
"""
from __future__ import annotations

import torch

from fade_kernels.solver.stats import GramStats


def valid_rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The rows of x float (B, T, K) whose mask bool (B, T) is True, as float32 (R, K)."""
    return x.reshape(-1, x.shape[-1])[mask.reshape(-1)].float()


# Column block of the symmetric Gram updates: X^T X is accumulated on the block upper triangle
# only (blocks (i, j) with j >= i), which is about (1 + B/K) / 2 of the flops of the full GEMM.
# Measured on 2 Zen 5 cores, K = 5120 and 2249 rows: 551 ms full, 356 ms with B = 1280, 322 ms
# with B = 640.
GRAM_BLOCK = 640


def accumulate_symmetric_gram(gram: torch.Tensor, rows: torch.Tensor) -> None:
    """gram += rows^T rows on the block upper triangle of `gram` only.

    gram: float32 (K, K); rows: float32 (R, K). The blocks strictly below the block diagonal are
    left as they are: mirror_block_upper(gram) fills them in once all rows are added."""
    width = rows.shape[1]
    if width <= GRAM_BLOCK:
        gram.addmm_(rows.t(), rows)
        return
    for start in range(0, width, GRAM_BLOCK):
        stop = min(start + GRAM_BLOCK, width)
        gram[start:stop, start:].addmm_(rows[:, start:stop].t(), rows[:, start:])


def mirror_block_upper(gram: torch.Tensor) -> torch.Tensor:
    """Copy the block upper triangle of a Gram matrix float32 (K, K) onto its strictly-lower blocks,
    in place (see accumulate_symmetric_gram); idempotent. Returns gram."""
    width = gram.shape[0]
    for start in range(GRAM_BLOCK, width, GRAM_BLOCK):
        stop = min(start + GRAM_BLOCK, width)
        gram[start:stop, :start] = gram[:start, start:stop].t()
    return gram


class GramAccumulator:
    """Running Gram matrices of one input group over valid rows, float32 sums, split in halves.

    Always: H-hat = X-hat^T X-hat (rows as tokens) and sum |x-hat| per input channel (for AWQ).
    With the full-precision chain (with_error=True) also G = delta^T X-hat and D = delta^T delta,
    delta = X - X-hat. Rows are added to half 0 or 1 (FADE's cross-fitting halves, by utterance);
    with n_halves=1 everything goes to one half. H and D are symmetric: only their block upper
    triangle is accumulated (accumulate_symmetric_gram), and stats() mirrors it.

    While the rows added so far number at most `width`, they are also kept (x-hat and delta, by
    reference): a layer's output error is then cheaper from the rows (R x K x N flops) than from
    the K x K Gram matrices (K x K x N), which is the case for every decoder layer of a short
    calibration set. See kept_rows.
    """

    def __init__(self, width: int, with_error: bool = False, n_halves: int = 1):
        if n_halves not in (1, 2):
            raise ValueError(f"n_halves must be 1 or 2, got {n_halves!r}")
        self.width, self.with_error, self.n_halves = width, with_error, n_halves
        self.h = [torch.zeros(width, width) for _ in range(n_halves)]
        self.g = [torch.zeros(width, width) for _ in range(n_halves)] if with_error else None
        self.d = [torch.zeros(width, width) for _ in range(n_halves)] if with_error else None
        self.abs_sum = torch.zeros(width, dtype=torch.float64)
        self.rows = [0] * n_halves
        self.total_rows = 0
        self._kept: list[tuple] | None = []   # (x_hat, delta) per add while few enough rows
        self._kept_count = 0

    def add(self, x_hat: torch.Tensor, delta: torch.Tensor | None = None, half: torch.Tensor | None = None,
            total_rows: int | None = None) -> None:
        """x_hat: float32 (R, K) valid rows of the quantized chain; delta: float32 (R, K) = X - X-hat rows
        (required when with_error); half: int64 (R,) in {0, 1} (required when n_halves = 2);
        total_rows: rows before masking (for the kept fraction), default R."""
        if x_hat.dim() != 2 or x_hat.shape[1] != self.width:
            raise ValueError(f"x_hat must be (R, {self.width}), got {tuple(x_hat.shape)}")
        if self.with_error and (delta is None or delta.shape != x_hat.shape):
            raise ValueError("delta with x_hat's shape is required when the full-precision chain is tracked")
        self.total_rows += x_hat.shape[0] if total_rows is None else total_rows
        self.abs_sum += x_hat.abs().sum(dim=0, dtype=torch.float64)
        for index in range(self.n_halves):
            if self.n_halves == 1:
                rows, err = x_hat, delta
            else:
                if half is None:
                    raise ValueError("half ids are required with two halves")
                pick = half == index
                rows = x_hat[pick]
                err = delta[pick] if delta is not None else None
            if rows.shape[0] == 0:
                continue
            accumulate_symmetric_gram(self.h[index], rows)
            if self.with_error:
                self.g[index].addmm_(err.t(), rows)
                accumulate_symmetric_gram(self.d[index], err)
            self.rows[index] += rows.shape[0]
        if self._kept is not None:
            self._kept_count += x_hat.shape[0]
            if self._kept_count <= self.width:
                self._kept.append((x_hat, delta))
            else:
                self._kept = None

    def kept_rows(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(x_hat float32 (R, K), delta float32 (R, K) or None without the full-precision chain): every
        row added, when R <= width; None once more rows than that were added."""
        if not self._kept:
            return None
        x_hat = torch.cat([x for x, _ in self._kept])
        delta = torch.cat([d for _, d in self._kept]) if self.with_error else None
        return x_hat, delta

    def _stats(self, halves: list[int]):
        rows = sum(self.rows[i] for i in halves)
        if rows == 0:
            raise RuntimeError("no valid calibration rows reached this layer" if len(halves) > 1 or self.n_halves == 1
                               else "a cross-fitting half received no calibration rows (need at least 2 utterances)")

        def mean(mats, symmetric=True):
            if mats is None:
                return None
            if symmetric:
                for i in halves:
                    mirror_block_upper(mats[i])
            total = mats[halves[0]] if len(halves) == 1 else sum(mats[i] for i in halves)
            return total / rows

        return GramStats(mean(self.h), mean(self.g, symmetric=False), mean(self.d), rows)

    def stats(self):
        """GramStats over all rows (means)."""
        return self._stats(list(range(self.n_halves)))

    def half_stats(self, index: int):
        """GramStats of one half (0 or 1)."""
        return self._stats([index])

    @property
    def act_mean_abs(self) -> torch.Tensor:
        """mean |x-hat| per input channel, float32 (K,)."""
        return (self.abs_sum / max(sum(self.rows), 1)).float()

    @property
    def valid_fraction(self) -> float:
        return sum(self.rows) / max(self.total_rows, 1)
