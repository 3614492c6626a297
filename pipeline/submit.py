"""``scoreda submit | status | job``: the stages of one run as chained SLURM jobs.

``scoreda submit CONFIG --run-dir RUN`` validates the submit config (site settings + one job spec
per stage) and every stage config against the cluster (partition known, time limits within its
maximum) *before* anything is written or submitted, then

* copies each stage config into ``RUN/configs/STAGE.yaml`` with the run's paths filled in
  (generate → ``RUN/data.zarr``; train reads that store and writes ``RUN/train``; the campaign
  writes ``RUN/campaign``; the bench sweep ``RUN/bench``),
* renders the stage's template from ``jobs/`` (or ``site.templates``) into ``RUN/jobs/``,
* submits them in stage order, each ``--dependency=afterok:<previous>`` with
  ``--kill-on-invalid-dep=yes`` (a failed stage cancels the rest: nothing waits forever),
* records the job ids in ``RUN/jobs.json`` (atomically) and prints them.

``--dry-run`` does the same up to ``sbatch --test-only`` for each script and records nothing.

Every template is resource headers plus ``exec scoreda job STAGE RUN``: the job command knows
whether to start or resume the stage, launches it (``srun`` for several tasks), passes SLURM's
pre-timeout ``USR1`` (``--signal=B:USR1@lead``, sent to the batch shell = this process) on to the
ranks, and when the stage stops with exit 3 (committed, not finished) requeues the job with
``scontrol requeue``: the same job id comes back with a fresh time limit and resumes from the
last committed cycle / checkpoint, until the stage is complete or ``max_requeues`` is spent.

``scoreda status RUN`` prints each job's state (``scontrol``; finished jobs stay known for
``MinJobAge``) and each stage's progress read from its outputs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.config import (
    ConfigError,
    JobSpec,
    Strict,
    SubmitConfig,
    dump,
    load_config,
    load_yaml,
    resolve_config_path,
    slurm_seconds,
    validate,
)
from pipeline.storage import OutputError, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
ORDER = ("generate", "train", "campaign", "smooth", "calibrate", "bench")
SUBMIT, JOBS, STORE = "submit.yaml", "jobs.json", "data.zarr"
EXIT_REQUEUE = 3  # a stage stopped after a commit/checkpoint and is not finished
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


# ------------------------------------------------------------------------------------------------
# SLURM command line
def _slurm(args: list[str], timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    """Run a SLURM client command; a missing client or an error becomes one line."""
    exe = shutil.which(args[0])
    if exe is None:
        raise OutputError(f"{args[0]}: not found (is SLURM installed and on PATH?)")
    try:
        r = subprocess.run([exe, *args[1:]], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise OutputError(f"{args[0]}: no answer within {timeout:.0f} s (is slurmctld up?)") from None
    if check and r.returncode != 0:
        msg = (r.stderr.strip() or r.stdout.strip()).splitlines()
        raise OutputError(f"{' '.join(args[:2])}: {msg[-1] if msg else f'exit {r.returncode}'}")
    return r


def partitions() -> tuple[dict[str, int | None], str | None]:
    """The cluster's partitions with their maximum time in seconds (None: no limit), and the
    default partition."""
    out = _slurm(["sinfo", "-h", "-o", "%P %l"]).stdout
    parts: dict[str, int | None] = {}
    default = None
    for line in out.splitlines():
        if not line.strip():
            continue
        name, limit = line.split()[:2]
        if name.endswith("*"):
            name = name[:-1]
            default = name
        try:
            parts[name] = None if limit in ("infinite", "n/a") else slurm_seconds(limit)
        except ValueError:
            parts[name] = None
    return parts, default


def free_port_pair() -> int:
    """A free port p with p + 1 free too: slurmctld and slurmd of a local SLURM (env/slurm.sh)."""
    import socket

    for _ in range(50):
        with socket.socket() as a:
            a.bind(("", 0))
            port = a.getsockname()[1]
        if port < 65000:
            with socket.socket() as b:
                try:
                    b.bind(("", port + 1))
                except OSError:
                    continue
            return port
    raise OutputError("no free port pair for a local SLURM")


def job_info(job_id: str) -> list[dict[str, str]]:
    """``scontrol show job`` as dicts (one per array task); [] when slurmctld no longer knows it."""
    r = _slurm(["scontrol", "-o", "show", "job", job_id], check=False)
    if r.returncode != 0:
        return []
    rows = []
    for line in r.stdout.splitlines():
        rec: dict[str, str] = {}
        for field in shlex.split(line):
            k, sep, v = field.partition("=")
            if sep:
                rec[k] = v
        if rec:
            rows.append(rec)
    return rows


# ------------------------------------------------------------------------------------------------
# rendering
def _scoreda(sub: SubmitConfig) -> str:
    if sub.site.scoreda:
        return sub.site.scoreda
    exe = Path(sys.executable).parent / "scoreda"
    return str(exe) if exe.exists() else f"{sys.executable} -m pipeline.cli"


def template_dir(sub: SubmitConfig) -> Path:
    d = Path(sub.site.templates) if sub.site.templates else ROOT / "jobs"
    if not d.is_dir():
        raise ConfigError(f"site.templates: {d} is not a directory of job templates")
    return d


def _headers(sub: SubmitConfig, spec: JobSpec) -> str:
    """The site's and the job's own optional ``#SBATCH`` lines."""
    s = sub.site
    lines = [f"--partition={s.partition}" if s.partition else None,
             f"--account={s.account}" if s.account else None,
             f"--qos={s.qos}" if s.qos else None,
             f"--gpus-per-node={spec.gpus}" if spec.gpus else None,
             f"--mem={spec.mem}" if spec.mem else None, *s.sbatch]
    return "\n".join(f"#SBATCH {x}" for x in lines if x)


