"""Whole-model merging: the streaming merge against a direct in-memory computation on tiny Llama
checkpoints, sharding, filters, dtypes, errors and atomic output (including SIGKILL mid-merge)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from paretune.errors import ConfigError, ParetuneError
from paretune.merging.methods import METHODS
from paretune.merging.models import (
    Checkpoint,
    ShardedWriter,
    merge_models,
    merge_state_dicts,
    name_filter,
    remove_stale_temp,
    resolve_dtype,
    tensor_seed,
)

OPTIONS = {
    "task_arithmetic": {},
    "weighted_average": {},
    "ties": {"density": 0.3},
    "dare_linear": {"density": 0.5, "seed": 7},
    "dare_ties": {"density": 0.5, "seed": 7},
    "pcb": {"ratio": 0.2},
}


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """base, a (sharded, 2+ files) and b (one file): a and b are the base plus seeded noise."""
    root = tmp_path_factory.mktemp("ckpts")
    m = _tiny_llama()
    m.save_pretrained(root / "base")
    (root / "base" / "tokenizer.json").write_text('{"who": "base"}')
    for i, (name, shard) in enumerate([("a", "20KB"), ("b", "5GB")]):
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        m.save_pretrained(root / name, max_shard_size=shard)
    (root / "b" / "tokenizer.json").write_text('{"who": "b"}')
    return {"base": root / "base", "a": root / "a", "b": root / "b", "root": root}


def _state(folder: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


def _reference(ckpts, method, weights, lam, params, select=lambda n: True):
    """Independent merge: whole state dicts in memory, METHODS called tensor by tensor."""
    base, inputs = _state(ckpts["base"]), [_state(ckpts["a"]), _state(ckpts["b"])]
    params = dict(params)
    seed = params.pop("seed", None)
    out = {}
    for name, b in base.items():
        if not select(name):
            out[name] = b
            continue
        kw = dict(params)
        if seed is not None:
            kw["generator"] = torch.Generator().manual_seed(tensor_seed(seed, name))
        tau = METHODS[method]([sd[name] - b for sd in inputs], weights=weights, **kw)
        out[name] = b + lam * tau
    return out


def test_sharded_input_is_sharded(ckpts):
    assert (ckpts["a"] / "model.safetensors.index.json").is_file()
    assert len(list(ckpts["a"].glob("model-*.safetensors"))) >= 2
    assert (ckpts["b"] / "model.safetensors").is_file()


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_streaming_equals_in_memory(ckpts, tmp_path, method):
    assert set(OPTIONS) == set(METHODS)
    weights = [0.7, 0.4]
    out = merge_models(ckpts["base"], [{"model": ckpts["a"], "weight": 0.7}, {"model": ckpts["b"], "weight": 0.4}],
                       method=method, out=tmp_path / "m", parameters=OPTIONS[method], lam=0.9, progress=False,
                       chunk_bytes=64)  # tiny blocks: entry-wise methods go row block by row block
    got, want = _state(out), _reference(ckpts, method, weights, 0.9, OPTIONS[method])
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype
        assert torch.equal(got[k], want[k]), (method, k)
    assert any(not torch.equal(got[k], _state(ckpts["base"])[k]) for k in got)
    # merge_state_dicts gives the same in memory
    mem = merge_state_dicts(_state(ckpts["base"]), [_state(ckpts["a"]), _state(ckpts["b"])], method=method,
                            weights=weights, lam=0.9, **OPTIONS[method])
    for k in want:
        assert torch.equal(mem[k], want[k]), (method, k)


def test_loads_with_transformers_and_sharded_output(ckpts, tmp_path):
    from transformers import AutoModelForCausalLM

    out = merge_models(ckpts["base"], [ckpts["a"], ckpts["b"]], method="ties", out=tmp_path / "m",
                       parameters={"density": 0.5}, shard_bytes=5000, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(files) >= 3 and sorted(set(index["weight_map"].values())) == files
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _state(out).values())
    model = AutoModelForCausalLM.from_pretrained(out)
    want = _reference(ckpts, "ties", None, 1.0, {"density": 0.5})
    sd = model.state_dict()
    for k, v in want.items():
        assert torch.equal(sd[k], v), k
    assert json.loads((out / "config.json").read_text()) == json.loads((ckpts["base"] / "config.json").read_text())
    assert (out / "generation_config.json").is_file()
    assert json.loads((out / "tokenizer.json").read_text()) == {"who": "base"}
    prov = json.loads((out / "paretune_merge.json").read_text())
    assert prov["method"] == "ties" and prov["parameters"] == {"density": 0.5}
    assert not (out / ".paretune-merge-pid").exists()


def test_filters_copy_the_rest_from_base(ckpts, tmp_path):
    include, exclude = ["re:layers\\.0\\.", "*embed_tokens*"], ["*.mlp.*"]
    sel = name_filter(include, exclude)
    out = merge_models(ckpts["base"], [ckpts["a"], ckpts["b"]], method="task_arithmetic", out=tmp_path / "m",
                       include=include, exclude=exclude, progress=False, tokenizer_from=ckpts["b"])
    got, base = _state(out), _state(ckpts["base"])
    want = _reference(ckpts, "task_arithmetic", None, 1.0, {}, select=sel)
    merged = [k for k in got if sel(k)]
    assert "model.embed_tokens.weight" in merged and "model.layers.0.self_attn.q_proj.weight" in merged
    assert "model.layers.0.mlp.up_proj.weight" not in merged and "model.layers.1.self_attn.q_proj.weight" not in merged
    for k in got:
        assert torch.equal(got[k], want[k])
        assert torch.equal(got[k], base[k]) == (k not in merged), k
    assert json.loads((out / "tokenizer.json").read_text()) == {"who": "b"}


def test_name_filter_rules():
    f = name_filter(["*.q_proj.*"], ["re:layers\\.1\\."])
    assert f("model.layers.0.self_attn.q_proj.weight") and not f("model.layers.1.self_attn.q_proj.weight")
    assert not f("model.layers.0.self_attn.k_proj.weight")
    assert name_filter()("anything")
    with pytest.raises(ConfigError, match="regular expression"):
        name_filter(["re:("])
    with pytest.raises(ConfigError, match="glob"):
        name_filter([3])


def _folder(path: Path, tensors: dict, model_type="llama", arch="LlamaForCausalLM") -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": [arch]}))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def test_non_float_copied_and_dtype(tmp_path):
    base = _folder(tmp_path / "base", {"w": torch.zeros(3, 4), "ids": torch.arange(5), "h": torch.ones(2, dtype=torch.bfloat16)})
    a = _folder(tmp_path / "a", {"w": torch.ones(3, 4), "ids": torch.arange(5) * 7, "h": torch.full((2,), 3.0, dtype=torch.bfloat16)})
    out = merge_models(base, [a, a], method="weighted_average", out=tmp_path / "o", dtype="bfloat16", lam=0.5,
                       progress=False)
    got = load_file(out / "model.safetensors")
    assert torch.equal(got["ids"], torch.arange(5))
    assert got["w"].dtype == torch.bfloat16 and torch.equal(got["w"], torch.full((3, 4), 0.5, dtype=torch.bfloat16))
    assert torch.equal(got["h"], torch.full((2,), 2.0, dtype=torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert resolve_dtype(None) is None and resolve_dtype("fp16") is torch.float16
    with pytest.raises(ConfigError, match="unknown dtype"):
        resolve_dtype("float8")


def test_writer_and_reader_round_trip(tmp_path):
    ts = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int32), "c": torch.randn(()), "d": torch.zeros(0, 4),
          "e": torch.randn(2, 2).to(torch.bfloat16)}
    w = ShardedWriter(tmp_path, [(k, v.dtype, tuple(v.shape)) for k, v in ts.items()], shard_bytes=40)
    for k, v in ts.items():
        if k == "a":  # in two row blocks
            w.write(k, v[:1], last=False)
            w.write(k, v[1:])
        else:
            w.write(k, v)
    w.finish()
    (tmp_path / "config.json").write_text("{}")
    c = Checkpoint(tmp_path)
    for k, v in ts.items():
        assert torch.equal(c.read(k), v)
        assert torch.equal(_state(tmp_path)[k], v)
    assert torch.equal(c.read("a", (1, 3)), ts["a"][1:])
    c.close()


def test_errors(ckpts, tmp_path):
    base, a, b = ckpts["base"], ckpts["a"], ckpts["b"]
    with pytest.raises(ConfigError, match="unknown merging method 'tie'.*did you mean 'ties'"):
        merge_models(base, [a], method="tie", out=tmp_path / "o")
    with pytest.raises(ConfigError, match="no option 'densty'.*did you mean 'density'"):
        merge_models(base, [a], method="ties", out=tmp_path / "o", parameters={"densty": 0.2})
    with pytest.raises(ConfigError, match="density"):
        merge_models(base, [a], method="ties", out=tmp_path / "o", parameters={"density": 2.0})
    with pytest.raises(ConfigError, match="one density for all inputs"):
        merge_models(base, [{"model": a, "density": 0.2}, {"model": b, "density": 0.4}], method="ties",
                     out=tmp_path / "o")
    with pytest.raises(ConfigError, match="non-empty list"):
        merge_models(base, [], method="ties", out=tmp_path / "o")
    with pytest.raises(ConfigError, match="unknown key 'wieght'.*did you mean 'weight'"):
        merge_models(base, [{"model": a, "wieght": 1}], method="ties", out=tmp_path / "o")
    with pytest.raises(ParetuneError, match="does not exist"):
        merge_models(base, [tmp_path / "nope"], method="ties", out=tmp_path / "o")
    with pytest.raises(ParetuneError, match="one of the models being merged"):
        merge_models(base, [a], method="ties", out=base, overwrite=True)
    assert not (tmp_path / "o").exists()
    # a tensor missing, a shape mismatch, another architecture, a pickle-only folder, a truncated file
    w = {"w": torch.zeros(2, 2), "v": torch.zeros(3)}
    good = _folder(tmp_path / "good", w)
    miss = _folder(tmp_path / "miss", {"w": torch.zeros(2, 2)})
    shape = _folder(tmp_path / "shape", {"w": torch.zeros(2, 3), "v": torch.zeros(3)})
    arch = _folder(tmp_path / "arch", w, model_type="gpt2", arch="GPT2LMHeadModel")
    with pytest.raises(ParetuneError, match="tensor 'v' of the base is missing from .*miss"):
        merge_models(good, [miss], method="task_arithmetic", out=tmp_path / "o")
    with pytest.raises(ParetuneError, match="tensor 'w' has shape \\[2, 3\\]"):
        merge_models(good, [shape], method="task_arithmetic", out=tmp_path / "o")
    with pytest.raises(ParetuneError, match="gpt2 model"):
        merge_models(good, [arch], method="task_arithmetic", out=tmp_path / "o")
    pkl = tmp_path / "pkl"
    pkl.mkdir()
    (pkl / "config.json").write_text("{}")
    (pkl / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ParetuneError, match="pickle files are not read"):
        merge_models(good, [pkl], method="task_arithmetic", out=tmp_path / "o")
    trunc = _folder(tmp_path / "trunc", w)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[:-8])
    with pytest.raises(ParetuneError, match="truncated"):
        merge_models(good, [trunc], method="task_arithmetic", out=tmp_path / "o")
    assert not (tmp_path / "o").exists()
    assert not list(tmp_path.glob(".o.tmp-*"))


def test_existing_output_and_overwrite(tmp_path):
    base = _folder(tmp_path / "base", {"w": torch.zeros(2)})
    a = _folder(tmp_path / "a", {"w": torch.ones(2)})
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(ParetuneError, match="already exists.*overwrite"):
        merge_models(base, [a], method="task_arithmetic", out=out, progress=False)
    assert (out / "keep").is_file()
    merge_models(base, [a], method="task_arithmetic", out=out, overwrite=True, progress=False)
    assert not (out / "keep").exists()
    assert torch.equal(load_file(out / "model.safetensors")["w"], torch.ones(2))


_KILL_SCRIPT = textwrap.dedent("""
    import functools, sys, time
    from paretune.merging import methods
    from paretune.merging.models import merge_models

    fn = methods.METHODS["task_arithmetic"]

    @functools.wraps(fn)
    def slow(tvs, **kw):
        print("tick", flush=True)
        time.sleep(0.2)
        return fn(tvs, **kw)

    methods.METHODS["task_arithmetic"] = slow
    merge_models(sys.argv[1], [sys.argv[2]], method="task_arithmetic", out=sys.argv[3], shard_bytes=64,
                 progress=False)
