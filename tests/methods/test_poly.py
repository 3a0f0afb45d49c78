"""Poly / MHR: routed mixtures of an inventory of LoRA modules, one routing per task.

Checked: PEFT's defaults and init, counts for every variant (per-layer and shared routing), the
output against a hand-written per-row formula, equality with PEFT's Poly on a tiny Llama with
several tasks in one batch (n_splits = 1 and > 1, evaluation and training routing, per-layer and
shared logits), save / load, gradients only where each variant trains, single-task merge, the
inventory copy (MHR-z, MHR-μ), and refused input (task id out of range, no task ids, a row count
that does not match, n_splits not dividing a layer, merging without a task)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import paretune
from paretune.errors import ConfigError, ParetuneError
from paretune.methods import poly
from paretune.methods.poly import PolyConfig, copy_inventory, task_ids

from layer_chain import assert_trainable_count, chain as train_mode_chain, deltas, left_unchanged, randomise

TASKS = [2, 0, 1]  # one task id per row of llama_batch3
LLAMA_TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def chain(seed: int = 0) -> nn.Sequential:
    """layer_chain's chain in evaluation mode (σ routing; training mode samples it)."""
    return train_mode_chain(seed).eval()


@pytest.fixture
def llama_batch3():
    g = torch.Generator().manual_seed(1)
    return torch.randint(2, 64, (3, 5), generator=g)


def small(**options) -> dict:
    return {"r": 2, "n_tasks": 3, "n_skills": 3, **options}


def reference_output(x: torch.Tensor, base_out: torch.Tensor, A, B, logits, tasks, h: int) -> torch.Tensor:
    """base_out + (1/r)·B_t A_t x per row, in float64, written with loops: for head k, rows of A_t's
    column block k are Σ_j w_kj A_j[:, block k], and B_t's row block k is Σ_j w_kj B_j[block k, :],
    with w_k = σ(Z_t,k) / (Σ σ(Z_t,k) + 1e-12)."""
    m, r, d_in = A.shape
    d_out = B.shape[1]
    out = base_out.double().clone()
    for row, t in enumerate(tasks):
        z = torch.sigmoid(logits[t].double().view(h, m))
        w = z / (z.sum(-1, keepdim=True) + 1e-12)
        a = torch.zeros(r, d_in, dtype=torch.float64)
        b = torch.zeros(d_out, r, dtype=torch.float64)
        bi, bo = d_in // h, d_out // h
        for k in range(h):
            for j in range(m):
                a[:, k * bi:(k + 1) * bi] += w[k, j] * A[j, :, k * bi:(k + 1) * bi].double()
                b[k * bo:(k + 1) * bo, :] += w[k, j] * B[j, k * bo:(k + 1) * bo, :].double()
        out[row] += (x[row].double() @ a.T @ b.T) / r
    return out


# -- config, counts, init ----------------------------------------------------------------------

def test_defaults_are_peft_s():
    from peft import PolyConfig as PeftPolyConfig

    ours, theirs = PolyConfig(), PeftPolyConfig()
    for option in ("r", "n_tasks", "n_skills", "n_splits", "poly_type", "init_weights"):
        assert getattr(ours, option) == getattr(theirs, option), option
    assert (ours.train, ours.share_router, ours.default_task) == ("all", False, None)


@pytest.mark.parametrize("train,share,per_layer,shared", [
    ("all", False, lambda s, d: 3 * 2 * s + 3 * 2 * 3, 0),
    ("all", True, lambda s, d: 3 * 2 * s, 3 * 2 * 3),
    ("routing", False, lambda s, d: 3 * 2 * 3, 0),
    ("routing", True, lambda s, d: 0, 3 * 2 * 3),
    ("inventory", False, lambda s, d: 3 * 2 * s, 0),
    ("inventory", True, lambda s, d: 3 * 2 * s, 0),
])
def test_counts_per_variant(train, share, per_layer, shared):
    """m·r·(d_in + d_out) per layer for the inventory, T·h·m for the logits (per layer, or once)."""
    model = chain()
    paretune.adapt(model, "poly", targets=["0", "1", "3"], n_splits=2, train=train, share_router=share,
                   **small())
    shapes = [(16, 8), (8, 16), (12, 12)]  # (d_out, d_in)
    expected = sum(per_layer(d_in + d_out, None) for d_out, d_in in shapes) + shared
    assert_trainable_count(model, expected)


