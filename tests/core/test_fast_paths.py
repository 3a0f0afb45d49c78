"""Every fast path against its reference: each kernel of paretune.core.fast against its plain
twin, the fused low-rank forward against the dense ΔW, the gathered (BGMV) per-sample path against
the loop over adapters, the fused training node against separate ops, and hot-swapping adapter
weights into a compiled model without recompiling."""

import pytest
import torch

import paretune
from paretune.core import fast
from paretune.core.host import Host
from paretune.core.serving import SamplePlan
from paretune.errors import AdapterFileError


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("inplace", [False, True])
def test_add_low_rank_equals_its_reference(inplace):
    x, out, a, b = _rand(3, 4, 10, seed=1), _rand(3, 4, 7, seed=2), _rand(2, 10, seed=3), _rand(7, 2, seed=4)
    want = fast.add_low_rank_reference(x, out, a, b, 0.7)
    got = fast.add_low_rank(x, out.clone(), a, b, 0.7, inplace=inplace)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("bias", [True, False])
def test_fused_lora_linear_equals_its_reference_forward_and_backward(bias):
    def leaves():
        x = _rand(2, 5, 10, seed=1).requires_grad_()
        w, b = _rand(7, 10, seed=2), (_rand(7, seed=3) if bias else None)
        a, up = _rand(3, 10, seed=4).requires_grad_(), _rand(7, 3, seed=5).requires_grad_()
        return x, w, b, a, up

    got_in = leaves()
    got = fast.FusedLoraLinear.apply(*got_in, 1.5)
    want_in = leaves()
    want = fast.lora_linear_reference(*want_in, 1.5)
    torch.testing.assert_close(got, want)
    g = _rand(*got.shape, seed=6)
    got.backward(g)
    want.backward(g)
    for i in (0, 3, 4):  # x, A, B
        torch.testing.assert_close(got_in[i].grad, want_in[i].grad)


@pytest.mark.parametrize("inplace", [False, True])
def test_gathered_low_rank_equals_its_reference(inplace):
    x, out = _rand(4, 3, 10, seed=1), _rand(4, 3, 7, seed=2)
    a, b = _rand(3, 2, 10, seed=3), _rand(3, 7, 2, seed=4)
    a[0], b[0] = 0, 0  # slot 0: no adapter
    slot = torch.tensor([2, 0, 1, 2])
    want = fast.gathered_low_rank_reference(x, out, a, b, slot)
    torch.testing.assert_close(fast.gathered_low_rank(x, out.clone(), a, b, slot, inplace=inplace), want)
    torch.testing.assert_close(want[1], out[1])


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _hosts(model):
    return [m for m in model.modules() if isinstance(m, Host)]


@pytest.mark.parametrize("maker", ["make_llama", "make_gpt2"])
def test_fused_lora_forward_equals_the_dense_reference(request, maker, perturb, ids):
    model = request.getfixturevalue(maker)()
    paretune.adapt(model, "lora", r=3, alpha=5.0)
    perturb(model)
    for host in _hosts(model):
        x = torch.randn(2, 5, host.geometry.d_in)
        dw = host.deltas["default"].delta_weight()
        w = host.geometry.matrix() + dw
        bias = host.geometry.bias
        want = x @ w.T + (bias if bias is not None else 0)
        with torch.no_grad():
            torch.testing.assert_close(host(x), want, atol=1e-5, rtol=1e-4)


def _mixed_adapters(make_llama, perturb):
    model = make_llama()
    specs = [("a", "lora", dict(r=2, targets=["q_proj", "v_proj"])),
             ("b", "lora", dict(r=4, alpha=2.0, rslora=True)),
             ("c", "pissa", dict(r=2, targets=["q_proj", "up_proj"])),
             ("d", "vera", dict(r=4)),
             ("e", "nola", dict(r=2, k=5)),
             ("f", "hydra", dict(r=2, targets=["o_proj"]))]  # no LoRA form: the loop serves it
    for i, (name, method, opts) in enumerate(specs):
        paretune.adapt(model, method, name=name, **opts)
        perturb(model, seed=20 + i)
    return model


NAMES = [["a", "b", "c"], ["c", None, "d", "e", "a", "b"], ["e", "e", None], ["f", "a", "c"], [None, None, None]]


@pytest.mark.parametrize("names", NAMES)
def test_gathered_per_sample_equals_the_loop(make_llama, perturb, names, monkeypatch):
    model = _mixed_adapters(make_llama, perturb)
    ids = torch.randint(2, 50, (len(names), 6), generator=torch.Generator().manual_seed(3))
    calls = []
    original = SamplePlan.stacked

    def spy(self, host, x):
        out = original(self, host, x)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(SamplePlan, "stacked", spy)
    with paretune.per_sample(model, names):
        fast = _logits(model, ids)
    assert any(calls) or set(names) <= {None, "f"}
    monkeypatch.setattr(SamplePlan, "stacked", lambda self, host, x: None)
    with paretune.per_sample(model, names):
        loop = _logits(model, ids)
    torch.testing.assert_close(fast, loop, atol=1e-5, rtol=1e-4)
    # and both equal running each row with its adapter alone
    for i, n in enumerate(names):
        paretune.set_active(model, [] if n is None else [n])
        torch.testing.assert_close(fast[i:i + 1], _logits(model, ids[i:i + 1]), atol=1e-5, rtol=1e-4)


