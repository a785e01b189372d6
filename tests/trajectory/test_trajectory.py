"""headlens trajectory: checkpoints and steps, the table against independent computations, serial against Ray,
a failing checkpoint, resume.

The checkpoints are tiny seeded models (tests/tiny_models.py) saved as transformers' Trainer saves them
(``checkpoint-<N>/`` with ``trainer_state.json``). The table is checked against the sweep run on each checkpoint on
its own, the first token's attention share against HuggingFace's own eager ``output_attentions`` recomputed in
float64 here, the residual norms against ``output_hidden_states``, the router numbers against ``headlens router``.
Ray runs as a local 2-CPU cluster started once for the module; without Ray those tests skip with one message.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import build_model, make_hub_cache, save_checkpoint, tokenizer_for

from headlens.circuits.sweep import SweepConfig, run_sweep
from headlens.cli import main
from headlens.errors import HeadlensError
from headlens.executor import SerialExecutor, TaskFailed, make_executor
from headlens.io.source import ModelSource
from headlens.io.tables import read_table
from headlens.trajectory.checkpoints import assign_steps, hub_points, local_points, step_in_name
from headlens.trajectory.run import run_trajectory

TEXTS = ["the cat sat on the mat and the dog sat on the log", "a b c d e f g h i j k"]
STEPS = (0, 50, 200)


def _trainer_dir(root: Path, family: str = "qwen3", steps=STEPS, state: bool = True) -> Path:
    run = root / f"run-{family}"
    for i, step in enumerate(steps):
        d = save_checkpoint(build_model(family, "gqa", seed=10 + i), tokenizer_for(family), run / f"checkpoint-{step}",
                            "hf_dir")
        assert (d / "model.safetensors").stat().st_size < 2_000_000  # tiny
        if state:
            (d / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": steps[-1],
                                                              "log_history": []}))
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return _trainer_dir(tmp_path_factory.mktemp("traj"))


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> Path:
    return _trainer_dir(tmp_path_factory.mktemp("traj-moe"), "qwen3_moe", steps=(0, 10))


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'headlens[ray]'): the Ray executor "
                                            "tests are skipped")
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    if started:
        ray.shutdown()


# ------------------------------------------------------------------------------------------ steps


def test_steps_from_trainer_state_are_trainers_global_step(tmp_path):
    run = _trainer_dir(tmp_path, steps=(0, 7))
    (run / "checkpoint-7" / "trainer_state.json").write_text(json.dumps({"global_step": 700}))  # the file wins
    points = local_points([run])
    assert [(p.name, p.step, p.step_from) for p in points] == [("checkpoint-0", 0, "trainer_state"),
                                                               ("checkpoint-7", 700, "trainer_state")]


def test_steps_from_names_and_from_the_order_given(tmp_path):
    run = _trainer_dir(tmp_path, steps=(30, 5), state=False)  # no trainer_state.json: the folder names
    points = local_points([run])  # a directory of checkpoint-N folders: sorted by step
    assert [(p.name, p.step, p.step_from) for p in points] == [("checkpoint-5", 5, "name"),
                                                               ("checkpoint-30", 30, "name")]
    a, b = tmp_path / "late", tmp_path / "early"
    (run / "checkpoint-30").rename(a)
    (run / "checkpoint-5").rename(b)
    points = local_points([a, b])  # no step anywhere: the order given
    assert [(p.name, p.step, p.step_from) for p in points] == [("late", 0, "order"), ("early", 1, "order")]
    points = local_points([a, b], steps=[9, 3])  # given: sorted by them
    assert [(p.name, p.step) for p in points] == [("early", 3), ("late", 9)]


def test_step_names_of_revisions_and_refusals():
    assert [step_in_name(r) for r in ("step1000", "step143000", "stepXXX", "step20-tokens84M", "main",
                                      "checkpoint-500", "global_step12", "v1.0")] == \
        [1000, 143000, None, 20, None, 500, 12, None]
    with pytest.raises(HeadlensError, match="has no step .* while others have one"):
        assign_steps(["step10", "main"], [(10, "name"), (None, "name")], None)
    assert assign_steps(["main", "dev"], [(None, "name"), (None, "name")], None) == [(0, "order"), (1, "order")]
    with pytest.raises(HeadlensError, match="both have step 10"):
        hub_points("org/m", ["step10", "step10-tokens1B"])


def test_hub_revisions_read_offline_with_their_steps(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    for i, rev in enumerate(("step1000", "step20")):
        sha = f"{i + 1:040x}"
        make_hub_cache(build_model("qwen3", "gqa", seed=20 + i), tokenizer_for("qwen3"), cache, "org/tiny", sha)
        (cache / "models--org--tiny" / "refs" / rev).write_text(sha)
    out = tmp_path / "out"
    code = main(["trajectory", "--hf-repo", "org/tiny", "--revisions", "step1000,step20", "--cache-dir", str(cache),
                 "--no-qk", "--out-dir", str(out)])
    assert code == 0
    rows = read_table(out / "trajectory.parquet")
    assert sorted({(r["checkpoint"], r["step"]) for r in rows}) == [("step1000", 1000), ("step20", 20)]
    direct = run_sweep(ModelSource(hf_repo="org/tiny", revision="step20", cache_dir=str(cache)),
                       SweepConfig(with_qk=False))
    want = [h.ov.rank_at[90] for h in direct.heads()]
    assert [r["ov_rank_e90"] for r in rows if r["checkpoint"] == "step20" and r["unit"] == "head"] == want


# ---------------------------------------------------------------------------- table against references


def test_table_is_each_checkpoints_sweep_under_the_sweeps_names(run_dir, tmp_path):
    result = run_trajectory(local_points([run_dir]), SweepConfig(), tmp_path / "out")
    rows = result.rows()
    for step, ck in zip(STEPS, sorted(run_dir.iterdir(), key=lambda d: int(d.name.split("-")[1]))):
        alone = run_sweep(ModelSource(weights=str(ck)), SweepConfig())
        heads, groups = alone.rows()
        mine = [r for r in rows if r["step"] == step and r["unit"] == "head"]
        assert len(mine) == len(heads)
        for r, h in zip(mine, heads):
            assert {k: r[k] for k in h} == h  # every sweep_heads column, under its name, bit for bit
        mine_g = [r for r in rows if r["step"] == step and r["unit"] == "group"]
        budget = {(b.layer, b.kv_head): b for b in alone.budget.rows}
        for r, g in zip(mine_g, groups):
            assert {k: r[k] for k in g} == g
            assert r["k_plain"] == budget[(r["layer"], r["kv_head"])].k_plain
    keys = [(r["step"], r["layer"], r["unit"], r["head"], r["kv_head"]) for r in rows]
    assert len(set(keys)) == len(keys)  # keyed by (checkpoint, step, layer, head or group)


def _eager_reference(ck: Path, texts: list[str]):
    """First-token share per (layer, head) and resid_pre norms, from HuggingFace's own eager attention probabilities
    and hidden states, in float64 here."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ck)
    model = AutoModel.from_pretrained(ck, attn_implementation="eager", dtype=torch.float32).eval()
    share, q, first, rest, n_rest = 0, 0, 0, 0, 0
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt")["input_ids"]
            out = model(input_ids=ids, output_attentions=True, output_hidden_states=True)
            P = torch.stack([a[0].double() for a in out.attentions])  # (L, H, N, N)
            share = share + P[:, :, 1:, 0].sum(-1)
            q += ids.shape[1] - 1
            hs = torch.stack([h[0].double() for h in out.hidden_states[:-1]])  # (L, N, d): each layer's input
            first = first + hs[:, 0].norm(dim=-1)
            rest = rest + hs[:, 1:].norm(dim=-1).sum(-1)
            n_rest += ids.shape[1] - 1
    return share / q, first / len(texts), rest / n_rest


