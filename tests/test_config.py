"""PolarConfig: options validation."""

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from polar_compile import PolarConfig
from polar_compile.config import AVAILABLE_PASSES, PolarOptionError
from polar_compile.routers import ModelShape, RouterBank


@pytest.mark.parametrize("density", [0, 1.5, -0.1, float("nan")])
def test_density_out_of_range(density):
    with pytest.raises(ValueError, match=rf"^density must be a number in \(0, 1\], got {density!r}$"):
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
    available = re.escape(str(list(AVAILABLE_PASSES)))
    with pytest.raises(ValueError, match=rf"unknown pass\(es\) \['mlp2'\]; available: {available}"):
        PolarConfig.from_options({"passes": ["mlp2"]})


def test_routers_from_a_directory_that_is_not_a_bank(tmp_path):
    with pytest.raises(ValueError, match=r"missing polar_config\.json"):
        PolarConfig.from_options({"routers": str(tmp_path)})


def test_routers_from_a_directory(tmp_path):
    bank = RouterBank(ModelShape("llama", 3, 8, 2, 2), {1: torch.ones(2, 8)}, {1: torch.zeros(2)})
    directory = bank.save(tmp_path / "bank")
    for routers in (directory, str(directory)):
        for config in (PolarConfig.from_options({"routers": routers}), PolarConfig(routers=routers)):
            assert isinstance(config.routers, RouterBank) and config.routers.layers == [1]


@pytest.mark.parametrize("value", [-1, "32", True, float("nan")])
def test_min_saved_mib_must_be_a_non_negative_number(value):
    with pytest.raises(ValueError, match=r"min_saved_mib must be a number >= 0 \(MiB\), got"):
        PolarConfig.from_options({"min_saved_mib": value})


# (option, value, the whole message)
WRONG_OPTIONS = [
    ("inductor", "False", r"inductor must be a bool \(True or False\), got str 'False'"),
    ("inductor", 0, r"inductor must be a bool \(True or False\), got int 0"),
    ("inductor", None, r"inductor must be a bool \(True or False\), got NoneType None"),
    ("passes", 3, r"passes must be a pass name \(str\) or a list/tuple of pass names, got int 3"),
    ("passes", {"attention"}, r"passes must be a pass name \(str\) or a list/tuple of pass names, got set \{'attention'\}"),
    ("passes", ["attention", None], r"passes\[1\] must be a pass name \(str\), got NoneType None"),
    ("density", "0.5", r"density must be a number in \(0, 1\] or a non-empty sequence of such numbers \(one per "
                       r"layer\), got str '0\.5'"),
    ("density", True, r"density must be a number in \(0, 1\] or a non-empty sequence .*, got bool True"),
    ("density", [], r"density must be a number in \(0, 1\] or a non-empty sequence .*, got list \[\]"),
    ("density", {0: 0.5}, r"density must be a number in \(0, 1\] or a non-empty sequence .*, got dict \{0: 0\.5\}"),
    ("density", [0.5, "0.5"], r"density\[1\] must be a number in \(0, 1\], got str '0\.5'"),
    ("density", (0.5, False), r"density\[1\] must be a number in \(0, 1\], got bool False"),
    ("min_saved_mib", "32", r"min_saved_mib must be a number >= 0 \(MiB\), got str '32'"),
    ("min_saved_mib", True, r"min_saved_mib must be a number >= 0 \(MiB\), got bool True"),
    ("min_saved_mib", -1, r"min_saved_mib must be a number >= 0 \(MiB\), got -1"),
    ("routers", 3, r"routers must be a RouterBank or a router bank directory \(str or Path\), got int 3"),
    ("routers", ["bank/"], r"routers must be a RouterBank or a router bank directory .*, got list \['bank/'\]"),
]


@pytest.mark.parametrize(("option", "value", "message"), WRONG_OPTIONS,
                         ids=[f"{option}={value!r}" for option, value, _ in WRONG_OPTIONS])
def test_wrong_option_types_name_the_option_expected_and_actual(option, value, message):
    for build in (PolarConfig.from_options, lambda options: PolarConfig(**options)):
        with pytest.raises(PolarOptionError, match=f"^{message}$") as raised:
            build({option: value})
        assert isinstance(raised.value, TypeError) and isinstance(raised.value, ValueError)


def test_option_values_that_are_accepted():
    config = PolarConfig.from_options({"inductor": False, "passes": "attention", "density": (1, 0.5),
                                       "min_saved_mib": 0})
    assert config.inductor is False and config.passes == ("attention",) and config.density == (1.0, 0.5)
    assert PolarConfig.from_options({"passes": [], "min_saved_mib": 2.5}).passes == ()
    assert PolarConfig.from_options(None) == PolarConfig()


@given(st.one_of(st.text(), st.integers(), st.floats(), st.none(), st.lists(st.booleans(), max_size=2)))
def test_inductor_takes_only_a_bool(value):
    with pytest.raises(PolarOptionError, match=rf"^inductor must be a bool \(True or False\), got {type(value).__name__} "):
        PolarConfig.from_options({"inductor": value})


@given(st.one_of(st.text(), st.booleans(), st.binary(max_size=2),
                 st.floats(allow_nan=False).filter(lambda d: not 0 < d <= 1)))
def test_density_takes_only_numbers_in_range(value):
    with pytest.raises(PolarOptionError, match=r"^density must be a number in \(0, 1\]"):
        PolarConfig.from_options({"density": value})


def test_min_saved_mib_defaults_to_the_cuda_cost_model_only_on_cuda():
    assert PolarConfig().saved_bytes_threshold("cuda") == PolarConfig.CUDA_MIN_SAVED_MIB * 2**20
    assert PolarConfig().saved_bytes_threshold("cpu") == 0
    assert PolarConfig(min_saved_mib=0).saved_bytes_threshold("cuda") == 0
    assert PolarConfig(min_saved_mib=1.5).saved_bytes_threshold("cpu") == 1.5 * 2**20


def test_options_must_be_a_mapping():
    with pytest.raises(PolarOptionError, match=r"polar options must be a dict, got list \[\('density', 0\.5\)\]"):
        PolarConfig.from_options([("density", 0.5)])


def test_mlp_break_even_by_device_batch_and_mlp_size():
    config = PolarConfig()
    assert config.mlp_break_even("cpu", 64, 2**40) == 1.0  # the reference ops: always route what the table says
    small, large = 256 * 2**20, 2**31  # OPT-6.7B's MLP, OPT-66B's
    assert [config.mlp_break_even("cuda", b, small) for b in (1, 16, 17, 64, 65, 256)] == [0.5, 0.5, 0.4, 0.3,
                                                                                         0.3, 0.3]
    assert [config.mlp_break_even("cuda", b, large) for b in (1, 16, 32, 64, 128)] == [0.7, 0.7, 0.6, 0.5, 0.4]