def test_gathered_path_follows_training_updates(make_llama, perturb):
    model = _mixed_adapters(make_llama, perturb)
    ids = torch.randint(2, 50, (3, 6), generator=torch.Generator().manual_seed(4))
    names = ["a", "b", None]
    with paretune.per_sample(model, names):
        before = _logits(model, ids)
    with torch.no_grad():
        for host in _hosts(model):
            if "a" in host.deltas:
                host.deltas["a"].B.add_(0.5)  # an optimizer step would do this in place
    with paretune.per_sample(model, names):
        after = _logits(model, ids)
    assert not torch.allclose(before[0], after[0]) and torch.allclose(before[1:], after[1:])


def test_per_sample_with_gradients_uses_the_loop(make_llama, perturb):
    model = make_llama()
    paretune.adapt(model, "lora", name="a", r=2)
    perturb(model)
    ids = torch.randint(2, 50, (2, 5))
    with paretune.per_sample(model, ["a", None]):
        model(input_ids=ids).logits.sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def _trained_adapter(make_llama, seed, tmp_path, **opts):
    model = make_llama()
    paretune.adapt(model, "lora", r=2, targets=["q_proj", "v_proj"], **opts)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    path = tmp_path / f"adapter-{seed}-{len(opts)}"
    paretune.save(model, path)
    return path, model


def test_hot_swap_into_a_compiled_model_does_not_recompile(make_llama, tmp_path, ids):
    first, _ = _trained_adapter(make_llama, 1, tmp_path)
    second, reference = _trained_adapter(make_llama, 2, tmp_path, init="gaussian")  # init differs: fine
    model = paretune.load(make_llama(), first)
    params = {n: p for n, p in model.named_parameters()}
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", dynamic=False)
    with torch.no_grad():
        compiled(input_ids=ids)
        with torch._dynamo.config.patch(error_on_recompile=True):
            paretune.hot_swap(model, second)
            got = compiled(input_ids=ids).logits
    torch.testing.assert_close(got, _logits(reference, ids), atol=1e-5, rtol=1e-4)
    assert all(p is params[n] for n, p in model.named_parameters())  # the same tensors, new values
    torch._dynamo.reset()


def test_hot_swap_refuses_what_does_not_fit(make_llama, tmp_path):
    base_path, _ = _trained_adapter(make_llama, 1, tmp_path)
    model = paretune.load(make_llama(), base_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    other_alpha, _ = _trained_adapter(make_llama, 2, tmp_path, alpha=4.0)
    with pytest.raises(AdapterFileError, match="alpha: 4.0 vs 8.0"):
        paretune.hot_swap(model, other_alpha)
    pissa = make_llama()
    paretune.adapt(pissa, "pissa", r=2, targets=["q_proj", "v_proj"])
    paretune.save(pissa, tmp_path / "pissa")
    with pytest.raises(AdapterFileError, match="same method"):
        paretune.hot_swap(model, tmp_path / "pissa")
    wider = make_llama()
    paretune.adapt(wider, "lora", r=2, targets=["q_proj"])
    paretune.save(wider, tmp_path / "wider")
    with pytest.raises(AdapterFileError, match="same targets"):
        paretune.hot_swap(model, tmp_path / "wider")
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("maker", ["make_llama", "make_gpt2"])
@pytest.mark.parametrize("method", ["lora", "pissa"])
def test_fused_training_path_equals_separate_ops(request, maker, method, perturb, ids, monkeypatch):
    from paretune.core.lowrank import LowRankDelta as LoraDelta

    def run():
        model = request.getfixturevalue(maker)()
        paretune.adapt(model, method, r=2, alpha=3.0)
        perturb(model, std=0.1)
        loss = model(input_ids=ids).logits.pow(2).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    taken = []
    original = LoraDelta.fused_forward
    monkeypatch.setattr(LoraDelta, "fused_forward", lambda self, x: taken.append(1) or original(self, x))
    fused_loss, fused_grads = run()
    assert taken
    monkeypatch.setattr(LoraDelta, "fused_forward", lambda self, x: None)
    loss, grads = run()
    torch.testing.assert_close(fused_loss, loss, atol=1e-6, rtol=1e-5)
    assert fused_grads.keys() == grads.keys() and grads
    for n in grads:
        torch.testing.assert_close(fused_grads[n], grads[n], atol=1e-6, rtol=1e-4, msg=n)


def test_fused_path_steps_aside_when_the_base_trains_or_has_hooks(make_llama):
    model = make_llama()
    paretune.adapt(model, "lora", r=2, targets=["q_proj"])
    delta = _hosts(model)[0].deltas["default"]
    x = torch.randn(2, 3, 16)
    assert delta.fused_forward(x) is not None
    with torch.no_grad():
        assert delta.fused_forward(x) is None  # inference has its own fused add
    handle = delta.geometry.base.register_forward_hook(lambda m, i, o: None)
    assert delta.fused_forward(x) is None
    handle.remove()
    base = delta.geometry.base
    base.forward = lambda inp: torch.nn.functional.linear(inp, base.weight)  # as accelerate's offload hooks do
    assert delta.fused_forward(x) is None
    del base.forward
    assert delta.fused_forward(x) is not None
    delta.geometry.weight.requires_grad_(True)
    assert delta.fused_forward(x) is None


def test_fast_paths_leave_an_output_a_hook_holds_alone(make_llama, perturb, ids):
    model = _mixed_adapters(make_llama, perturb)
    q = model.model.layers[0].self_attn.q_proj
    seen = []
    handle = q.base.register_forward_hook(lambda m, i, o: seen.append((o, o.clone())))
    with paretune.per_sample(model, ["a", "b", "c"]):
        _logits(model, ids)
    paretune.set_active(model, ["a"])
    _logits(model, ids)
    handle.remove()
    assert len(seen) == 2
    for held, copy in seen:
        assert torch.equal(held, copy)  # nobody wrote into the base's output after the hook saw it
