"""Full-size paper models for server GPUs in float16: about 4 minutes and 11 GB of memory on 2 cores."""

import numpy as np
import pytest

from mixer_edge.compiler import compile_model
from mixer_edge.export import open_model

from conftest import quiet

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("model, params_millions", [("mixer_l16", 207), ("mixer_h14", 431)])
def test_server_preset_builds_full_size_model_in_float16(tmp_path, model, params_millions):
    source = open_model(model, progress=quiet)
    manifest = compile_model(source, "h100", tmp_path / model, progress=quiet)
    assert manifest["precision"]["compute"] == "float16" and manifest["cuda"]["archs"] == ["sm_90"]
    with np.load(tmp_path / model / "params.npz") as npz:
        fp16 = sum(npz[k].size for k in npz.files if npz[k].dtype == np.float16)
    assert fp16 / 1e6 > 0.95 * params_millions  # the weights ship in half precision