def test_prompt_numbers_equal_huggingfaces_eager_attention_and_hidden_states(run_dir, tmp_path):
    result = run_trajectory(local_points([run_dir]), SweepConfig(calibration=TEXTS), tmp_path / "out")
    rows = result.rows()
    for c in result.checkpoints:
        share, first, rest = _eager_reference(Path(c.point.where), TEXTS)
        heads = [r for r in rows if r["checkpoint"] == c.point.name and r["unit"] == "head"]
        got = torch.tensor([[r["first_token_share"] for r in heads if r["layer"] == layer]
                            for layer in range(share.shape[0])], dtype=torch.float64)
        torch.testing.assert_close(got, share, rtol=1e-5, atol=1e-6)
        layers = [r for r in rows if r["checkpoint"] == c.point.name and r["unit"] == "layer"]
        torch.testing.assert_close(torch.tensor([r["resid_norm_first"] for r in layers], dtype=torch.float64), first,
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor([r["resid_norm_rest"] for r in layers], dtype=torch.float64), rest,
                                   rtol=1e-5, atol=1e-6)
        assert all(r["white_heldout_k8"] is not None for r in heads)  # the data-aware errors are there too


def test_router_numbers_are_headlens_routers(moe_dir, tmp_path):
    from headlens.moe.router import route

    result = run_trajectory(local_points([moe_dir]), SweepConfig(calibration=TEXTS, with_qk=False), tmp_path / "o")
    rows = result.rows()
    for c in result.checkpoints:
        stats = {s.layer: s for s in route(ModelSource(weights=c.point.where), TEXTS).report.stats}
        layers = {r["layer"]: r for r in rows if r["checkpoint"] == c.point.name and r["unit"] == "layer"}
        assert stats and all(layers[layer]["router_entropy"] == s.routing_entropy_norm for layer, s in stats.items())
        assert all(layers[layer]["router_load_entropy"] == s.load_entropy_norm for layer, s in stats.items())
        assert all("router_entropy" not in r for layer, r in layers.items() if layer not in stats)  # dense layers


