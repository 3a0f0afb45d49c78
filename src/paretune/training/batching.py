"""Tokenised examples and the batches made from them, for classification and generation.

Generation examples are ``prompt + completion + eos``; the loss and exact match count only the
completion tokens (and the eos, so a right answer must also stop).
"""

from __future__ import annotations

import dataclasses

import torch

from ..data.examples import Dataset
from ..errors import ParetuneError


@dataclasses.dataclass
class Encoded:
    kind: str
    ids: list[list[int]]
    labels: list[int] | None = None  # classification: class index per example
    prompt_lens: list[int] | None = None  # generation: tokens of the prompt
    label_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def loss_units(self, rows: list[int]) -> int:
        """How many loss terms the rows hold: examples, or completion tokens for generation."""
        if self.kind == "classification":
            return len(rows)
        return sum(len(self.ids[i]) - self.prompt_lens[i] for i in rows)


def encode(data: Dataset, tokenizer, *, labels: list[str] | None = None, max_length: int = 64) -> Encoded:
    """Tokenise a dataset. For classification, ``labels`` fixes the class order (the training
    labels); an eval label outside it is an error."""
    if data.kind == "classification":
        labels = labels or data.labels()
        index = {name: i for i, name in enumerate(labels)}
        unseen = sorted({r["label"] for r in data.rows} - set(index))
        if unseen:
            raise ParetuneError(
                f"{data.source} has labels that training never saw: {unseen[:10]}; every eval label must occur "
                "in the training data."
            )
        enc = tokenizer([r["text"] for r in data.rows], truncation=True, max_length=max_length)
        return Encoded("classification", enc["input_ids"], [index[r["label"]] for r in data.rows], label_names=labels)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ParetuneError("the tokenizer has no eos token; generation training needs one to mark the end.")
    ids, prompt_lens = [], []
    prompts = tokenizer([r["prompt"] for r in data.rows], add_special_tokens=False)["input_ids"]
    completions = tokenizer([r["completion"] for r in data.rows], add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None else []
    for p, c in zip(prompts, completions):
        p = (bos + p)[: max(1, max_length // 2)]
        seq = (p + c + [eos])[:max_length]
        ids.append(seq)
        prompt_lens.append(len(p))
    return Encoded("generation", ids, prompt_lens=prompt_lens)


def collate(enc: Encoded, rows: list[int], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A right-padded batch of ``rows``. Generation labels are -100 outside the completion."""
    seqs = [enc.ids[i] for i in rows]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for j, s in enumerate(seqs):
        input_ids[j, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[j, : len(s)] = 1
    batch = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}
    if enc.kind == "classification":
        batch["labels"] = torch.tensor([enc.labels[i] for i in rows], dtype=torch.long, device=device)
    else:
        labels = torch.full_like(input_ids, -100)
        for j, i in enumerate(rows):
            labels[j, enc.prompt_lens[i]: len(enc.ids[i])] = input_ids[j, enc.prompt_lens[i]: len(enc.ids[i])]
        batch["labels"] = labels.to(device)
    return batch


def summed_loss(model, batch: dict[str, torch.Tensor], kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of per-unit losses, per-unit correctness) for a batch: per example for
    classification; per completion token for generation (correct = greedy token right). Logits
    longer than the batch (a method that prepends virtual tokens) are scored on their last
    positions, the batch's own."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits.float()
    labels = batch["labels"]
    if kind == "classification":
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        return loss, logits.argmax(-1) == labels
    if logits.shape[1] > labels.shape[1]:  # virtual tokens put before the input (prompt tuning): not scored
        logits = logits[:, logits.shape[1] - labels.shape[1]:]
    logits, labels = logits[:, :-1], labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return loss, (logits.argmax(-1) == labels) | (labels == -100)
