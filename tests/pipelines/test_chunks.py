"""Resumable diffuse chunks give the unchunked output, bit for bit at the same degree.

A request's diffuse is split into chunks ``[a, b)`` at arbitrary points; each chunk runs
on a separate pipeline object (as on another device), its state goes through the wire
codec between chunks (zero-copy frames, read-only on arrival), and the final latents
must equal one uninterrupted diffuse exactly. A yield (the worker's flag asking to stop)
ends a chunk at the next step boundary with the same kind of state.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.pipelines.conftest import TEST_SHAPES
from trident.errors import InvalidRequestError
from trident.pipelines import open_pipeline
from trident.pipelines.chunks import is_partial, steps_done
from trident.runtime.serial import pack_tensors, unpack_tensors

STEPS = 4

CASES: list[tuple[str, dict[str, Any]]] = [
    ("flux", {}),
    ("sd3", {"negative_prompt": "blurry", "guidance_scale": 5.0}),
    ("wan", {"negative_prompt": "blurry", "guidance_scale": 5.0}),
    ("cogvideox", {"negative_prompt": "blurry", "guidance_scale": 6.0, "use_dynamic_cfg": True}),
    ("hunyuanvideo", {}),
]


def _wire(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Through the wire codec, as a device hop would (read-only tensors on arrival)."""
    meta, frames = pack_tensors(tensors)
    return unpack_tensors(meta, [bytes(f) for f in frames])


def _request(family: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "prompt": "a red fox in the snow",
        "num_inference_steps": STEPS,
        "seed": 5,
        **TEST_SHAPES[family],
        **extra,
    }


def _chunked(
    model_dir: Path, params: dict[str, Any], cuts: list[int]
) -> tuple[dict[str, torch.Tensor], list[int]]:
    encoder = open_pipeline(model_dir)
    state = _wire(encoder.run("encode", {}, params))
    bounds = [0, *cuts, STEPS]
    done = []
    for a, b in itertools.pairwise(bounds):
        worker = open_pipeline(model_dir)  # a fresh object: another device
        out = worker.run("diffuse", state, params, {"diffuse_steps": [a, b]})
        if b < STEPS:
            assert is_partial(out)
            done.append(steps_done(out) or 0)
        else:
            assert not is_partial(out)
        state = _wire(out)
    return state, done


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("family", "extra"), CASES, ids=[f for f, _ in CASES])
def test_chunked_diffuse_equals_unchunked(
    tiny_model_dir: Callable[[str], Path], family: str, extra: dict[str, Any]
) -> None:
    model_dir = tiny_model_dir(family)
    params = _request(family, extra)
    stages = open_pipeline(model_dir)
    whole = stages.run("diffuse", stages.run("encode", {}, params), params)
    for cuts in ([1], [3], [1, 2, 3]):
        got, done = _chunked(model_dir, params, cuts)
        assert done == cuts
        assert set(got) == set(whole)
        for name, value in whole.items():
            assert torch.equal(got[name], value), (family, cuts, name)
    # The decoded pixels follow (the decode stage sees the same latents).
    pixels = stages.run("decode", got, params)["output"]
    assert torch.equal(pixels, stages.run("decode", whole, params)["output"])


