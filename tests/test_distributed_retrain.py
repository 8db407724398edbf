"""The retrain under the standard launchers: the shipped accelerate config, one process, and
two CPU processes (torchrun, gloo) where rank 0 alone must snapshot, evaluate and register."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from feedback.models import DataSnapshot, ModelVersion, TrainingRun
from tests.test_training import FAST
from tests.training_data import seed_preferences

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "training" / "accelerate_multi_gpu.yaml"
BIN = Path(sys.executable).parent
# One-process stages must be cheap: best-of-N is refused on several processes (llama.cpp, one process).
TINY = {**FAST, "bon_samples": 0}


def test_the_shipped_accelerate_config_parses_as_a_multi_gpu_launch():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    cfg = load_config_from_file(str(CONFIG))
    assert cfg.distributed_type == DistributedType.MULTI_GPU
    assert cfg.num_processes >= 2 and cfg.num_machines == 1
    assert cfg.mixed_precision == "no"  # the trainers choose bf16 themselves on GPUs that have it


def _launch(cmd: list[str], db_url: str, data_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DATABASE_URL": db_url, "CHAT_DATA_DIR": str(data_dir), "CHAT_MODERATION_BACKENDS": "rules",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = ["-m", "training.retrain", "--url", db_url, "--data-dir", str(data_dir), "--config-json", json.dumps(TINY)]
    return subprocess.run(cmd + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _one_run_one_version(session_factory) -> ModelVersion:
    with session_factory() as s:
        runs = s.scalars(select(TrainingRun)).all()
        assert len(runs) == 1 and runs[0].status == "done", [(r.status, r.error) for r in runs]
        assert s.scalar(select(func.count()).select_from(DataSnapshot)) == 1
        versions = s.scalars(select(ModelVersion).where(ModelVersion.training_run_id == runs[0].id)).all()
        assert len(versions) == 1
        return versions[0]


@pytest.mark.slow
def test_accelerate_launch_of_the_shipped_config_runs_the_tiny_retrain_in_one_process(
        session_factory, db_url, tmp_path, tiny_model_dir):
    seed_preferences(session_factory, tiny_model_dir)
    out = _launch([str(BIN / "accelerate"), "launch", "--config_file", str(CONFIG), "--cpu", "--num_processes", "1",
                   "-m"], db_url, tmp_path / "data")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    version = _one_run_one_version(session_factory)
    assert Path(version.path, "config.json").is_file() and version.stage == "ppo"


@pytest.mark.slow
def test_two_process_retrain_trains_on_both_ranks_and_registers_once(session_factory, db_url, tmp_path,
                                                                     tiny_model_dir):
    """torchrun is what `accelerate launch --multi_gpu` runs; on CPU it joins the ranks over gloo."""
    seed_preferences(session_factory, tiny_model_dir)
    out = _launch([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"], db_url, tmp_path / "data")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("run 1: done") == 1  # rank 0 reports; rank 1 trained silently
    version = _one_run_one_version(session_factory)
    m = version.metrics
    # PPO's batch spans both ranks: 8 episodes / (4 per rank x 2 ranks) = one update, not two.
    assert m["ppo_updates"] == 1
    assert m["eval"]["win_rate"] == m["eval"]["win_rate"] and "total" in m["timings_s"]
    assert not list((tmp_path / "data" / "versions").glob(".tmp-*"))
