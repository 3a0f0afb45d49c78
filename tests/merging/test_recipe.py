"""Merge recipes (YAML): parsing, errors with suggestions, run_recipe end to end, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from paretune.errors import ConfigError, ParetuneError
from paretune.merging.cli import merge_command, parse_size
from paretune.merging.recipe import Recipe, load_recipe, parse_recipe, run_recipe


def _folder(path: Path, tensors: dict) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture()
def models(tmp_path) -> Path:
    g = torch.Generator().manual_seed(0)
    base = {"layers.0.w": torch.randn(4, 6, generator=g), "layers.1.w": torch.randn(4, 6, generator=g),
            "embed.weight": torch.randn(8, 6, generator=g)}
    _folder(tmp_path / "base", base)
    for name in ("a", "b"):
        _folder(tmp_path / name, {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()})
    (tmp_path / "b" / "tokenizer_config.json").write_text('{"from": "b"}')
    return tmp_path


RECIPE = """\
base: base
method: ties
parameters: {density: 0.5, lam: 0.8, majority_sign: frequency}
inputs:
  - {model: a, weight: 0.6}
  - {model: b, weight: 0.4, density: 0.5}
filters:
  include: ["layers.*"]
  exclude: ["re:layers\\\\.1\\\\."]
dtype: bfloat16
tokenizer_from: b
"""


def _write(root: Path, text: str, name: str = "recipe.yaml") -> Path:
    p = root / name
    p.write_text(text)
    return p


def test_parse_full_recipe(models):
    r = load_recipe(_write(models, RECIPE))
    assert isinstance(r, Recipe)
    assert r.base == models / "base" and r.method == "ties" and r.lam == 0.8
    assert r.parameters == {"density": 0.5, "majority_sign": "frequency"}
    assert r.inputs == [{"model": models / "a", "weight": 0.6}, {"model": models / "b", "weight": 0.4, "density": 0.5}]
    assert r.include == ["layers.*"] and r.exclude == ["re:layers\\.1\\."]
    assert r.dtype == "bfloat16" and r.tokenizer_from == models / "b" and r.source == models / "recipe.yaml"
    # the smallest recipe: paths as plain strings, defaults for the rest
    r = parse_recipe({"base": "base", "method": "task_arithmetic", "inputs": ["a", "b"]}, models)
    assert r.inputs == [{"model": models / "a"}, {"model": models / "b"}] and r.lam == 1.0 and r.dtype is None
    assert r.tokenizer_from == "base" and r.include is None


def test_run_recipe_end_to_end(models, tmp_path):
    from paretune.merging.methods import ties

    out = run_recipe(_write(models, RECIPE), tmp_path / "out", progress=False)
    got = load_file(out / "model.safetensors")
    base, a, b = (load_file(models / n / "model.safetensors") for n in ("base", "a", "b"))
    want = (base["layers.0.w"] + 0.8 * ties([a["layers.0.w"] - base["layers.0.w"], b["layers.0.w"] - base["layers.0.w"]],
                                            density=0.5, weights=[0.6, 0.4], majority_sign="frequency"))
    assert got["layers.0.w"].dtype == torch.bfloat16
    assert torch.equal(got["layers.0.w"], want.to(torch.bfloat16))
    for k in ("layers.1.w", "embed.weight"):  # filtered out: the base's, cast to the output dtype
        assert torch.equal(got[k], base[k].to(torch.bfloat16))
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"from": "b"}


@pytest.mark.parametrize("text, message", [
    ("base: base\nmehtod: ties\ninputs: [a]\n", "unknown key 'mehtod'; did you mean 'method'"),
    ("base: base\nmethod: ties\ninputs: [{model: a, wieght: 1}]\n", "input 0: unknown key 'wieght'; did you mean 'weight'"),
    ("base: base\nmethod: ties\ninputs: [a]\nfilters: {incldue: ['*']}\n", "unknown key 'incldue'; did you mean 'include'"),
    ("base: base\nmethod: tie\ninputs: [a]\n", "unknown merging method 'tie'.*known methods: .*dare_linear"),
    ("base: base\nmethod: ties\ninputs: [a]\nparameters: {densty: 0.2}\n", "no option 'densty'; did you mean 'density'"),
    ("base: base\nmethod: task_arithmetic\ninputs: [a]\nparameters: {seed: 1}\n", "no option 'seed'"),
    ("base: base\nmethod: ties\ninputs: [missing]\n", "input 0 model 'missing' does not exist"),
    ("base: nowhere\nmethod: ties\ninputs: [a]\n", "base 'nowhere' does not exist"),
    ("method: ties\ninputs: [a]\n", "'base' is required"),
    ("base: base\nmethod: ties\ninputs: []\n", "non-empty list"),
    ("base: base\nmethod: ties\ninputs: [a]\ndtype: float8\n", "unknown dtype"),
    ("base: base\nmethod: ties\ninputs: [a]\nparameters: {lam: big}\n", "lam must be a number"),
    ("base: base\nmethod: ties\ninputs: [{model: a, weight: heavy}]\n", "weight must be a number"),
    ("- just\n- a list\n", "must be a mapping"),
    ("base: [unclosed\n", "not valid YAML at line"),
])
def test_recipe_errors(models, text, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(_write(models, text))


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ParetuneError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_parse_size():
    assert parse_size("500MB") == 500 * 10**6 and parse_size("1GiB") == 2**30 and parse_size("4096") == 4096
    assert parse_size("1.5kb") == 1500
    with pytest.raises(ConfigError, match="e.g. 500MB"):
        parse_size("lots")


def _app() -> typer.Typer:
    from paretune.cli import guarded

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test app"""

    app.command("merge")(guarded(merge_command))
    return app