# --------------------------------------------------------------------------------------- executors


def _table(out: Path) -> bytes:
    return (out / "trajectory.parquet").read_bytes()


def test_serial_and_ray_write_identical_tables(run_dir, tmp_path, ray_local, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = ["trajectory", "--weights", str(run_dir)]
    assert main([*base, "--out-dir", str(tmp_path / "serial")]) == 0
    assert main([*base, "--out-dir", str(tmp_path / "ray"), "--executor", "ray", "--layers-per-task", "1"]) == 0
    assert _table(tmp_path / "serial") == _table(tmp_path / "ray")  # weight-only: bit for bit, any thread count
    assert (tmp_path / "serial" / "trajectory.csv").read_bytes() == (tmp_path / "ray" / "trajectory.csv").read_bytes()
    # with texts the forward passes run in float32: bit for bit at the same torch thread count (Ray's tasks run 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*base, "--prompt", TEXTS[0], "--out-dir", str(tmp_path / "s1")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert main([*base, "--prompt", TEXTS[0], "--out-dir", str(tmp_path / "r1"), "--executor", "ray"]) == 0
    assert _table(tmp_path / "s1") == _table(tmp_path / "r1")
    summary = json.loads((tmp_path / "r1" / "trajectory_summary.json").read_text())
    assert summary["executor"]["executor"] == "ray" and summary["executor"]["cpus"] == 2


def test_sweep_on_ray_writes_the_serial_tables(run_dir, tmp_path, ray_local):
    ck = str(run_dir / "checkpoint-50")
    assert main(["sweep", "--weights", ck, "--out-dir", str(tmp_path / "s")]) == 0
    assert main(["sweep", "--weights", ck, "--out-dir", str(tmp_path / "r"), "--executor", "ray",
                 "--layers-per-task", "1"]) == 0
    for name in ("sweep_heads.parquet", "sweep_groups.parquet", "sweep_budget.csv", "sweep_summary.json"):
        assert (tmp_path / "s" / name).read_bytes() == (tmp_path / "r" / name).read_bytes(), name


def test_latent_attention_sweep_on_ray_equals_serial(tmp_path, ray_local):
    from headlens.circuits.mla import run_mla_sweep

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "circuits"))
    from test_mla import _deepseek

    d = save_checkpoint(_deepseek("deepseek_v3"), tokenizer_for("none"), tmp_path / "ds", "hf_dir")
    source = ModelSource(weights=str(d))
    serial = run_mla_sweep(source)
    with make_executor("ray") as ex:
        ray = run_mla_sweep(source, executor=ex, layers_per_task=1)
    assert len(serial.layers) == 2
    assert json.dumps(serial.to_json(), sort_keys=True) == json.dumps(ray.to_json(), sort_keys=True)


