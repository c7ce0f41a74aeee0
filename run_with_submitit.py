"""Launches ``main.py`` on a SLURM cluster through submitit (optional dependency: ``pip install submitit``).

Every flag of ``main.py`` is accepted, plus the job's shape::

    python run_with_submitit.py --nodes 2 --ngpus 8 --partition learnfair --job_dir /checkpoint/$USER/irpe/%j \\
        --model deit_small_patch16_224_ctx_product_50_shared_k --data-path /data/imagenet

Each task reads its rank from SLURM (``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``) and the processes meet
through a file in the shared job folder. On preemption or timeout the job is requeued and resumes from
``<job_dir>/checkpoint.pth``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import main as trainer_main
import utils

_logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """``main.py``'s flags (``--config`` defaults included) plus the job's shape and SLURM options."""
    parser = argparse.ArgumentParser("Submitit for DeiT / iRPE", parents=[trainer_main.get_args_parser()])
    parser.add_argument("--ngpus", default=8, type=int, help="GPUs (tasks) per node")
    parser.add_argument("--nodes", default=2, type=int, help="number of nodes")
    parser.add_argument("--timeout", default=2800, type=int, help="job duration in minutes")
    parser.add_argument("--job_dir", default="", type=str, help="job folder (default: <shared folder>/%%j)")
    parser.add_argument("--partition", default="", type=str, help="SLURM partition")
    parser.add_argument("--use_volta32", action="store_true", help="ask for 32 GB V100s (constraint volta32gb)")
    parser.add_argument("--comment", default="", type=str, help="SLURM comment")
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default="")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**trainer_main.load_config(known.config, trainer_main.get_args_parser()))
    return parser.parse_args(argv)


def shared_folder() -> Path:
    """A folder visible from every node: ``$IRPE_SHARED_DIR`` or ``/checkpoint/$USER/experiments``."""
    base = os.environ.get("IRPE_SHARED_DIR") or (
        f"/checkpoint/{os.environ.get('USER', 'user')}/experiments" if Path("/checkpoint").is_dir() else ""
    )
    if not base:
        raise utils.UserError("no shared folder: set IRPE_SHARED_DIR or pass --job_dir on a shared file system")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def init_file_url(folder: Path) -> str:
    """A fresh ``file://`` rendezvous URL in ``folder`` (the file must not exist before the job starts)."""
    path = folder / f"{uuid.uuid4().hex}_init"
    path.unlink(missing_ok=True)
    return path.absolute().as_uri()


class Trainer:
    """The submitit callable: runs ``main.main`` in every task and requeues itself from the last checkpoint."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def __call__(self) -> Any:
        import submitit

        env = submitit.JobEnvironment()
        utils.setup_logging(env.global_rank)  # main.main sets it up again, the same way
        self.args.output_dir = str(self.args.job_dir).replace("%j", str(env.job_id))
        _logger.info(f"Process group: {env.num_tasks} tasks, rank: {env.global_rank}")
        try:
            return trainer_main.main(self.args)
        except utils.UserError as e:
            utils.eprint(f"error: {utils.user_message(e)}")
            raise SystemExit(2) from None

    def checkpoint(self) -> Any:
        """Called by submitit on preemption/timeout: requeue with ``--resume`` on the last checkpoint."""
        import submitit

        self.args.dist_url = init_file_url(Path(self.args.job_dir).parent)
        ckpt = trainer_main.resumable_checkpoint(Path(self.args.output_dir))  # None: preempted before any checkpoint
        if ckpt is not None:
            self.args.resume = str(ckpt)
        _logger.info(f"Requeuing {self.args}")
        return submitit.helpers.DelayedSubmission(type(self)(self.args))


def cli(argv: list[str] | None = None) -> int:
    """Command-line entry point: submits the job, or prints ``error: ...`` and returns 2."""
    utils.setup_logging(0)
    try:
        args = parse_args(argv)
        try:
            import submitit
        except ImportError:
            raise utils.UserError(
                "run_with_submitit.py needs submitit (pip install submitit); without SLURM use torchrun main.py"
            ) from None
        if not args.job_dir:
            args.job_dir = str(shared_folder() / "%j")
        job_root = Path(args.job_dir.replace("%j", "")).parent if "%j" in args.job_dir else Path(args.job_dir)
        job_root.mkdir(parents=True, exist_ok=True)
        executor = submitit.AutoExecutor(folder=args.job_dir, slurm_max_num_timeout=30)
        kwargs: dict[str, Any] = {}
        if args.partition:
            kwargs["slurm_partition"] = args.partition
        if args.use_volta32:
            kwargs["slurm_constraint"] = "volta32gb"
        if args.comment:
            kwargs["slurm_comment"] = args.comment
        executor.update_parameters(
            mem_gb=40 * args.ngpus,
            gpus_per_node=args.ngpus,
            tasks_per_node=args.ngpus,  # one task per GPU
            cpus_per_task=10,
            nodes=args.nodes,
            timeout_min=args.timeout,
            slurm_signal_delay_s=120,
            **kwargs,
        )
        executor.update_parameters(name="irpe")
        args.dist_url = init_file_url(job_root)
        job = executor.submit(Trainer(args))
    except utils.UserError as e:
        utils.eprint(f"error: {utils.user_message(e)}")
        return 2
    _logger.info(f"Submitted job {job.job_id}; logs and checkpoints in {args.job_dir.replace('%j', str(job.job_id))}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
