"""Study workers as jobs of Hydra's submitit launcher (`hydra/launcher=submitit_slurm`, or
`submitit_local` on one machine): the head creates the study and its parent run, then
submits `n_jobs` long-lived worker jobs at once; each runs the ask/tell loop against the
shared storage until the study has `n_trials`, its trials in its own process (a queue
wait is paid once per worker, not once per trial; pruning and heartbeats stay there).

- The executor is built from `hydra.launcher` exactly as the launcher builds its own
  (submitit's AutoExecutor, the same keys): partition, GPUs, CPUs, time limit, signal
  delay, `additional_parameters`, `setup` all apply to the workers.
- A worker runs this command again in its job (`cnnstudy-train -m ...` with
  `hydra/launcher=basic`, the study's name, its own output folder), with
  CNNSTUDY_STUDY_WORKER=1: it never closes the parent run nor summarises.
- Preemption and time limits: SLURM sends SIGUSR2 (`signal_delay_s` before the limit)
  and SIGTERM. A worker notes them, stops at the next safe point (between batches), marks
  its trial FAIL and queues its parameters again, marks its MLflow run KILLED, then asks
  submitit to requeue the job (`scontrol requeue`; the local executor restarts it). The
  requeued job rejoins the study.
- The head watches the study while the jobs run, says each finished trial, fails the
  trials of workers that died (their heartbeats stop), and summarises at the end.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from cnnstudy.errors import ConfigError
from cnnstudy.log import get as get_log

log = get_log("study")

JOB_ENV = "CNNSTUDY_STUDY_JOB"  # set in a worker job: preemption requeues it


def is_submitit(config: Any) -> bool:
    target = str(config.hydra.launcher.get("_target_", ""))
    return "hydra_submitit_launcher" in target


def is_slurm(config: Any) -> bool:
    return str(config.hydra.launcher.get("_target_", "")).endswith("SlurmLauncher")


def in_job() -> bool:
    return os.environ.get(JOB_ENV) == "1"


def check(config: Any, storage_url: str, tracking_uri: str) -> None:
    """What cannot work with the launcher, said before anything is submitted."""
    from cnnstudy.locks import sqlite_path
    from cnnstudy.study.storage import is_file_storage

    if not is_slurm(config):
        return
    if is_file_storage(storage_url):
        raise ConfigError(
            f"hydra.sweeper.storage={storage_url}: SLURM workers run on other machines, and "
            "a SQLite or journal file cannot be shared by several machines. Use a database "
            "server: storage=postgres (make services starts one; README: Services)"
        )
    if sqlite_path(tracking_uri) is not None:
        raise ConfigError(
            f"logger.tracking_uri={tracking_uri}: SLURM workers run on other machines, and "
            "a SQLite file cannot be shared by them. Use a tracking server: logger=server "
            "(make services starts one; README: Services)"
        )
    tasks = int(config.hydra.launcher.get("tasks_per_node") or 1)
    if tasks != 1:
        raise ConfigError(
            f"hydra.launcher.tasks_per_node={tasks}: each worker job is one process that "
            "runs trials; a trial on several devices starts its own processes "
            "(trainer.devices=N on one node, with hydra.launcher.gpus_per_node=N). Valid: 1"
        )
    import shutil

    if shutil.which("sbatch") is None:
        raise ConfigError(
            "hydra/launcher=submitit_slurm: SLURM's sbatch is not on this machine's PATH. Run "
            "the command on a SLURM login node, or run the workers here: "
            "hydra/launcher=submitit_local"
        )


def executor(config: Any) -> Any:
    """submitit's executor for `hydra.launcher`, built as hydra-submitit-launcher builds
    its own (submitit_launcher.BaseSubmititLauncher.launch)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    params = OmegaConf.to_container(config.hydra.launcher, resolve=True)
    target = str(params.pop("_target_"))
    cluster = "slurm" if target.endswith("SlurmLauncher") else "local"
    init = {"folder": params.pop("submitit_folder")}
    if "max_num_timeout" in params:
        init[f"{cluster}_max_num_timeout"] = params.pop("max_num_timeout")
    made = submitit.AutoExecutor(cluster=cluster, **init)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    made.update_parameters(**{k if k in base else f"{cluster}_{k}": v for k, v in params.items()})
    return made


