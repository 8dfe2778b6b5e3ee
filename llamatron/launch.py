"""Cluster launch: a Slurm batch script from the config's [launch] section, and torchrun on one node.

One job runs `srun --ntasks-per-node=1` over its nodes; on each node that task is `llamatron train
--nproc-per-node G --nnodes N --rdzv-endpoint FIRST_NODE:PORT`, which is torchrun (its `run()`,
called in-process) starting G training processes that meet through a c10d rendezvous hosted by the
first node. Calling torchrun in-process rather than as a command is what lets a node report why its
workers stopped: torchrun itself exits 1 for any failed worker, and the batch script must tell a
pre-empted run (exit 75, REQUEUE_EXIT_CODE: checkpoint written, requeue me) from a broken one.

Consecutive jobs (`launch.jobs`, the reference's NPAR) are the same script submitted in a chain with
`--dependency=afterany`. Every job resumes from the newest complete checkpoint of the run directory
(the trainer does that by itself), a job whose training exits 75 requeues itself (same job id, its log
appended), and a job that finds the run already at `train.steps` ends at once.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from llamatron.config import SBATCH_UNSAFE, Config, LaunchConfig, dump_config, validate_config
from llamatron.errors import REQUEUE_EXIT_CODE, LlamatronError

_PLAIN = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")


def nproc_per_node(lc: LaunchConfig) -> int:
    return lc.nproc_per_node or lc.gpus_per_node


@dataclass
class LaunchPlan:
    """Where a launch puts things: all absolute, as the batch script sees them."""

    workdir: Path  # the jobs' working directory (relative config paths are relative to it)
    out_dir: Path  # the run directory (train.out_dir)
    script: Path  # the rendered batch script, submitted once per consecutive job
    config: Path  # the resolved config the jobs train from
    log_pattern: Path  # one log per job: slurm-%j.out, appended to when the job is requeued

    @classmethod
    def for_config(cls, cfg: Config, workdir: str | Path | None = None) -> "LaunchPlan":
        workdir = Path(workdir or os.getcwd()).absolute()
        out = Path(cfg.train.out_dir)
        out = out if out.is_absolute() else workdir / out
        return cls(workdir, out, out / "launch" / "job.sbatch", out / "launch" / "config.yaml",
                   out / "logs" / "slurm-%j.out")

    def log(self, job_id: str) -> Path:
        return Path(str(self.log_pattern).replace("%j", job_id))


def _sbatch_value(value: str | Path, what: str) -> str:
    """A value for an #SBATCH line (config validation has rejected quotes, $, ` and line breaks)."""
    value = str(value)
    if _PLAIN.fullmatch(value):
        return value
    if SBATCH_UNSAFE.search(value):
        raise LlamatronError(f"{what} {value!r}: quotes, backslashes, $, ` and line breaks cannot go into an #SBATCH line")
    return f'"{value}"'


def render_sbatch(cfg: Config, plan: LaunchPlan, source: str = "") -> str:
    """The batch script of one job of the run (every consecutive job runs the same script)."""
    lc = cfg.launch
    nproc = nproc_per_node(lc)
    world = lc.nodes * nproc
    validate_config(cfg, world)  # the layout against the world size, before anything is queued
    container = bool(lc.container_image)
    python = lc.python or ("python" if container else sys.executable)

    opts: list[tuple[str, str | Path]] = [("job-name", lc.job_name)]
    if lc.account:
        opts.append(("account", lc.account))
    if lc.partition:
        opts.append(("partition", lc.partition))
    opts += [("nodes", str(lc.nodes)), ("ntasks-per-node", "1")]
    if lc.gpus_per_node:
        opts.append(("gpus-per-node", str(lc.gpus_per_node)))
    opts += [("time", lc.time), ("chdir", plan.workdir), ("output", plan.log_pattern), ("open-mode", "append")]
    if "%" in str(plan.out_dir):
        raise LlamatronError(f"config key 'train.out_dir': {plan.out_dir}: '%' starts a Slurm file name pattern")
    sbatch_lines = [f"#SBATCH --{k}={_sbatch_value(v, 'the working directory' if k == 'chdir' else f'sbatch --{k}')}"
                    for k, v in opts]
    sbatch_lines.append("#SBATCH --requeue")
    if lc.signal_seconds:
        # No "B:": the signal goes to the training step (every node's launcher), not the batch shell.
        sbatch_lines.append(f"#SBATCH --signal=USR1@{lc.signal_seconds}")
    sbatch_lines += [f"#SBATCH {arg}" for arg in lc.sbatch_args]

    env = {}
    if lc.signal_seconds:
        # How long torchrun lets its workers finish (checkpoint) after a stop signal before SIGKILL.
        env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(lc.signal_seconds)
    env.update(lc.env)
    env_lines = [f"export {k}={shlex.quote(v)}" for k, v in env.items()]

    srun = [shlex.join(["srun", f"--nodes={lc.nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"])]
    if container:
        srun.append(shlex.quote(f"--container-image={lc.container_image}"))
        if lc.container_mounts:
            srun.append(shlex.quote(f"--container-mounts={','.join(lc.container_mounts)}"))
        srun.append(shlex.quote(f"--container-workdir={plan.workdir}"))
    srun += [shlex.quote(a) for a in lc.srun_args]
    srun.append(shlex.join([python, "-m", "llamatron", "train", "--config", str(plan.config)]))
    # $head_node and $SLURM_JOB_ID are expanded by the batch shell (on the first node) when the job runs.
    srun.append(f"--nproc-per-node {nproc} --nnodes {lc.nodes} "
                f'--rdzv-endpoint "$head_node:{lc.rdzv_port}" --rdzv-id "$SLURM_JOB_ID"')
    command = " \\\n    ".join(srun)

    gpus = f" x {lc.gpus_per_node} GPUs" if lc.gpus_per_node else ""
    lines = [
        "#!/bin/bash",
        _comment(f"llamatron launch: {lc.nodes} node(s){gpus}, {nproc} training process(es) per node "
                 f"(world size {world}); run directory {plan.out_dir}"),
        _comment(f"Rendered from {source or 'the config'}; submitted {lc.jobs} time(s), each job after the "
                 "last (--dependency=afterany), each resuming from the newest complete checkpoint."),
        *sbatch_lines,
        "",
        *env_lines,
        *([""] if env_lines else []),
        'nodes=( $(scontrol show hostnames "$SLURM_JOB_NODELIST") )',
        "head_node=${nodes[0]}",
        'echo "llamatron: job $SLURM_JOB_ID (start $(( ${SLURM_RESTART_COUNT:-0} + 1 ))) at $(date -Is) on '
        f'${{#nodes[@]}} node(s): ${{nodes[*]}}; rendezvous $head_node:{lc.rdzv_port}"',
        "",
        command,
        "rc=$?",
        f"if [ $rc -eq {REQUEUE_EXIT_CODE} ]; then",
        f'    echo "llamatron: training stopped early after a checkpoint (exit {REQUEUE_EXIT_CODE}); '
        'requeueing job $SLURM_JOB_ID"',
        '    scontrol requeue "$SLURM_JOB_ID" && exit 0',
        "fi",
        'echo "llamatron: training exited with status $rc at $(date -Is)"',
        "exit $rc",
        "",
    ]
    return "\n".join(lines)


