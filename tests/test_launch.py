"""`llamatron launch`: the rendered sbatch script (run under bash with stand-ins for srun, scontrol and
sbatch), chained submission, the [launch] config keys, and `train --nproc-per-node` (torchrun)."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llamatron.cli import main
from llamatron.config import load_config
from llamatron.errors import LlamatronError
from llamatron.launch import LaunchPlan, render_sbatch, torchrun

REPO = Path(__file__).resolve().parents[1]
TRICKY = "a b'c $(echo pwned) \"q\" `x` \\n"  # must reach the job literally

CONFIG = textwrap.dedent("""\
    [model]
    size = "debug"
    [data]
    mock = true
    seq_len = 32
    [train]
    steps = 20
    global_batch_size = 64
    micro_batch_size = 2
    out_dir = "runs/my run"
    [parallel]
    tp = 2
    [launch]
    account = "proj-a"
    partition = "batch"
    nodes = 4
    gpus_per_node = 8
    time = "02:00:00"
    jobs = 3
    container_image = "nvcr.io#nvidia/pytorch:25.01-py3"
    container_mounts = ["/lustre:/lustre", "/home/u/data:/data:ro"]
    sbatch_args = ["--exclusive", "--mem=0"]
    srun_args = ["--cpu-bind=none"]
    rdzv_port = 29600
    [launch.env]
    NCCL_DEBUG = "WARN"
    """)


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "cluster.toml"
    path.write_text(CONFIG + f"TRICKY = {json.dumps(TRICKY)}\n")
    return path


def _dry_run(config, capsys, *sets):
    argv = ["launch", "--config", str(config), "--dry-run"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    return capsys.readouterr().out


def test_dry_run_multi_node_layout(config_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = _dry_run(config_file, capsys)
    run = tmp_path / "runs" / "my run"
    sbatch = [l for l in script.splitlines() if l.startswith("#SBATCH")]
    assert sbatch == [
        "#SBATCH --job-name=llamatron",
        "#SBATCH --account=proj-a",
        "#SBATCH --partition=batch",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",  # one torchrun per node
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --time=02:00:00",
        f"#SBATCH --chdir={tmp_path}",
        f'#SBATCH --output="{run}/logs/slurm-%j.out"',  # a space in the path: double-quoted for sbatch
        "#SBATCH --open-mode=append",  # a requeued job appends to its log
        "#SBATCH --requeue",
        "#SBATCH --signal=USR1@120",
        "#SBATCH --exclusive",
        "#SBATCH --mem=0",
    ]
    assert "world size 32" in script
    assert 'nodes=( $(scontrol show hostnames "$SLURM_JOB_NODELIST") )' in script
    assert "head_node=${nodes[0]}" in script
    assert '--nproc-per-node 8 --nnodes 4 --rdzv-endpoint "$head_node:29600" --rdzv-id "$SLURM_JOB_ID"' in script
    assert "'--container-image=nvcr.io#nvidia/pytorch:25.01-py3'" in script
    assert "--container-mounts=/lustre:/lustre,/home/u/data:/data:ro" in script
    assert f"--container-workdir={tmp_path}" in script
    assert f"python -m llamatron train --config '{run}/launch/config.yaml'" in script  # `python` of the image
    assert "export NCCL_DEBUG=WARN" in script
    assert "scontrol requeue \"$SLURM_JOB_ID\"" in script and "-eq 75" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True, start_new_session=True).returncode == 0
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_dry_run_without_container_uses_this_python(config_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = _dry_run(config_file, capsys, "launch.container_image=''", "launch.account=''", "launch.signal_seconds=0",
                      "launch.gpus_per_node=0", "launch.nproc_per_node=4", "parallel.tp=1", "train.global_batch_size=32")
    assert "--container" not in script and "--account" not in script and "--signal" not in script
    assert "--gpus-per-node" not in script and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in script
    assert f"{sys.executable} -m llamatron train" in script
    assert "--nproc-per-node 4 --nnodes 4" in script


def test_layout_is_checked_against_the_job_world_size(config_file, capsys):
    # tp 2 x 32 ranks: global batch 64 cannot be split over 16 data-parallel ranks of micro-batch 8.
    assert main(["launch", "--config", str(config_file), "--dry-run", "--set", "train.micro_batch_size=8"]) == 2
    assert "train.global_batch_size" in capsys.readouterr().err


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


def _run_script(script: str, tmp_path: Path, srun_rc: int) -> tuple[subprocess.CompletedProcess, dict]:
    """Run the batch script as Slurm would on the first node, with srun/scontrol stand-ins."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    record = tmp_path / "record"
    # srun: record its arguments (one per line) and the environment it was given, then exit srun_rc.
    _stub(bin_dir, "srun", f'printf "%s\\n" "$@" > {record}/srun.args\n'
          f'env -0 > {record}/srun.env\nexit {srun_rc}\n')
    _stub(bin_dir, "scontrol", textwrap.dedent(f"""\
        if [ "$1 $2" = "show hostnames" ]; then printf "gpu-007\\ngpu-008\\ngpu-011\\ngpu-012\\n"; exit 0; fi
        if [ "$1" = requeue ]; then echo "$2" >> {record}/requeued; exit 0; fi
        exit 1
        """))
    record.mkdir(exist_ok=True)
    for f in record.iterdir():
        f.unlink()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu-[007-008,011-012]"}
    res = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path,
                         start_new_session=True)
    env_vars = dict(kv.split("=", 1) for kv in (record / "srun.env").read_text().split("\0") if "=" in kv)
    return res, {"args": (record / "srun.args").read_text().splitlines(), "env": env_vars,
                 "requeued": (record / "requeued").read_text().split() if (record / "requeued").exists() else []}


