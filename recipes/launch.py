"""Run any recipe through nemo-run, locally (LocalExecutor + torchrun) or on Slurm (SlurmExecutor).

    python recipes/launch.py tiny train.steps=2                           # 2 gloo ranks on this machine
    python recipes/launch.py topd_70b --executor slurm --dry-run          # print the sbatch script nemo-run makes
    python recipes/launch.py topd_70b --executor slurm --account A --partition P --container IMAGE

Overrides are dotted keys of the RunConfig (topd_megatron.overrides). The recipes are also registered as nemo-run
factories (`run.cli.factory`) for the `cfg` argument of `topd_megatron.training.loop.train_run`, so a nemo-run
entry point can name them.
Ranks: nodes * ranks per node from the recipe's `cluster` (tiny: TP*PP ranks on one node); `--nodes` and
`--ranks-per-node` change that. On a single CPU machine torchrun starts gloo ranks; on GPUs, NCCL.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import nemo_run as run

from topd_megatron import recipes
from topd_megatron.analysis.prepare import prepare
from topd_megatron.config import RunConfig
from topd_megatron.training.loop import train_run


def to_config(obj: Any) -> Any:
    """A dataclass instance (nested) as a nemo-run/fiddle `run.Config` tree with every field explicit."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return run.Config(type(obj), **{f.name: to_config(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
    return obj


def _register_factories() -> None:
    for name in recipes.names():

        def factory(_name: str = name) -> run.Config[RunConfig]:
            return to_config(recipes.get(_name))

        factory.__name__ = name
        factory.__qualname__ = name
        run.cli.factory(factory, target=train_run, target_arg="cfg", name=name)


_register_factories()


def slurm_executor(args: argparse.Namespace, cfg: RunConfig, job_dir: Path) -> run.SlurmExecutor:
    return run.SlurmExecutor(
        account=args.account,
        partition=args.partition,
        nodes=args.nodes or cfg.cluster.nodes,
        ntasks_per_node=args.ranks_per_node or cfg.cluster.gpus_per_node,
        gpus_per_node=None if args.no_gpus else cfg.cluster.gpus_per_node,
        time=args.time,
        exclusive=not args.no_gpus,
        container_image=args.container,
        container_mounts=args.mount,
        tunnel=run.LocalTunnel(job_dir=str(job_dir)),
        packager=run.Packager(),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", choices=recipes.names())
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted-key overrides, e.g. train.steps=2")
    parser.add_argument("--executor", choices=["local", "slurm"], default="local")
    parser.add_argument("--dry-run", action="store_true", help="print what would run (the sbatch script for slurm)")
    parser.add_argument("--nodes", type=int, default=None, help="training nodes (default: the recipe's cluster)")
    parser.add_argument("--ranks-per-node", type=int, default=None, help="default: GPUs per node (tiny: TP*PP)")
    parser.add_argument("--job-dir", default=None, help="nemo-run's experiment directory (default: RUN_DIR/nemo-run)")
    slurm = parser.add_argument_group("slurm (also read from TOPD_SLURM_ACCOUNT, _PARTITION, _CONTAINER)")
    slurm.add_argument("--account", default=os.environ.get("TOPD_SLURM_ACCOUNT", "default"))
    slurm.add_argument("--partition", default=os.environ.get("TOPD_SLURM_PARTITION"))
    slurm.add_argument("--container", default=os.environ.get("TOPD_SLURM_CONTAINER"))
    slurm.add_argument("--mount", action="append", default=[], help="container mount SRC:DST (repeatable)")
    slurm.add_argument("--time", default="04:00:00")
    slurm.add_argument("--no-gpus", action="store_true", help="CPU nodes: no --gpus-per-node directive")
    args = parser.parse_intermixed_args(argv)

    try:
        cfg = recipes.get(args.recipe, args.overrides)
    except ValueError as e:
        print(f"launch: error: {e}", file=sys.stderr)
        return 2
    ranks = args.ranks_per_node or (
        cfg.parallel.model_parallel_size if args.recipe == "tiny" else cfg.cluster.gpus_per_node
    )
    job_dir = Path(args.job_dir or Path(cfg.run_dir) / "nemo-run").resolve()
    task = run.Partial(train_run, cfg=to_config(cfg))
    if args.executor == "local":
        if recipes.recipe(args.recipe).needs_tiny_pair and not args.dry_run:
            prepare()
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        if shutil.which("torchrun") is None:
            print("launch: error: torchrun is not on PATH; run from the project's .venv", file=sys.stderr)
            return 2
        executor = run.LocalExecutor(ntasks_per_node=ranks, launcher="torchrun")
    else:
        executor = slurm_executor(args, cfg, job_dir)
        executor.ntasks_per_node = ranks
    with run.Experiment(f"topd-{args.recipe}", executor=executor, log_level="WARN", base_dir=str(job_dir)) as exp:
        exp.add(task, name=args.recipe)
        if args.dry_run:
            exp.dryrun()
            return 0
        exp.run(sequential=True, detach=False, tail_logs=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