def _setup(sub: SubmitConfig) -> str:
    lines = [f"module load {m}" for m in sub.site.modules] + list(sub.site.setup)
    return "\n".join(lines)


def render(sub: SubmitConfig, stage: str, run_dir: Path, template: str | None = None) -> str:
    """The batch script of ``stage``: the template with the run's values filled in."""
    spec = getattr(sub, stage)
    name = template or (f"{stage}_gpu" if stage == "train" and spec.gpus else stage)
    path = template_dir(sub) / f"{name}.sbatch"
    if not path.exists():
        raise ConfigError(f"site.templates: no template {path.name} in {path.parent}")
    values = {
        "job_name": f"{run_dir.name}-{stage}"[:64],
        "nodes": spec.nodes, "ntasks": spec.ntasks, "cpus_per_task": spec.cpus_per_task,
        "gpus": spec.gpus, "time": spec.time or sub.site.time,
        "log": str(run_dir / "logs" / f"{stage}-%j.out"),
        "array_log": str(run_dir / "logs" / f"{stage}-%A_%a.out"),
        "signal_lead": getattr(spec, "signal_lead", 0),
        "array": (f"0-{len(spec.ranks) - 1}" if stage == "bench"
                  else f"0-{max(len(spec.trajectories), 1) - 1}" if stage == "smooth" else ""),
        "max_ntasks": max(spec.ranks) if stage == "bench" else spec.ntasks,
        "site_headers": _headers(sub, spec), "setup": _setup(sub),
        "scoreda": _scoreda(sub), "run_dir": shlex.quote(str(run_dir)), "stage": stage,
    }
    try:
        text = path.read_text().format_map(values)
    except (KeyError, ValueError, IndexError) as exc:
        raise ConfigError(f"{path}: bad template field {exc}") from None
    # a placeholder with nothing to say (no site headers, no set-up) leaves no blank line
    return "\n".join(line for line in text.splitlines() if line.strip()) + "\n"


