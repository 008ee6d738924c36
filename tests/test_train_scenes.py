"""Detector training scenes: the catalog-shot ("studio") scenes and their boxes."""

import numpy as np
import pytest
from PIL import Image

from imgsearch.errors import BadInput
from imgsearch.sample_data import build_sample_set
from train.commands import TrainingData
from train.engine import TrainConfig
from train.options import build_parser
from train.training_data import studio_scene

PRODUCT = (50, 40, 130, 120)  # x1, y1, x2 (exclusive), y2 (exclusive) of the product in the shot


def _studio_shot() -> Image.Image:
    shot = Image.new("RGB", (200, 160), (242, 241, 236))
    shot.paste((180, 30, 40), PRODUCT)
    return shot


def test_a_studio_scene_boxes_the_whole_product_wherever_the_crop_puts_it():
    rng = np.random.default_rng(0)
    shot = _studio_shot()
    sizes = set()
    for _ in range(20):
        scene, boxes = studio_scene(shot, rng)
        assert len(boxes) == 1
        x1, y1, x2, y2 = boxes[0]
        assert 0 <= x1 < x2 <= scene.width and 0 <= y1 < y2 <= scene.height
        assert (x2 - x1, y2 - y1) == (PRODUCT[2] - PRODUCT[0], PRODUCT[3] - PRODUCT[1])  # never cut
        inside = np.asarray(scene.crop(boxes[0]))
        assert (inside == (180, 30, 40)).all()  # the box is the product, exactly
        sizes.add(scene.size)
    assert len(sizes) > 10  # the border around it varies


def test_a_full_bleed_photo_is_all_product():
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    scene, boxes = studio_scene(photo, np.random.default_rng(2))
    assert scene.size == photo.size and boxes == [(0, 0, 120, 90)]


def test_studio_scenes_share_is_validated_by_the_config_and_the_cli(capsys):
    with pytest.raises(BadInput, match="studio_scenes must be in \\[0, 1\\], got 1.5"):
        TrainConfig(studio_scenes=1.5)
    # A checkpoint's config from before the knob trained without catalog shots, and resumes so.
    assert TrainConfig().studio_scenes == 0.15 and TrainConfig.from_dict({"epochs": 2}).studio_scenes == 0.0
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()
    parser = build_parser()
    assert parser.parse_args(["c.csv", "--output", "m.ckpt", "--studio-scenes", "0"]).studio_scenes == 0.0
    with pytest.raises(SystemExit):
        parser.parse_args(["c.csv", "--output", "m.ckpt", "--studio-scenes", "2"])
    assert "expected a number in [0, 1], got 2.0" in capsys.readouterr().err


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return build_sample_set(tmp_path_factory.mktemp("sample"), seed=0, limit_products=8, queries_per_product=1,
                            progress=False).catalog_csv


def test_the_scenes_mix_catalog_shots_in_as_configured(catalog):
    # Catalog shots are 320 px square, shopper scenes 320-640 px a side (SceneStyle.size_range).
    studio = list(TrainingData.from_catalog(catalog, TrainConfig(scenes=6, studio_scenes=1.0)).scenes())
    shopper = list(TrainingData.from_catalog(catalog, TrainConfig(scenes=6, studio_scenes=0.0)).scenes())
    assert len(studio) == len(shopper) == 6
    for scene, boxes in studio:
        assert max(scene.size) <= 320 and len(boxes) == 1
        x1, y1, x2, y2 = boxes[0]
        assert 0 <= x1 < x2 <= scene.width and 0 <= y1 < y2 <= scene.height
        assert (x2 - x1) * (y2 - y1) > 0.1 * scene.width * scene.height  # the product fills much of the frame
    assert all(min(scene.size) >= 320 and 1 <= len(boxes) <= 2 for scene, boxes in shopper)


def test_scenes_and_views_rendered_by_threads_repeat_exactly(catalog):
    """Each scene and each product's views own their seeded stream: two runs give the same pixels and boxes."""
    config = TrainConfig(scenes=8, shopper_views=3, max_products=3)

    def render():
        data = TrainingData.from_catalog(catalog, config)
        return list(data.scenes()), list(data.labelled_views())

    (scenes_a, views_a), (scenes_b, views_b) = render(), render()
    assert len(scenes_a) == 8 and len(views_a) == TrainingData.from_catalog(catalog, config).n_views
    for (image_a, boxes_a), (image_b, boxes_b) in zip(scenes_a, scenes_b):
        assert boxes_a == boxes_b and np.array_equal(np.asarray(image_a), np.asarray(image_b))
    assert [label for label, _ in views_a] == [label for label, _ in views_b]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for (_, a), (_, b) in zip(views_a, views_b))
    assert len({np.asarray(image).tobytes() for image, _ in scenes_a}) == 8  # every scene its own draw
