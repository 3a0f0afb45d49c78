"""The bench's per-method tuning: which option sets a method's size, how far to scan it, and the
learning rate a method trains at by default. Bench settings, not the method's: the core's
registry knows nothing of them. A method not listed gets :class:`BenchTuning`'s defaults (knob
``r`` when its config has one, scanned up to the smallest ``min(d_out, d_in)``; the bench's
adapter learning rate)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BenchTuning:
    knob: str | None = None  # the integer option that sets the method's size (None: r if it has one)
    knob_max: int | None = None  # largest value of the knob worth trying (None: min(d_out, d_in))
    lr: float | None = None  # the bench's peak learning rate for the method (None: the adapter rate)
    options: dict = dataclasses.field(default_factory=dict)  # options every bench run of the method gets


#: Learning rates (``lr=``) come from one search on the built-in task the quick bench runs (MiniLM-L6,
#: city -> continent, 80 steps of 16, seed 0): ``paretune bench --quick --tune lr --tune-grid
#: 0.25,0.5,1,2,4,8 --seeds 0``, scored on the validation split (docs/results.md, "Registered learning
#: rates"). A method keeps its earlier default (the adapters' 2e-3, or the rate named in its comment)
#: when the search's best rate beat it by less than 0.02 accuracy (one standard error of 500 validation
#: rows) or when no rate moved it off the majority class (prompt tuning, prefix tuning, MAM, LT-SFT,
#: Compacter, BitFit). The head-only baseline's searched rate is ``sweep.DEFAULT_LR["head"]``; the head of
#: every adapter run keeps ``sweep.HEAD_LR`` (the search held it fixed).
TUNING: dict[str, BenchTuning] = {
    # NOLA's size is k + l coefficients per layer, whatever the layer's shape, so min(d_out, d_in)
    # bounds nothing: k, the number of A-basis coefficients, is scanned up to 8192.
    "nola": BenchTuning(knob="k", knob_max=8192),
    # Kronecker's shapes set its size (A about factor x factor, B the rest: count about
    # factor^2 + d_out*d_in/factor^2, smallest near factor = sqrt(d)); factors past the square root
    # of the widest layer only mirror smaller ones, and 128 covers layers 16384 wide. r is not the
    # knob: with the default split it moves the count by at most about 2x.
    "kronecker": BenchTuning(knob="factor", knob_max=128, lr=8e-3),
    # FourierFT trains n_frequency spectral coefficients per layer whatever its shape (37 layers of
    # MiniLM-L6 at n = 1892 give 70,004); scanned up to 8192.
    "fourierft": BenchTuning(knob="n_frequency", knob_max=8192, lr=1.6e-2),
    # LoCA trains n_frequency coefficients and 2·n_frequency locations per layer (MiniLM-L6:
    # n = 631 gives 70,041); scanned up to 4096.
    "loca": BenchTuning(knob="n_frequency", knob_max=4096, lr=1.6e-2),
    # NeuroAda trains k entries per output neuron (d_out·k per layer); k up to min(d_out, d_in) is
    # always valid (MiniLM-L6: k = 3 gives 63,360).
    "neuroada": BenchTuning(knob="k", lr=1.6e-2),
    # Random sparse trains `count` entries per layer whatever its shape (37 layers of MiniLM-L6 at
    # count = 1892 give 70,004); scanned up to 8192.
    "random-sparse": BenchTuning(knob="count", knob_max=8192, lr=1.6e-2),
    # LT-SFT trains W's own entries (all of them in its first phase), as full fine-tuning does, so it
    # runs at full fine-tuning's rate: on the quick bench 0.442 at 1e-4 against 0.373 at the adapters'
    # 2e-3 (docs/results.md).
    "lt-sft": BenchTuning(lr=1e-4),
    # Subspace training's size is dim, for the whole model (not per layer): the budget is dim itself.
    "subspace": BenchTuning(knob="dim", knob_max=131_072, lr=1e-3),
    # A bottleneck adapter's size is its bottleneck width m (2·d·m + m + d per adapted sub-layer),
    # up to the layer width. Compacter has no knob: its point is its fixed, tiny size (the bench
    # runs it at its defaults).
    "bottleneck": BenchTuning(knob="bottleneck"),
    # Poly / MHR route by task id; the bench's single-task runs use task 0 for every row.
    "poly": BenchTuning(options={"default_task": 0}, lr=8e-3),
    # Prompt and prefix tuning: the number of virtual tokens sets the size (n·d, 2·n·d_kv per layer);
    # the rates are those of PEFT's prompt- and prefix-tuning guides (3e-2, 1e-2). Prompt tuning runs
    # at its default 20 tokens (7,680 numbers on MiniLM-L6), no knob: at the quick budget it would
    # prepend 182 tokens to 10-token inputs, and its training step then costs far more than the other
    # methods' (a quick-bench run did not finish in 9 minutes on a 2-core CPU).
    "prompt-tuning": BenchTuning(lr=3e-2),
    "prefix-tuning": BenchTuning(knob="num_virtual_tokens", knob_max=256, lr=1e-2),
    # MAM = prefix tuning + a scaled parallel FFN adapter; at the paper's 30 prefix tokens it is twice
    # the quick budget, so the bench fixes the adapter's bottleneck at 8 and scans the prefix length.
    # Its rate stays the adapters' 2e-3: 1e-2 helped on SmolLM2 country -> capital (exact match 0.0 ->
    # 0.086) but broke MiniLM city -> continent (0.470 -> 0.3725, one class); see docs/results.md.
    "mam": BenchTuning(knob="num_virtual_tokens", knob_max=256, options={"bottleneck": 8}),
    # The VeRA paper tunes its vectors at learning rates about ten times LoRA's (4e-3 to 1e-2 on GLUE);
    # the search went further still (8e-2, the top of its grid; 4e-2 was within 0.01 of it).
    "vera": BenchTuning(lr=8e-2),
    # MoS keeps its effective rank r (64) and is sized by the LoRA rank whose count its shard pools
    # equal (MiniLM-L6 at 70,000: equivalent_r = 2, 82,944 numbers).
    "mos": BenchTuning(knob="equivalent_r", knob_max=64, lr=4e-3),
    # AdaLoRA is sized by its starting rank (target_r follows it, the budget schedule spans the run).
    "adalora": BenchTuning(knob="init_r", knob_max=64, lr=8e-3),
    # IncreLoRA grows from 1 rank per matrix (plus a reserve) towards an average of 2 over steps 30-105
    # of the quick bench's 150; its starting count does not follow target_r, so it runs at these
    # options (MiniLM-L6: 82,980 at the start, at most 152,136 grown).
    "increlora": BenchTuning(options={"init_r": 1, "target_r": 2, "incre_rank_num": 1, "init_warmup": 15,
                                      "incre_interval": 15, "top_h": 6}, lr=4e-3),
    # LoRA-Mixer: E experts per attention projection; 2 experts, top-1, so that r = 1 fits the quick
    # budget (at the default 4 experts r = 1 is already 110,592 on MiniLM-L6).
    "lora-mixer": BenchTuning(knob="r", knob_max=64, options={"n_experts": 2, "top_k": 1}, lr=4e-3),
    # MoSA is a bottleneck adapter trained sparsely: sized as bottleneck.
    "mosa": BenchTuning(knob="bottleneck", lr=8e-3),
    # FlyLoRA's r must stay at or above k; with k = 1 the bench can scan r from 1 (MiniLM-L6 at
    # 70,000: r = 3, 63,360 numbers).
    "flylora": BenchTuning(options={"k": 1}, lr=1e-3),
    # MixLoRA: E experts of the feed-forward block; 2 experts, both active, so that r = 1 fits the quick
    # budget (69,120 on MiniLM-L6; 4 experts need 119,808). top_k = 1 would give the router no
    # gradient from the task loss (its one weight renormalises to 1).
    "mixlora": BenchTuning(knob="r", knob_max=64, options={"num_experts": 2, "top_k": 2}, lr=1e-3),
    # Rates from the search (see the comment above TUNING) of methods with no other bench setting.
    "hydra": BenchTuning(lr=1e-3),
    "ia3": BenchTuning(lr=1.6e-2),
    "lamda": BenchTuning(lr=8e-3),
    "ln-tuning": BenchTuning(lr=8e-3),
    "pissa": BenchTuning(lr=5e-4),
    "shira": BenchTuning(lr=1.6e-2),
}


def tuning_of(method: str) -> BenchTuning:
    """The bench tuning of a registered method's name (the defaults when it has none of its own)."""
    return TUNING.get(method, BenchTuning())
