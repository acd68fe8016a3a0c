"""GK's prototype selection (PGM, docs/METHODS.md 1.2) for one class at one FPN level.

Two steps, both on the inputs' device. A call syncs with the host a few times (the
finiteness check, the number of candidates, which sets the loop length, and the rows the
float32 density leaves undecided; on the CPU also once per density tile), never inside the
pursuit:

1. Density filter: per space, ``rho_n = sum_m exp(-((1 - a_n . a_m) / sigma)^2)``, computed
   by pieces so memory stays far below O(N^2): with float32 products (the default) only the
   square tiles on and above the diagonal of the symmetric Gram matrix, leaving out the kernel
   terms below 1e-15 (see :func:`density_with_bound`); in float64 over row chunks.
2. Matching pursuit with the consistency term. For a unit atom ``u`` the best coefficients
   of docs/METHODS.md 1.2 turn the candidate error into
   ``E = sum_n |r^a_n|^2 + |r^b_n|^2 - (w^a_n p_n + w^b_n q_n)``
   (the minimum of the quadratic in ``(w^a, w^b)``), and ``w^a p + w^b q`` simplifies to
   ``(p^2 + q^2 + alpha (p + q)^2) / (1 + 2 alpha)``. The residual-norm sum is the same for
   every candidate, so the arg-min of ``E`` is the arg-max of that "gain", which we compute
   directly: dropping the large shared constant removes the cancellation that would
   otherwise swamp small differences between candidates.

   Three ways to get the gains, chosen by cost (``method="auto"``); all give the same picks:

   - "gram": the gain needs only sums over n of ``p^2``, ``q^2`` and ``p q``, which are
     quadratic forms of the residuals' second moments: ``sum_n p_n^2 = u^T (R_a^T R_a) u``,
     ``sum_n p_n q_n = u^T (R_a^T R_b) v``. They are computed once, O(N D^2 + |candidates| D^2),
     and each step's rank-1 change of the residuals changes them by products of the
     candidates with a few D-vectors, O((N + |candidates|) D) (see :class:`_GramState`):
     no |candidates| x N matrix exists.
   - "cached": the inner products ``P = U R_a^T`` and ``Q = V R_b^T`` (|candidates| x N),
     built once and updated by a rank-1 term per step (``P -= (U u*) w^a^T``), when they fit
     ``cache_bytes`` (cheaper than "gram" for small N).
   - "streamed": the residuals are kept and P, Q recomputed per step in candidate chunks.

   The |candidates| x D x N tensor of the reference code never exists.

Precision: float64 by default (the density threshold is a strict comparison and the pursuit
an arg-max over sums of N terms). The N x N Gram products of the density filter, the largest
cost, are computed in ``gram_dtype`` (float32 by default) with float64 accumulation of the
kernel sums, together with a rigorous bound on each density's error; the rows whose
side of the threshold the bound leaves open are recomputed in float64, so the candidate set
is the float64 one.
"""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["select_prototypes", "density", "dense_candidates", "DEFAULT_CACHE_BYTES"]

# Elements (not bytes) of one chunk of an N-column work matrix; 2^21 float64 = 16 MiB.
_CHUNK_ELEMENTS = 1 << 21
# Default bound on the cached P and Q matrices together (bytes); DISTILL.PROTOTYPES.CACHE_BYTES.
DEFAULT_CACHE_BYTES = 4 << 30
METHODS = ("auto", "gram", "cached", "streamed")
# The float32 density leaves out kernel terms with 1 - s >= this many sigmas (each < 1e-15).
_CUT_SIGMAS = 6.0
# Above this fraction of kept terms a density tile evaluates its kernel densely.
_SPARSE_FRACTION = 0.25
# Largest side of the density filter's square Gram tiles (see _tile_side).
_GRAM_TILE = 1024


