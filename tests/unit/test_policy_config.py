"""Policy configuration: one registry, one typed option parser, strict TOML.

Every rule of issue #13 item 5: an unknown option or a value that is not one of an
enumerated field's choices is a ConfigError naming it and what is valid (the daemon's
and the benchmark's paths too); strings are converted by the field's type; the nested
sections reach the parts; no policy mutates its caller's config; every registered
name builds a policy; the defaults are those of the old flat TridentConfig.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _minisim import MiniSim, arrive, devices, join, models

from trident.config import ModelSpec, SchedulerConfig, load_scheduler_config
from trident.errors import ConfigError
from trident.sched.baselines import StageSplitConfig
from trident.sched.cost import load_cost_model
from trident.sched.options import apply_options
from trident.sched.registry import (
    POLICIES,
    POLICY_NAMES,
    config_keys,
    make_policy,
    parse_policy_options,
)
from trident.sched.tridentpolicy import TridentConfig, TridentPolicy, TridentStaticPolicy
from trident.sched.types import RequestSpec, Shape

pytestmark = pytest.mark.timeout(60)
COST = load_cost_model([])
ROOT = Path(__file__).resolve().parents[2]

# The flat TridentConfig before the sections (trident/sched/policy.py), name -> default.
OLD_TRIDENT_DEFAULTS: dict[str, Any] = {
    "max_queue": 1024,
    "max_attempts": 3,
    "max_inflight_per_device": 2,
    "slo_scale": 2.5,
    "efficiency": 0.8,
    "solver": "cbc",
    "dispatch_max_nodes": 200,
    "dispatch_max_requests": 24,
    "groups_per_degree": 3,
    "lookahead_s": 2.0,
    "use_mip": True,
    "relax_when_idle": True,
    "wait_for_on_time": True,
    "max_batch": 4,
    "batch_min_gain": 1.2,
    "load_cost": True,
    "placement_solver": "auto",  # "highs" until session 9 (the same at <= 256 devices)
    "placement_max_nodes": 500,
    "move_penalty": 0.05,
    "move_horizon_s": 300.0,
    "load_weight": 1.0,
    "window_s": 180.0,  # 60 s until session 7 (four pipelines, bench/sim.md)
    "min_model_arrivals": 8,
    "max_window_s": 300.0,
    "imbalance": 1.5,
    "drift": 0.25,
    "replan_interval_s": 5.0,
    "confirm_checks": 3,
    "min_replan_interval_s": 30.0,
    "min_gain": 0.1,
    "satisfied_ratio": 1.25,
    "objective": "served",
    "rho_max": 0.7,
    "degree_headroom": True,
    "secondary_weight": 0.01,
    "bind_aux": True,
    "min_served_gain": 0.05,
    "min_arrivals": 10,
    "dynamic_placement": True,
    "static_plan_after_s": None,
    "log_empty_rounds": False,
    "shed_late_margin_s": None,
}


def _get(cfg: Any, path: str) -> Any:
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


# --------------------------------------------------------------------------- defaults


def test_every_old_flat_option_still_works_with_its_old_default() -> None:
    cfg = parse_policy_options("trident", {})
    for name, default in OLD_TRIDENT_DEFAULTS.items():
        assert name in config_keys("trident"), name
        paths = TridentConfig.ALIASES.get(name, (name,))
        for path in paths:
            assert _get(cfg, path) == default, (name, path)


def test_baseline_defaults_unchanged() -> None:
    for name in ("b1", "b4", "b6", "authors"):
        cfg = parse_policy_options(name, {})
        assert cfg.core.max_inflight_per_device == 1  # baselines do not pre-queue
        assert (cfg.core.max_queue, cfg.core.slo_scale, cfg.core.efficiency) == (1024, 2.5, 0.8)
    assert parse_policy_options("b1", {}).degree == 1
    assert parse_policy_options("b6", {}).split == (6, 1, 1)
    a = parse_policy_options("authors", {})
    assert (a.max_nodes, a.min_interval_s, a.solver) == (10_000, 0.0, "cbc")


# --------------------------------------------------------------------------- registry


def test_every_registered_name_builds_its_policy_once() -> None:
    assert len(POLICY_NAMES) == len(set(POLICY_NAMES))
    assert set(POLICY_NAMES) == {
        "trident",
        "trident-np",
        "trident-static",
        "b1",
        "b4",
        "b6",
        "authors",
        "fifo",
    }
    ms = models("flux", "sd3")
    for name in POLICY_NAMES:
        pol = make_policy(name, ms, COST)
        assert isinstance(pol, POLICIES[name].cls)  # type: ignore[arg-type]
        assert getattr(pol, "name", None) == name
        sim = MiniSim(pol, COST)
        join(sim, devices(1, 4))
        arrive(sim, RequestSpec("r0", "flux", Shape(512, 512, 1, 4), 0.5))
        sim.run()
        assert [c.request_id for c in sim.done] == ["r0"], name


def test_unknown_policy_is_a_config_error_listing_the_names() -> None:
    with pytest.raises(ConfigError, match="did you mean 'trident-static'") as exc:
        make_policy("trident-statik", models("flux"), COST)
    for name in POLICY_NAMES:
        assert name in str(exc.value)


# --------------------------------------------------------------------------- parsing


def test_unknown_option_names_it_and_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_policy_options("trident", {"dispatch_max_node": 7})
    msg = str(exc.value)
    assert "'dispatch_max_node'" in msg and "did you mean 'dispatch_max_nodes'" in msg
    assert "max_batch" in msg and "SECTION.FIELD" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match=r"unknown option 'dispatch\.nope'.*dispatch\.max_nodes"):
        parse_policy_options("trident", {"dispatch.nope": 1})
    with pytest.raises(ConfigError, match="unknown option 'max_batch'"):
        parse_policy_options("b1", {"max_batch": 1})  # baselines never batch
    with pytest.raises(ConfigError, match=r"unknown option 'degree'.*diffuse_degree"):
        parse_policy_options("fifo", {"degree": 2})


@pytest.mark.parametrize(
    ("name", "key", "value"),
    [
        ("trident", "solver", "hihgs"),
        ("trident", "placement_solver", "glpk"),
        ("trident", "dispatch.solver", "CBC "),
        ("trident", "objective", "max"),
        ("authors", "solver", "gurobi"),
    ],
)
def test_enumerated_value_outside_its_choices_is_a_config_error(
    name: str, key: str, value: str
) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'.*not one of the choices") as exc:
        parse_policy_options(name, {key: value})
    assert "'cbc'" in str(exc.value) or "'served'" in str(exc.value)


def test_config_built_in_code_is_checked_too() -> None:
    bad = TridentConfig()
    bad.dispatch.solver = "hihgs"  # type: ignore[assignment]
    with pytest.raises(ConfigError, match="solver='hihgs'"):
        make_policy("trident", models("flux"), COST, bad)


def test_string_values_are_converted_by_the_field_type() -> None:
    cfg = parse_policy_options(
        "trident",
        {
            "dispatch_max_nodes": "7",
            "lookahead_s": "0.5",
            "use_mip": "false",
            "dynamic_placement": "False",
            "shed_late_margin_s": "30",
            "static_plan_after_s": "none",
            "max_batch": 2.0,
            "solver": "highs",
            "core.max_attempts": "5",
        },
    )
    assert cfg.dispatch.max_nodes == 7 and isinstance(cfg.dispatch.max_nodes, int)
    assert cfg.dispatch.lookahead_s == 0.5
    assert cfg.dispatch.use_mip is False and cfg.dynamic_placement is False
    assert cfg.core.shed_late_margin_s == 30.0 and cfg.static_plan_after_s is None
    assert cfg.batching.max_batch == 2 and cfg.dispatch.solver == "highs"
    assert cfg.core.max_attempts == 5
    b6 = parse_policy_options("b6", {"split": "4,2,2", "shares": "flux=2,sd3=1"})
    assert b6.split == (4, 2, 2) and b6.shares == {"flux": 2.0, "sd3": 1.0}
    assert parse_policy_options("b6", {"split": [5, 2, 1]}).split == (5, 2, 1)
    for key, value in (("max_batch", "four"), ("use_mip", "maybe"), ("split", "1,2")):
        with pytest.raises(ConfigError, match=f"'{key}'"):
            parse_policy_options("b6" if key == "split" else "trident", {key: value})


def test_nested_sections_reach_the_parts() -> None:
    ms = models("flux")
    pol = make_policy(
        "trident",
        ms,
        COST,
        dispatch_max_nodes="7",
        placement_max_nodes=11,
        efficiency=0.7,
        imbalance=2.0,
        window_s=30,
        max_batch=1,
        **{"dispatch.on_time_reward": 500, "trigger.drift": 0.5},
    )
    assert isinstance(pol, TridentPolicy)
    assert pol.dispatcher.config.max_nodes == 7
    assert pol.dispatcher.config.on_time_reward == 500.0
    assert pol._orch_config().max_nodes == 11 and pol._orch_config().solver == "auto"
    assert pol.config.efficiency == pol.dispatcher.config.efficiency == 0.7
    assert pol._orch_config().efficiency == 0.7
    assert pol.trigger.config.imbalance == pol.monitor.imbalance == 2.0
    assert pol.trigger.config.drift == 0.5 and pol.monitor.window_s == 30.0
    assert pol.batching.max_batch == 1
    # a TOML sub-table / JSON object under a section's name
    sub = parse_policy_options("trident", {"dispatch": {"max_nodes": 9}})
    assert sub.dispatch.max_nodes == 9


# --------------------------------------------------------------------------- no mutation


def test_trident_static_leaves_its_callers_config_alone() -> None:
    cfg = TridentConfig()
    before = copy.deepcopy(cfg)
    pol = TridentStaticPolicy(models("flux"), COST, cfg)
    assert cfg == before and cfg.dynamic_placement is True
    assert pol.tconfig.dynamic_placement is False and pol.tconfig is not cfg
    pol2 = make_policy("trident-static", models("flux"), COST, cfg, max_batch=1)
    assert cfg == before
    assert isinstance(pol2, TridentStaticPolicy) and pol2.tconfig.batching.max_batch == 1


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_no_policy_mutates_the_config_it_was_given(name: str) -> None:
    cfg = parse_policy_options(name, {})
    before = copy.deepcopy(cfg)
    pol = make_policy(name, models("flux", "sd3"), COST, cfg)
    sim = MiniSim(pol, COST)
    join(sim, devices(1, 4))
    for i in range(6):
        arrive(sim, RequestSpec(f"r{i}", "flux" if i % 2 else "sd3", Shape(512, 512, 1, 4), i))
    sim.run()
    assert cfg == before


def test_apply_options_copies() -> None:
    cfg = StageSplitConfig(shares={"flux": 1.0})
    out = apply_options(cfg, {"shares": {"flux": 3}, "max_queue": 5})
    assert cfg.shares == {"flux": 1.0} and cfg.core.max_queue == 1024
    assert out.shares == {"flux": 3.0} and out.core.max_queue == 5


# --------------------------------------------------------------------------- daemon


def _served() -> Any:
    from trident.runtime.registry import register_models

    return register_models([ModelSpec(name="flux", family="flux")])


def test_daemon_make_core_uses_the_parser() -> None:
    from trident.runtime.scheduler import _parse, make_core

    cfg, _ = _parse(
        [
            *("--model", "flux=sim:flux", "--policy-option", "dispatch_max_nodes=7"),
            *("--policy-option", "use_mip=false", "--max-queue", "9"),
        ]
    )
    assert cfg.policy_options == {"dispatch_max_nodes": "7", "use_mip": "false"}
    pol = make_core(cfg, _served())
    assert isinstance(pol, TridentPolicy)
    assert pol.dispatcher.config.max_nodes == 7 and pol.dispatcher.config.use_mip is False
    assert pol.config.max_queue == 9
    fifo = make_core(
        SchedulerConfig(policy="fifo", max_queue=3, policy_options={"diffuse_degree": "2"}),
        _served(),
    )
    assert fifo.config.diffuse_degree == 2 and fifo.config.max_queue == 3  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"fifo.*unknown option 'bogus'"):
        make_core(SchedulerConfig(policy="fifo", policy_options={"bogus": 1}), _served())


def test_daemon_main_reports_a_bad_option_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from trident.runtime.scheduler import main

    rc = main(["--model", "flux=sim:flux", "--policy-option", "bogus=1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("trident-scheduler: policy 'trident': unknown option 'bogus'")
    assert err.count("\n") == 1 and "Traceback" not in err and "valid options" in err


def test_scheduler_entry_point_exits_nonzero_without_a_traceback() -> None:
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "trident.runtime.scheduler", "--model", "flux=sim:flux"),
            *("--policy-option", "bogus=1"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown option 'bogus'" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- bench


def test_bench_sim_rejects_a_bad_option_before_running(capsys: pytest.CaptureFixture[str]) -> None:
    from trident.bench.sim import BenchConfig, check_policy_options, main, policy_options

    base = ["--trace", "flux", "--nodes", "1", "--gpus-per-node", "2", "--duration", "5"]
    assert main([*base, "--policies", "trident,b1", "--policy-opt", "b1.degre=2"]) == 2
    err = capsys.readouterr().err
    assert "unknown option 'degre'" in err and "did you mean 'degree'" in err
    assert main([*base, "--policies", "trident", "--policy-opt", "bogus=1"]) == 2
    assert "policy 'trident': unknown option 'bogus'" in capsys.readouterr().err
    # scoped to a policy this run leaves out: still checked
    cfg = BenchConfig(policies=("trident",), policy_options=(("b4.nope", 1),))
    with pytest.raises(ConfigError, match=r"'b4'.*'nope'"):
        check_policy_options(cfg)
    # LABEL.KEY scopes to a label; any other dotted key is a section option for all
    cfg = BenchConfig(
        policies=("trident", "nobatch=trident"),
        policy_options=(("nobatch.max_batch", 1), ("dispatch.max_nodes", 50)),
    )
    check_policy_options(cfg)
    assert policy_options(cfg, "nobatch") == {
        "slo_scale": 2.5,
        "dispatch.max_nodes": 50,
        "max_batch": 1,
    }
    assert policy_options(cfg, "trident") == {"slo_scale": 2.5, "dispatch.max_nodes": 50}


# --------------------------------------------------------------------------- TOML


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "scheduler.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (
            "[scheduler]\npolcy = 'trident'\n",
            "unknown key [scheduler].polcy (did you mean 'policy'?)",
        ),
        ("[schedular]\npolicy = 'trident'\n", "unknown key schedular"),
        ("[[models]]\nname = 'f'\nfamly = 'flux'\n", "unknown key [[models]] #1 famly"),
        ("[scheduler]\nslo_scale = 'x'\n", "[scheduler].slo_scale must be float"),
        ("[scheduler]\nlog_file = 5\n", "[scheduler].log_file must be"),
    ],
)
def test_toml_unknown_key_or_bad_type_is_a_config_error(
    tmp_path: Path, text: str, needle: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        load_scheduler_config(_write(tmp_path, text))
    assert needle in str(exc.value)
    if "unknown key" in needle:
        assert "valid keys:" in str(exc.value)


def test_toml_policy_options_reach_the_policy(tmp_path: Path) -> None:
    from trident.runtime.scheduler import make_core

    path = _write(
        tmp_path,
        "[scheduler]\npolicy = 'trident'\nslo_scale = 3\n"
        "[scheduler.policy_options]\nmax_batch = 1\ndispatch.max_nodes = 9\n"
        "[scheduler.policy_options.trigger]\ndrift = 0.5\n"
        "[[models]]\nname = 'flux'\nfamily = 'flux'\n",
    )
    cfg = load_scheduler_config(path)
    assert cfg.slo_scale == 3.0 and isinstance(cfg.slo_scale, float)
    pol = make_core(cfg, _served())
    assert isinstance(pol, TridentPolicy)
    assert pol.batching.max_batch == 1 and pol.dispatcher.config.max_nodes == 9
    assert pol.trigger.config.drift == 0.5 and pol.config.slo_scale == 3.0


def test_deploy_scheduler_toml_is_valid() -> None:
    raw = tomllib.loads((ROOT / "deploy" / "scheduler.toml").read_text())
    section = raw["scheduler"]
    valid = {f for f in SchedulerConfig.__dataclass_fields__ if f != "models"}
    assert set(section) <= valid
    parse_policy_options(section.get("policy"), section.get("policy_options", {}))