""")


def test_sigkill_mid_merge_leaves_no_output(ckpts, tmp_path):
    out = tmp_path / "killed"
    script = tmp_path / "slow_merge.py"
    script.write_text(_KILL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(ckpts["base"]), str(ckpts["a"]), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(3):  # a few tensors in: some shards are on disk
            assert proc.stdout.readline().strip() == "tick", proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    leftovers = list(tmp_path.glob(".killed.tmp-*"))
    assert len(leftovers) == 1 and list(leftovers[0].glob("model-*.safetensors"))
    # a rerun succeeds and removes the dead merge's temporary folder
    merge_models(ckpts["base"], [ckpts["a"]], method="task_arithmetic", out=out, progress=False)
    assert (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".killed.tmp-*"))


def test_remove_stale_temp_keeps_live_merges(tmp_path):
    out = tmp_path / "o"
    live = tmp_path / ".o.tmp-live"
    live.mkdir()
    (live / ".paretune-merge-pid").write_text(str(os.getppid()))
    other = tmp_path / ".o.tmp-other"
    other.mkdir()  # no marker: not a merge's folder
    dead = tmp_path / ".o.tmp-dead"
    dead.mkdir()
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    (dead / ".paretune-merge-pid").write_text(str(p.pid))
    assert remove_stale_temp(out) == [dead]
    assert live.exists() and other.exists() and not dead.exists()
