"""Degree k > 1 for the diffuse stage: groups, input broadcast, context / CFG parallelism.

Multi-process tests spawn fresh interpreters ('spawn' start method) that run the helpers at
the bottom of this module and report through a queue; every child is joined or killed.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue
import socket
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from trident.pipelines.api import ModelMeta, ParallelContext

pytestmark = pytest.mark.timeout(120)

CHILD_TIMEOUT_S = 100.0
# Context parallel (flux, wan: diffusers _cp_plan) and CFG-parallel (sd3).
FAMILIES = ("flux", "wan", "sd3")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _children(
    targets: list[tuple[Callable[..., None], tuple[Any, ...]]],
) -> Iterator[tuple[Any, list[Any]]]:
    """Start ``target(queue, *args)`` per entry in spawned processes; always reap them."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=fn, args=(q, *args), daemon=True) for fn, args in targets]
    try:
        for p in procs:
            p.start()
        yield q, procs
    finally:
        for p in procs:
            p.join(timeout=10)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        q.close()
        q.join_thread()


def _collect(q: Any, n: int) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for _ in range(n):
        try:
            who, result = q.get(timeout=CHILD_TIMEOUT_S)
        except queue.Empty:
            pytest.fail(f"children reported {sorted(out)} of {n} results in time")
        if isinstance(result, str) and result.startswith("Traceback"):
            pytest.fail(f"child {who} failed:\n{result}")
        out[who] = result
    return out


# ----------------------------------------------------------------- in-process tests


def _meta(family: str, *, uses_cfg: bool, context_parallel: bool) -> ModelMeta:
    return ModelMeta(
        path="/nonexistent",
        family=family,
        pipeline_class="X",
        is_video=False,
        vae_scale_factor_spatial=8,
        uses_cfg=uses_cfg,
        context_parallel=context_parallel,
    )


def test_degree_one_is_a_no_op() -> None:
    import torch

    from trident.pipelines.parallel import broadcast_inputs, diffuse_context

    x = {"a": torch.ones(2)}
    assert broadcast_inputs(x, None)["a"] is x["a"]
    pipe = SimpleNamespace(transformer=object())
    with diffuse_context(pipe, _meta("hunyuanvideo", uses_cfg=False, context_parallel=False), None):
        pass
    with pytest.raises(ValueError):
        broadcast_inputs(None, None)


def test_refuses_family_without_cp_plan_or_cfg() -> None:
    from trident.pipelines.parallel import diffuse_context, parallel_mode

    fake = ParallelContext(rank=0, world_size=2, group=None)
    pipe = SimpleNamespace(transformer=SimpleNamespace(_cp_plan=None))
    meta = _meta("hunyuanvideo", uses_cfg=False, context_parallel=False)
    assert parallel_mode(pipe, meta) == "none"
    with (
        pytest.raises(ValueError, match="hunyuanvideo: degree 2 is not supported"),
        diffuse_context(pipe, meta, fake),
    ):
        pass
    assert parallel_mode(pipe, _meta("sd3", uses_cfg=True, context_parallel=False)) == "cfg"
    cp_pipe = SimpleNamespace(transformer=SimpleNamespace(_cp_plan={"x": 1}))
    assert parallel_mode(cp_pipe, _meta("flux", uses_cfg=False, context_parallel=True)) == "context"


def test_join_group_validates_arguments() -> None:
    from trident.pipelines.parallel import join_group

    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        join_group("localhost:1234", "k", 0, 2)
    with pytest.raises(ValueError, match="outside"):
        join_group("tcp://127.0.0.1:1", "k", 2, 2)
    with pytest.raises(ValueError, match="world_size"):
        join_group("tcp://127.0.0.1:1", "k", 0, 1)
    with pytest.raises(ValueError, match="group_key"):
        join_group("tcp://127.0.0.1:1", "a/b", 0, 2)


