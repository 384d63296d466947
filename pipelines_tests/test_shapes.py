"""The synthetic shapes set, its pixel classifiers and benchmarks/eval_shapes.py."""

import numpy as np
import pytest

from pixel_diffusers.testing import make_tiny_pixelhdm_pipeline
from pixel_diffusers.training_utils import shapes

from repo_scripts import load_script

def _eval_module():
    return load_script("eval_shapes", "benchmarks")


@pytest.mark.parametrize("size", [32, 64])
def test_classifiers_read_every_rendered_combination(size):
    for index, (shape, color, background) in enumerate(shapes.evaluation_prompts(90)):
        image = shapes.render_shape(shape, color, background, size, np.random.default_rng(index))
        assert shapes.classify_color(image) == color
        assert shapes.classify_shape(image) == shape
        assert shapes.classify_background(image) == background
    blank = np.full((size, size, 3), 128, dtype=np.uint8)
    assert shapes.classify_color(blank) is None and shapes.classify_shape(blank) is None


def test_dataset_is_deterministic_and_holds_out_pairs():
    dataset = shapes.ShapesDataset(200, size=32, seed=3)
    first, again = dataset[7], shapes.ShapesDataset(200, size=32, seed=3)[7]
    assert np.array_equal(np.asarray(first["image"]), np.asarray(again["image"])) and first["caption"] == again["caption"]
    seen = {(dataset[i]["shape"], dataset[i]["color"]) for i in range(200)}
    assert not seen & set(shapes.HELD_OUT)
    item = dataset[0]
    assert item["caption"] == shapes.caption(item["shape"], item["color"], item["background"])
    assert shapes.class_names()[item["class_label"]] == f"{item['color']} {item['shape']}"
    with pytest.raises(ValueError, match="color and background"):
        shapes.render_shape("circle", "red", "red", 32, np.random.default_rng(0))
    prompts = shapes.evaluation_prompts(64, include_held_out=False)
    assert not {(s, c) for s, c, _ in prompts} & set(shapes.HELD_OUT)


def test_score_of_ground_truth_renders_is_perfect():
    combos = shapes.evaluation_prompts(24)
    images = [shapes.render_shape(*combo, 32, np.random.default_rng(i)) for i, combo in enumerate(combos)]
    result = _eval_module().score(images, combos, text_conditional=True)
    assert result["color_accuracy"] == result["shape_accuracy"] == result["background_accuracy"] == 1.0
    wrong = _eval_module().score(images[1:] + images[:1], combos, text_conditional=True)
    assert wrong["class_accuracy"] < 1.0


def test_eval_shapes_runs_on_a_saved_pipeline(tmp_path, capsys):
    folder = tmp_path / "pipe"
    make_tiny_pixelhdm_pipeline(seed=0).save_pretrained(folder)
    result = _eval_module().main(
        ["--pipeline", str(folder), "--num_images", "4", "--num_inference_steps", "2", "--solver", "euler",
         "--grid", str(tmp_path / "g.png")]
    )
    assert result["num_images"] == 4 and 0.0 <= result["color_accuracy"] <= 1.0
    assert (result["solver"], result["time_grid"], result["num_inference_steps"]) == ("euler", "linear", 2)
    assert (tmp_path / "g.png").exists() and '"shape_accuracy"' in capsys.readouterr().out