def test_init_follows_peft():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(400, 200))
    paretune.adapt(model, "poly", targets="all-linear", r=4, n_tasks=5, n_skills=3, n_splits=4)
    d = deltas(model)["0"]
    assert d.A.shape == (3, 4, 400) and d.B.shape == (3, 200, 4) and d.router.shape == (5, 12)
    bound = 1 / (400 / 4) ** 0.5  # kaiming-uniform(a=√5) over one head's 100 inputs
    assert d.A.abs().max() <= bound and d.A.abs().max() > 0.95 * bound
    assert torch.count_nonzero(d.B) == 0
    assert d.router.abs().max() <= 1e-3 and d.router.abs().max() > 0.9e-3
    paretune.adapt(model, "poly", name="rand", targets="all-linear", r=4, init_weights=False)
    b = model[0].deltas["rand"].B
    assert b.abs().max() <= 0.5 and b.abs().max() > 0.45  # U(-1/√r, 1/√r)


# -- the formula and PEFT ----------------------------------------------------------------------

@pytest.mark.parametrize("h", [1, 2])
def test_output_matches_the_per_row_formula(h):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 6)).eval()
    model = nn.Sequential(nn.Linear(8, 6)).eval()
    model.load_state_dict(base.state_dict())
    paretune.adapt(model, "poly", targets="all-linear", n_splits=h, **small())
    randomise(model, scale=0.5)
    d = deltas(model)["0"]
    x = torch.randn(4, 3, 8)
    tasks = [1, 0, 2, 1]
    with torch.no_grad(), task_ids(model, tasks):
        got = model(x)
    ref = reference_output(x, base(x), d.A, d.B, d.router, tasks, h)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


def _peft_pair(make_llama, h: int, share: bool, train_mode: bool = False):
    """Ours and PEFT's Poly on the same tiny Llama, with the same random A, B and logits."""
    from peft import PolyConfig as PeftPolyConfig, get_peft_model

    ours = make_llama()
    paretune.adapt(ours, "poly", targets=LLAMA_TARGETS, n_splits=h, share_router=share, **small())
    randomise(ours, scale=0.3)
    theirs = get_peft_model(make_llama(), PeftPolyConfig(r=2, n_tasks=3, n_skills=3, n_splits=h,
                                                         target_modules=LLAMA_TARGETS))
    ds = deltas(ours)
    assert len(ds) == 2 * len(LLAMA_TARGETS)
    with torch.no_grad():
        for name, d in ds.items():
            layer = theirs.base_model.model.get_submodule(name)
            bi, bo = d.d_in // h, d.d_out // h
            for k in range(h):  # PEFT: A (h, m, d_in/h, r), B (h, m, r, d_out/h)
                layer.poly_lora_A["default"][k] = d.A[:, :, k * bi:(k + 1) * bi].transpose(1, 2)
                layer.poly_lora_B["default"][k] = d.B[:, k * bo:(k + 1) * bo, :].transpose(1, 2)
            layer.poly_router["default"].module_logits.copy_(d.logits)
    ours.train(train_mode)
    theirs.train(train_mode)
    return ours, theirs


@pytest.mark.parametrize("h,share", [(1, False), (2, False), pytest.param(4, True, marks=pytest.mark.slow)])
def test_equals_peft_with_several_tasks_in_a_batch(make_llama, llama_batch3, h, share):
    ours, theirs = _peft_pair(make_llama, h, share)
    with torch.no_grad():
        with task_ids(ours, TASKS):
            got = ours(llama_batch3).logits
        want = theirs.base_model(input_ids=llama_batch3, task_ids=torch.tensor(TASKS)).logits
        base = make_llama()(llama_batch3).logits
    assert (want - base).abs().max() > 1e-2  # the adapters really change the outputs
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # every task differs: a row routed as another task gives other logits
    with torch.no_grad(), task_ids(ours, [0, 0, 0]):
        assert (ours(llama_batch3).logits - got).abs().max() > 1e-4


