"""Focus ("disentanglement") of an image condition, the original VD app's `adjust_rank`.

The 256 local CLIP tokens of an image are split by a randomized low-rank SVD into their top q = 20 principal
components and a residual. The UI calls the slider's ends "Semantic" (0) and "Style" (1):
  focus < 0.5 scales the top two components down (both removed at 0);
  focus > 0.5 drops the residual and scales components 5..19 down (only the top five kept at 1);
  focus = 0.5 leaves the tokens as they are.
The result is rescaled to the input's std. The class token is never changed.
Mirrors app.py (`decompose`, `adjust_rank`) of SHI-Labs/Versatile-Diffusion at cf0f4a2.
"""

import math
import numbers

import torch
from torch import Tensor

Q = 20  # components computed by the randomized SVD
NITER = 100  # subspace iterations
MAX_SEMANTIC_DROP = 1  # focus 0 removes components 0..1
MAX_STYLE_DROP = 5  # focus 1 removes components 5..Q-1


def low_rank_pca(x: Tensor, q: int, niter: int, generator: torch.Generator | None = None
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Randomized SVD x ≈ U diag(S) Vᵀ of a batch [B, m, n], not centred: U [B, m, q], S [B, q], V [B, n, q].

    Halko et al. 2009 (arXiv:0909.4061): Gaussian range finder with `niter` subspace iterations (Alg. 4.4), then
    an exact SVD of the small projected matrix (Alg. 5.1). The operations and the one random draw are those of
    `torch.pca_lowrank(x, q, center=False, niter=niter)`, so a generator seeded like the global RNG gives torch's
    result; without a generator the global RNG is used, as torch does. The draw is made on the generator's device.
    """
    m, n = x.shape[-2:]
    if not 0 <= q <= min(m, n):
        raise ValueError(f"q must be in [0, min(m, n)] = [0, {min(m, n)}], got {q}")
    if niter < 0:
        raise ValueError(f"niter must be >= 0, got {niter}")
    a = x.mT if m < n else x  # work on the tall orientation, like torch: a is [B, max(m,n), min(m,n)]
    # one test matrix shared by the whole batch (torch draws it this way too)
    device = generator.device if generator is not None else x.device
    omega = torch.randn(a.shape[-1], q, generator=generator, dtype=x.dtype, device=device).to(x.device)
    basis = torch.linalg.qr(a @ omega).Q  # (B, max, q)
    for _ in range(niter):
        basis = torch.linalg.qr(a.mT @ basis).Q  # (B, min, q)
        basis = torch.linalg.qr(a @ basis).Q  # (B, max, q)
    u, s, vh = torch.linalg.svd(basis.mT @ a, full_matrices=False)  # SVD of the (B, q, min) projection
    u, v = basis @ u, vh.mT
    return (v, s, u) if m < n else (u, s, v)


def _component_weights(focus: float) -> dict[int, float]:
    """Factor for each singular value the focus changes; both ramps are 1 at focus 0.5."""
    if focus < 0.5:
        # y0 runs from -MAX_SEMANTIC_DROP (focus 0) to 1 (focus 0.5) along exp(2 focus - 1)
        t0 = math.exp(-1.0)
        y0 = (math.exp((focus - 0.5) * 2) - t0) / (1 - t0) * (1 + MAX_SEMANTIC_DROP) - MAX_SEMANTIC_DROP
        last = MAX_SEMANTIC_DROP + 1  # the line through (0, y0) and (last, 1)
        return {i: max(0.0, i / last * (1 - y0) + y0) for i in range(MAX_SEMANTIC_DROP + 1)}
    # y0 runs from 1 (focus 0.5) to -(Q - MAX_STYLE_DROP) (focus 1)
    t0, low = math.e, Q - MAX_STYLE_DROP
    y0 = (math.exp((focus - 0.5) * 2) - t0) / (1 - t0) * (1 + low) - low
    first, last = Q - 1, MAX_STYLE_DROP - 1  # the line through (Q-1, y0) and (MAX_STYLE_DROP-1, 1)
    return {i: max(0.0, (i - first) / (last - first) * (1 - y0) + y0) for i in range(MAX_STYLE_DROP, Q)}


def adjust_focus(tokens: Tensor, focus: float, generator: torch.Generator | None = None) -> Tensor:
    """Image context tokens [B, 257, D] with their local tokens moved towards semantics (focus < 0.5) or style
    (focus > 0.5); focus 0.5 returns `tokens` itself.

    Computed in float32 (float64 stays float64) and cast back. The randomized SVD draws from `generator`, or from
    the global RNG like the original, which never seeds it.
    """
    if isinstance(focus, bool) or not isinstance(focus, numbers.Real):
        raise TypeError(f"focus must be a number in [0, 1], got {focus!r}")
    if not 0 <= focus <= 1:
        raise ValueError(f"focus must be in [0, 1], got {focus!r}")
    focus = float(focus)
    if tokens.ndim != 3 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [B, 1 + N, D] (a class token then local tokens), got {tuple(tokens.shape)}")
    if focus == 0.5:
        return tokens
    x = tokens[:, 1:].to(torch.promote_types(tokens.dtype, torch.float32))  # (B, N, D) local tokens
    std = x.std(dim=(-2, -1), keepdim=True)  # (B, 1, 1), unbiased like the original
    mean = x.mean(-1, keepdim=True)  # (B, N, 1): each token's mean over features
    centred = x - mean
    # Q components, or as many as there are (only small test models have fewer than 20 features)
    u, s, v = low_rank_pca(centred, min(Q, *centred.shape[-2:]), NITER, generator)
    rest = centred - (u * s.unsqueeze(-2)) @ v.mT  # what the top Q components leave
    for i, w in _component_weights(focus).items():
        if i < s.shape[1]:
            s[:, i] *= w
    if focus > 0.5:
        rest = 0
    out = (u * s.unsqueeze(-2)) @ v.mT + mean + rest
    # divergence: the original's stds have shape [B] and so broadcast against the feature axis: right at B = 1
    # (the app's only use), an error for other batch sizes (or a wrong per-feature scale if B equals D). We
    # rescale each sample by its own std, [B, 1, 1], which is the same arithmetic at B = 1.
    out = out / out.std(dim=(-2, -1), keepdim=True) * std
    return torch.cat([tokens[:, :1], out.to(tokens.dtype)], dim=1)