def worker_arguments(argv: list[str], study_name: str, sweep_dir: str, k: int) -> list[str]:
    """The command line of worker `k`: this command's, on the study the head opened, in an
    output folder of its own. It composes the same config, launcher included; in a job,
    the sweeper runs its trials in the job's process (hydra_plugins.cnnstudy_sweeper)."""
    kept = [a for a in argv if not a.startswith(("hydra.sweeper.study_name=", "hydra.sweep.dir="))]
    return [
        *kept,
        f"hydra.sweeper.study_name={_quoted(study_name)}",
        f"hydra.sweep.dir={_quoted(str(Path(sweep_dir) / f'worker-{k}'))}",
    ]


def _quoted(value: str) -> str:
    """A value as one Hydra override token, whatever it holds."""
    if all(c.isalnum() or c in "-_./:" for c in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class StudyWorker:
    """The callable a worker job runs: `cnnstudy-train ARGS` as a study worker. submitit's
    `checkpoint` (called on preemption) resubmits it unchanged: the study's state lives in
    its storage, not here."""

    def __init__(self, arguments: list[str], started: str = "") -> None:
        self.arguments, self.started = arguments, started

    def __call__(self) -> str:
        from cnnstudy.redact import RedactingStream
        from cnnstudy.run import train
        from cnnstudy.study import workers

        os.environ[JOB_ENV] = "1"
        os.environ[workers.WORKER_ENV] = "1"
        os.environ.pop(workers.DRIVER_ENV, None)
        if self.started:
            os.environ[workers.STARTED_ENV] = self.started
        # the job's log says what a console script would, secrets redacted
        sys.stdout, sys.stderr = RedactingStream(sys.stdout), RedactingStream(sys.stderr)
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        requeue = signal.getsignal(signal.SIGUSR2)  # submitit's: requeue, then exit
        sys.argv = ["cnnstudy-train", *self.arguments]
        try:
            train.main()
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else 1
            # SIGUSR2: the time limit is near (sbatch --signal): requeue. SIGTERM: SLURM
            # preempts (and requeues itself) or cancels: stop, the trial queued again
            if code - 128 == int(signal.SIGUSR2) and callable(requeue):
                log.warning("cnnstudy: the job's time limit is near (SIGUSR2): requeued")
                requeue(signal.SIGUSR2, None)  # requeues the job and exits the process
            if code != 0:
                raise RuntimeError(
                    f"the study worker exited with {code} (its log: above)"
                ) from None
        return "done"

    def checkpoint(self) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def submit(
    config: Any, arguments: list[str], study_name: str, count: int, started: Any = None
) -> list[Any]:
    """`count` worker jobs, submitted at once, outside the head's MLflow run and SLURM
    job (sbatch exports the submitter's environment)."""
    import submitit

    sweep_dir = str(config.hydra.sweep.dir)
    made = executor(config)
    with submitit.helpers.clean_env(extra_names=("MLFLOW_RUN_ID",)):
        with made.batch():
            jobs = [
                made.submit(
                    StudyWorker(
                        worker_arguments(arguments, study_name, sweep_dir, k),
                        started.isoformat() if started is not None else "",
                    )
                )
                for k in range(count)
            ]
    folder = Path(str(config.hydra.launcher.submitit_folder)).parent
    log.info(
        f"{count} worker job(s) submitted ({', '.join(str(j.job_id) for j in jobs)}); "
        f"their logs: {folder}"
    )
    return jobs


def ended(jobs: list[Any]) -> bool:
    return all(job.done() for job in jobs)


def failures(jobs: list[Any]) -> str:
    """What went wrong with the jobs, one clause each ("" when nothing did)."""
    said = []
    for job in jobs:
        try:
            job.result()
        except Exception as err:  # noqa: BLE001 -- submitit's job errors, reported
            last = [line for line in str(err).strip().splitlines() if line.strip()]
            said.append(f"worker job {job.job_id}: {last[-1] if last else type(err).__name__}")
    return "; ".join(said)


def cancel(jobs: list[Any]) -> None:
    for job in jobs:
        if not job.done():
            try:
                job.cancel(check=False)
            except Exception:  # noqa: BLE001 -- already gone
                pass


def wait(jobs: list[Any], tick: Any, every: float = 2.0) -> None:
    """Until every job has ended, `tick()` every `every` seconds (the head's watch)."""
    from cnnstudy.run.lifecycle import raise_if_signalled

    while not ended(jobs):
        time.sleep(every)
        raise_if_signalled()
        tick()