def test_cli(models, tmp_path):
    recipe = _write(models, "base: base\nmethod: task_arithmetic\ninputs: [a, b]\nparameters: {lam: 0.5}\n")
    out = tmp_path / "merged"
    runner = CliRunner()
    res = runner.invoke(_app(), ["merge", str(recipe), "--out", str(out), "--shard-size", "100B"])
    assert res.exit_code == 0, res.output
    assert "merged 2 model(s)" in res.output
    assert (out / "model.safetensors.index.json").is_file()
    got = {}
    for f in out.glob("model-*.safetensors"):
        got.update(load_file(f))
    base, a, b = (load_file(models / n / "model.safetensors") for n in ("base", "a", "b"))
    for k in base:
        want = base[k] + 0.5 * ((a[k] - base[k]) + (b[k] - base[k]))
        assert torch.allclose(got[k], want, rtol=0, atol=1e-6), k
    # an existing output without --overwrite: error: ..., status 2; with it: replaced
    res = runner.invoke(_app(), ["merge", str(recipe), "--out", str(out), "--quiet"])
    assert res.exit_code == 2 and "already exists" in res.output
    res = runner.invoke(_app(), ["merge", str(recipe), "--out", str(out), "--quiet", "--overwrite"])
    assert res.exit_code == 0 and res.output == ""
    bad = _write(models, "base: base\nmethod: tiez\ninputs: [a]\n", "bad.yaml")
    res = runner.invoke(_app(), ["merge", str(bad), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "did you mean 'ties'" in res.output
    assert not (tmp_path / "x").exists()


# -- the same recipe through mergekit ------------------------------------------------------------
MERGEKIT = {  # our method -> mergekit's method name and its extra parameters
    "ties": ("ties", {"normalize": True, "int8_mask": False}),
    "task_arithmetic": ("task_arithmetic", {"normalize": False}),
    "weighted_average": ("linear", {"normalize": True}),
}


@pytest.mark.parametrize("method", list(MERGEKIT))
def test_a_recipe_mergekit_expresses_gives_mergekits_tensors(tmp_path, method):
    """Tiny Llama checkpoints (transformers folders), one recipe written for both tools: the merged
    tensors are mergekit's (TIES with weights 1, where its weighting and PEFT's agree)."""
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(tmp_path / "base")
    for name in ("a", "b"):
        tuned = LlamaForCausalLM(cfg)
        tuned.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_(0.05 * torch.randn_like(p))
        tuned.save_pretrained(tmp_path / name)
    options = {"density": 0.3} if method == "ties" else {}
    ours = run_recipe(parse_recipe({
        "base": "base", "method": method, "parameters": options, "dtype": "float32",
        "inputs": [{"model": "a", "weight": 1.0}, {"model": "b", "weight": 1.0}],
    }, tmp_path), tmp_path / "ours", progress=False)
    name, extra = MERGEKIT[method]
    per_model = {"weight": 1.0, **options}
    config = {"merge_method": name, "dtype": "float32", "parameters": extra,
              "models": [{"model": str(tmp_path / n), "parameters": per_model} for n in ("a", "b")]}
    if name != "linear":  # mergekit's linear averages the listed models themselves: base + mean(τ)
        config["base_model"] = str(tmp_path / "base")
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "mergekit"),
              options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False))
    got, want = load_file(str(Path(ours) / "model.safetensors")), load_file(str(tmp_path / "mergekit" / "model.safetensors"))
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
