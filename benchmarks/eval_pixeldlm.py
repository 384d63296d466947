#!/usr/bin/env python
"""Exact-match accuracy of a PixelDLM pipeline on prompt / answer pairs (the built-in addition set by default).

    python benchmarks/eval_pixeldlm.py --pipeline addition-pixeldlm/pipeline

An answer counts when its decoded token ids equal the reference answer's. Prints JSON with exact_match, the number
of items and the sampling settings, plus up to 8 wrong answers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pixel_diffusers import PixelDLMPipeline
from pixel_diffusers.training_utils import addition_pairs, answer_pairs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", required=True, help="A saved PixelDLMPipeline folder or Hub id.")
    parser.add_argument("--data", type=str, default=None,
                        help='A JSON list of {"prompt", "answer"}; default: the addition pairs.')
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--guidance_scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=str, default=None, help="Also write the JSON here.")
    args = parser.parse_args(argv)

    items = json.loads(Path(args.data).read_text(encoding="utf-8")) if args.data else addition_pairs()
    pipe = PixelDLMPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    hits, texts = answer_pairs(pipe, items, args.num_inference_steps, args.guidance_scale, args.seed)
    wrong = [(item["prompt"], item["answer"], text) for item, hit, text in zip(items, hits, texts) if not hit]
    result = {
        "exact_match": round(sum(hits) / len(hits), 4),
        "num_items": len(items),
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "wrong_examples": wrong[:8],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
