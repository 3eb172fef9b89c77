"""The full-size configs of the GPU acceptance run (bench/gpu/configs) load into their
diffusers / transformers classes on the meta device and have the published sizes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.timeout(120)

GPU_DIR = Path(__file__).resolve().parents[2] / "bench" / "gpu"


def _build_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("trident_gpu_build", GPU_DIR / "build.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


build = _build_module()

# Published model sizes (parameters) quoted by the model cards / papers, independent of
# the manifests' exact figures: each component must be within 2% of these.
PUBLISHED = {
    ("flux", "transformer"): 11.9e9,  # FLUX.1-dev: "12B"; 11.90B counted
    ("flux", "text_encoder_2"): 4.76e9,  # T5-v1.1-XXL encoder
    ("flux", "text_encoder"): 123e6,  # CLIP-L text tower
    ("sd3", "transformer"): 2.03e9,  # SD3-medium MMDiT "2B"
    ("sd3", "text_encoder_2"): 695e6,  # OpenCLIP bigG text tower
    ("sd3", "text_encoder_3"): 4.76e9,
    ("wan", "transformer"): 1.42e9,  # Wan2.1-T2V-"1.3B"
    ("wan", "text_encoder"): 5.68e9,  # umT5-XXL encoder
    ("wan", "vae"): 127e6,  # Wan-VAE
    ("cogvideox", "transformer"): 5.57e9,  # CogVideoX1.5-"5B"
    ("cogvideox", "text_encoder"): 4.76e9,
    ("hunyuanvideo", "transformer"): 12.8e9,  # HunyuanVideo "13B"
    ("hunyuanvideo", "text_encoder"): 7.5e9,  # Llama-3-8B text tower without lm_head
}


@pytest.mark.parametrize("family", build.FAMILIES)
def test_configs_load_on_meta_with_published_sizes(family: str) -> None:
    man = build.manifest(family)
    configs = build.component_configs(family)
    assert set(man["published_parameters"]) == set(configs) - {"scheduler"}
    counts = build.meta_parameter_counts(family)
    for name, want in man["published_parameters"].items():
        assert abs(counts[name] / want - 1) <= 0.02, (family, name, counts[name], want)
    for (fam, name), want in PUBLISHED.items():
        if fam == family:
            assert abs(counts[name] / want - 1) <= 0.02, (family, name, counts[name], want)
    # the scheduler config loads too
    sched = build.instantiate(configs["scheduler"])
    assert type(sched).__name__ == configs["scheduler"]["_class_name"]


def test_manifests_name_real_pipelines_and_tokenizers() -> None:
    import diffusers

    from trident.families import FAMILIES

    for family in build.FAMILIES:
        man = build.manifest(family)
        assert man["pipeline_class"] == FAMILIES[family].pipeline_class
        assert hasattr(diffusers, man["pipeline_class"])
        assert set(man["tokenizers"].values()) <= {"clip", "t5", "llama"}
        configs = build.component_configs(family)
        for comp in man.get("shared", {}):
            assert comp in configs
