import torch

from mixer_edge.checkpoints import load_checkpoint, read_metadata
from mixer_edge.export import BUNDLED_CHECKPOINT
from mixer_edge.model import MixerConfig
from mixer_edge.train import save_checkpoint, train_digits


def test_bundled_checkpoint_reaches_95_percent(digits_test):
    meta = read_metadata(BUNDLED_CHECKPOINT)
    model = load_checkpoint(BUNDLED_CHECKPOINT, MixerConfig.from_dict(meta["config"]))
    x, y = digits_test
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(x)).argmax(1).numpy() == y).mean()
    assert accuracy >= 0.95
    assert abs(accuracy - meta["test_accuracy"]) < 1e-3  # the metadata tells the truth


def test_recipe_runs_and_saves_a_loadable_checkpoint(tmp_path):
    result = train_digits(epochs=3, progress=False)
    assert result.test_accuracy > 0.5  # three epochs already learn; the full recipe is checked above
    path = save_checkpoint(result, "mixer_digits", tmp_path / "d.safetensors")
    meta = read_metadata(path)
    assert meta["preset"] == "mixer_digits" and meta["epochs"] == 3
    load_checkpoint(path, MixerConfig.from_dict(meta["config"]))
    assert [p.name for p in tmp_path.iterdir()] == ["d.safetensors"]
