"""Tiny models: loadable by diffusers itself, small, deterministic, and a CLI."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from trident.pipelines import inspect_model
from trident.pipelines.tiny import TINY_FAMILIES, main, make_tiny_model


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.mark.timeout(60)
def test_cli_writes_a_diffusers_pipeline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from diffusers import DiffusionPipeline

    assert main(["sd3", str(tmp_path / "m"), "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "m")
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    size = sum(f.stat().st_size for f in (tmp_path / "m").rglob("*") if f.is_file())
    assert size < 5 * 2**20


def test_cli_rejects_unknown_family(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["stable-cascade", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown family"):
        make_tiny_model("stable-cascade", tmp_path)


@pytest.mark.timeout(60)
def test_weights_depend_only_on_the_seed(tiny_model_dir: object, tmp_path: Path) -> None:
    a = make_tiny_model("flux", tmp_path / "a", seed=1)
    b = make_tiny_model("flux", tmp_path / "b", seed=1)
    c = make_tiny_model("flux", tmp_path / "c", seed=2)
    assert _digest(a) == _digest(b) != _digest(c)


def test_every_family_is_servable(tiny_model_dir: object) -> None:
    for family in TINY_FAMILIES:
        meta = inspect_model(tiny_model_dir(family))  # type: ignore[operator]
        assert meta.family == family
