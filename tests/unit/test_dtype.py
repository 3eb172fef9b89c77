"""Serving dtype per model: ``--dtype NAME=DTYPE``, ``dtype = "..."`` in ``[[models]]``,
and the weight sizes the planner uses (issue #12 item 1). Torch-free."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from trident.config import (
    DTYPES,
    ModelSpec,
    apply_dtype_flags,
    load_scheduler_config,
    parse_model_flag,
)
from trident.errors import ConfigError
from trident.runtime.registry import register_models
from trident.runtime.scheduler import _parse
from trident.sched.cost import ReferenceCostModel, model_weight_bytes


def test_dtypes_are_the_three_documented_ones() -> None:
    assert DTYPES == ("float32", "bfloat16", "float16")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "auto"])
def test_dtype_flag_sets_the_named_model(dtype: str) -> None:
    models = [parse_model_flag("a=sim:flux"), parse_model_flag("b=sim:wan")]
    out = apply_dtype_flags(models, [f"a={dtype}"])
    assert [m.dtype for m in out] == [dtype, "auto"]
    assert [m.dtype for m in models] == ["auto", "auto"]  # the input is left alone


def test_last_dtype_flag_for_a_name_wins() -> None:
    out = apply_dtype_flags([ModelSpec("a", family="flux")], ["a=float16", "a=float32"])
    assert out[0].dtype == "float32"


def test_invalid_dtype_is_a_config_error_naming_the_valid_values() -> None:
    with pytest.raises(ConfigError) as err:
        apply_dtype_flags([ModelSpec("a", family="flux")], ["a=fp8"])
    msg = str(err.value)
    assert "'fp8'" in msg
    for name in DTYPES:
        assert name in msg


def test_dtype_for_an_unknown_model_is_an_error() -> None:
    with pytest.raises(ConfigError, match="no model named 'zz'"):
        apply_dtype_flags([ModelSpec("a", family="flux")], ["zz=bfloat16"])
    with pytest.raises(ConfigError, match="expected NAME=DTYPE"):
        apply_dtype_flags([ModelSpec("a", family="flux")], ["bfloat16"])


def test_scheduler_flags() -> None:
    cfg, _ = _parse(["--model", "f=sim:flux", "--model", "w=sim:wan", "--dtype", "w=float32"])
    assert {m.name: m.dtype for m in cfg.models} == {"f": "auto", "w": "float32"}
    with pytest.raises(ConfigError, match="no model named 'x'"):
        _parse(["--model", "f=sim:flux", "--dtype", "x=float32"])
    with pytest.raises(ConfigError, match="float32, bfloat16, float16"):
        _parse(["--model", "f=sim:flux", "--dtype", "f=int8"])


def test_toml_dtype_and_flag_override(tmp_path: Path) -> None:
    p = tmp_path / "s.toml"
    p.write_text(
        '[[models]]\nname = "f"\nfamily = "flux"\ndtype = "float16"\n'
        '[[models]]\nname = "w"\nfamily = "wan"\n'
    )
    cfg = load_scheduler_config(p)
    assert {m.name: m.dtype for m in cfg.models} == {"f": "float16", "w": "auto"}
    cfg, _ = _parse(["--config", str(p), "--dtype", "f=bfloat16"])
    assert {m.name: m.dtype for m in cfg.models} == {"f": "bfloat16", "w": "auto"}


@pytest.mark.parametrize("bad", ['"double"', "16"])
def test_toml_invalid_dtype_is_a_config_error(tmp_path: Path, bad: str) -> None:
    p = tmp_path / "s.toml"
    p.write_text(f'[[models]]\nname = "f"\nfamily = "flux"\ndtype = {bad}\n')
    with pytest.raises(ConfigError, match="float32, bfloat16, float16"):
        load_scheduler_config(p)


def _safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A valid safetensors file of zeros: ``name -> (dtype code, shape)``."""
    size = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8}
    header: dict[str, object] = {}
    off = 0
    for name, (code, shape) in tensors.items():
        n = size[code]
        for d in shape:
            n *= d
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(off))


