"""Train or evaluate on Slurm through submitit (docs/distributed.md), with main.py's options; a
preempted or timed-out job requeues itself with --auto_resume.

    python run_with_submitit.py --nodes 2 --ngpus 8 --partition PART --job_dir /shared/run ...
"""
import argparse
import os
import shutil
import sys
from pathlib import Path

REPO = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    import main  # here, not at the top: the pickled Trainer must not refer to the module
    parser = argparse.ArgumentParser("DETR with iRPE on Slurm (submitit)", parents=[main.get_args_parser()])
    parser.add_argument("--nodes", default=1, type=int, help="machines for the job")
    parser.add_argument("--ngpus", default=8, type=int,
                        help="GPUs per node, one process each; 0 for one CPU process (--local)")
    parser.add_argument("--timeout", default=4320, type=int,
                        help="minutes the job may run before Slurm stops it (it is then requeued)")
    parser.add_argument("--partition", default=None, type=str, help="Slurm partition")
    parser.add_argument("--job_dir", default="", type=str,
                        help="submitit's logs and, without --output_dir, the run's output")
    parser.add_argument("--max_requeues", default=30, type=int,
                        help="how often a timed-out job is requeued (preemptions do not count)")
    parser.add_argument("--local", action="store_true",
                        help="run the job here with submitit's local executor and wait for it")
    return parser.parse_args(argv)


class Trainer:
    """What each Slurm task runs: main.py's run in this process, in the job's process group."""

    def __init__(self, args):
        self.args = args

    def __call__(self):
        import submitit
        if REPO not in sys.path:
            sys.path.insert(0, REPO)
        import main

        job = submitit.JobEnvironment()
        if job.num_tasks > 1:  # MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK for env://
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                                  overwrite=True)
            os.environ["GROUP_WORLD_SIZE"] = str(job.num_nodes)
        try:
            return main.run_parsed(self.args)
        except SystemExit as stop:
            if isinstance(stop.code, str):  # main.py's message: make it the job's error
                raise RuntimeError(stop.code) from None
            raise  # an exit status (submitit's requeue, an interruption) stays one

    def checkpoint(self):
        """Called by submitit on preemption or time-out: the requeued job continues the run."""
        import submitit
        args = argparse.Namespace(**{**vars(self.args), "auto_resume": True})
        return submitit.helpers.DelayedSubmission(type(self)(args))


def submit(args):
    try:
        import submitit
    except ImportError:
        raise SystemExit("run_with_submitit.py needs submitit: pip install -r requirements.txt") from None
    if not args.local and shutil.which("sbatch") is None:
        raise SystemExit("no Slurm here (sbatch is not on PATH): submit from a Slurm login node, "
                         "or pass --local to run the job on this machine")
    if not args.job_dir:
        raise SystemExit("pass --job_dir, a folder that every node of the job can read and write")
    job_dir = Path(args.job_dir).resolve()
    args.output_dir = str(Path(args.output_dir).resolve()) if args.output_dir else str(job_dir)
    tasks = max(args.ngpus, 1)
    executor = submitit.AutoExecutor(folder=job_dir / "submitit" / "%j",
                                     cluster="local" if args.local else None,
                                     slurm_max_num_timeout=args.max_requeues)
    executor.update_parameters(name="detr_irpe", nodes=args.nodes, tasks_per_node=tasks,
                               gpus_per_node=args.ngpus, cpus_per_task=args.num_workers + 1,
                               timeout_min=args.timeout, slurm_signal_delay_s=120)
    if args.partition:
        executor.update_parameters(slurm_partition=args.partition)
    trainer = Trainer(argparse.Namespace(**{k: v for k, v in vars(args).items()
                                            if k not in ("nodes", "ngpus", "timeout", "partition",
                                                         "job_dir", "max_requeues", "local")}))
    return executor.submit(trainer)


if __name__ == "__main__":
    cli_args = parse_args()
    submitted = submit(cli_args)
    print(f"submitted job {submitted.job_id}; logs in {submitted.paths.folder}, output in "
          f"{cli_args.output_dir}", flush=True)
    if cli_args.local:
        submitted.results()  # every task's; raises with the traceback of a task that failed
        print(f"job {submitted.job_id} finished", flush=True)
