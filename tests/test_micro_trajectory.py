"""tools/train/micro_trajectory.py and train.py --save-every: training trajectories as checkpoint-<step>/ folders
with Trainer's trainer_state.json, the input of `headlens trajectory`."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TRAIN_DIR = ROOT / "tools" / "train"


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TRAIN_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def micro():
    return _load("micro_trajectory")


@pytest.fixture(scope="module")
def trajectory(micro, tmp_path_factory):
    return micro.write_micro_trajectory(tmp_path_factory.mktemp("micro") / "run")


def _step(path: Path) -> int:
    return int(path.name.removeprefix("checkpoint-"))


def _text_loss(model, micro, windows: int = 16) -> float:
    stream, _ = _load("train").encode_stream(micro.load_tokenizer(), micro.TEXT)
    n = micro.SEQ_LEN
    win = stream[: windows * n + 1]
    idx = torch.arange(windows)[:, None] * n + torch.arange(n + 1)[None, :]
    batch = win[idx]
    with torch.no_grad():
        logits = model(input_ids=batch[:, :-1]).logits
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)))


def test_checkpoints_are_trainer_checkpoints(micro, trajectory):
    from transformers import AutoModelForCausalLM
    from transformers.trainer_callback import TrainerState

    assert [_step(p) for p in trajectory] == list(micro.STEPS)
    assert sorted(p.name for p in trajectory[0].parent.iterdir()) == sorted(p.name for p in trajectory)
    for path in trajectory:
        assert {"config.json", "model.safetensors", "tokenizer.json", "trainer_state.json"} <= {
            f.name for f in path.iterdir()}
        model = AutoModelForCausalLM.from_pretrained(str(path))
        assert type(model).__name__ == "Qwen3ForCausalLM" and model.config.head_dim == micro.SHAPE["head_dim"]
        state = TrainerState.load_from_json(str(path / "trainer_state.json"))
        assert state.global_step == _step(path) and state.max_steps == max(micro.STEPS)
        losses = [e for e in state.log_history if "loss" in e]
        assert [e["step"] for e in losses] == list(range(1, _step(path) + 1))  # every step's loss so far
        assert state.num_input_tokens_seen == _step(path) * micro.BATCH * micro.SEQ_LEN
        assert 0 < (path / "model.safetensors").stat().st_size < 3_000_000  # tiny: CI builds it


def test_step0_is_the_seeded_initialisation(micro, trajectory):
    from transformers import AutoModelForCausalLM

    fresh = micro.build_micro_model(micro.load_tokenizer(), seed=0).state_dict()
    saved = AutoModelForCausalLM.from_pretrained(str(trajectory[0])).state_dict()
    assert saved.keys() == fresh.keys()
    for name, t in fresh.items():
        assert torch.equal(saved[name], t), name
    trained = AutoModelForCausalLM.from_pretrained(str(trajectory[-1])).state_dict()
    assert not torch.equal(trained["model.layers.0.self_attn.v_proj.weight"],
                           fresh["model.layers.0.self_attn.v_proj.weight"])


def test_loss_falls_and_ov_rank_moves(micro, trajectory):
    """The point of the trajectory: training dynamics.  The loss on the text falls, and the OV circuits' rank at
    90% energy falls from its random-initialisation value (headlens's own sweep)."""
    import headlens
    from transformers import AutoModelForCausalLM

    first, last = (AutoModelForCausalLM.from_pretrained(str(p)) for p in (trajectory[0], trajectory[-1]))
    assert _text_loss(last, micro) < _text_loss(first, micro) - 1.5
    state = json.loads((trajectory[-1] / "trainer_state.json").read_text())
    logged = [e["loss"] for e in state["log_history"]]
    assert sum(logged[-10:]) / 10 < logged[0] - 1.5

    def mean_ov_rank(path: Path) -> float:
        res = headlens.run_sweep(headlens.ModelSource(weights=str(path), device="cpu"),
                                 headlens.SweepConfig(with_qk=False))
        ranks = [h.ov.rank_at[90] for h in res.heads()]
        return sum(ranks) / len(ranks)

    assert mean_ov_rank(trajectory[-1]) < mean_ov_rank(trajectory[0]) - 3


def test_same_seed_same_trajectory_start(micro, tmp_path):
    """A second build with the same seed starts from the same bytes; another seed does not."""
    a = micro.write_micro_trajectory(tmp_path / "a", steps=(0,), seed=0)
    b = micro.write_micro_trajectory(tmp_path / "b", steps=(0,), seed=1)
    c = micro.write_micro_trajectory(tmp_path / "c", steps=(0,), seed=0)
    blob = [(p[0] / "model.safetensors").read_bytes() for p in (a, b, c)]
    assert blob[0] == blob[2] != blob[1]


def test_train_save_every(tmp_path):
    """train.py --save-every on a tiny text (the tiny-lm shape, 4 steps of 1 x 32 tokens): checkpoints at the
    initialisation, every 2 steps and the last, bf16 like the final directory, which equals the last checkpoint."""
    from safetensors.torch import load_file
    from transformers.trainer_callback import TrainerState

    train = _load("train")
    text = (TRAIN_DIR / "heldout.txt").read_text(encoding="utf-8")
    (tmp_path / "train.txt").write_text(text[:20_000], encoding="utf-8")
    (tmp_path / "held.txt").write_text(text[20_000:23_000], encoding="utf-8")
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    try:  # train.py sets the process's torch threads (1: the fastest on a shared 2-core machine)
        rc = train.main(["--model", "tiny-lm", "--train-file", str(tmp_path / "train.txt"), "--heldout-file",
                         str(tmp_path / "held.txt"), "--steps", "5", "--save-every", "2", "--batch", "1",
                         "--seq-len", "32", "--log-every", "1", "--eval-every", "2", "--eval-windows", "1",
                         "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    ckpts = sorted(out.glob("checkpoint-*"), key=_step)
    assert [_step(p) for p in ckpts] == [0, 2, 4, 5]
    for p in ckpts:
        state = TrainerState.load_from_json(str(p / "trainer_state.json"))
        assert state.global_step == _step(p) and state.max_steps == 5 and state.save_steps == 2
        assert [e["step"] for e in state.log_history if "loss" in e] == list(range(1, _step(p) + 1))
        assert [e["step"] for e in state.log_history if "eval_loss" in e] == list(range(2, _step(p) + 1, 2))
        assert {t.dtype for t in load_file(str(p / "model.safetensors")).values()} == {torch.bfloat16}
    assert (ckpts[-1] / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["steps"] == 5 and prov["save_every"] == 2 and prov["train_file"] == str(tmp_path / "train.txt")


def test_headlens_trajectory_reads_the_training_run(trajectory, tmp_path):
    """``headlens trajectory`` on the micro run: every checkpoint with Trainer's step, the OV rank at 90% energy
    falling from its initialisation value (real training dynamics), each checkpoint's rows equal to its own sweep,
    and the figure and page written."""
    import headlens
    from headlens.cli import main
    from headlens.io.tables import read_table

    run = Path(trajectory[0]).parent  # the training run's directory of checkpoint-N folders
    out = tmp_path / "out"
    assert main(["trajectory", "--weights", str(run), "--prompt", "The function returns a new list.",
                 "--out-dir", str(out)]) == 0
    rows = read_table(out / "trajectory.parquet")
    heads = [r for r in rows if r["unit"] == "head"]
    steps = sorted({r["step"] for r in heads})
    assert steps == [0, 10, 20, 40, 80]
    mean = {s: sum(r["ov_rank_e90"] for r in heads if r["step"] == s) / sum(r["step"] == s for r in heads)
            for s in steps}
    assert mean[80] < mean[0] - 3, mean
    alone = headlens.run_sweep(headlens.ModelSource(weights=str(run / "checkpoint-40")),
                               headlens.SweepConfig(calibration=["The function returns a new list."]))
    assert [r["ov_rank_e90"] for r in heads if r["step"] == 40] == [h.ov.rank_at[90] for h in alone.heads()]
    assert all(r["first_token_share"] is not None for r in heads)
    for name in ("trajectory.csv", "trajectory.png", "trajectory.html", "trajectory_summary.json"):
        assert (out / name).stat().st_size > 0