def test_serial_path_never_imports_ray(run_dir, tmp_path):
    code = ("import sys; from headlens.cli import main; "
            f"rc = main(['trajectory', '--weights', {str(run_dir)!r}, '--no-qk', '--out-dir', {str(tmp_path)!r}]); "
            "rc2 = main(['sweep', '--model', 'tiny-lm', '--layers', '0', '--out-dir', "
            f"{str(tmp_path / 's')!r}]); print(rc, rc2, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={
        **__import__("os").environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "0 0 False", out.stderr[-2000:]


def test_ray_executor_without_ray_is_one_line_naming_the_extra(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    code = main(["trajectory", "--weights", str(run_dir), "--executor", "ray", "--out-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pip install 'headlens[ray]'" in err[0], err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ failure and resume


def _poison(ck: Path) -> bytes:
    """Make one attention weight of ``ck`` non-finite (a damaged file that still opens); returns the old bytes."""
    from safetensors.torch import load_file, save_file

    path = ck / "model.safetensors"
    old = path.read_bytes()
    sd = load_file(path)
    name = next(k for k in sd if "layers.1.self_attn.q_proj.weight" in k)
    sd[name][0, 0] = float("nan")
    save_file(sd, str(path), metadata={"format": "pt"})
    return old


@pytest.mark.parametrize("executor", ["serial", "ray"])
def test_a_failing_checkpoint_is_one_line_nothing_half_and_a_rerun_does_only_the_rest(executor, tmp_path, capsys,
                                                                                     request):
    if executor == "ray":
        request.getfixturevalue("ray_local")
    run = _trainer_dir(tmp_path, steps=(0, 1, 2))
    bad = run / "checkpoint-1"
    good = _poison(bad)
    out = tmp_path / "out"
    extra = ["--executor", "ray", "--layers-per-task", "1"] if executor == "ray" else []
    capsys.readouterr()
    code = main(["trajectory", "--weights", str(run), "--out-dir", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "checkpoint-1" in err[0] and "q_proj" in err[0], err
    assert not any(out.glob("trajectory*")), sorted(p.name for p in out.iterdir())  # nothing half-written
    # the layers finished before the failure are kept; those of the checkpoint that changed on disk are not valid
    kept = {d.name: len(list((out / "checkpoints" / d.name / "sweep_layers").glob("layer_*.json")))
            for d in run.iterdir()}
    if executor == "serial":  # checkpoint-0 finished before checkpoint-1's task failed; nothing of -1 or -2 kept
        assert kept == {"checkpoint-0": 2, "checkpoint-1": 0, "checkpoint-2": 0}, kept
    (bad / "model.safetensors").write_bytes(good)  # repaired (a new file: its layers' fingerprints no longer match)
    valid = kept["checkpoint-0"] + kept["checkpoint-2"]
    code = main(["trajectory", "--weights", str(run), "--out-dir", str(out), *extra])
    first = capsys.readouterr().out.splitlines()[0]
    assert code == 0
    # the rerun computes exactly what is missing or changed, and keeps the rest
    want = f"{6 - valid} layers to sweep" + (f", {valid} kept from an earlier run" if valid else "")
    assert want in first, (first, kept)
    rows = read_table(out / "trajectory.parquet")
    assert sorted({r["step"] for r in rows}) == [0, 1, 2]


def test_a_truncated_checkpoint_is_refused_naming_it(tmp_path, capsys):
    run = _trainer_dir(tmp_path, steps=(0, 1))
    f = run / "checkpoint-1" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    capsys.readouterr()
    code = main(["trajectory", "--weights", str(run), "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "checkpoint checkpoint-1" in err[0], err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("trajectory*"))


def test_resume_reuses_parts_only_while_their_fingerprints_match(run_dir, tmp_path):
    out = tmp_path / "out"
    plans = []
    run_trajectory(local_points([run_dir]), SweepConfig(with_qk=False), out, on_plan=plans.append)
    run_trajectory(local_points([run_dir]), SweepConfig(with_qk=False), out, on_plan=plans.append)
    run_trajectory(local_points([run_dir]), SweepConfig(with_qk=False, ks="4"), out, on_plan=plans.append)
    run_trajectory(local_points([run_dir]), SweepConfig(with_qk=False, ks="4"), out, resume=False,
                   on_plan=plans.append)
    todo = [[t for _, t, _ in plan] for plan in plans]
    assert todo == [[2, 2, 2], [0, 0, 0], [2, 2, 2], [2, 2, 2]]


def test_task_failure_names_the_task_and_keeps_the_cause():
    def boom(x):
        raise ValueError(f"bad {x}\nsecond line")

    from headlens.executor import Task

    with pytest.raises(TaskFailed, match=r"^ck-3, layers 0-1: ValueError: bad 3$") as info:
        list(SerialExecutor().results([Task(boom, (3,), "ck-3, layers 0-1")]))
    assert isinstance(info.value.__cause__, ValueError)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, proc, seconds: float = 90) -> bool:
    import socket
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            time.sleep(0.5)
    return False


def test_ray_address_joins_a_running_cluster(run_dir, tmp_path):
    """`--ray-address` joins a cluster started by `ray start --head` (a fresh driver process, as a user's), instead of
    starting a local Ray; the tables equal the serial run's. The head runs with --block in its own session and is
    stopped by signalling that session only (`ray stop` would stop every Ray on the machine)."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'headlens[ray]'): the Ray executor tests "
                                      "are skipped")
    import os
    import signal

    ray_cmd = Path(sys.executable).with_name("ray")
    if not ray_cmd.exists():
        pytest.skip(f"no `ray` command next to {sys.executable}")
    import secrets

    # Ray's token authentication (on by default for clusters since 2.59): the head and the driver share the token
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    port = _free_port()
    head = subprocess.Popen([str(ray_cmd), "start", "--head", "--block", "--num-cpus", "2", "--port", str(port),
                             "--include-dashboard", "false", "--disable-usage-stats"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        if not _wait_for_port(port, head):
            pytest.skip("`ray start --head` did not come up here")
        code = ("import sys; from headlens.cli import main; sys.exit(main(['trajectory', '--weights', "
                f"{str(run_dir)!r}, '--no-qk', '--executor', 'ray', '--ray-address', '127.0.0.1:{port}', "
                f"'--out-dir', {str(tmp_path / 'joined')!r}]))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert f"ray: joined the cluster at 127.0.0.1:{port} (2 CPUs)" in out.stdout, out.stdout  # started nothing
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(head.pid, signal.SIGKILL)
    assert main(["trajectory", "--weights", str(run_dir), "--no-qk", "--out-dir", str(tmp_path / "serial")]) == 0
    assert _table(tmp_path / "joined") == _table(tmp_path / "serial")
    summary = json.loads((tmp_path / "joined" / "trajectory_summary.json").read_text())
    assert summary["executor"]["ray_address"] == f"127.0.0.1:{port}"
