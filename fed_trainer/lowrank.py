"""Exact low-rank algebra on factored matrices, without forming the dense product."""

from __future__ import annotations

import torch


def truncated_svd_of_product(
    left: torch.Tensor, right: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best rank-`rank` approximation of `left @ right` as `U diag(S) Vh`, from the factors alone.

    `left` is out x R and `right` is R x in (R the stacked rank). With `left = Q_l R_l` and `right^T = Q_r R_r`
    (reduced QR), `left @ right = Q_l (R_l R_r^T) Q_r^T`, so the SVD of the small R x R core `U' S V'^T` gives
    `U = Q_l U'`, `V = Q_r V'`. Cost O((out + in) R^2) instead of O(out * in * min(out, in)); computed in float64.

    Returns `U` (out x k), `S` (k), `Vh` (k x in) in the input dtype, with k = min(rank, R, out, in).
    """
    dtype = left.dtype
    q_left, r_left = torch.linalg.qr(left.double())
    q_right, r_right = torch.linalg.qr(right.double().T)
    u_core, s, vh_core = torch.linalg.svd(r_left @ r_right.T)
    k = min(rank, s.numel())
    u = q_left @ u_core[:, :k]
    vh = vh_core[:k] @ q_right.T
    return u.to(dtype), s[:k].to(dtype), vh.to(dtype)