def test_cpu_shim_is_scoped_to_cpu_and_the_block() -> None:
    import torch

    from trident.pipelines.parallel import _cpu_device_count_shim

    before = torch.accelerator.device_count
    with _cpu_device_count_shim("cpu"):
        assert torch.accelerator.device_count() >= 1
    assert torch.accelerator.device_count is before
    with _cpu_device_count_shim("cuda"):
        assert torch.accelerator.device_count is before
    with pytest.raises(RuntimeError), _cpu_device_count_shim("cpu"):
        raise RuntimeError("boom")
    assert torch.accelerator.device_count is before


def test_shared_clone_shares_weights_not_state() -> None:
    import torch
    from diffusers import FluxTransformer2DModel

    from trident.pipelines.parallel import _shared_clone

    torch.manual_seed(0)
    model: Any = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    clone: Any = _shared_clone(model)
    assert clone is not model
    pairs = list(zip(clone.named_parameters(), model.named_parameters(), strict=True))
    assert all(a is b and na == nb for (na, a), (nb, b) in pairs)
    blocks = list(zip(clone.modules(), model.modules(), strict=True))
    assert all(a is not b for a, b in blocks)
    attn_c, attn_m = clone.transformer_blocks[0].attn, model.transformer_blocks[0].attn
    assert attn_c.processor is not attn_m.processor
    attn_c.processor._parallel_config = "x"
    assert attn_m.processor._parallel_config is None
    clone.register_forward_hook(lambda *a: None)
    assert not model._forward_hooks


# ----------------------------------------------------------------- groups (torch only)


def _group_child(
    q: Any, name: str, rendezvous: str, plan: list[tuple[str, int, int]], host_first: bool
) -> None:
    """Join each (group_key, rank, world) of ``plan`` in turn; broadcast + all_reduce."""
    try:
        import torch
        import torch.distributed as dist

        from trident.pipelines.parallel import broadcast_inputs, host_store, join_group, leave_group

        if host_first:
            host, port = rendezvous.removeprefix("tcp://").split(":")
            assert host_store(host, int(port)) == rendezvous
        seen = []
        for key, rank, world in plan:
            ctx = join_group(rendezvous, key, rank, world)
            assert dist.get_rank() == rank and dist.get_world_size() == world
            src = {"x": torch.arange(6.0).reshape(2, 3), "i": torch.tensor([7], dtype=torch.int64)}
            got = broadcast_inputs(src if rank == 0 else None, ctx)
            assert torch.equal(got["x"], src["x"]) and got["i"].dtype == torch.int64
            total = torch.tensor([float(rank + 1)])
            dist.all_reduce(total, group=ctx.group)
            seen.append(float(total))
            leave_group(ctx)
            leave_group(ctx)  # idempotent
            assert not dist.is_initialized()
        q.put((name, seen))
    except Exception:
        q.put((name, traceback.format_exc()))


def test_groups_reform_and_survive_a_restarted_partner() -> None:
    """A hosts its store and stays up; B leaves (exits) after two formations; C -- a fresh
    process, as after a restart -- forms new groups with A under new keys."""
    rendezvous = f"tcp://127.0.0.1:{_free_port()}"
    with _children(
        [
            (_group_child, ("A", rendezvous, [("g1", 0, 2), ("g2", 0, 2)], True)),
            (_group_child, ("B", rendezvous, [("g1", 1, 2), ("g2", 1, 2)], False)),
        ]
    ) as (q, _):
        first = _collect(q, 2)
    assert first == {"A": [3.0, 3.0], "B": [3.0, 3.0]}
    # A new pair: D hosts on the same port again (rank 0, fallback hosting), E is a client.
    with _children(
        [
            (_group_child, ("D", rendezvous, [("g3", 0, 2), ("g4", 0, 2)], False)),
            (_group_child, ("E", rendezvous, [("g3", 1, 2), ("g4", 1, 2)], False)),
        ]
    ) as (q, _):
        second = _collect(q, 2)
    assert second == {"D": [3.0, 3.0], "E": [3.0, 3.0]}


