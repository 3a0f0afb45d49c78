"""``paretune generate``: continue prompts with a causal LM, with or without an adapter.

    paretune generate --model smollm2-135m --prompt "The capital of France is"
    paretune generate --model smollm2-135m --adapter runs/x/adapter --prompts prompts.txt --batch-size 8

Choices: decoding is greedy (the most likely token each step: deterministic, so a completion can
be compared across adapters); prompts are batched with left padding (each prompt ends where
generation starts, the layout ``model.generate`` needs); the tokenizer's chat template is applied
only with ``--chat`` (each prompt then becomes one user message followed by the assistant's
turn), since a base model has no template and a template changes what an instruction model sees.
Completions are printed without the prompt and without special tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import typer

from .errors import ParetuneError

__all__ = ["generate", "generate_command", "read_prompts"]


def read_prompts(path: Path) -> list[str]:
    """Prompts from a file: a ``.jsonl`` file's ``"prompt"`` fields, else one prompt per
    non-empty line (``\\n`` inside a line stands for a newline)."""
    if not path.is_file():
        raise ParetuneError(f"prompts file {path} does not exist; give a text file with one prompt per line.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ParetuneError(f"prompts file {path} could not be read as UTF-8 text ({e}).") from None
    prompts: list[str] = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ParetuneError(f"{path} line {number} is not JSON ({e}).") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ParetuneError(f"{path} line {number} has no string field 'prompt'.")
            prompts.append(row["prompt"])
    else:
        prompts = [line.replace("\\n", "\n") for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ParetuneError(f"prompts file {path} has no prompts.")
    return prompts


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    chat: bool = False,
    progress: bool = True,
) -> list[str]:
    """Greedy completions of ``prompts`` (the new text only), ``batch_size`` prompts at a time,
    left-padded. ``chat``: wrap each prompt in the tokenizer's chat template as a user turn."""
    import torch

    from .progress import bar

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ParetuneError(f"max_new_tokens={max_new_tokens!r} is invalid; it must be an integer >= 1.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ParetuneError(f"batch_size={batch_size!r} is invalid; it must be an integer >= 1.")
    if not hasattr(model, "generate"):
        raise ParetuneError(f"{type(model).__name__} cannot generate text; load a causal LM (task 'causal-lm').")
    texts = list(prompts)
    special = True
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ParetuneError("this tokenizer has no chat template; drop --chat to use the prompts as they are.")
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in texts]
        special = False  # the template already holds the special tokens
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    out: list[str] = []
    try:
        starts = range(0, len(texts), batch_size)
        for start in bar(starts, desc="generate", unit="batch", leave=False, enabled=progress, delay=2.0):
            batch = texts[start:start + batch_size]
            enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=special).to(device)
            inputs = {k: enc[k] for k in ("input_ids", "attention_mask")}  # not token_type_ids (BERT tokenizers)
            with torch.no_grad():
                ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            new = ids[:, enc["input_ids"].shape[1]:]
            out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
    return out


def generate_command(
    model: str = typer.Option(..., "--model", help="smollm2-135m | a local causal LM folder or Hub id"),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="an adapter folder (paretune.save or PEFT) "
                                           "or a training run folder holding adapter/"),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", help="a prompt (repeatable)"),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="a file: one prompt per line, or JSONL "
                                           "with a 'prompt' field"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="tokens to generate per prompt"),
    batch_size: int = typer.Option(8, "--batch-size", help="prompts per batch (left-padded)"),
    chat: bool = typer.Option(False, "--chat", help="apply the tokenizer's chat template (prompt as a user turn)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object per prompt: prompt, completion"),
) -> None:
    """Continue prompts greedily with a causal LM (and an adapter); prints each completion."""
    import paretune

    if (prompt is None or not prompt) == (prompts is None):
        raise ParetuneError("give either --prompt TEXT (repeatable) or --prompts FILE, not both and not neither.")
    texts = list(prompt) if prompt else read_prompts(prompts)  # type: ignore[arg-type]
    if max_new_tokens < 1 or batch_size < 1:
        raise ParetuneError("--max-new-tokens and --batch-size must be at least 1.")
    net, tokenizer = paretune.models.load(model, task="causal-lm")
    if adapter is not None:
        from .cli import adapter_folder
        from .io import CONFIG_FILE

        folder = adapter_folder(adapter)
        if (folder / CONFIG_FILE).is_file():
            paretune.load(net, folder)
        else:
            paretune.import_peft(net, folder)
    completions = generate(net, tokenizer, texts, max_new_tokens=max_new_tokens, batch_size=batch_size, chat=chat)
    for text, completion in zip(texts, completions):
        if as_json:
            typer.echo(json.dumps({"prompt": text, "completion": completion}, ensure_ascii=False))
        elif len(texts) == 1:
            typer.echo(completion)
        else:
            typer.echo(f"> {text}")
            typer.echo(completion)
            typer.echo("")
