"""Prompt / answer pairs for PixelDLM: a synthetic addition set and the exact-match score of a pipeline on pairs."""

from __future__ import annotations

import torch


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