class _YieldAfter(threading.Event):
    """A worker flag that asks for a yield once ``after`` steps are done."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.after = after
        self.steps: list[int] = []
        self.polls = 0  # polled once at the end of every denoising step

    def report_step(self, step: int, total: int) -> None:
        self.steps.append(step)

    def poll(self) -> tuple[bool, bool]:
        self.polls += 1
        return self.is_set(), self.polls >= self.after


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family", ["flux", "wan"])
def test_yield_stops_at_a_step_boundary_and_resumes_exactly(
    tiny_model_dir: Callable[[str], Path], family: str
) -> None:
    model_dir = tiny_model_dir(family)
    params = _request(family, {})
    stages = open_pipeline(model_dir)
    emb = stages.run("encode", {}, params)
    whole = stages.run("diffuse", emb, params)
    flag = _YieldAfter(after=2)
    paused = stages.run("diffuse", emb, params, cancel=flag)
    assert is_partial(paused) and steps_done(paused) == 2
    assert flag.steps == [1, 2]  # progress counts the request's steps
    resumed = open_pipeline(model_dir).run(
        "diffuse", _wire(paused), params, {"diffuse_steps": [2, None]}
    )
    assert torch.equal(resumed["latents"], whole["latents"])


@pytest.mark.timeout(60)
def test_bad_chunk_ranges_are_refused(tiny_model_dir: Callable[[str], Path]) -> None:
    model_dir = tiny_model_dir("flux")
    params = _request("flux", {})
    stages = open_pipeline(model_dir)
    emb = stages.run("encode", {}, params)
    with pytest.raises(InvalidRequestError, match="no chunk state"):
        stages.run("diffuse", emb, params, {"diffuse_steps": [2, 4]})
    with pytest.raises(InvalidRequestError, match="not a range"):
        stages.run("diffuse", emb, params, {"diffuse_steps": [3, 2]})
    paused = stages.run("diffuse", emb, params, {"diffuse_steps": [0, 1]})
    with pytest.raises(InvalidRequestError, match="has done 1"):
        stages.run("diffuse", paused, params, {"diffuse_steps": [2, 4]})


# ----------------------------------------------------------------- degree changes


def _degree_child(q: Any, rank: int, rendezvous: str, model_dir: str, family: str) -> None:
    """Rank 0: the degree-1 reference and a degree-1 first chunk; then both ranks run the
    second chunk at degree 2, a first chunk at degree 2 that yields (agreed across ranks),
    and rank 0 finishes that one at degree 1."""
    try:
        torch.set_num_threads(1)
        from trident.pipelines.parallel import join_group, leave_group

        stages: Any = open_pipeline(model_dir)
        params = _request(family, {})
        emb = whole = first = None
        if rank == 0:
            emb = stages.run("encode", {}, params)
            whole = stages.run("diffuse", emb, params)["latents"]
            first = _wire(stages.run("diffuse", emb, params, {"diffuse_steps": [0, 2]}))
        ctx = join_group(rendezvous, f"chunks-{family}", rank, 2)
        try:
            second = stages.run("diffuse", first, params, {"diffuse_steps": [2, 4]}, ctx)
            # Only rank 1 is asked to yield: the agreed flag stops both after step 1.
            flag = _YieldAfter(after=1 if rank == 1 else 99)
            paused = stages.run("diffuse", emb, params, parallel=ctx, cancel=flag)
        finally:
            leave_group(ctx)
        if rank == 0:
            assert whole is not None
            rest = stages.run("diffuse", _wire(paused), params, {"diffuse_steps": [1, None]})
            q.put(
                (
                    rank,
                    {
                        "up": float((second["latents"] - whole).abs().max()),
                        "down": float((rest["latents"] - whole).abs().max()),
                        "paused_at": steps_done(paused),
                    },
                )
            )
        else:
            q.put((rank, steps_done(paused)))
    except Exception:
        import traceback

        q.put((rank, traceback.format_exc()))


@pytest.mark.timeout(180)
def test_degree_change_between_chunks_matches_within_tolerance(
    tiny_model_dir: Callable[[str], Path],
) -> None:
    from tests.pipelines.test_parallel import _children, _collect, _free_port

    rendezvous = f"tcp://127.0.0.1:{_free_port()}"
    model_dir = str(tiny_model_dir("flux"))
    with _children([(_degree_child, (rank, rendezvous, model_dir, "flux")) for rank in (0, 1)]) as (
        q,
        _,
    ):
        got = _collect(q, 2)
    assert got[1] == 1  # rank 1 stopped after the same step as rank 0
    assert got[0]["paused_at"] == 1
    assert got[0]["up"] <= 1e-4  # degree 1 -> 2 between chunks
    assert got[0]["down"] <= 1e-4  # degree 2 -> 1 between chunks