def _flux_dir(root: Path, code: str) -> Path:
    """A flux directory whose weights are stored as ``code`` (F32 or BF16)."""
    (root / "model_index.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "FluxPipeline",
                "transformer": ["diffusers", "FluxTransformer2DModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            }
        )
    )
    (root / "transformer").mkdir()
    (root / "transformer" / "config.json").write_text(json.dumps({"patch_size": 1}))
    (root / "vae").mkdir()
    (root / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [8, 8, 8, 8]}))
    _safetensors(
        root / "transformer" / "diffusion_pytorch_model.safetensors",
        {"w": (code, [1000, 10]), "steps": ("I64", [100])},  # ints keep their size
    )
    _safetensors(root / "vae" / "diffusion_pytorch_model.safetensors", {"w": (code, [500])})
    _safetensors(root / "text_encoder" / "model.safetensors", {"w": (code, [2000])})
    return root


@pytest.mark.parametrize("stored", ["F32", "BF16"])
def test_registry_weight_sizes_follow_the_dtype(tmp_path: Path, stored: str) -> None:
    d = _flux_dir(tmp_path / "flux", stored)
    specs = [ModelSpec(f"m-{dt}", path=str(d), dtype=dt) for dt in (*DTYPES, "auto")]
    served = register_models(specs)
    on_disk = served["m-float32"].meta.stage_weight_bytes

    def w(name: str) -> dict[str, int]:
        return dict(served[name].info.stage_weight_bytes)

    # bytes that are not floating-point weights: headers, configs, the int tensor
    other = {
        s: on_disk[s] - n * (4 if stored == "F32" else 2)
        for s, n in {"diffuse": 10_000, "decode": 500, "encode": 2000}.items()
    }
    assert other["diffuse"] > 800  # the 800 bytes of int64 are not rescaled
    assert w("m-float32") == {
        "diffuse": other["diffuse"] + 40_000,
        "decode": other["decode"] + 2000,
        "encode": other["encode"] + 8000,
    }
    assert w("m-bfloat16") == {
        "diffuse": other["diffuse"] + 20_000,
        "decode": other["decode"] + 1000,
        "encode": other["encode"] + 4000,
    }
    assert w("m-float16") == w("m-bfloat16")
    assert w("m-auto") == w("m-bfloat16")  # sized as cuda runs it
    assert served["m-auto"].info.dtype == "bfloat16"
    assert served["m-auto"].dtype == "auto"  # the worker resolves auto by its device
    assert served["m-float32"].describe()["dtype"] == "float32"
    cost = ReferenceCostModel()
    for name in ("m-float32", "m-bfloat16"):
        info = served[name].info
        assert model_weight_bytes(cost, info, "diffuse") == w(name)["diffuse"]


def test_simulated_model_weights_scale_from_the_bf16_figures() -> None:
    served = register_models(
        [ModelSpec(n, family="flux", dtype=n) for n in ("float32", "bfloat16", "auto")]
    )
    cost = ReferenceCostModel()
    bf16 = cost.weight_bytes("flux", "diffuse")
    assert model_weight_bytes(cost, served["bfloat16"].info, "diffuse") == bf16
    assert model_weight_bytes(cost, served["auto"].info, "diffuse") == bf16
    assert model_weight_bytes(cost, served["float32"].info, "diffuse") == 2 * bf16


def test_sim_device_accounts_weights_at_the_model_dtype() -> None:
    from trident.runtime.devices import SimExecutor

    models = {
        "a": {"family": "flux"},  # no dtype: auto, bfloat16 on a simulated GPU
        "b": {"family": "flux", "dtype": "bfloat16"},
        "c": {"family": "flux", "dtype": "float32"},
    }
    ex = SimExecutor(models, 10**12, time_scale=0.0)
    for m in models:
        ex.load(m, "diffuse")
    bf16 = ReferenceCostModel().weight_bytes("flux", "diffuse")
    assert [ex.resident[(m, "diffuse")] for m in models] == [bf16, bf16, 2 * bf16]


def test_torch_executor_resolves_auto_by_device_kind() -> None:
    torch = pytest.importorskip("torch")
    from trident.runtime.devices import StageError, TorchExecutor

    models = {
        "auto": {"family": "flux", "path": "/nowhere"},
        "half": {"family": "flux", "path": "/nowhere", "dtype": "float16"},
        "bad": {"family": "flux", "path": "/nowhere", "dtype": "int8"},
    }
    cpu = TorchExecutor(models, "cpu")
    assert cpu.dtype("auto") is torch.float32
    assert cpu.dtype("half") is torch.float16
    cuda = TorchExecutor(models, "cpu")
    cuda.kind = "cuda"  # what a cuda:N executor has; no GPU needed to resolve the name
    assert cuda.dtype("auto") is torch.bfloat16
    with pytest.raises(StageError, match="int8"):
        cpu.dtype("bad")
