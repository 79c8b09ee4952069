"""The demo's training crops: deterministic files, whatever the threads' order."""

from PIL import Image

from sinder_hub.commands.demo import write_training_crops
from sinder_hub.data import TRAIN_SAMPLES


def test_training_crops_are_the_same_files_every_run(tmp_path):
    assert write_training_crops(tmp_path / "a", 2) == 2 * len(TRAIN_SAMPLES)
    write_training_crops(tmp_path / "b", 2)
    write_training_crops(tmp_path / "c", 2, seed=1)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(f"{name}_{k:02d}.png" for name in TRAIN_SAMPLES for k in range(2))
    same = [(tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in names]
    other = [(tmp_path / "a" / n).read_bytes() == (tmp_path / "c" / n).read_bytes() for n in names]
    assert all(same) and not any(other)
    with Image.open(tmp_path / "a" / names[0]) as image:
        assert image.size == (256, 256) and image.mode == "RGB"