def test_equals_peft_in_training_mode_with_the_same_noise(make_llama, llama_batch3):
    """Training routing samples a relaxed Bernoulli (temperature 1) as PEFT: the same seed, the same
    draws in the same layer order, the same outputs."""
    ours, theirs = _peft_pair(make_llama, 2, False, train_mode=True)
    torch.manual_seed(11)
    with task_ids(ours, TASKS):
        got = ours(llama_batch3).logits
    torch.manual_seed(11)
    want = theirs.base_model(input_ids=llama_batch3, task_ids=torch.tensor(TASKS)).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.manual_seed(12)
    with task_ids(ours, TASKS):
        assert (ours(llama_batch3).logits - got).abs().max() > 1e-5  # routing is sampled


def test_default_targets_are_peft_s(make_llama):
    model = make_llama()
    paretune.adapt(model, "poly", r=2)
    assert sorted({n.rsplit(".", 1)[1] for n in deltas(model)}) == ["q_proj", "v_proj"]


# -- save / load, gradients --------------------------------------------------------------------

@pytest.mark.parametrize("train,share", [("all", False), ("all", True), ("routing", False), ("inventory", False)])
def test_save_load_round_trip(tmp_path, train, share):
    model = chain()
    paretune.adapt(model, "poly", targets="all-linear", train=train, share_router=share, **small())
    with torch.no_grad():  # move everything the adapter holds, the frozen inventory too
        for d in deltas(model).values():
            d.A.normal_()
            d.B.normal_()
    randomise(model, seed=4)
    x = torch.randn(3, 8)
    with torch.no_grad(), task_ids(model, [1, 2, 0]):
        ref = model(x)
    paretune.save(model, tmp_path / "a")
    fresh = chain()
    paretune.load(fresh, tmp_path / "a")
    with torch.no_grad(), task_ids(fresh, [1, 2, 0]):
        torch.testing.assert_close(fresh(x), ref, atol=0, rtol=0)
    assert paretune.count(fresh)["stored_bytes"] == paretune.count(model)["stored_bytes"]


@pytest.mark.parametrize("train,share,grads,frozen", [
    ("all", False, ("A", "B", "router"), ()),
    ("all", True, ("A", "B", "bank.router"), ()),
    ("routing", False, ("router",), ("A", "B")),
    ("inventory", False, ("A", "B"), ()),
])
def test_gradients_only_where_the_variant_trains(make_llama, llama_batch3, train, share, grads, frozen):
    model = make_llama()
    paretune.adapt(model, "poly", n_splits=2, train=train, share_router=share, **small())
    with torch.no_grad():
        for d in deltas(model).values():
            d.B.normal_()  # B = 0 would give A no gradient
    model.train()
    with task_ids(model, TASKS):
        model(llama_batch3).logits.square().mean().backward()
    for n, p in model.named_parameters():
        if ".deltas." in n:
            assert n.endswith(grads) and p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert not p.requires_grad and p.grad is None, n
    for d in deltas(model).values():
        for t in frozen:
            assert not getattr(d, t).requires_grad
        if train == "inventory":
            assert d.logits is None


def test_routing_gradient_reaches_only_the_rows_tasks(make_llama, llama_batch3):
    """Task 1 is in no row: its logits get a zero gradient, the others do not."""
    model = make_llama()
    paretune.adapt(model, "poly", **small())
    with torch.no_grad():
        for d in deltas(model).values():
            d.B.normal_()
    with task_ids(model, [0, 2, 2]):
        model(llama_batch3).logits.square().mean().backward()
    for d in deltas(model).values():
        g = d.router.grad
        assert g[1].abs().sum() == 0 and g[0].abs().sum() > 0 and g[2].abs().sum() > 0


# -- variants and inventories ------------------------------------------------------------------

