"""Models trained on non-square images: their InputSpec keeps both sides, image files are read to that shape."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import hydranets
from hydranets.data import ImageDataset
from hydranets.data.inputs import InputSpec, read_images
from hydranets.errors import HydraError

pytestmark = pytest.mark.usefixtures("one_thread")


def _wide_dataset() -> ImageDataset:
    images = torch.randint(0, 256, (6, 3, 20, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return ImageDataset(images, torch.tensor([0, 1, 2, 0, 1, 2]), ["a", "b", "c"], (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))


def test_the_spec_of_non_square_images_keeps_both_sides_and_old_specs_stay_square():
    spec = InputSpec.of_dataset(_wide_dataset())
    assert spec.shape == (20, 28) and (spec.size, spec.height) == (28, 20)
    assert InputSpec.from_dict(spec.to_dict()) == spec
    old = {k: v for k, v in spec.to_dict().items() if k != "height"}  # saved before `height` existed
    assert InputSpec.from_dict(old).shape == (28, 28)
    square = ImageDataset(torch.zeros(2, 1, 16, 16, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"], (0.5,), (0.5,))
    assert InputSpec.of_dataset(square).shape == (16, 16)
    assert "height" not in InputSpec.of_dataset(square).to_dict()  # square checkpoints keep their old format


@pytest.mark.parametrize("width, height, resized, corner", [
    (70, 40, (35, 20), (3, 0)),    # wider than the spec: scaled by 20 / 40, 7 columns cropped
    (40, 60, (28, 42), (0, 11)),   # taller: scaled by 28 / 40, 22 rows cropped
])
def test_image_files_are_scaled_to_cover_the_spec_and_centre_cropped(tmp_path, width, height, resized, corner):
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "img.png")
    spec = InputSpec.of_dataset(_wide_dataset())
    got = read_images([tmp_path / "img.png"], spec)
    left, top = corner
    expected = np.asarray(Image.fromarray(pixels).resize(resized, Image.Resampling.BILINEAR))[top:top + 20, left:left + 28]
    assert got.shape == (1, 3, 20, 28)
    assert torch.equal(got[0], torch.from_numpy(expected.copy()).permute(2, 0, 1))


def test_predict_takes_the_spec_shape_and_refuses_the_square_one():
    data = _wide_dataset()
    model = hydranets.create_model("resnet_cifar", num_classes=3, depth=8, width=0.25).eval()
    model.input_spec = InputSpec.of_dataset(data)
    rows = hydranets.predict(model, data.images, top=1)
    x = (data.images.float() / 255 - torch.tensor(data.mean).view(1, 3, 1, 1)) / torch.tensor(data.std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert [r["indices"][0] for r in rows] == model(x).argmax(1).tolist()
    with pytest.raises(HydraError, match="takes 20x28 images, got 28x28"):
        hydranets.predict(model, torch.zeros(1, 3, 28, 28, dtype=torch.uint8))