def _restart_host(q: Any, rendezvous: str, n_partners: int) -> None:
    try:
        import torch
        import torch.distributed as dist

        from trident.pipelines.parallel import host_store, join_group, leave_group

        host, port = rendezvous.removeprefix("tcp://").split(":")
        host_store(host, int(port))
        for i in range(n_partners):
            ctx = join_group(rendezvous, f"formation-{i}", 0, 2)
            t = torch.tensor([1.0])
            dist.all_reduce(t, group=ctx.group)
            leave_group(ctx)
        q.put(("host", "ok"))
    except Exception:
        q.put(("host", traceback.format_exc()))


def _restart_partner(q: Any, rendezvous: str, i: int) -> None:
    try:
        import torch
        import torch.distributed as dist

        from trident.pipelines.parallel import join_group, leave_group

        ctx = join_group(rendezvous, f"formation-{i}", 1, 2)
        t = torch.tensor([2.0])
        dist.all_reduce(t, group=ctx.group)
        leave_group(ctx)
        q.put((f"partner{i}", float(t)))
    except Exception:
        q.put((f"partner{i}", traceback.format_exc()))


def test_partner_process_restarted_between_formations() -> None:
    rendezvous = f"tcp://127.0.0.1:{_free_port()}"
    ctx = mp.get_context("spawn")
    with _children([(_restart_host, (rendezvous, 2))]) as (q, _):
        for i in range(2):  # partner 0 exits, partner 1 is a fresh process (the "restart")
            p = ctx.Process(target=_restart_partner, args=(q, rendezvous, i), daemon=True)
            p.start()
            p.join(timeout=CHILD_TIMEOUT_S)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
            assert p.exitcode == 0
        got = _collect(q, 3)
    assert got == {"partner0": 3.0, "partner1": 3.0, "host": "ok"}


# ----------------------------------------------------------------- degree 2 == degree 1


def _diffuse_child(
    q: Any, rank: int, rendezvous: str, dirs: dict[str, str], shapes: dict[str, dict[str, int]]
) -> None:
    """Rank 0 computes the degree-1 reference, then both ranks run degree 2."""
    try:
        import torch

        torch.set_num_threads(1)
        from trident.pipelines import open_pipeline
        from trident.pipelines.parallel import join_group, leave_group

        result: dict[str, Any] = {}
        for n, family in enumerate(FAMILIES):
            stages: Any = open_pipeline(dirs[family])
            stages.load("diffuse")
            loaded = stages._pipes["diffuse"].transformer
            params = {**shapes[family], "num_inference_steps": 2, "seed": 3}
            emb = ref = None
            if rank == 0:
                stages.load("encode")
                emb = stages.run("encode", {}, {"prompt": "a red fox", "negative_prompt": "blur"})
                ref = stages.run("diffuse", emb, params)["latents"]
            ctx = join_group(rendezvous, f"{family}-{n}", rank, 2)
            try:
                out = stages.run("diffuse", emb, params, parallel=ctx)["latents"]
                again = stages.run("diffuse", emb, params, parallel=ctx)["latents"]
                if family == "sd3":  # no guidance -> batch 1: a clear error on every rank
                    emb1 = None
                    if rank == 0:
                        emb1 = stages.run("encode", {}, {"prompt": "a fox", "guidance_scale": 1.0})
                    try:
                        stages.run("diffuse", emb1, {**params, "guidance_scale": 1.0}, parallel=ctx)
                        result["sd3_no_cfg_error"] = None
                    except RuntimeError as e:
                        result["sd3_no_cfg_error"] = str(e)
            finally:
                leave_group(ctx)
            if rank == 0:
                assert ref is not None
                after = stages.run("diffuse", emb, params)["latents"]
                result[family] = {
                    "diff": float((out - ref).abs().max()),
                    "diff_again": float((again - ref).abs().max()),
                    "degree1_after_exact": bool(torch.equal(after, ref)),
                    "transformer_restored": stages._pipes["diffuse"].transformer is loaded,
                    "scale": float(ref.abs().max()),
                }
            else:
                result[family] = {"shape": list(out.shape)}
        q.put((rank, result))
    except Exception:
        q.put((rank, traceback.format_exc()))