# ------------------------------------------------------------------------------------------------
# stage configs with the run's paths
def _stage_configs(sub: SubmitConfig, run_dir: Path, stages: list[str]) -> dict[str, dict[str, Any]]:
    """Each stage's config (validated) with the run's paths, as the mapping written to
    ``RUN/configs/STAGE.yaml``."""
    out: dict[str, dict[str, Any]] = {}
    for stage in stages:
        spec = getattr(sub, stage)
        if stage == "bench":
            continue
        try:
            path = resolve_config_path(spec.config)
            data = load_yaml(path)
        except ConfigError as exc:  # name the key that points there
            raise ConfigError(f"{stage}.config: {exc}") from None
        if data.get("stage", stage) != stage:
            raise ConfigError(f"{stage}.config: {path} is a {data.get('stage')!r} config, not {stage!r}")
        data = dict(data, stage=stage)
        if stage == "generate":
            data["out"] = str(run_dir / STORE)
        elif stage == "train" and "generate" in stages:
            data["store"] = str(run_dir / STORE)
        elif (stage == "campaign" and "train" in stages
              and (data.get("filter") or {}).get("method") == "sda"):
            # SDA as the campaign's filter samples with the model this chain trains
            data["filter"] = {**data["filter"], "sda": {**(data["filter"].get("sda") or {}),
                                                        "model": str(run_dir / "train")}}
        elif stage == "smooth" and "train" in stages:
            data["model_run"] = str(run_dir / "train")  # the model this chain trains
        elif stage == "calibrate" and "smooth" in stages:
            # the chain's smoothed windows are the calibration cases
            data["runs"] = [str(p) for p in smooth_outputs(sub, run_dir, out["smooth"]).values()]
        cfg = validate(data, _schema(stage), f"{stage}.config ({path})")
        if stage == "train" and "generate" not in stages:
            store = Path(cfg.store)  # type: ignore[attr-defined]
            if not store.exists():
                raise ConfigError(f"{stage}.config: store {store} does not exist and no generate "
                                  f"stage makes it")
        if stage == "train":
            _check_train_gpus(spec, cfg.device, path)  # type: ignore[attr-defined]
        if stage == "smooth":
            _check_smooth(spec, cfg, path, "train" in stages)  # type: ignore[arg-type]
        if stage == "calibrate" and "smooth" in stages and cfg.pool == "param":  # type: ignore[attr-defined]
            from kernels.metrics import conformal_min_cases

            need = conformal_min_cases(cfg.level)  # type: ignore[attr-defined]
            if len(data["runs"]) < need:
                raise ConfigError(f"smooth.trajectories: {len(data['runs'])} windows are too few "
                                  f"for calibrate's {cfg.level:.0%} bound per parameter (at least "  # type: ignore[attr-defined]
                                  f"{need}; or pool: all in calibrate.config)")
        sda = getattr(getattr(cfg, "filter", None), "sda", None)
        if stage == "campaign" and sda is not None and "train" not in stages \
                and not (Path(sda.model) / "model.pt").exists():
            raise ConfigError(f"{stage}.config: filter.sda.model {sda.model} has no model.pt and "
                              f"no train stage makes it")
        out[stage] = cfg.model_dump(mode="json")
    return out


def smooth_outputs(sub: SubmitConfig, run_dir: Path, smooth_cfg: dict[str, Any]) -> dict[int, Path]:
    """Test trajectory → ``RUN/smooth/tT`` for each window of the smooth stage, in array-task
    order: ``smooth.trajectories``, or the config's own ``trajectory`` when none are listed."""
    assert sub.smooth is not None
    trajs = sub.smooth.trajectories or [int(smooth_cfg.get("trajectory", 0))]
    return {t: run_dir / "smooth" / f"t{t}" for t in trajs}


def _check_smooth(spec: JobSpec, cfg: Any, path: Path, trained_here: bool) -> None:
    """The smoothing's model exists or this chain trains it; GPUs and device agree."""
    if not trained_here and not (Path(cfg.model_run) / "model.pt").exists():
        raise ConfigError(f"smooth.config: model_run {cfg.model_run} has no model.pt and no train "
                          "stage makes it")
    gpu = cfg.device.startswith("cuda")
    if gpu and spec.gpus == 0:
        raise ConfigError(f"smooth.gpus: 0, but smooth.config ({path}) samples on device "
                          f"{cfg.device!r}: ask for the nodes' GPUs")
    if spec.gpus and not gpu:
        raise ConfigError(f"smooth.gpus: {spec.gpus} per node asked, but smooth.config ({path}) "
                          f"samples on device {cfg.device!r} (set device: cuda)")


def _check_train_gpus(spec: JobSpec, device: str, path: Path) -> None:
    """The train job's GPUs and its config's device agree: one DDP rank per GPU (NCCL refuses
    two ranks on one GPU), and no GPU allocated to a CPU training."""
    gpu = device.startswith("cuda")
    if gpu and spec.gpus == 0:
        raise ConfigError(f"train.gpus: 0, but train.config ({path}) trains on device {device!r}: "
                          "ask for the nodes' GPUs")
    if spec.gpus and not gpu:
        raise ConfigError(f"train.gpus: {spec.gpus} per node asked, but train.config ({path}) "
                          f"trains on device {device!r} (set device: cuda)")
    if gpu and spec.ntasks != spec.nodes * spec.gpus:
        raise ConfigError(f"train.ntasks: {spec.ntasks} ranks on {spec.nodes} node(s) with "
                          f"{spec.gpus} GPUs each; DDP takes one rank per GPU "
                          f"(ntasks = nodes × gpus = {spec.nodes * spec.gpus})")
    if device != "cuda" and gpu and spec.ntasks > spec.nodes:
        raise ConfigError(f"train.config ({path}): device {device!r} puts every rank of a node on "
                          "one GPU; use device: cuda (GPU local rank)")


