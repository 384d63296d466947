"""The addition pairs, the exact-match score and benchmarks/eval_pixeldlm.py."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from pixel_diffusers.testing import make_tiny_tokenizer
from pixel_diffusers.training_utils import addition_pairs, answer_pairs, exact_match

from repo_scripts import load_script

ROOT = Path(__file__).resolve().parents[1]


def test_addition_pairs():
    pairs = addition_pairs()
    assert len(pairs) == 64 and len({p["prompt"] for p in pairs}) == 64
    assert pairs[0] == {"prompt": "10+20=", "answer": "30"} and {"prompt": "13+27=", "answer": "40"} in pairs
    assert all(int(p["answer"]) == sum(map(int, p["prompt"][:-1].split("+"))) for p in pairs)
    with pytest.raises(ValueError, match="first and second"):
        addition_pairs(range(0))


class LookupPipeline:
    """Stands in for a PixelDLMPipeline: answers from a table and records the seed of each batch's generator."""

    def __init__(self, table):
        self.table, self.tokenizer, self.seeds = table, make_tiny_tokenizer(), []

    def __call__(self, prompts, num_inference_steps, guidance_scale, generator, output_type):
        self.seeds.append(generator.initial_seed())
        texts = [self.table[p] for p in prompts]
        ids = [self.tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        return SimpleNamespace(texts=texts, token_ids=ids)


def test_exact_match_compares_token_ids():
    pairs = addition_pairs()
    table = {p["prompt"]: p["answer"] for p in pairs}
    for p in pairs[::4]:
        table[p["prompt"]] = p["answer"] + "0"  # 16 wrong answers
    pipe = LookupPipeline(table)
    hits, texts = answer_pairs(pipe, pairs, seed=5)
    assert sum(hits) == 48 and texts[0] == "300" and not hits[0] and hits[1]
    assert pipe.seeds == [5, 21, 37, 53]  # one generator per batch of 16
    assert exact_match(LookupPipeline(table), pairs) == 0.75
    with pytest.raises(ValueError, match="prompt"):
        answer_pairs(pipe, [{"prompt": None, "answer": "x"}])


def test_addition_config_trains_and_eval_pixeldlm_scores_it(tmp_path):
    script = load_script("train_pixeldlm")
    tiny = {"sample_size": 8, "patch_size": 2, "hidden_size": 32, "num_layers": 1, "num_attention_heads": 2}
    out = tmp_path / "run"
    script.main(["--config", str(ROOT / "training" / "configs" / "pixeldlm_addition.yaml"), "--output_dir", str(out),
                 "--max_train_steps", "2", "--transformer_config", json.dumps(tiny), "--validation_num_inference_steps",
                 "2", "--save_precision", "bf16"])
    result = json.loads((out / "exact_match.json").read_text())
    assert result["num_items"] == 64 and 0.0 <= result["exact_match"] <= 1.0

    bench = load_script("eval_pixeldlm", "benchmarks")
    scored = bench.main(["--pipeline", str(out / "pipeline"), "--num_inference_steps", "2"])
    assert scored["num_items"] == 64 and scored["exact_match"] == result["exact_match"]
    assert len(scored["wrong_examples"]) == min(8, round(64 * (1 - scored["exact_match"])))
    index = json.loads((out / "pipeline" / "model_index.json").read_text())
    assert index["color_levels"] == 7

    with pytest.raises(ValueError, match="--data or --synthetic_addition"):
        script.main(["--config", str(ROOT / "training" / "configs" / "pixeldlm_addition.yaml"), "--data", "x.json",
                     "--output_dir", str(tmp_path / "bad")])