def test_degree2_matches_degree1_flux_wan_context_and_sd3_cfg(
    tiny_model_dir: Callable[[str], Path],
) -> None:
    from tests.pipelines.conftest import TEST_SHAPES

    dirs = {f: str(tiny_model_dir(f)) for f in FAMILIES}
    shapes = {f: dict(TEST_SHAPES[f]) for f in dirs}
    rendezvous = f"tcp://127.0.0.1:{_free_port()}"
    with _children([(_diffuse_child, (r, rendezvous, dirs, shapes)) for r in range(2)]) as (q, _):
        res = _collect(q, 2)
    for family in FAMILIES:
        r0 = res[0][family]
        assert r0["scale"] > 0
        assert r0["diff"] <= 1e-4, (family, r0)
        assert r0["diff_again"] <= 1e-4, (family, r0)
        assert r0["degree1_after_exact"], family
        assert r0["transformer_restored"], family
    for rank in (0, 1):
        err = res[rank]["sd3_no_cfg_error"]
        assert err is not None and "batch 1" in err, err


# ----------------------------------------------------------------- cancel at degree 2


def _cancel_child(
    q: Any, rank: int, rendezvous: str, flux_dir: str, shape: dict[str, int], cancel_at: int
) -> None:
    """Only rank 1's flag is set (after ``cancel_at`` steps): both ranks must stop at the
    same step, and the group must still run a full diffuse afterwards."""
    try:
        import threading

        import torch

        torch.set_num_threads(1)
        from trident.pipelines import StageCancelled, open_pipeline
        from trident.pipelines.parallel import join_group, leave_group

        stages: Any = open_pipeline(flux_dir)
        stages.load("diffuse")
        scheduler = stages._pipes["diffuse"].scheduler
        steps = {"n": 0}
        cancel = threading.Event()
        step = scheduler.step

        def counting_step(*args: Any, **kwargs: Any) -> Any:
            out = step(*args, **kwargs)
            steps["n"] += 1
            if rank == 1 and steps["n"] == cancel_at:
                cancel.set()
            return out

        scheduler.step = counting_step
        emb = None
        if rank == 0:
            stages.load("encode")
            emb = stages.run("encode", {}, {"prompt": "a red fox"})
        params = {**shape, "num_inference_steps": 40, "seed": 3}
        ctx = join_group(rendezvous, "cancel-0", rank, 2)
        result: dict[str, Any] = {}
        try:
            try:
                stages.run("diffuse", emb, params, parallel=ctx, cancel=cancel)
                result["cancelled"] = None
            except StageCancelled as exc:
                result["cancelled"] = str(exc)
            result["steps"] = steps["n"]
            # The group is intact: a full (short) diffuse still runs on both ranks.
            out = stages.run(
                "diffuse",
                emb,
                {**params, "num_inference_steps": 2},
                parallel=ctx,
                cancel=threading.Event(),
            )
            result["after_shape"] = list(out["latents"].shape)
        finally:
            leave_group(ctx)
        q.put((rank, result))
    except Exception:
        q.put((rank, traceback.format_exc()))


def test_cancel_on_one_rank_stops_both_ranks_at_the_same_step(
    tiny_model_dir: Callable[[str], Path],
) -> None:
    from tests.pipelines.conftest import TEST_SHAPES

    cancel_at = 3
    rendezvous = f"tcp://127.0.0.1:{_free_port()}"
    args = (str(tiny_model_dir("flux")), dict(TEST_SHAPES["flux"]), cancel_at)
    with _children([(_cancel_child, (r, rendezvous, *args)) for r in range(2)]) as (q, _):
        res = _collect(q, 2)
    for rank in (0, 1):
        assert res[rank]["cancelled"] == f"cancelled after denoising step {cancel_at}", res
        assert res[rank]["steps"] == cancel_at, res
        assert res[rank]["after_shape"], res
