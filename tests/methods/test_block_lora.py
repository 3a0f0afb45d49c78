"""Block-LoRA: one shared down-projection block for n input chunks (Zhou et al. 2025)."""

import math

import pytest
import torch
from torch import nn

import paretune
from paretune.core.host import Host


def _delta(model):
    return next(m for m in model.modules() if isinstance(m, Host)).deltas["default"]


@pytest.mark.parametrize("d_in, d_out, blocks", [(8, 16, 4), (16, 8, 2), (12, 12, 5), (30, 7, 8), (7, 3, 7)])
def test_count_and_shapes(d_in, d_out, blocks):
    model = nn.Sequential(nn.Linear(d_in, d_out))
    paretune.adapt(model, "block-lora", r=3, blocks=blocks, targets=["0"])
    d = _delta(model)
    assert tuple(d.A.shape) == (3, math.ceil(d_in / blocks)) and tuple(d.B.shape) == (d_out, 3)
    c = paretune.count(model)
    assert c["trainable"] == c["formula"] == 3 * (math.ceil(d_in / blocks) + d_out)
    assert c["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("d_in, blocks", [(12, 4), (10, 3), (5, 1)])
def test_sum_of_chunks_equals_the_shared_block_matrix(d_in, blocks):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, 6))
    paretune.adapt(model, "block-lora", r=2, alpha=3.0, blocks=blocks, targets=["0"])
    d = _delta(model)
    with torch.no_grad():
        d.B.normal_()
    x = torch.randn(4, d_in)
    chunk = math.ceil(d_in / blocks)
    full_a = torch.cat([d.A] * blocks, dim=1)[:, :d_in]  # every column block is the shared A_s
    for k in range(blocks):
        assert torch.equal(full_a[:, k * chunk:(k + 1) * chunk], d.A[:, : min(chunk, d_in - k * chunk)])
    want = model[0].base(x) + 1.5 * x @ (d.B @ full_a).T
    torch.testing.assert_close(model(x), want)
    torch.testing.assert_close(d.delta_weight(), 1.5 * d.B @ full_a)


def test_starts_at_the_base_and_exports_as_lora(tmp_path, make_llama, llama_batch):
    model = make_llama()
    want = model(llama_batch).logits
    paretune.adapt(model, "block-lora", r=4, blocks=8, targets=["q_proj", "v_proj"])
    torch.testing.assert_close(model(llama_batch).logits, want)
    for h in (m for m in model.modules() if isinstance(m, Host)):
        with torch.no_grad():
            h.deltas["default"].B.normal_(std=0.1)
    adapted = model(llama_batch).logits
    paretune.export_peft(model, tmp_path / "peft")
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(make_llama(), tmp_path / "peft")
    torch.testing.assert_close(peft_model(llama_batch).logits, adapted, atol=1e-5, rtol=1e-4)


def test_too_many_blocks_is_a_clear_error():
    with pytest.raises(paretune.ConfigError, match="blocks=9 exceeds d_in=8"):
        paretune.adapt(nn.Sequential(nn.Linear(8, 4)), "block-lora", r=4, blocks=9, targets=["0"])
    with pytest.raises(paretune.ConfigError, match="blocks"):
        paretune.adapt(nn.Sequential(nn.Linear(8, 4)), "block-lora", blocks=0, targets=["0"])