def _schema(stage: str) -> type[Strict]:
    from pipeline.config import STAGES

    return STAGES[stage]


def _check_cluster(sub: SubmitConfig, stages: list[str]) -> None:
    parts, default = partitions()
    part = sub.site.partition or default
    if sub.site.partition is not None and sub.site.partition not in parts:
        raise ConfigError(f"site.partition: {sub.site.partition!r} is not a partition of this "
                          f"cluster (known: {', '.join(sorted(parts)) or 'none'})")
    if part is None:
        raise ConfigError("site.partition: the cluster has no default partition; name one")
    limit = parts.get(part)
    for stage in stages:
        spec = getattr(sub, stage)
        t = spec.time or sub.site.time
        if limit is not None and slurm_seconds(t) > limit:
            key = f"{stage}.time" if spec.time else "site.time"
            raise ConfigError(f"{key}: {t} exceeds the maximum of partition {part!r} ({limit} s)")


def load_submit_config(path: str | Path) -> SubmitConfig:
    cfg = load_config(path, "submit")
    if not isinstance(cfg, SubmitConfig):
        raise ConfigError(f"{path}: stage: expected 'submit'")
    return cfg


def _stages(sub: SubmitConfig, only: str | None) -> list[str]:
    present = [s for s in ORDER if getattr(sub, s) is not None]
    if only is None:
        stages = present
    else:
        stages = [s.strip() for s in only.split(",") if s.strip()]
        for s in stages:
            if s not in ORDER:
                raise ConfigError(f"--stages: unknown stage {s!r} (known: {', '.join(ORDER)})")
            if s not in present:
                raise ConfigError(f"--stages: {s!r} has no job spec in the submit config")
        stages = [s for s in ORDER if s in stages]
    if not stages:
        raise ConfigError("submit: no stage to submit")
    return stages