def _comment(text: str) -> str:
    """A one-line shell comment, whatever the text holds."""
    return "# " + text.replace("\r", "\\r").replace("\n", "\\n")


def submit(cfg: Config, script: str, plan: LaunchPlan, log=print) -> list[str]:
    """Write the script and config into the run directory, submit `launch.jobs` chained jobs."""
    plan.script.parent.mkdir(parents=True, exist_ok=True)
    plan.log_pattern.parent.mkdir(parents=True, exist_ok=True)  # sbatch does not create it
    plan.config.write_text(dump_config(cfg))
    plan.script.write_text(script)
    job_ids: list[str] = []
    for i in range(cfg.launch.jobs):
        cmd = ["sbatch", "--parsable"]
        if job_ids:
            cmd.append(f"--dependency=afterany:{job_ids[-1]}")
        cmd.append(str(plan.script))
        try:
            res = subprocess.run(cmd, cwd=plan.workdir, capture_output=True, text=True)
        except FileNotFoundError:
            raise LlamatronError("sbatch not found: `llamatron launch` needs Slurm (or --dry-run)") from None
        if res.returncode != 0:
            done = f" (jobs already submitted: {', '.join(job_ids)})" if job_ids else ""
            raise LlamatronError(f"sbatch failed{done}: {(res.stderr or res.stdout).strip()}")
        job_id = res.stdout.strip().split(";")[0]  # --parsable: "ID" or "ID;CLUSTER"
        job_ids.append(job_id)
        after = f", after {job_ids[-2]}" if len(job_ids) > 1 else ""
        log(f"submitted job {job_id} ({i + 1} of {cfg.launch.jobs}{after}); log {plan.log(job_id)}")
    log(f"script {plan.script}; config {plan.config}")
    log(f"follow: tail -f {plan.log(job_ids[-1] if len(job_ids) == 1 else job_ids[0])}; "
        f"cancel: scancel {' '.join(job_ids)}")
    return job_ids


# --------------------------------------------------------------------------------------------------
# One node: torchrun


_AGENT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1)


def torchrun(command: list[str], nproc_per_node: int, nnodes: int = 1, rdzv_endpoint: str | None = None,
             rdzv_id: str | None = None, log=print) -> int:
    """Run `command` (`-m MODULE ARGS` or `SCRIPT ARGS`) in nproc_per_node processes with torchrun,
    across nnodes nodes that meet at rdzv_endpoint (None: one node, on a free local port).

    Returns an exit status: 0; REQUEUE_EXIT_CODE when a worker exited with it or this process got a
    stop signal (SIGTERM, SIGUSR1: forwarded to the workers, which checkpoint and exit); 130 on SIGINT;
    otherwise the first failed worker's exit status."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    argv = [f"--nnodes={nnodes}", f"--nproc-per-node={nproc_per_node}"]
    if rdzv_endpoint is None:
        if nnodes != 1:
            raise LlamatronError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the first node)")
        argv.append("--standalone")
    else:
        argv += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id or 'llamatron'}"]
    argv += command
    log(f"torchrun {shlex.join(argv)}")

    def stop(signum, frame):  # torchrun handles TERM/INT/HUP/QUIT itself; USR1 (Slurm's --signal) alike
        raise SignalException(f"Process {os.getpid()} got signal: {signum}", sigval=signal.Signals(signum))

    # torch's agent installs handlers for TERM/INT/HUP/QUIT in this process and leaves them: put them all
    # back, or a later SIGTERM (to a test run in this process, say) raises its SignalException here.
    previous = {s: signal.getsignal(s) for s in _AGENT_SIGNALS}
    signal.signal(signal.SIGUSR1, stop)
    try:
        run(parse_args(argv))
        return 0
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        if REQUEUE_EXIT_CODE in codes:
            return REQUEUE_EXIT_CODE
        first = codes[0] if codes else 1
        return first if first > 0 else 128 - first  # killed by signal N: -N -> 128 + N, as a shell says
    except SignalException as e:
        return 130 if e.sigval == signal.SIGINT else REQUEUE_EXIT_CODE
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
