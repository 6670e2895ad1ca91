"""PolarConfig: options validation."""

import pytest

from polar_compile import PolarConfig
from polar_compile.routers import ModelShape, RouterBank


@pytest.mark.parametrize("density", [0, 1.5, -0.1, "0.5", True])
def test_density_out_of_range(density):
    with pytest.raises(ValueError, match=r"density must be a number in \(0, 1\], got"):
        PolarConfig.from_options({"density": density})


def test_per_layer_density():
    bank = RouterBank(ModelShape("llama", 3, 8, 2, 2), {}, {}, densities={2: 0.25})
    config = PolarConfig.from_options({"routers": bank, "density": [1.0, 0.5, 0.75]})
    assert [config.layer_density(i) for i in range(3)] == [1.0, 0.5, 0.75]
    assert PolarConfig(routers=bank).layer_density(2) == 0.25
    assert PolarConfig(routers=bank).layer_density(1) == PolarConfig.DEFAULT_DENSITY
    with pytest.raises(ValueError, match="per-layer density has 2 entries, the model has 3 layers"):
        PolarConfig.from_options({"routers": bank, "density": [0.5, 0.5]})
    with pytest.raises(ValueError, match=r"density\[1\] must be a number in \(0, 1\], got 0"):
        PolarConfig.from_options({"density": [0.5, 0]})


def test_unknown_option_and_pass():
    with pytest.raises(ValueError, match=r"unknown polar option\(s\) \['densty'\]; valid options: \['routers'"):
        PolarConfig.from_options({"densty": 0.5})
    with pytest.raises(ValueError, match=r"unknown pass\(es\) \['mlp2'\]; available: \['attention'\]"):
        PolarConfig.from_options({"passes": ["mlp2"]})


def test_routers_from_a_directory_that_is_not_a_bank(tmp_path):
    with pytest.raises(ValueError, match=r"missing polar_config\.json"):
        PolarConfig.from_options({"routers": str(tmp_path)})


@pytest.mark.parametrize("value", [-1, "32", True, float("nan")])
def test_min_saved_mib_must_be_a_non_negative_number(value):
    with pytest.raises(ValueError, match=r"min_saved_mib must be a number >= 0 \(MiB\), got"):
        PolarConfig.from_options({"min_saved_mib": value})


def test_min_saved_mib_defaults_to_the_cuda_cost_model_only_on_cuda():
    assert PolarConfig().saved_bytes_threshold("cuda") == PolarConfig.CUDA_MIN_SAVED_MIB * 2**20
    assert PolarConfig().saved_bytes_threshold("cpu") == 0
    assert PolarConfig(min_saved_mib=0).saved_bytes_threshold("cuda") == 0
    assert PolarConfig(min_saved_mib=1.5).saved_bytes_threshold("cpu") == 1.5 * 2**20