# ------------------------------------------------------------------------------------------------
# submit
def submit(sub: SubmitConfig, run_dir: str | Path, stages: list[str], dry_run: bool = False,
           source: str = "") -> list[dict[str, Any]]:
    """Render and submit (or test) the chain; returns the job records."""
    run_dir = Path(run_dir).absolute()
    if (run_dir / JOBS).exists():
        raise OutputError(f"{run_dir}: already submitted ({JOBS}); see `scoreda status {run_dir}`")
    for stage, out in (("generate", STORE), ("train", "train"), ("campaign", "campaign"),
                       ("smooth", "smooth"), ("calibrate", "calibrate"), ("bench", "bench")):
        if stage in stages and (run_dir / out).exists():
            raise OutputError(f"{run_dir / out}: exists; choose a new --run-dir")
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputError(f"{run_dir}: exists and is not a directory")
    configs = _stage_configs(sub, run_dir, stages)
    _check_cluster(sub, stages)
    scripts = {s: render(sub, s, run_dir) for s in stages}
    if "bench" in stages:
        scripts["bench_gather"] = render(sub, "bench", run_dir, template="bench_gather")
    # everything is valid: write
    for d in ("configs", "jobs", "logs"):
        (run_dir / d).mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / SUBMIT, dump(sub))
    for stage, data in configs.items():
        write_text_atomic(run_dir / "configs" / f"{stage}.yaml",
                          __import__("yaml").safe_dump(data, sort_keys=False))
    paths = {}
    for name, text in scripts.items():
        p = run_dir / "jobs" / f"{name}.sbatch"
        write_text_atomic(p, text)
        p.chmod(0o755)
        paths[name] = p
    records: list[dict[str, Any]] = []
    if dry_run:
        for name, p in paths.items():
            r = _slurm(["sbatch", "--test-only", str(p)], check=False)
            msg = (r.stderr.strip() or r.stdout.strip()).splitlines()
            records.append({"stage": name, "script": str(p), "ok": r.returncode == 0,
                            "sbatch": msg[-1] if msg else ""})
        return records
    prev: str | None = None
    for name in [*stages, *(["bench_gather"] if "bench" in stages else [])]:
        cmd = ["sbatch", "--parsable"]
        if prev is not None:
            # the gather step summarises whatever array tasks finished
            kind = "afterany" if name == "bench_gather" else "afterok"
            cmd += [f"--dependency={kind}:{prev}", "--kill-on-invalid-dep=yes"]
        try:
            jid = _slurm([*cmd, str(paths[name])]).stdout.strip().split(";")[0]
        except OutputError:
            for rec in records:  # a half-submitted chain is cancelled, not left behind
                _slurm(["scancel", rec["job_id"]], check=False)
            raise
        records.append({"stage": name, "job_id": jid, "script": str(paths[name]),
                        "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        prev = jid
    write_text_atomic(run_dir / JOBS, json.dumps({"config": source, "jobs": records}, indent=1))
    return records


# ------------------------------------------------------------------------------------------------
# status
def _progress(stage: str, run_dir: Path) -> str:
    try:
        if stage == "generate":
            from pipeline.store import status

            if not (run_dir / STORE).exists():
                return "not started"
            st = status(run_dir / STORE)
            return f"{st.shards_done}/{st.shards_total} shards"
        if stage == "train":
            from pipeline.train import read_progress

            d = run_dir / "train"
            if not (d / "progress.json").exists():
                return "not started"
            rec = read_progress(d)
            steps = load_yaml(d / "config.yaml").get("steps")
            return f"step {rec['step']}/{steps}" + (" (model.pt)" if (d / "model.pt").exists() else "")
        if stage == "campaign":
            from pipeline.campaign import read_progress

            d = run_dir / "campaign"
            if not (d / "progress.json").exists():
                return "not started"
            rec = read_progress(d)
            return f"{rec['cycles_done']}/{rec['cycles']} cycles"
        if stage == "smooth":
            from pipeline.smooth import METRICS

            sub = validate(load_yaml(run_dir / SUBMIT), SubmitConfig, str(run_dir / SUBMIT))
            outs = smooth_outputs(sub, run_dir, load_yaml(run_dir / "configs" / "smooth.yaml"))  # type: ignore[arg-type]
            done = sum((o / METRICS).exists() for o in outs.values())
            return f"{done}/{len(outs)} windows"
        if stage == "calibrate":
            from pipeline.calibrate import CALIBRATION

            return "done" if (run_dir / "calibrate" / CALIBRATION).exists() else "not done"
        if stage == "bench":
            done = sorted((run_dir / "bench").glob("ranks-*.json"))
            table = (run_dir / "bench" / "scaling.md").exists()
            return f"{len(done)} rank counts measured" + (", table written" if table else "")
    except (OSError, OutputError, ConfigError, KeyError, ValueError) as exc:
        return f"unreadable ({exc})"
    return ""


def status_lines(run_dir: str | Path) -> list[str]:
    run_dir = Path(run_dir)
    try:
        rec = json.loads((run_dir / JOBS).read_text())
    except FileNotFoundError:
        raise OutputError(f"{run_dir}: no {JOBS} (not a submitted run)") from None
    except ValueError:
        raise OutputError(f"{run_dir / JOBS}: unreadable") from None
    lines = [f"{'stage':<13}{'job':<10}{'state':<26}{'restarts':<9}progress"]
    for job in rec["jobs"]:
        rows = job_info(job["job_id"])
        if not rows:
            state, restarts = "finished (no longer in slurmctld)", "-"
        else:
            states = sorted({r.get("JobState", "?") for r in rows})
            state = ",".join(states)
            reason = rows[0].get("Reason", "None")
            if reason not in ("None", "") and "PENDING" in states:
                state += f" ({reason})"
            exit_codes = {r.get("ExitCode", "0:0") for r in rows}
            if "FAILED" in states:
                state += f" exit {','.join(sorted(exit_codes))}"
            restarts = str(max(int(r.get("Restarts", "0") or 0) for r in rows))  # array: any task
        stage = job["stage"]
        prog = _progress(stage, run_dir) if stage in ORDER else ""
        lines.append(f"{stage:<13}{job['job_id']:<10}{state:<25} {restarts:<9}{prog}")
    return lines


# ------------------------------------------------------------------------------------------------
# the job itself (inside the allocation)
def _stage_argv(stage: str, run_dir: Path, sub: SubmitConfig) -> list[str]:
    """The stage's ``scoreda`` arguments: start it, or resume what a previous attempt committed."""
    conf = str(run_dir / "configs" / f"{stage}.yaml")
    if stage == "generate":  # re-running generate resumes: finished shards are skipped
        return ["generate", conf, "--out", str(run_dir / STORE)]
    if stage == "train":
        d = run_dir / "train"
        if (d / "progress.json").exists():
            return ["train", "--resume", str(d)]
        return ["train", conf, "--run-dir", str(d), "--overwrite"]  # nothing committed yet
    if stage == "campaign":
        d = run_dir / "campaign"
        if (d / "progress.json").exists():
            return ["campaign", "resume", str(d)]
        return ["campaign", "run", conf, "--run-dir", str(d), "--overwrite"]
    raise ConfigError(f"job: unknown stage {stage!r}")


def _launcher(ntasks: int) -> list[str]:
    if os.environ.get("SLURM_JOB_ID"):
        return ["srun", "--kill-on-bad-exit=1", f"--ntasks={ntasks}"]
    if ntasks == 1:
        return []
    return [str(Path(sys.executable).parent / "mpiexec"), "-n", str(ntasks)]


def run_stage(argv: list[str], ntasks: int, sub: SubmitConfig, seen: list[int] | None = None) -> int:
    """Run ``scoreda ARGV`` on ``ntasks`` ranks, passing USR1/TERM on to them; its exit code.
    The signals received are appended to ``seen``.

    A signal is passed on only once the stage has had 3 s to start (its CLI records USR1 from
    its first line; before that the default action would kill it) and again every 10 s until it
    exits: the stages stop at their next commit whichever copy they see.
    """
    from pipeline import early_signal

    cmd = [*_launcher(ntasks), *shlex.split(_scoreda(sub)), *argv]
    print(f"scoreda job: {' '.join(cmd)}", flush=True)
    pending: list[int] = [signal.SIGUSR1] if early_signal() else []

    def note(signum: int, frame: Any) -> None:
        pending.append(signum)

    old = {s: signal.signal(s, note) for s in (signal.SIGUSR1, signal.SIGTERM)}
    child = subprocess.Popen(cmd)
    t0, sent = time.monotonic(), -math.inf
    try:
        while (rc := child.poll()) is None:
            now = time.monotonic()
            if pending and now - t0 >= 3 and now - sent >= 10:
                sig = signal.Signals(pending[-1])
                print(f"scoreda job: {sig.name} → stage", flush=True)
                try:
                    child.send_signal(sig)  # srun passes it on to every task
                except ProcessLookupError:
                    pass
                sent = now
            time.sleep(0.2)
        return rc
    finally:
        if seen is not None:
            seen.extend(pending)
        for s, h in old.items():
            signal.signal(s, h)


def _smooth_job(run_dir: Path, sub: SubmitConfig) -> int:
    """This array task's window (``SLURM_ARRAY_TASK_ID``), or every window in turn outside
    SLURM; a window whose output is complete is skipped (smooth writes it whole, by rename)."""
    from pipeline import early_signal
    from pipeline.smooth import METRICS

    assert sub.smooth is not None
    conf = run_dir / "configs" / "smooth.yaml"
    outs = list(smooth_outputs(sub, run_dir, load_yaml(conf)).items())  # type: ignore[arg-type]
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if task is not None:
        if not 0 <= int(task) < len(outs):
            print(f"scoreda job smooth: array index {task} outside smooth.trajectories",
                  file=sys.stderr)
            return 2
        outs = [outs[int(task)]]
    seen: list[int] = []
    started = False
    for traj, out in outs:
        if (out / METRICS).exists():
            print(f"scoreda job: {out} is complete; skipped", flush=True)
            continue
        # the time limit is near: no new window after one ran (the first always runs, to its
        # first committed batch at least, so every attempt makes progress)
        if started and (seen or early_signal()):
            print(f"scoreda job: stop signal; {out} not started", flush=True)
            return _requeue_if_stopped("smooth", sub.smooth, EXIT_REQUEUE)
        started = True
        # no --overwrite: a window's committed samples are resumed, never discarded
        rc = run_stage(["smooth", str(conf), "--trajectory", str(traj), "--out", str(out)],
                       sub.smooth.ntasks, sub, seen)
        if rc != 0:
            return _requeue_if_stopped("smooth", sub.smooth, rc)
    return 0


def run_job(stage: str, run_dir: str | Path) -> int:
    """The body of a stage's batch script: run or resume; requeue when stopped unfinished."""
    run_dir = Path(run_dir).absolute()
    sub = validate(load_yaml(run_dir / SUBMIT), SubmitConfig, str(run_dir / SUBMIT))
    assert isinstance(sub, SubmitConfig)
    if stage == "bench":
        from pipeline.bench_scaling import run_array_task

        return run_array_task(run_dir, sub, _scoreda(sub), _launcher)
    if stage == "bench_gather":
        from pipeline.bench_scaling import gather

        gather(run_dir / "bench")
        return 0
    spec = getattr(sub, stage, None)
    if spec is None:
        raise ConfigError(f"job: {run_dir / SUBMIT} has no {stage!r} stage")
    if stage == "smooth":
        return _smooth_job(run_dir, sub)
    if stage == "calibrate":
        return run_stage(["calibrate", str(run_dir / "configs" / "calibrate.yaml"), "--out",
                          str(run_dir / "calibrate"), "--overwrite"], 1, sub)
    return _requeue_if_stopped(stage, spec, run_stage(_stage_argv(stage, run_dir, sub),
                                                      spec.ntasks, sub))


def _requeue_if_stopped(stage: str, spec: JobSpec, rc: int) -> int:
    """A stage that stopped after a commit (exit 3) requeues its job under SLURM, until
    ``max_requeues``; any other exit code is the job's."""
    if rc != EXIT_REQUEUE:
        return rc
    job = os.environ.get("SLURM_JOB_ID")
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    max_rq = getattr(spec, "max_requeues", 0)
    if job is None:
        print(f"scoreda job: {stage} stopped unfinished (not under SLURM: run it again to resume)")
        return rc
    if restarts >= max_rq:
        print(f"scoreda job: {stage} stopped unfinished after {restarts} requeues (max_requeues)")
        return rc
    print(f"scoreda job: {stage} committed and stopped; requeue {restarts + 1} of job {job}",
          flush=True)
    _slurm(["scontrol", "requeue", job])
    time.sleep(30)  # slurmctld ends this run of the job now; returning first would look like success
    return rc


# ------------------------------------------------------------------------------------------------
# CLI
def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="submit a run's stages as chained SLURM jobs",
                       description="Render the stages' job scripts into RUN_DIR and submit them "
                                   "chained with afterok (--kill-on-invalid-dep=yes); long stages "
                                   "requeue themselves until done.")
    p.add_argument("config", help="submit config: file or shipped example name")
    p.add_argument("--run-dir", required=True, help="run directory to create")
    p.add_argument("--stages", help="comma-separated subset, e.g. train,campaign")
    p.add_argument("--dry-run", action="store_true",
                   help="write the scripts and check them with sbatch --test-only; submit nothing")
    p.set_defaults(func=_cmd_submit)

    s = sub.add_parser("status", help="job states and stage progress of a submitted run")
    s.add_argument("run_dir")
    s.set_defaults(func=_cmd_status)

    j = sub.add_parser("job", help="(inside a batch script) run or resume one stage of a run")
    j.add_argument("stage", choices=[*ORDER, "bench_gather"])
    j.add_argument("run_dir")
    j.set_defaults(func=_cmd_job)


def _cmd_submit(args: argparse.Namespace) -> int:
    path = resolve_config_path(args.config)
    cfg = load_submit_config(path)
    stages = _stages(cfg, args.stages)
    recs = submit(cfg, args.run_dir, stages, dry_run=args.dry_run, source=str(path))
    if args.dry_run:
        for r in recs:
            print(f"{r['stage']:<13}{'ok' if r['ok'] else 'REFUSED':<9}{r['script']}  {r['sbatch']}")
        return 0 if all(r["ok"] for r in recs) else 1
    for r in recs:
        print(f"{r['stage']:<13}job {r['job_id']}")
    print(f"recorded in {Path(args.run_dir) / JOBS}; `scoreda status {args.run_dir}`")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    for line in status_lines(args.run_dir):
        print(line)
    return 0


def _cmd_job(args: argparse.Namespace) -> int:
    return run_job(args.stage, args.run_dir)