def _unit_rows(x: Tensor, eps: float) -> Tensor:
    # Rows whose norm is below eps become (near) zero vectors: such a row has density
    # ~N*exp(-100), below every non-zero row's (whose self term alone is 1), so it is never
    # a candidate.
    return x / x.norm(dim=1, keepdim=True).clamp_min(eps)


def _rows_per_chunk(n_cols: int, chunk_elements: int) -> int:
    return max(1, chunk_elements // max(n_cols, 1))


def _tile_side(chunk_elements: int) -> int:
    # Square tiles of the Gram matrix, at most _GRAM_TILE on a side: on the 2-core CPU a
    # (1024, D) x (D, 1024) product runs near the machine's matmul peak while its 4 MiB
    # result stays in cache for the threshold and the kernel; full-width row chunks of a
    # few rows ran at 60% of that peak and their results went through memory.
    return max(1, min(_GRAM_TILE, math.isqrt(max(chunk_elements, 1))))


def density(x: Tensor, sigma: float = 0.1, chunk_elements: int = _CHUNK_ELEMENTS) -> Tensor:
    """Kernel density of each row among all rows, under cosine distance.

    Args:
        x (Tensor): (N, D) unit-norm (or zero) rows.
        sigma (float): kernel width; ``rho_n = sum_m exp(-((1 - x_n . x_m) / sigma)^2)``,
            the row itself included.
        chunk_elements (int): rows are processed in chunks of ``chunk_elements // N`` so
            the working memory is O(chunk_elements), not O(N^2).

    Returns:
        Tensor: (N,) densities, dtype and device of ``x``.
    """
    n = x.shape[0]
    out = x.new_empty(n)
    step = _rows_per_chunk(n, chunk_elements)
    for start in range(0, n, step):
        sim = x[start:start + step] @ x.T
        # exp(-((1 - s) / sigma)^2), in place on the chunk to keep one buffer.
        sim.neg_().add_(1.0).div_(sigma).square_().neg_().exp_()
        out[start:start + step] = sim.sum(dim=1)
    return out


def _unit_roundoff(dtype: torch.dtype, device) -> float:
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return 2.0 ** -11  # TF32 products
    return torch.finfo(dtype).eps / 2


def _kernel_terms(s: Tensor, sigma: float, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    # the kernel k = exp(-((1 - s) / sigma)^2) of computed products s, in dtype, and
    # |1 - s| k, which the error bound sums (|k'(s)| = 2 |1 - s| k / sigma^2)
    t = s.to(dtype).neg_().add_(1.0)
    k = torch.div(t, sigma).square_().neg_().exp_()
    return k, t.abs_().mul_(k)


def density_with_bound(x: Tensor, sigma: float, gram_dtype: torch.dtype,
                       chunk_elements: int = _CHUNK_ELEMENTS) -> Tuple[Tensor, Tensor]:
    """:func:`density` with the Gram products in ``gram_dtype`` (kernel sums in x's dtype),
    and a bound on each density's error against the computation in x's dtype.

    A product of two rows of norm <= 1 computed in ``gram_dtype`` (D terms, unit roundoff u,
    rows rounded to it) is off by at most ``e = (D + 2) u / (1 - (D + 2) u)``. The kernel
    ``k(s) = exp(-((1 - s) / sigma)^2)`` has ``|k''| <= 2 / sigma^2``, so a term moves by at
    most ``e (|k'(s)| + e / sigma^2)`` with s the computed product; summed over the row.

    Two savings, both inside that bound. The Gram matrix is symmetric, so only its square
    tiles on and above the diagonal are computed (an off-diagonal tile's column sums are the
    rows' below it). Terms whose computed ``1 - s`` is at least ``_CUT_SIGMAS * sigma`` are
    left out: each is below ``exp(-((cut - e) / sigma)^2)`` (about 1e-16), at most N of them
    per row, which the bound adds. On the CPU a tile where few terms remain evaluates the
    kernel on those alone, a tile where most remain on all of them (as every tile does on a
    GPU, where the kernel is cheap and the count would sync with the host).
    """
    n, d = x.shape
    out, slope = x.new_zeros(n), x.new_zeros(n)
    xl = x.to(gram_dtype)
    u = _unit_roundoff(gram_dtype, x.device)
    e = (d + 2) * u / (1 - (d + 2) * u)
    cut = _CUT_SIGMAS * sigma
    dropped = math.exp(-((cut - e) / sigma) ** 2) if cut > e else 1.0
    # On a GPU the kernel is cheap next to a host sync per tile: every tile is dense there.
    dense = x.device.type != "cpu"
    side = _tile_side(chunk_elements)
    # one output buffer for every tile: a fresh (side, side) product per tile would fault in
    # new pages each time
    buf = xl.new_empty(min(n, side) * min(n, side))

    def add(k: Tensor, g: Tensor, index: Tensor) -> None:
        out.index_add_(0, index, k)
        slope.index_add_(0, index, g)

    for r0 in range(0, n, side):
        r1 = min(n, r0 + side)
        for c0 in range(r0, n, side):  # the tiles on and above the diagonal
            c1 = min(n, c0 + side)
            sim = buf[:(r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
            torch.mm(xl[r0:r1], xl[c0:c1].T, out=sim)
            # an off-diagonal tile stands for its mirror below the diagonal too: its column
            # sums are those rows' sums over this tile's rows
            mirrored = c0 != r0
            flat = None if dense else sim.view(-1).gt(1.0 - cut).nonzero().squeeze(1)
            if flat is None or flat.numel() > _SPARSE_FRACTION * sim.numel():
                k, g = _kernel_terms(sim, sigma, x.dtype)  # every term kept (within the bound too)
                out[r0:r1] += k.sum(dim=1)
                slope[r0:r1] += g.sum(dim=1)
                if mirrored:
                    out[c0:c1] += k.sum(dim=0)
                    slope[c0:c1] += g.sum(dim=0)
                continue
            # few terms above the cut (the usual case on the CPU): the kernel on those alone
            k, g = _kernel_terms(sim.view(-1)[flat], sigma, x.dtype)
            width = c1 - c0
            add(k, g, flat // width + r0)
            if mirrored:
                add(k, g, flat % width + c0)
    # |k'(s)| = 2 (1 - s) / sigma^2 k(s)
    err = e * (slope.mul_(2.0 / sigma ** 2) + n * e / sigma ** 2) + n * dropped
    return out, err


def _dense_mask(rho: Tensor, fraction: float) -> Tensor:
    # q = value at position floor(fraction * N) of the ascending densities; keep rho > q.
    q = torch.sort(rho).values[int(math.floor(fraction * rho.shape[0]))]
    return rho > q


def _dense_mask_verified(x: Tensor, sigma: float, fraction: float, gram_dtype: torch.dtype,
                         chunk_elements: int) -> Tensor:
    """``_dense_mask(density(x))`` (in x's dtype) from low-precision Gram products.

    With exact densities within ``err`` of the computed ones and E = max(err), the exact
    quantile q* lies within E of the computed one, q. Rows whose interval lies wholly below
    q - E (L of them) or above q + E keep their side; the others are recomputed in x's dtype,
    and q* is the (pos - L)-th smallest of them (every row certainly below is below q*,
    every row certainly above is above it).
    """
    n = x.shape[0]
    rho, err = density_with_bound(x, sigma, gram_dtype, chunk_elements)
    pos = int(math.floor(fraction * n))
    q = torch.sort(rho).values[pos]
    big = err.max()
    below = rho + err < q - big
    above = rho - err > q + big
    unsure = (~(below | above)).nonzero().squeeze(1)
    exact = density_rows(x, unsure, sigma, chunk_elements)
    q_exact = torch.sort(exact).values[pos - int(below.sum())]
    dense = above.clone()
    dense[unsure] = exact > q_exact
    return dense


def density_rows(x: Tensor, rows: Tensor, sigma: float = 0.1,
                 chunk_elements: int = _CHUNK_ELEMENTS) -> Tensor:
    """:func:`density` of the given rows only (same computation per row)."""
    n = x.shape[0]
    out = x.new_empty(rows.numel())
    step = _rows_per_chunk(n, chunk_elements)
    for start in range(0, rows.numel(), step):
        sim = x[rows[start:start + step]] @ x.T
        sim.neg_().add_(1.0).div_(sigma).square_().neg_().exp_()
        out[start:start + step] = sim.sum(dim=1)
    return out


def dense_candidates(
    a: Tensor, b: Tensor, sigma: float = 0.1, fraction: float = 0.4,
    chunk_elements: int = _CHUNK_ELEMENTS, gram_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """The density filter of docs/METHODS.md 1.2 step 2 (the candidate set Γ).

    Args:
        a (Tensor): (N, D_s) unit-norm (or zero) student rows.
        b (Tensor): (N, D_t) unit-norm (or zero) teacher rows.
        sigma (float): density kernel width.
        fraction (float): the threshold ``q`` is the density at position
            ``floor(fraction * N)`` of the ascending densities.
        chunk_elements (int): see :func:`density`.
        gram_dtype (torch.dtype or None): precision of the Gram products; the result is
            that of the inputs' dtype whatever it is (see :func:`_dense_mask_verified`).
            None: the inputs' dtype.

    Returns:
        Tensor: ascending int64 indices of the instances whose density is strictly greater
        than ``q`` in both spaces (empty for N <= 1 or when all densities are equal).
    """
    if a.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=a.device)
    if gram_dtype is None or torch.finfo(gram_dtype).eps <= torch.finfo(a.dtype).eps:
        dense = _dense_mask(density(a, sigma, chunk_elements), fraction)
        dense &= _dense_mask(density(b, sigma, chunk_elements), fraction)
    else:
        dense = _dense_mask_verified(a, sigma, fraction, gram_dtype, chunk_elements)
        dense &= _dense_mask_verified(b, sigma, fraction, gram_dtype, chunk_elements)
    return dense.nonzero().squeeze(1)


def _pick(gain: Tensor, taken: Tensor, positions: Tensor) -> Tensor:
    """Position of the largest gain among candidates not taken; lowest on exact ties.

    Written out instead of relying on ``argmax``'s tie rule. Returns a (1,) device tensor
    used with ``index_select``/``index_fill_``: indexing with a 0-d tensor would call
    ``.item()`` and stall the GPU at every step.
    """
    gain = gain.masked_fill(taken, -math.inf)
    best = gain.max()
    return torch.where(gain == best, positions, positions.numel()).min().view(1)


def _gain(p: Tensor, q: Tensor, alpha: float) -> Tensor:
    # sum_n (w^a p + w^b q) = sum_n (p^2 + q^2 + alpha (p + q)^2) / (1 + 2 alpha),
    # with one temporary of p's size.
    t = torch.add(p, q).square_().mul_(alpha).addcmul_(p, p).addcmul_(q, q)
    return t.sum(dim=1) / (1.0 + 2.0 * alpha)


def _coefficients(p: Tensor, q: Tensor, alpha: float):
    s = alpha * (p + q)
    return (s + p) / (1.0 + 2.0 * alpha), (s + q) / (1.0 + 2.0 * alpha)


class _ProductGains:
    """Gains from the inner products ``P`` and ``Q`` of the candidates with the residuals,
    a chunk of candidates at a time (``products(lo, hi)`` supplies them)."""

    def gains(self, alpha: float, rows: int) -> Tensor:
        g = self.ua.shape[0]
        return torch.cat([_gain(*self.products(s, s + rows), alpha) for s in range(0, g, rows)])


class _CachedProducts(_ProductGains):
    """P = U_a R_a^T and Q = U_b R_b^T for every candidate, kept and updated in place:
    removing atom k from every residual is a rank-1 update of P and Q. Memory O(G N)."""

    def __init__(self, a: Tensor, b: Tensor, ua: Tensor, ub: Tensor):
        self.ua, self.ub = ua, ub
        self.p, self.q = ua @ a.T, ub @ b.T  # (G, N)

    def products(self, lo: int, hi: int):
        return self.p[lo:hi], self.q[lo:hi]

    def remove(self, k: Tensor, alpha: float) -> None:
        wa, wb = _coefficients(self.p.index_select(0, k)[0], self.q.index_select(0, k)[0], alpha)
        # r_n <- r_n - w_n u*  =>  (U r_n) <- (U r_n) - w_n (U u*)
        self.p.addr_(self.ua @ self.ua.index_select(0, k)[0], wa, alpha=-1.0)
        self.q.addr_(self.ub @ self.ub.index_select(0, k)[0], wb, alpha=-1.0)


class _StreamedResiduals(_ProductGains):
    """The residuals themselves; P and Q are recomputed per chunk of candidates each step.
    Memory O(N D + chunk N), for N too large to cache G x N products."""

    def __init__(self, a: Tensor, b: Tensor, ua: Tensor, ub: Tensor):
        self.ua, self.ub = ua, ub
        self.ra, self.rb = a.clone(), b.clone()  # (N, D_s), (N, D_t)

    def products(self, lo: int, hi: int):
        return self.ua[lo:hi] @ self.ra.T, self.ub[lo:hi] @ self.rb.T

    def remove(self, k: Tensor, alpha: float) -> None:
        u, v = self.ua.index_select(0, k)[0], self.ub.index_select(0, k)[0]
        wa, wb = _coefficients(self.ra @ u, self.rb @ v, alpha)
        self.ra.addr_(wa, u, alpha=-1.0)
        self.rb.addr_(wb, v, alpha=-1.0)


class _GramState(_StreamedResiduals):
    """The residuals, kept and updated as :class:`_StreamedResiduals`; the gains come from
    their second moments: ``sum_n p_n^2 = u^T (R_a^T R_a) u``, ``sum_n q_n^2 = v^T (R_b^T R_b) v``,
    ``sum_n p_n q_n = u^T (R_a^T R_b) v``, computed once, O((N + G) D^2).

    Removing the atom (u*, v*) with coefficients (w_a, w_b) changes the residuals by rank 1
    (``R_a <- R_a - w_a u*^T``), so each candidate's three sums change by products of its
    atoms with six vectors: with ``x = R_a^T w_a``, ``z = R_a^T w_b``, ``y = R_b^T w_b``,
    ``t = R_b^T w_a`` (before the update),
    ``pp -= 2 (u.u*)(u.x) - |w_a|^2 (u.u*)^2``, ``qq -= 2 (v.v*)(v.y) - |w_b|^2 (v.v*)^2``,
    ``pq -= (u.z)(v.v*) + (u.u*)(v.t) - (w_a.w_b)(u.u*)(v.v*)``. A step costs O((N + G) D).
    Memory O(N D + G D + D^2)."""

    def __init__(self, a: Tensor, b: Tensor, ua: Tensor, ub: Tensor):
        super().__init__(a, b, ua, ub)
        self.pp = ((ua @ (a.T @ a)) * ua).sum(dim=1)
        self.qq = ((ub @ (b.T @ b)) * ub).sum(dim=1)
        self.pq = ((ua @ (a.T @ b)) * ub).sum(dim=1)

    def gains(self, alpha: float, rows: int) -> Tensor:
        return ((1.0 + alpha) * (self.pp + self.qq) + (2.0 * alpha) * self.pq) / (1.0 + 2.0 * alpha)

    def remove(self, k: Tensor, alpha: float) -> None:
        u, v = self.ua.index_select(0, k)[0], self.ub.index_select(0, k)[0]
        wa, wb = _coefficients(self.ra @ u, self.rb @ v, alpha)
        w = torch.stack([wa, wb], dim=1)  # (N, 2)
        x, z = (self.ra.T @ w).unbind(1)  # R_a^T w_a, R_a^T w_b
        t, y = (self.rb.T @ w).unbind(1)  # R_b^T w_a, R_b^T w_b
        cu, cx, cz = (self.ua @ torch.stack([u, x, z], dim=1)).unbind(1)  # (G,) each
        cv, cy, ct = (self.ub @ torch.stack([v, y, t], dim=1)).unbind(1)
        self.pp -= 2.0 * cu * cx - wa.dot(wa) * cu * cu
        self.qq -= 2.0 * cv * cy - wb.dot(wb) * cv * cv
        self.pq -= cz * cv + cu * ct - wa.dot(wb) * cu * cv
        self.ra.addr_(wa, u, alpha=-1.0)
        self.rb.addr_(wb, v, alpha=-1.0)


def _pursuit(state, num_candidates: int, num_instances: int, steps: int, alpha: float,
             chunk_elements: int, device) -> Tensor:
    """Matching pursuit over candidate atoms; ``state`` supplies the gains and the updates."""
    taken = torch.zeros(num_candidates, dtype=torch.bool, device=device)
    positions = torch.arange(num_candidates, device=device)
    rows = _rows_per_chunk(num_instances, chunk_elements)
    chosen = []
    for _ in range(steps):
        k = _pick(state.gains(alpha, rows), taken, positions)
        state.remove(k, alpha)
        taken.index_fill_(0, k, True)
        chosen.append(k)
    return torch.cat(chosen)


def select_prototypes(
    student_feats: Tensor,
    teacher_feats: Tensor,
    num_prototypes: int,
    alpha: float = 10.0,
    *,
    sigma: float = 0.1,
    density_fraction: float = 0.4,
    eps: float = 1e-12,
    dtype: torch.dtype = torch.float64,
    gram_dtype: Optional[torch.dtype] = torch.float32,
    chunk_elements: int = _CHUNK_ELEMENTS,
    cache_bytes: Optional[int] = DEFAULT_CACHE_BYTES,
    method: str = "auto",
) -> Tensor:
    """Choose the prototype instances of one class at one FPN level (GK's PGM).

    Implements docs/METHODS.md 1.2: L2-normalise each space; keep the instances whose density
    is strictly above the ``floor(density_fraction * N)``-th smallest density in both
    spaces; then run ``num_prototypes`` steps of matching pursuit with the consistency
    term ``alpha``, never choosing an instance twice.

    Ties: at every step the candidate with the lowest position among the candidates
    (equivalently the lowest instance index) wins among exactly equal errors. Results
    are deterministic for a given device (cross-device results agree except on
    near-ties within rounding, which float64 makes rare).

    Edge cases: N = 0 gives an empty result. N = 1 gives an empty result too: the only
    density is the quantile itself and "strictly greater" excludes it (the same holds
    whenever all densities are equal, e.g. all instances identical). Fewer candidates
    than ``num_prototypes`` gives fewer indices.

    Args:
        student_feats (Tensor): (N, D_s) student instance features of the class.
        teacher_feats (Tensor): (N, D_t) teacher instance features of the same instances,
            same order; D_t may differ from D_s. Both must be finite.
        num_prototypes (int): K, the most prototypes to choose (paper: 10).
        alpha (float): weight of the consistency term (paper: 10).
        sigma (float): density kernel width on the cosine distance (reference: 0.1).
        density_fraction (float): quantile position of the density threshold (0.4).
        eps (float): norm floor for the L2 normalisation (zero rows stay zero).
        dtype (torch.dtype): compute precision, float64 by default: the density threshold
            is a strict comparison and the pursuit an arg-min over sums of N terms, so
            float32 (let alone TF32 matmuls on Ampere+ GPUs) can flip near-ties. Pass
            torch.float32 for speed on GPUs with slow float64.
        gram_dtype (torch.dtype or None): precision of the density filter's N x N Gram
            products (float32: about twice as fast on CPUs); the candidate set is still
            exactly the one in ``dtype`` (rows the error bound leaves undecided are recomputed
            in ``dtype``). None: ``dtype``.
        chunk_elements (int): size (in elements) of the chunks of N-column work matrices.
        cache_bytes (int or None): largest size of the cached (G, N) inner-product
            matrices P and Q together (``DISTILL.PROTOTYPES.CACHE_BYTES``); above it the
            "cached" method gives way to "streamed". None: no bound.
        method (str): how the pursuit gets its gains: "auto" (the cheapest: "gram" unless
            the cached products are cheaper and fit ``cache_bytes``), "gram", "cached" or
            "streamed" (see the module docstring); the picks are the same.

    Returns:
        Tensor: (k,) int64 indices into the N instances, in selection order, on the
        inputs' device, k <= num_prototypes.

    Raises:
        ValueError: inputs not 2-D, different N, different devices, not finite, or a
            negative ``num_prototypes``.
    """
    if student_feats.dim() != 2 or teacher_feats.dim() != 2:
        raise ValueError(
            "select_prototypes expects (N, D_s) student and (N, D_t) teacher features, got "
            f"shapes {tuple(student_feats.shape)} and {tuple(teacher_feats.shape)}"
        )
    if student_feats.shape[0] != teacher_feats.shape[0]:
        raise ValueError(
            f"student and teacher features must describe the same instances: got "
            f"{student_feats.shape[0]} and {teacher_feats.shape[0]} rows"
        )
    if student_feats.device != teacher_feats.device:
        raise ValueError(
            f"student features on {student_feats.device}, teacher features on "
            f"{teacher_feats.device}: put both on one device"
        )
    if int(num_prototypes) < 0:
        raise ValueError(f"num_prototypes must be >= 0, got {num_prototypes}")
    device = student_feats.device
    empty = torch.empty(0, dtype=torch.long, device=device)
    n = student_feats.shape[0]
    if n == 0 or num_prototypes == 0:
        return empty

    with torch.no_grad():
        a = student_feats.detach().to(dtype)
        b = teacher_feats.detach().to(dtype)
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            bad = [name for name, x in (("student", a), ("teacher", b)) if not torch.isfinite(x).all()]
            raise ValueError(
                f"select_prototypes got non-finite (inf/NaN) {' and '.join(bad)} features "
                f"({n} instances): the model that produced them has diverged"
            )
        a = _unit_rows(a, eps)
        b = _unit_rows(b, eps)

        candidates = dense_candidates(a, b, sigma, density_fraction, chunk_elements, gram_dtype)
        g = candidates.numel()
        if g == 0:
            return empty
        steps = min(int(num_prototypes), g)
        ua, ub = a[candidates], b[candidates]

        method = _choose_method(method, n, g, a.shape[1], b.shape[1], steps, a.element_size(), cache_bytes)
        state = {"gram": _GramState, "cached": _CachedProducts, "streamed": _StreamedResiduals}[method](a, b, ua, ub)
        picks = _pursuit(state, g, n, steps, alpha, chunk_elements, a.device)
        return candidates[picks]


def _choose_method(method: str, n: int, g: int, ds: int, dt: int, steps: int, element_size: int,
                   cache_bytes: Optional[int]) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got '{method}'")
    fits = cache_bytes is None or 2 * g * n * element_size <= cache_bytes
    if method != "auto":
        return "streamed" if method == "cached" and not fits else method
    # multiply-adds: the moments and the first gains once plus ~10 passes of N x D or G x D per
    # step, against building P, Q once plus ~8 elementwise passes over them per step
    # (memory-bound, counted as 4 multiply-adds each)
    gram = (n + g) * (ds * ds + dt * dt + ds * dt) + steps * 10 * (n + g) * (ds + dt)
    cached = g * n * (ds + dt) + steps * 32 * g * n
    return "cached" if fits and cached < gram else "gram"
