"""PixelDLM's data: text items read from upstream's formats, their resumable token-image batches, a synthetic addition
set and the exact-match score of a pipeline on prompt / answer pairs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .index_batches import IndexBatches

logger = logging.getLogger(__name__)


def addition_pairs(first: range = range(10, 18), second: range = range(20, 28)) -> list[dict]:
    """`{"prompt": "13+27=", "answer": "40"}` for every `a` in `first` and `b` in `second`, `a` major (64 by default).

    The answer is a function of both operands (the units digits add with a carry into the tens), so a model must
    read the whole prompt, not copy it.
    """
    if not first or not second or min(first) < 0 or min(second) < 0:
        raise ValueError(f"first and second must be non-empty ranges of non-negative integers; got {first}, {second}.")
    return [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in first for b in second]


@torch.no_grad()
def answer_pairs(
    pipe, items: list[dict], num_inference_steps: int = 20, guidance_scale: float = 1.0, seed: int = 0,
    batch_size: int = 16,
) -> tuple[list[bool], list[str]]:
    """Asks `pipe` (a `PixelDLMPipeline`) every item's prompt: per item, whether the decoded token ids equal the
    answer's, and the decoded text. Batch `k` is sampled from the generator seeded `seed + k * batch_size`."""
    if not items or any(item.get("prompt") is None for item in items):
        raise ValueError("items must be a non-empty list of items that all have a prompt.")
    hits, texts = [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        out = pipe(
            [item["prompt"] for item in chunk], num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(seed + start), output_type="pt",
        )
        for item, ids in zip(chunk, out.token_ids):
            hits.append(ids == pipe.tokenizer(item["answer"], add_special_tokens=False).input_ids)
        texts += out.texts
    return hits, texts


def exact_match(
    pipe, items: list[dict], num_inference_steps: int = 20, guidance_scale: float = 1.0, seed: int = 0
) -> float:
    """Fraction of `items` whose answer `pipe` writes exactly (see `answer_pairs`)."""
    hits, _ = answer_pairs(pipe, items, num_inference_steps, guidance_scale, seed)
    return sum(hits) / len(hits)


def read_text_items(path: str | Path) -> tuple[list[dict], int]:
    """PixelDLM items `{"prompt": str | None, "answer": str}` from upstream's formats, and the number of unreadable
    files and items: a JSON list (or JSONL) of `{"text"}` (unconditional) or `{"prompt", "answer"}` items, a `.txt`
    file with one text per line, or a folder of such files."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.suffix in (".json", ".jsonl", ".txt")) if path.is_dir() else [path]
    items, skipped = [], 0
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
            if file.suffix == ".txt":
                raw = [{"text": line} for line in text.splitlines() if line.strip()]
            elif file.suffix == ".jsonl":
                raw = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                raw = json.loads(text)
                raw = raw if isinstance(raw, list) else [raw]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            logger.warning("skipping unreadable %s: %s", file, error)
            skipped += 1
            continue
        for item in raw:
            if isinstance(item, dict) and isinstance(item.get("answer"), str) and isinstance(item.get("prompt"), str):
                items.append({"prompt": item["prompt"], "answer": item["answer"]})
            elif isinstance(item, dict) and isinstance(item.get("text"), str):
                items.append({"prompt": None, "answer": item["text"]})
            else:
                skipped += 1
    if not items:
        raise ValueError(f"data={str(path)!r} holds no {{'text'}} or {{'prompt', 'answer'}} items.")
    return items, skipped


class TextItemBatches(IndexBatches):
    """Endless, resumable batches of PixelDLM items as token images (`codec.encode_text`, truncated): the answer is
    `pixel_values` (with its `text_mask`), the prompt the `condition` (`has_prompt` False for plain texts).

    The order is `IndexBatches`': a permutation per epoch seeded by (seed, epoch), dealt round-robin to the
    processes. `num_unreadable` counts items left out when reading.
    """

    def __init__(self, items, codec, tokenizer, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0,
                 num_unreadable: int = 0):
        super().__init__(len(items), batch_size, seed, num_replicas, rank)
        self.items, self.codec, self.tokenizer, self.num_unreadable = items, codec, tokenizer, num_unreadable

    def __iter__(self):
        for batch in super().__iter__():
            chunk = [self.items[i] for i in batch["indices"]]
            target, mask = self.codec.encode_text(self.tokenizer, [item["answer"] for item in chunk], truncate=True)
            condition, _ = self.codec.encode_text(self.tokenizer, [item["prompt"] or "" for item in chunk], truncate=True)
            has_prompt = torch.tensor([item["prompt"] is not None for item in chunk])
            yield {"pixel_values": target, "text_mask": mask, "condition": condition, "has_prompt": has_prompt,
                   "num_skipped": 0}
