"""Launches ``main.py`` on a SLURM cluster through submitit (optional dependency: ``pip install submitit``).

Every flag of ``main.py`` is accepted, plus the job's shape::

    python run_with_submitit.py --nodes 2 --ngpus 8 --partition learnfair --job_dir /checkpoint/$USER/irpe/%j \\
        --model deit_small_patch16_224_ctx_product_50_shared_k --data-path /data/imagenet

Tasks (one per GPU, ranked by SLURM) meet through a file beside the job folders. On preemption or timeout the job is
requeued and resumes from the last checkpoint in its folder (``--job_dir`` with ``%j`` replaced by the job id).
"""

from __future__ import annotations

import argparse
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import main as trainer_main
import utils

try:  # optional: only the submitting machine and the tasks need it
    import submitit
except ImportError:
    submitit = None

_logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """``main.py``'s flags (``--config`` defaults included) plus the job's shape and SLURM options."""
    parser = argparse.ArgumentParser("Submitit for DeiT / iRPE", parents=[trainer_main.get_args_parser()])
    parser.add_argument("--ngpus", default=8, type=int, help="GPUs (tasks) per node")
    parser.add_argument("--nodes", default=2, type=int, help="number of nodes")
    parser.add_argument("--timeout", default=2800, type=int, help="job duration in minutes")
    parser.add_argument("--job_dir", default="", type=str, help="job folder on a shared file system (%%j: job id)")
    parser.add_argument("--partition", default="", type=str, help="SLURM partition")
    parser.add_argument("--use_volta32", action="store_true", help="ask for 32 GB V100s (constraint volta32gb)")
    parser.add_argument("--comment", default="", type=str, help="SLURM comment")
    return trainer_main.parse_args(argv, parser)


def init_file_url(job_dir: str) -> str:
    """A fresh ``file://`` rendezvous URL in the folder that holds the job folders (``job_dir`` above its ``%j``)."""
    root = Path(job_dir).parent if "%j" in job_dir else Path(job_dir)
    root.mkdir(parents=True, exist_ok=True)
    return (root / f"{uuid.uuid4().hex}_init").absolute().as_uri()


class Trainer:
    """The submitit callable: runs ``main.main`` in every task and requeues itself from the last checkpoint."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def __call__(self) -> Any:
        self.args.output_dir = str(self.args.job_dir).replace("%j", str(submitit.JobEnvironment().job_id))
        try:
            return trainer_main.main(self.args)
        except utils.UserError as e:
            utils.eprint(f"error: {utils.user_message(e)}")
            raise SystemExit(2) from None

    def checkpoint(self) -> Any:
        """Called by submitit on preemption/timeout: requeue with ``--resume`` on the last checkpoint."""
        self.args.dist_url = init_file_url(self.args.job_dir)
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
        if submitit is None:
            raise utils.UserError("submitit is not installed: pip install submitit (without SLURM: torchrun main.py)")
        if not args.job_dir and not Path("/checkpoint").is_dir():
            raise utils.UserError("pass --job_dir: a folder on a file system that every node shares")
        args.job_dir = args.job_dir or f"/checkpoint/{os.environ.get('USER', 'user')}/experiments/%j"
        executor = submitit.AutoExecutor(folder=args.job_dir, slurm_max_num_timeout=30)
        slurm = dict(partition=args.partition, constraint="volta32gb" if args.use_volta32 else "", comment=args.comment)
        executor.update_parameters(
            name="irpe",
            mem_gb=40 * args.ngpus,
            gpus_per_node=args.ngpus,
            tasks_per_node=args.ngpus,  # one task per GPU
            cpus_per_task=10,
            nodes=args.nodes,
            timeout_min=args.timeout,
            slurm_signal_delay_s=120,
            **{f"slurm_{key}": value for key, value in slurm.items() if value},  # only the options given
        )
        args.dist_url = init_file_url(args.job_dir)
        job = executor.submit(Trainer(args))
    except utils.UserError as e:
        utils.eprint(f"error: {utils.user_message(e)}")
        return 2
    _logger.info(f"Submitted job {job.job_id}; logs and checkpoints in {args.job_dir.replace('%j', str(job.job_id))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