def test_rendered_script_starts_one_torchrun_per_node_with_rendezvous_on_the_first(config_file, tmp_path):
    cfg = load_config(str(config_file))
    plan = LaunchPlan.for_config(cfg, tmp_path)
    script = render_sbatch(cfg, plan, source="cfg.toml --set 'x=1\ntouch injected'")  # a line break stays in the comment
    res, rec = _run_script(script, tmp_path, 0)
    assert not (tmp_path / "injected").exists()
    assert res.returncode == 0, res.stderr
    assert "on 4 node(s): gpu-007 gpu-008 gpu-011 gpu-012; rendezvous gpu-007:29600" in res.stdout
    assert rec["args"] == [
        "--nodes=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
        "--container-image=nvcr.io#nvidia/pytorch:25.01-py3",
        "--container-mounts=/lustre:/lustre,/home/u/data:/data:ro",
        f"--container-workdir={tmp_path}",
        "--cpu-bind=none",
        "python", "-m", "llamatron", "train", "--config", str(tmp_path / "runs/my run/launch/config.yaml"),
        "--nproc-per-node", "8", "--nnodes", "4", "--rdzv-endpoint", "gpu-007:29600", "--rdzv-id", "4242",
    ]
    assert rec["env"]["TRICKY"] == TRICKY  # exported literally: no expansion, no command substitution
    assert rec["env"]["NCCL_DEBUG"] == "WARN"
    assert rec["env"]["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "120"
    assert rec["requeued"] == []


@pytest.mark.parametrize("rc, requeued, script_rc", [(75, ["4242"], 0), (1, [], 1)])
def test_exit_75_requeues_the_job_and_a_failure_does_not(config_file, tmp_path, rc, requeued, script_rc):
    cfg = load_config(str(config_file))
    res, rec = _run_script(render_sbatch(cfg, LaunchPlan.for_config(cfg, tmp_path)), tmp_path, rc)
    assert rec["requeued"] == requeued
    assert res.returncode == script_rc


def test_submit_chains_consecutive_jobs(config_file, tmp_path, capsys, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "sbatch.calls"
    # sbatch --parsable: prints the new job id (here 100, 101, ...; with a cluster name as Slurm may).
    _stub(bin_dir, "sbatch", f'echo "$*" >> {calls}\necho "$((100 + $(wc -l < {calls}) - 1));cluster1"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    assert main(["launch", "--config", str(config_file)]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "my run"
    script = run / "launch" / "job.sbatch"
    assert calls.read_text().splitlines() == [
        f"--parsable {script}",
        f"--parsable --dependency=afterany:100 {script}",
        f"--parsable --dependency=afterany:101 {script}",
    ]
    for job in (100, 101, 102):
        assert f"submitted job {job} " in out and f"log {run}/logs/slurm-{job}.out" in out
    assert "scancel 100 101 102" in out
    assert (run / "logs").is_dir()  # sbatch does not create the log directory
    assert "#SBATCH --nodes=4" in script.read_text()
    saved = load_config(str(run / "launch" / "config.yaml"))  # what the jobs train from
    assert saved.launch.env["TRICKY"] == TRICKY and saved.parallel.tp == 2


def test_submit_reports_sbatch_errors(config_file, tmp_path, capsys, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "sbatch", 'echo "sbatch: error: Invalid account or account/partition combination specified" >&2\nexit 1\n')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    assert main(["launch", "--config", str(config_file)]) == 2
    assert "Invalid account" in capsys.readouterr().err


@pytest.mark.parametrize("override, key", [
    ("launch.account=a'b", "launch.account"),
    ("launch.partition=x$(id)", "launch.partition"),
    ("launch.env={1BAD: x}", "launch.env"),
    ("launch.sbatch_args=[exclusive]", "launch.sbatch_args"),
    ("launch.container_mounts=[/a]", "launch.container_mounts"),
    ("launch.nodes=0", "launch.nodes"),
    ("launch.jobs=0", "launch.jobs"),
    ("launch.rdzv_port=70000", "launch.rdzv_port"),
])
def test_unsafe_or_wrong_launch_keys_are_rejected(override, key):
    with pytest.raises(LlamatronError, match=re.escape(key)):
        load_config(None, ["data.mock=true", override])


def test_launch_key_rules():
    with pytest.raises(LlamatronError, match="launch.nproc_per_node"):
        load_config(None, ["data.mock=true", "launch.gpus_per_node=0"])  # a CPU job needs a process count
    with pytest.raises(LlamatronError, match="launch.jobs"):
        load_config(None, ["data.mock=true", "launch.jobs=2", "checkpoint.enabled=false"])
    cfg = load_config(None, ["data.mock=true", "launch.env=[A=1,B=x=y]"])  # --set form of a table
    assert cfg.launch.env == {"A": "1", "B": "x=y"}
    with pytest.raises(LlamatronError, match="checkpoint.resume"):
        load_config(None, ["data.mock=true", "launch.jobs=2", "checkpoint.resume=false"])


def test_set_takes_string_keys_as_typed():
    # YAML alone would read 4:00:00 as the base-60 number 14400 (sbatch: 14400 minutes).
    cfg = load_config(None, ["data.mock=true", "launch.time=4:00:00", "launch.account=", "launch.partition='a b'"])
    assert (cfg.launch.time, cfg.launch.account, cfg.launch.partition) == ("4:00:00", "", "a b")


# --------------------------------------------------------------------------------------------------
# One node: torchrun


@pytest.mark.parametrize("codes, expected", [((0, 0), 0), ((0, 75), 75), ((3, 0), 3)])
def test_torchrun_reports_the_workers_exit_status(tmp_path, codes, expected):
    worker = tmp_path / "worker.py"
    worker.write_text(f"import os, sys\nsys.exit({list(codes)}[int(os.environ['RANK'])])\n")
    assert torchrun([str(worker)], nproc_per_node=2, log=lambda *_: None) == expected


def test_train_nproc_per_node_runs_under_torchrun_and_a_finished_run_exits_at_once(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "llamatron", "train", "--config", "demo", "--nproc-per-node", "2",
           "--set", "model.size=debug", "--set", "data.mock=true", "--set", "data.seq_len=32",
           "--set", "train.steps=3", "--set", "train.global_batch_size=4", "--set", "train.micro_batch_size=2",
           "--set", "train.device=cpu", "--set", "train.log_every=1", "--set", "eval.samples=2", "--set", f"train.out_dir={out}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, start_new_session=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "layout: 2 process(es)" in res.stdout
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["kind"] == "train"]
    assert steps == [1, 2, 3]
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, start_new_session=True)
    assert again.returncode == 0
    assert "already finished: checkpoint at step 3" in again.stdout
    assert "torchrun" not in again.stdout  # no worker was started


def test_nnodes_without_nproc_per_node_is_an_error(capsys):
    assert main(["train", "--config", "demo", "--nnodes", "2", "--set", "data.mock=true"]) == 2
    assert "--nproc-per-node" in capsys.readouterr().err
