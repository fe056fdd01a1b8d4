"""Tests of the batched QP solvers behind UPGrad, DualProj and MGDA (``torchjd_func._qp``).

Every accuracy check compares against something computed independently here: the KKT conditions
of each problem, an exact enumeration of the active sets for small ``m``, TorchJD's published
values, and PCGrad's rule (for which UPGrad with a sum preference and no regularisation is exact
on two rows).
"""

import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch._dynamo.testing
from torch import Tensor, nn

import torchjd_func._qp
from tests.settings import DEVICE, DTYPE
from tests.utils import NoHostSync, reference_gramian
from torchjd_func._qp import (
    _ENUMERATE_MAX,
    _ENUMERATE_MAX_CUDA,
    _enumerate_all,
    _inverse,
    _padded_pair,
    _reduced_solve,
    dual_cone_projection,
    dualproj_weights,
    mgda_weights,
    normalize_regularize,
    solve_box_qp,
    upgrad_weights,
)

F64 = torch.float64
# Relative KKT tolerances: the solve is in float64 whatever the input dtype, so float32 results
# are only limited by their own rounding.
KKT_TOL = {torch.float64: 1e-6, torch.float32: 1e-4}
DTYPES = sorted({F64, DTYPE}, key=str)
J_BASE = [[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]
KINDS = ["randn", "low_rank", "rank_one", "colinear", "duplicated", "row_scaled", "conflict"]
SCALES = [1e-10, 1.0, 1e15]


def jacobian(kind: str, m: int, gen: torch.Generator) -> Tensor:
    """A float64 ``[m, 2m]`` matrix whose Gramian exercises one difficulty."""
    n = 2 * m

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=F64)

    def signs(k: int) -> Tensor:
        return torch.randint(0, 2, (k, 1), generator=gen, dtype=F64) * 2 - 1

    if kind == "randn":
        return randn(m, n)
    if kind == "low_rank":
        r = max(1, m // 4)
        return randn(m, r) @ randn(r, n)
    if kind == "rank_one":
        return signs(m) * randn(m, 1).abs() * randn(1, n)
    if kind == "colinear":
        magnitudes = 10 ** (2 * torch.rand(m, 1, generator=gen, dtype=F64) - 1)
        return signs(m) * magnitudes * randn(1, n) + 1e-6 * randn(m, n)
    if kind == "duplicated":
        half = randn((m + 1) // 2, n)
        return torch.cat([half, -half, half])[:m]
    if kind == "row_scaled":
        return 10 ** (8 * torch.rand(m, 1, generator=gen, dtype=F64) - 4) * randn(m, n)
    if kind == "conflict":
        return randn(m, n) - 3 * signs(m) * randn(1, n)
    raise ValueError(kind)


def gramians(m: int, seed: int, *, scales: list[float] = SCALES) -> Tensor:
    """All kinds × scales for one ``m``, stacked ``[b, m, m]`` in float64, plus a zero Gramian."""
    gen = torch.Generator().manual_seed(seed)
    stack = [s * (j @ j.T) for kind in KINDS for j in [jacobian(kind, m, gen)] for s in scales]
    return torch.stack([*stack, torch.zeros(m, m, dtype=F64)])


def reference_normalize(gramian: Tensor, norm_eps: float, reg_eps: float) -> Tensor:
    """TorchJD's normalisation written out for one ``[m, m]`` Gramian, in float64."""
    g = gramian.to(F64)
    trace = float(g.trace())
    g = torch.zeros_like(g) if trace < norm_eps or trace <= 0 else g / trace
    return g + reg_eps * torch.eye(len(g), dtype=F64, device=g.device)


def projection_kkt(gramian: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """Worst relative KKT residual of ``v = argmin vᵀGv s.t. v ≥ u`` for rows ``u`` ``[k, m]``.

    The conditions (Lemma 4 of https://arxiv.org/abs/2406.16232): ``v ≥ u``, ``Gv ≥ 0``,
    ``uᵀGv = vᵀGv`` and ``(v − u)_i (Gv)_i = 0``, each divided by the magnitude of its terms.
    """
    g, u, v = gramian.to(F64), u.to(F64), v.to(F64)
    gv = v @ g
    size_inf = torch.maximum(u.abs().amax(-1), v.abs().amax(-1)).clamp_min(1e-300)
    size_1 = torch.maximum(u.abs().sum(-1), v.abs().sum(-1)).clamp_min(1e-300)
    gv_size = g.abs().max().clamp_min(1e-300) * size_1
    primal = (u - v).clamp_min(0).amax(-1) / size_inf
    dual = (-gv).clamp_min(0).amax(-1) / gv_size
    gap = ((v - u) * gv).sum(-1).abs() / (gv_size * size_1)
    complementarity = ((v - u) * gv).abs().amax(-1) / (gv_size * size_inf)
    return torch.stack([primal, dual, gap, complementarity]).amax()


def enumerate_lcp(gramian: Tensor, c: Tensor) -> Tensor:
    """Exact solution of ``y ≥ 0, Gy + c ≥ 0, yᵀ(Gy + c) = 0`` by trying all 2^m free sets."""
    m = len(c)
    best, best_violation = torch.zeros(m, dtype=F64), float("inf")
    for mask in itertools.product([False, True], repeat=m):
        free = torch.tensor(mask)
        y = torch.zeros(m, dtype=F64)
        if free.any():
            y[free] = torch.linalg.solve(gramian[free][:, free], -c[free])
        violation = max(0.0, -float(y.min()), -float((gramian @ y + c).min()))
        if violation < best_violation:
            best, best_violation = y, violation
    return best


def natural_residual(gramian: Tensor, c: Tensor, y: Tensor) -> Tensor:
    """``‖min(y, Gy + c)‖∞`` relative to the size of the terms of ``Gy + c``, per row."""
    w = y @ gramian + c
    size = c.abs().amax(-1) + (y.abs() @ gramian.abs()).amax(-1)
    return torch.minimum(y, w).abs().amax(-1) / size.clamp_min(1e-300)


def hard_lcps(m: int, b: int, seed: int) -> tuple[Tensor, Tensor]:
    """Random LCPs with ill-conditioned spectra, on which plain PDAS cycles now and then."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(b, m, m, generator=gen, dtype=F64))
    eigenvalues = 10 ** (-8 * torch.rand(b, 1, m, generator=gen, dtype=F64))
    g = normalize_regularize((q * eigenvalues) @ q.mT)
    return g, torch.randn(b, 1, m, generator=gen, dtype=F64)


# ----------------------------------------------------------------------------------------------
# normalize_regularize


def test_normalize_regularize_matches_torchjd() -> None:
    g = gramians(4, seed=0).to(DEVICE, DTYPE)
    expected = torch.stack([reference_normalize(x, 1e-4, 1e-4) for x in g])
    torch.testing.assert_close(normalize_regularize(g).to(F64), expected, rtol=1e-6, atol=1e-7)
    assert normalize_regularize(g).dtype == DTYPE


def test_normalize_regularize_zero_without_threshold_is_finite() -> None:
    out = normalize_regularize(torch.zeros(3, 3, device=DEVICE, dtype=DTYPE), norm_eps=0.0)
    torch.testing.assert_close(out, 1e-4 * torch.eye(3, device=DEVICE, dtype=DTYPE))


# ----------------------------------------------------------------------------------------------
# Dual-cone projection and UPGrad / DualProj


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 16, 32])
def test_projection_kkt(m: int, dtype: torch.dtype) -> None:
    g = gramians(m, seed=m).to(DEVICE, dtype)
    gen = torch.Generator().manual_seed(100 + m)
    # Rows of diag(pref) as UPGrad projects them, plus general vectors of both signs.
    u = torch.cat(
        [
            torch.diag(torch.rand(m, generator=gen, dtype=F64)),
            torch.randn(3, m, generator=gen, dtype=F64),
        ]
    )
    u = u.to(DEVICE, dtype)
    v = dual_cone_projection(u, g)
    assert v.shape == (len(g), m + 3, m)
    assert v.dtype == dtype
    assert v.device == g.device
    for gi, vi in zip(g, v, strict=True):
        residual = projection_kkt(reference_normalize(gi, 1e-4, 1e-4), u, vi)
        assert residual <= KKT_TOL[dtype]


@pytest.mark.parametrize("m", [128, 256])
def test_projection_kkt_large(m: int) -> None:
    gen = torch.Generator().manual_seed(m)
    j = jacobian("low_rank" if m == 128 else "conflict", m, gen).to(DEVICE)
    g = j @ j.T
    # All m rows of UPGrad's diag(1/m) for m = 128; 16 of them for m = 256, to keep it quick.
    step = 1 if m == 128 else m // 16
    u = torch.diag(torch.full((m,), 1.0 / m, dtype=F64, device=DEVICE))[::step]
    v = dual_cone_projection(u, g)
    assert projection_kkt(reference_normalize(g, 1e-4, 1e-4), u, v) <= 1e-6


def _per_sample_mlp_gramian(m: int) -> Tensor:
    """Per-sample Gramian of an MLP on ``m`` samples, in float64 on ``DEVICE``: gradients so
    nearly colinear that the solver's Jacobi sweeps diverge and every problem starts from 0."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 1)).to(F64)
    x = torch.randn(m, 12, generator=gen, dtype=F64)
    y = torch.randn(m, generator=gen, dtype=F64)
    return reference_gramian((model,), (model(x).squeeze(1) - y) ** 2).detach().to(DEVICE)


def test_projection_kkt_on_per_sample_gramian_of_an_mlp() -> None:
    """A Gramian as IWRM sees it (per-sample gradients of an MLP, 96 samples): on these the
    warm start of the active-set method helps least, so they exercise its later iterations."""
    g = _per_sample_mlp_gramian(96)
    u = torch.diag(torch.full((96,), 1.0 / 96, dtype=F64, device=DEVICE))
    v = dual_cone_projection(u, g)
    assert projection_kkt(reference_normalize(g, 1e-4, 1e-4), u, v) <= 1e-6


@pytest.mark.parametrize("m", [1, 2, 3, 4, 6])
def test_upgrad_and_dualproj_match_enumeration(m: int) -> None:
    g = gramians(m, seed=10 + m)
    gen = torch.Generator().manual_seed(m)
    pref = torch.rand(m, generator=gen, dtype=F64) + 0.1
    upgrad = upgrad_weights(g.to(DEVICE), pref.to(DEVICE)).cpu()
    dualproj = dualproj_weights(g.to(DEVICE), pref.to(DEVICE)).cpu()
    for gi, w_up, w_dp in zip(g, upgrad, dualproj, strict=True):
        gn = reference_normalize(gi, 1e-4, 1e-4)
        expected_up = pref + sum(enumerate_lcp(gn, pref[i] * gn[i]) for i in range(m))
        expected_dp = pref + enumerate_lcp(gn, gn @ pref)
        scale = float(expected_up.abs().max())
        torch.testing.assert_close(w_up, expected_up, rtol=0, atol=1e-9 * scale)
        torch.testing.assert_close(w_dp, expected_dp, rtol=0, atol=1e-9 * scale)


@pytest.mark.parametrize("m", [2, 5, 16, 40])
def test_matches_torchjd_quadprog_if_installed(m: int) -> None:
    """TorchJD's quadprog-based weightings, when TorchJD happens to be installed (not a dependency)."""
    aggregation = pytest.importorskip("torchjd.aggregation")
    pytest.importorskip("quadprog")
    g = gramians(m, seed=30 + m, scales=[1e-10, 1.0, 1e15])
    up = upgrad_weights(g.to(DEVICE)).cpu()
    dp = dualproj_weights(g.to(DEVICE)).cpu()
    alphas = mgda_weights(g.to(DEVICE)).cpu()
    for gi, w_up, w_dp, alpha in zip(g, up, dp, alphas, strict=True):
        expected_up = aggregation.UPGradWeighting()(gi)
        expected_dp = aggregation.DualProjWeighting()(gi)
        torch.testing.assert_close(
            w_up, expected_up, rtol=0, atol=1e-7 * float(expected_up.abs().max())
        )
        torch.testing.assert_close(
            w_dp, expected_dp, rtol=0, atol=1e-7 * float(expected_dp.abs().max())
        )
        # Frank-Wolfe stops early (epsilon=1e-3): the exact solution can only be better.
        frank_wolfe = aggregation.MGDAWeighting()(gi)
        assert alpha @ gi @ alpha <= frank_wolfe @ gi @ frank_wolfe + 1e-7 * float(gi.trace())


def test_published_values() -> None:
    """TorchJD 0.18's values on J_base (float32), from the reference contract."""
    j = torch.tensor(J_BASE, device=DEVICE, dtype=DTYPE)
    g = j @ j.T
    expected = {
        upgrad_weights: [1.110921, 0.789431],
        dualproj_weights: [0.610921, 0.500000],
        mgda_weights: [0.6, 0.4],
    }
    for fn, values in expected.items():
        out = fn(g)
        assert out.dtype == DTYPE
        torch.testing.assert_close(
            out, torch.tensor(values, device=DEVICE, dtype=DTYPE), rtol=0, atol=1e-4
        )


def pcgrad_weights(gramian: Tensor) -> Tensor:
    """PCGrad's weights for two rows (TorchJD's PCGradWeighting; no randomness for m = 2)."""
    g = gramian.to(F64).cpu()
    weights = torch.zeros(2, dtype=F64)
    for i, j in [(0, 1), (1, 0)]:
        combination = torch.eye(2, dtype=F64)[i]
        inner = float(g[j] @ combination)
        if inner < 0:
            combination[j] -= inner / g[j, j]
        weights += combination
    return weights


def test_upgrad_sum_preference_is_pcgrad_for_two_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    jacobians = [torch.randn(2, 5, generator=gen, dtype=F64) for _ in range(20)]
    jacobians += [
        torch.tensor(J_BASE, dtype=F64),
        torch.tensor([[1.0, 0.0], [-2.0, 0.0]], dtype=F64),  # opposite: singular Gramian
        torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=F64),  # aligned: singular Gramian
        torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=F64),  # orthogonal
    ]
    tol = KKT_TOL[DTYPE]
    for j in jacobians:
        g = (j @ j.T).to(DEVICE, DTYPE)
        ones = torch.ones(2, device=DEVICE, dtype=DTYPE)
        w = upgrad_weights(g, ones, norm_eps=0.0, reg_eps=0.0)
        expected = pcgrad_weights(g)
        assert w.isfinite().all()
        torch.testing.assert_close(w.cpu().to(F64), expected, rtol=tol, atol=tol)


def test_unregularized_rank_deficient_projection() -> None:
    """reg_eps = 0 with singular Gramians (m > rank): finite, and the KKT conditions hold."""
    for seed, kind in enumerate(["low_rank", "rank_one", "duplicated"]):
        j = jacobian(kind, 12, torch.Generator().manual_seed(seed))[:, :3].to(DEVICE)
        g = j @ j.T
        u = torch.diag(torch.full((12,), 1.0 / 12, dtype=F64, device=DEVICE))
        v = dual_cone_projection(u, g, reg_eps=0.0)
        assert v.isfinite().all()
        assert projection_kkt(reference_normalize(g, 1e-4, 0.0), u, v) <= 1e-6


def test_batched_leading_dims_and_broadcast_pref() -> None:
    g = gramians(3, seed=1)[:6].reshape(2, 3, 3, 3).to(DEVICE, DTYPE)
    pref = torch.tensor([0.2, 0.3, 0.5], device=DEVICE, dtype=DTYPE)
    batched = upgrad_weights(g, pref)
    assert batched.shape == (2, 3, 3)
    looped = torch.stack([torch.stack([upgrad_weights(x, pref) for x in row]) for row in g])
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# MGDA


def mgda_kkt(gramian: Tensor, alpha: Tensor) -> float:
    """Worst KKT residual of ``min αᵀGα s.t. α ≥ 0, Σα = 1``, relative to ``tr(G)``."""
    g, a = gramian.to(F64), alpha.to(F64)
    scale = max(float(g.trace()), 1e-300)
    ga = g @ a
    lam = a @ ga
    residuals = [
        float((-a).clamp_min(0).max()),
        abs(float(a.sum()) - 1),
        float((lam - ga).clamp_min(0).max()) / scale,
        float((a * (ga - lam)).abs().max()) / scale,
    ]
    return max(residuals)


def test_float32_stage_identifies_then_float64_solves(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU, problems that the Jacobi sweeps did not help first run PDAS in float32; the
    float64 PDAS that follows gives KKT-exact results, equal to those without that stage."""
    g = _per_sample_mlp_gramian(96)
    u = torch.diag(torch.full((96,), 1.0 / 96, dtype=F64, device=DEVICE))
    calls: list[Tensor] = []
    stage = torchjd_func._qp._float32_stage

    def spy(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor, Tensor]:
        calls.append(args[5])  # which problems the sweeps helped
        return stage(*args, **kwargs)

    monkeypatch.setattr(torchjd_func._qp, "_float32_stage", spy)
    monkeypatch.setattr(torchjd_func._qp, "_FLOAT32_STAGE_MIN", 10**9)
    without = dual_cone_projection(u, g)
    assert not calls
    monkeypatch.setattr(torchjd_func._qp, "_FLOAT32_STAGE_MIN", 8)
    with_stage = dual_cone_projection(u, g)
    assert len(calls) == (1 if DEVICE.type == "cpu" else 0)
    if calls:
        assert not calls[0].any()  # the sweeps helped no problem: all went through float32
    assert projection_kkt(reference_normalize(g, 1e-4, 1e-4), u, with_stage) <= 1e-6
    torch.testing.assert_close(with_stage, without, rtol=1e-9, atol=1e-12)
    # Where the sweeps helped every problem (random gradients), the stage is skipped eagerly.
    calls.clear()
    random = gramians(32, seed=3, scales=[1.0])[0].to(DEVICE)
    eye = torch.eye(32, dtype=F64, device=DEVICE)
    v = dual_cone_projection(eye, random)
    assert not calls
    assert projection_kkt(reference_normalize(random, 1e-4, 1e-4), eye, v) <= 1e-6


def test_float32_stage_leaves_alone_what_float32_cannot_factor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A singular Gramian (duplicated gradients, no regularisation) gets float64's ridge, which
    float32 cannot resolve: the stage then takes no float32 step, and the result is unchanged."""
    gen = torch.Generator().manual_seed(5)
    j = torch.randn(10, 40, generator=gen, dtype=F64)
    g = torch.cat([j, j, -j, 2 * j]) @ torch.cat([j, j, -j, 2 * j]).T  # [40, 40], rank 10
    g = g.to(DEVICE)
    eye = torch.eye(40, dtype=F64, device=DEVICE)
    steps: list[torch.dtype] = []  # one per PDAS step outside the fallback
    reduced_solve = torchjd_func._qp._reduced_solve

    def spy(*args: Any, **kwargs: Any) -> Tensor:
        steps.append(args[0].dtype)
        return reduced_solve(*args, **kwargs)

    stages: list[Tensor] = []
    stage = torchjd_func._qp._float32_stage

    def stage_spy(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor, Tensor]:
        stages.append(args[5])
        return stage(*args, **kwargs)

    monkeypatch.setattr(torchjd_func._qp, "_reduced_solve", spy)
    monkeypatch.setattr(torchjd_func._qp, "_float32_stage", stage_spy)
    monkeypatch.setattr(torchjd_func._qp, "_FLOAT32_STAGE_MIN", 10**9)
    without = dual_cone_projection(eye, g, reg_eps=0.0)
    monkeypatch.setattr(torchjd_func._qp, "_FLOAT32_STAGE_MIN", 8)
    steps.clear()
    with_stage = dual_cone_projection(eye, g, reg_eps=0.0)
    if DEVICE.type == "cpu":
        assert len(stages) == 1
        assert not stages[0].all()  # some problems were left to the stage...
    assert torch.float32 not in steps  # ...which took no float32 step
    assert steps  # the float64 PDAS ran
    torch.testing.assert_close(with_stage, without, rtol=0, atol=0, equal_nan=True)


def test_float32_stage_gives_the_same_values_in_every_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the stage, the early exit ("cond"), fixed loops ("always") and vmap agree bit for bit,
    as they do without it (the stage's unconverged problems are frozen alike in every mode)."""
    monkeypatch.setattr(torchjd_func._qp, "_FLOAT32_STAGE_MIN", 8)
    g = normalize_regularize(_per_sample_mlp_gramian(40))
    c = torch.cat([g, -g[:3]])  # UPGrad's rows, and three more
    early_exit = solve_box_qp(g, c)
    fixed = solve_box_qp(g, c, fallback="always")
    torch.testing.assert_close(fixed, early_exit, rtol=0, atol=0)
    vmapped = torch.vmap(solve_box_qp, in_dims=(None, 0))(g, c[:, None])[:, 0]
    torch.testing.assert_close(vmapped, early_exit, rtol=1e-9, atol=1e-12)
    lcp_w = early_exit @ g + c
    assert (torch.minimum(early_exit, lcp_w).abs().amax() / c.abs().amax()) <= 1e-9


@pytest.mark.parametrize("stage_min", [8, 10**9])
def test_float32_stage_compiles_into_one_graph(
    monkeypatch: pytest.MonkeyPatch, stage_min: int
) -> None:
    """Compiled, the stage is a second :func:`torch.cond` (CPU only; skipped when the sweeps
    helped every problem), in the same single graph."""
    monkeypatch.setattr(torchjd_func._qp, "_FLOAT32_STAGE_MIN", stage_min)
    torch._dynamo.reset()
    conds: list[int] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
        conds.append(sum(getattr(n.target, "__name__", "") == "cond" for n in gm.graph.nodes))
        return gm.forward

    compiled = torch.compile(upgrad_weights, fullgraph=True, backend=backend)
    g = _per_sample_mlp_gramian(40)
    torch.testing.assert_close(compiled(g), upgrad_weights(g), rtol=1e-9, atol=1e-12)
    staged = stage_min <= 40 and DEVICE.type == "cpu"
    assert conds == [2 if staged else 1]
    torch._dynamo.reset()


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 16, 64])
def test_mgda_kkt(m: int) -> None:
    g = gramians(m, seed=20 + m)
    alphas = mgda_weights(g.to(DEVICE)).cpu()
    assert alphas.isfinite().all()
    for gi, alpha in zip(g, alphas, strict=True):
        assert mgda_kkt(gi, alpha) <= 1e-6


def test_mgda_zero_gramian_is_uniform() -> None:
    out = mgda_weights(torch.zeros(4, 4, device=DEVICE, dtype=DTYPE))
    torch.testing.assert_close(out, torch.full((4,), 0.25, device=DEVICE, dtype=DTYPE))


def test_mgda_rejects_nonpositive_regularization() -> None:
    with pytest.raises(ValueError, match="reg_eps"):
        mgda_weights(torch.eye(2), reg_eps=0.0)


# ----------------------------------------------------------------------------------------------
# The LCP solver itself: fallback, non-finite inputs


def test_fallback_solves_what_pdas_alone_cannot() -> None:
    g, c = hard_lcps(m=12, b=500, seed=0)
    g, c = g.to(DEVICE), c.to(DEVICE)
    pdas_only = solve_box_qp(g, c, ipm_iters=0, polish_iters=0)
    assert (natural_residual(g, c, pdas_only) > 1e-6).sum() >= 5  # cycling instances exist
    default = solve_box_qp(g, c)
    always = solve_box_qp(g, c, fallback="always")
    interior_point_only = solve_box_qp(g, c, pdas_iters=0)
    for y in (default, always, interior_point_only):
        assert natural_residual(g, c, y).max() <= 1e-9
    torch.testing.assert_close(default, always, rtol=0, atol=0)


@pytest.mark.parametrize("m", [1, 2, 3, 8, 17])
def test_reduced_solve_equals_direct_solves(m: int) -> None:
    """The size-``m // 2`` solve (through ``G_FF`` or ``(G⁻¹)_AA``) is ``G_FF y_F = −c_F``."""
    gen = torch.Generator().manual_seed(m)
    g = normalize_regularize(gramians(m, seed=m, scales=[1.0])[:3])
    c = torch.randn(3, 6, m, generator=gen, dtype=F64)
    free = torch.rand(3, 6, m, generator=gen) < torch.rand(3, 6, 1, generator=gen)
    free[0, 0], free[0, 1] = True, False  # all free, all bound
    expected = torch.zeros_like(c)
    for b, row in itertools.product(range(3), range(6)):
        f = free[b, row].nonzero()[:, 0]
        expected[b, row, f] = torch.linalg.solve(g[b][f][:, f], -c[b, row, f])
    g, c, free = g.to(DEVICE), c.to(DEVICE), free.to(DEVICE)
    inverse = _inverse(g)
    pair = _padded_pair(g, inverse)
    torch.testing.assert_close(
        _reduced_solve(g, inverse, pair, c, free).cpu(), expected, rtol=1e-9, atol=1e-11
    )
    rows = torch.rand(3, 6, generator=gen).to(DEVICE) < 0.5
    partial_rows = _reduced_solve(g, inverse, pair, c, free, rows)
    torch.testing.assert_close(
        partial_rows[rows].cpu(), expected[rows.cpu()], rtol=1e-9, atol=1e-11
    )


def test_solve_box_qp_matches_enumeration_with_shared_gramian() -> None:
    g, _ = hard_lcps(m=5, b=4, seed=1)
    c = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(2), dtype=F64)
    y = solve_box_qp(g.to(DEVICE), c.to(DEVICE)).cpu()
    for gi, ci, yi in zip(g, c, y, strict=True):
        expected = torch.stack([enumerate_lcp(gi, row) for row in ci])
        torch.testing.assert_close(yi, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("m", [1, 2, 3, 6])
def test_small_m_paths_match_enumeration(m: int) -> None:
    """m ≤ 2 (closed form) and m ≤ 6 (batched enumeration): random LCPs (any sign of c,
    ill-conditioned G) against the reference enumeration of this file."""
    g, _ = hard_lcps(m=m, b=50, seed=3)
    c = torch.randn(50, 3, m, generator=torch.Generator().manual_seed(4), dtype=F64)
    y = solve_box_qp(g.to(DEVICE), c.to(DEVICE)).cpu()
    for gi, ci, yi in zip(g, c, y, strict=True):
        expected = torch.stack([enumerate_lcp(gi, row) for row in ci])
        torch.testing.assert_close(yi, expected, rtol=1e-9, atol=1e-12)
        assert natural_residual(gi, ci, yi).max() <= 1e-9


@pytest.mark.parametrize("m", [7, 8])
def test_enumeration_used_on_cuda_matches_reference(m: int) -> None:
    """On CUDA devices the enumeration serves up to m = 8 (``_ENUMERATE_MAX_CUDA``); checked here
    on any device by calling it directly, on random LCPs with ill-conditioned G."""
    assert _ENUMERATE_MAX_CUDA >= m > _ENUMERATE_MAX
    g, _ = hard_lcps(m=m, b=6, seed=m)
    c = torch.randn(6, 2, m, generator=torch.Generator().manual_seed(5), dtype=F64)
    y = _enumerate_all(g.to(DEVICE), c.to(DEVICE)).cpu()
    for gi, ci, yi in zip(g, c, y, strict=True):
        expected = torch.stack([enumerate_lcp(gi, row) for row in ci])
        torch.testing.assert_close(yi, expected, rtol=1e-9, atol=1e-12)


def test_small_m_reads_nothing_on_the_host() -> None:
    limit = _ENUMERATE_MAX_CUDA if DEVICE.type == "cuda" else _ENUMERATE_MAX
    for m in (2, 3, limit):
        g = gramians(m, seed=m, scales=[1.0])[0].to(DEVICE, DTYPE)
        with NoHostSync():
            upgrad_weights(g)
    g = gramians(limit + 1, seed=1, scales=[1.0])[0].to(DEVICE, DTYPE)
    with pytest.raises(AssertionError, match="host synchronisation"), NoHostSync():
        upgrad_weights(g)  # PDAS reads whether it has converged


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA's synchronisation debug mode")
def test_small_m_does_not_synchronise_cuda() -> None:
    g = gramians(_ENUMERATE_MAX_CUDA, seed=2, scales=[1.0])[0].to(DEVICE, DTYPE)
    upgrad_weights(g)  # lazy initialisations first
    torch.cuda.set_sync_debug_mode("error")
    try:
        upgrad_weights(g)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_give_nan_only_where_they_are(bad: float) -> None:
    g = gramians(3, seed=5)[:3].to(DEVICE, DTYPE)
    poisoned = g.clone()
    poisoned[1, 0, 2] = bad
    for fn in (upgrad_weights, dualproj_weights, mgda_weights):
        out = fn(poisoned)
        assert out[1].isnan().all()
        torch.testing.assert_close(out[[0, 2]], fn(g[[0, 2]]))
    c = torch.ones(4, 3, device=DEVICE, dtype=DTYPE)
    c[2, 1] = bad
    y = solve_box_qp(g[0], c)
    assert y[2].isnan().all()
    assert y[[0, 1, 3]].isfinite().all()


# ----------------------------------------------------------------------------------------------
# Transforms: vmap, compile, autograd


# m = 4 takes the enumeration of the active sets, m = 9 the active-set method (PDAS) on any
# device (enumeration up to m = 6 on CPUs, m = 8 on CUDA devices).
SOLVER_PATHS = [4, 9]


@pytest.mark.parametrize("m", SOLVER_PATHS)
@pytest.mark.parametrize("fn", [upgrad_weights, dualproj_weights, mgda_weights])
def test_vmap_equals_loop(fn: Callable[[Tensor], Tensor], m: int) -> None:
    g = gramians(m, seed=7, scales=[1.0]).to(DEVICE, DTYPE)
    looped = torch.stack([fn(x) for x in g])
    torch.testing.assert_close(torch.vmap(fn)(g), looped, rtol=1e-6, atol=1e-7)


def test_vmap_over_changing_shapes() -> None:
    for m, b in [(3, 4), (4, 4), (8, 2), (9, 3)]:
        g = gramians(m, seed=m, scales=[1.0])[:b].to(DEVICE, DTYPE)
        torch.testing.assert_close(torch.vmap(upgrad_weights)(g), upgrad_weights(g))


def test_vmap_with_fallback_equals_loop() -> None:
    g, c = hard_lcps(m=12, b=500, seed=0)
    unconverged = natural_residual(g, c, solve_box_qp(g, c, ipm_iters=0, polish_iters=0)) > 1e-9
    # Some elements need the fallback, others not: under vmap it runs for all of them, in the
    # loop only where needed, and the converged ones must not change.
    index = torch.cat([unconverged.nonzero()[:2, 0], (~unconverged).nonzero()[:2, 0]])
    g, c = g[index].to(DEVICE), c[index].to(DEVICE)
    looped = torch.stack([solve_box_qp(gi, ci) for gi, ci in zip(g, c, strict=True)])
    torch.testing.assert_close(torch.vmap(solve_box_qp)(g, c), looped, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("m", SOLVER_PATHS)
@pytest.mark.parametrize("fn", [upgrad_weights, dualproj_weights, mgda_weights])
def test_compile_fullgraph_without_recompile(fn: Callable[[Tensor], Tensor], m: int) -> None:
    """Dynamo captures the whole function in one graph, reused for new data of the same shape."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    g = gramians(m, seed=8, scales=[1.0]).to(DEVICE, DTYPE)
    for x in (g[0], g[1]):
        torch.testing.assert_close(compiled(x), fn(x), rtol=1e-6, atol=1e-7)
    assert counter.frame_count == 1


@pytest.mark.parametrize("loop", ["while_loop", "unroll"])
def test_compiled_pdas_loop_knob(monkeypatch: pytest.MonkeyPatch, loop: str) -> None:
    """``_COMPILED_LOOP`` picks a ``while_loop`` or unrolled steps under compile: same values."""
    monkeypatch.setattr(torchjd_func._qp, "_COMPILED_LOOP", loop)
    torch._dynamo.reset()
    found: set[str] = set()

    def backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
        found.update(str(getattr(n.target, "__name__", "")) for n in gm.graph.nodes)
        return gm.forward

    compiled = torch.compile(upgrad_weights, fullgraph=True, backend=backend)
    g = gramians(9, seed=10, scales=[1.0]).to(DEVICE, DTYPE)
    for x in (g[0], g[1]):
        torch.testing.assert_close(compiled(x), upgrad_weights(x), rtol=1e-6, atol=1e-7)
    assert ("while_loop" in found) == (loop == "while_loop")
    assert "cond" in found
    torch._dynamo.reset()


def test_compile_dynamic_shapes() -> None:
    """One graph for several m with dynamic=True."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(upgrad_weights, fullgraph=True, backend=counter, dynamic=True)
    for m in (9, 11):
        x = gramians(m, seed=m, scales=[1.0])[0].to(DEVICE, DTYPE)
        torch.testing.assert_close(compiled(x), upgrad_weights(x), rtol=1e-6, atol=1e-7)
    assert counter.frame_count == 1


@pytest.mark.parametrize("m", SOLVER_PATHS)
@pytest.mark.filterwarnings("ignore:.*_prims_common.check.*:FutureWarning")
def test_compile_inductor_equals_eager(m: int) -> None:
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(upgrad_weights, fullgraph=True, backend=counter)
    g = gramians(m, seed=9, scales=[1.0]).to(DEVICE, DTYPE)
    for x in (g[2], g[3]):
        torch.testing.assert_close(compiled(x), upgrad_weights(x), rtol=1e-6, atol=1e-7)
    assert counter.frame_count == 1


def test_gradients_match_finite_differences() -> None:
    gen = torch.Generator().manual_seed(3)
    for m in (3, 8):  # enumeration, PDAS
        j = torch.randn(m, m + 1, generator=gen, dtype=F64)
        j[:, 0] -= 2.0
        j[0] *= -1  # a conflict, so that some constraints are active
        j = j.to(DEVICE)
        for fn in (upgrad_weights, dualproj_weights, mgda_weights):
            x0 = j.clone().requires_grad_()
            assert torch.autograd.gradcheck(
                lambda x, fn=fn: fn(x @ x.T, differentiable=True), (x0,)
            )


def test_no_grad_values_equal_grad_values() -> None:
    g = gramians(4, seed=11, scales=[1.0])[2].to(DEVICE)
    with torch.no_grad():
        expected = upgrad_weights(g)
    out = upgrad_weights(g.clone().requires_grad_(), differentiable=True)
    assert out.requires_grad
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=0)