def test_mhr_mu_routes_every_task_through_the_average():
    model = chain()
    paretune.adapt(model, "poly", targets=["0"], train="inventory", n_splits=2, **small())
    randomise(model)
    d = deltas(model)["0"]
    x = torch.randn(3, 8)
    with torch.no_grad():
        with task_ids(model, [0, 1, 2]):
            out = model[0](x)
        want = model[0].base(x) + x @ (d.B.mean(0) @ d.A.mean(0)).T / 2
        model.train()  # no sampling in training either: the routing is fixed
        with task_ids(model, [2, 2, 0]):
            torch.testing.assert_close(model[0](x), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_copy_inventory_for_mhr_z_and_mhr_mu():
    pre = chain()
    paretune.adapt(pre, "poly", targets=["0", "1"], **small())
    randomise(pre)
    z = chain()  # MHR-z: a new task, only its routing trains, over the pre-trained modules
    paretune.adapt(z, "poly", targets=["0", "1"], train="routing", **small(n_tasks=1))
    copy_inventory(z, pre)
    for n, d in deltas(z).items():
        assert torch.equal(d.A, deltas(pre)[n].A) and torch.equal(d.B, deltas(pre)[n].B)
    mu = chain()  # MHR-μ: every module set to the average of the pre-trained ones
    paretune.adapt(mu, "poly", targets=["0", "1"], train="inventory", **small(n_skills=2))
    copy_inventory(mu, pre, average=True)
    for n, d in deltas(mu).items():
        for j in range(2):
            torch.testing.assert_close(d.A[j], deltas(pre)[n].A.mean(0))
            torch.testing.assert_close(d.B[j], deltas(pre)[n].B.mean(0))
    other = chain()
    paretune.adapt(other, "poly", targets=["0"], **small(n_skills=2))
    before = deltas(other)["0"].A.clone()
    with pytest.raises(ParetuneError, match="n_skills"):
        copy_inventory(other, pre)
    assert torch.equal(deltas(other)["0"].A, before)
    wrong_r = chain()
    paretune.adapt(wrong_r, "poly", targets=["0"], **small(r=3))
    with pytest.raises(ParetuneError, match="same rank"):
        copy_inventory(wrong_r, pre)


def test_mhr_mu_copies_stay_equal_under_adam():
    """After copy_inventory(average=True) the m modules get equal gradients, so Adam keeps them equal."""
    pre = chain()
    paretune.adapt(pre, "poly", targets=["0"], **small())
    randomise(pre)
    mu = chain()
    paretune.adapt(mu, "poly", targets=["0"], train="inventory", **small())
    copy_inventory(mu, pre, average=True)
    opt = torch.optim.Adam([p for p in mu.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        mu(torch.randn(4, 8)).square().mean().backward()
        opt.step()
    d = deltas(mu)["0"]
    assert not torch.equal(d.A[0], deltas(pre)["0"].A.mean(0))  # it trained
    for j in (1, 2):
        torch.testing.assert_close(d.A[j], d.A[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(d.B[j], d.B[0], atol=1e-6, rtol=0)


def test_merge_folds_in_the_default_task_only():
    model = chain()
    paretune.adapt(model, "poly", targets=["0", "1", "2", "3", "4"], default_task=2, n_splits=2, **small())
    randomise(model, scale=0.3)
    x = torch.randn(3, 8)
    with torch.no_grad():
        unmerged = model(x)  # every row task 2
        with task_ids(model, [2, 2, 2]):
            torch.testing.assert_close(model(x), unmerged, atol=0, rtol=0)
        paretune.merge(model)
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
        with task_ids(model, [2, 2, 2]):
            torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
        with pytest.raises(ParetuneError, match="merged for task 2"):
            with task_ids(model, [0, 2, 2]):
                pass
        paretune.unmerge(model)
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)


def test_merge_without_a_task_is_refused_and_changes_nothing():
    model = chain()
    paretune.adapt(model, "poly", targets="all-linear", **small())
    randomise(model)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ConfigError, match="default_task"):
        paretune.merge(model)
    assert not paretune.adapters(model)["default"].merged
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_per_sample_with_a_default_task():
    """per_sample runs the adapter on its own rows; with default_task those rows need no ids. Task
    ids for the whole batch do not fit the subset, which is refused."""
    model = chain()
    paretune.adapt(model, "poly", targets=["0"], default_task=1, **small())
    randomise(model)
    x = torch.randn(3, 8)
    with torch.no_grad():
        alone = model(x)
        with paretune.per_sample(model, ["default", None, "default"]):
            mixed = model(x)
        paretune.set_active(model, [])
        base = model(x)
    torch.testing.assert_close(mixed[[0, 2]], alone[[0, 2]], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed[1], base[1], atol=0, rtol=0)
    paretune.set_active(model, ["default"])
    with pytest.raises(ParetuneError, match="3 task ids"), task_ids(model, [0, 1, 2]):
        with paretune.per_sample(model, ["default", None, "default"]):
            model(x)


# -- refused input -----------------------------------------------------------------------------

def test_no_task_ids_is_an_error_and_task_ids_nest():
    model = chain()
    paretune.adapt(model, "poly", targets=["0"], **small())
    randomise(model)
    x = torch.randn(2, 8)
    with pytest.raises(ParetuneError, match="no task ids"):
        model(x)
    with torch.no_grad(), task_ids(model, [0, 1]):
        outer = model(x)
        with task_ids(model, torch.tensor([1, 1])):
            inner = model(x)
        torch.testing.assert_close(model(x), outer, atol=0, rtol=0)
    torch.testing.assert_close(inner[1], outer[1], atol=0, rtol=0)
    assert (inner[0] - outer[0]).abs().max() > 1e-4
    with pytest.raises(ParetuneError, match="no task ids"):
        model(x)  # the ids are gone after the block


@pytest.mark.parametrize("ids,match", [([0, 3], "out of range"), ([-1, 0], "out of range"),
                                       ([], "non-empty"), ([0.5, 1.0], "integers"), ([[0, 1]], "1-D")])
def test_bad_task_ids_are_refused(ids, match):
    model = chain()
    paretune.adapt(model, "poly", targets=["0"], **small())
    with pytest.raises(ConfigError, match=match):
        with task_ids(model, ids):
            pass


def test_task_ids_must_match_the_rows_and_name_a_poly_adapter():
    model = chain()
    paretune.adapt(model, "poly", targets=["0"], **small())
    paretune.adapt(model, "lora", name="other", targets=["1"], r=2)
    with pytest.raises(ParetuneError, match="3 rows"), task_ids(model, [0, 1]):
        model(torch.randn(3, 8))
    with pytest.raises(ParetuneError, match="not poly"), task_ids(model, [0], name="other"):
        pass
    with pytest.raises(ParetuneError, match="no adapter named"), task_ids(model, [0], name="nope"):
        pass


def test_n_splits_must_divide_every_layer_and_the_model_stays_as_it_was():
    model = chain()  # layer 5 is 30 -> 7: 7 is odd; layer 2 is 8 -> 12
    x = torch.randn(2, 8)
    with left_unchanged(model, x), pytest.raises(ConfigError, match="n_splits=2 must divide"):
        paretune.adapt(model, "poly", targets="all-linear", n_splits=2, **small())
    with left_unchanged(model, x), pytest.raises(ConfigError, match="8 -> 12"):
        paretune.adapt(model, "poly", targets=["2"], n_splits=3, **small())  # 3 divides 12, not 8
    paretune.adapt(model, "poly", targets=["2"], n_splits=4, **small())  # 4 divides both
    assert deltas(model)["2"].A.shape == (3, 2, 8)


@pytest.mark.parametrize("bad", [{"r": 0}, {"n_tasks": 0}, {"n_skills": 0}, {"n_splits": 0},
                                 {"poly_type": "xpoly"}, {"train": "routes"}, {"share_router": 1},
                                 {"default_task": 3, "n_tasks": 3}, {"default_task": -1}, {"init_weights": "no"}])
def test_bad_options_are_refused(bad):
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ConfigError):
        paretune.adapt(model, "poly", **bad)
    assert isinstance(model[0], nn.Linear) and paretune.adapters(model) == {}


def test_unknown_architecture_has_no_default_targets():
    from paretune.errors import TargetError

    with pytest.raises(TargetError, match="targets="):
        poly.default_targets(nn.Sequential(nn.Linear(4, 4)))
