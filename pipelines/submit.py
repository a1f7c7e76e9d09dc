"""`mim submit STAGE [--config F key=value ...] --nodes N --gpus-per-node G --time T ...`: renders
slurm/mim.sbatch for a stage and submits it (prints the job id; --dry-run prints the script).
`mim submit chain --config PRETRAIN.yaml --linprobe-config L.yaml [--finetune-config F.yaml]
[--segprobe-config S.yaml] --run-root DIR [STAGE.key=value ...]` submits pretrain -> export ->
linprobe (-> finetune, -> segprobe) with afterok dependencies, each stage reading the previous
one's outputs."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mim.config import SCHEMAS, load_config
from mim.errors import UserInputError
from mim.recipe import check_run
from mim.slurm import JobSpec, render, submit
from pipelines.common import reports_user_errors

TRAINING_STAGES = SCHEMAS
EVALUATIONS = ("linprobe", "finetune", "segprobe")  # what a chain runs on its export, in order


def cluster_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mim submit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("stage", choices=[*TRAINING_STAGES, "export", "chain"])
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=0)
    parser.add_argument("--tasks-per-node", type=int, default=None, help="default: one per GPU")
    parser.add_argument("--cpus-per-task", type=int, default=8)
    parser.add_argument("--time", default="24:00:00")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--dependency", help="e.g. afterok:1234")
    parser.add_argument("--grace", type=int, default=180, help="seconds between the USR1 warning and the end")
    parser.add_argument("--max-requeues", type=int, default=20)
    parser.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    parser.add_argument("--linprobe-config", help="chain: the linear-probe config")
    parser.add_argument("--finetune-config", help="chain: the fine-tune config (optional)")
    parser.add_argument("--segprobe-config", help="chain: the segmentation-probe config (optional)")
    parser.add_argument("--run-root", type=Path, help="chain: run dirs go to RUN_ROOT/<stage>")
    return parser


def spec_for(
    args: argparse.Namespace, stage: str, arguments: list[str], log_dir: Path, dependency: str | None
) -> JobSpec:
    one_process = stage == "export"  # export reads a checkpoint and writes files: one task, no GPU
    return JobSpec(
        stage=stage,
        arguments=arguments,
        log_dir=log_dir.resolve(),
        nodes=1 if one_process else args.nodes,
        gpus_per_node=0 if one_process else args.gpus_per_node,
        tasks_per_node=1 if one_process else args.tasks_per_node,
        cpus_per_task=args.cpus_per_task,
        time=args.time,
        partition=args.partition,
        account=args.account,
        dependency=dependency,
        grace_seconds=args.grace,
        max_requeues=args.max_requeues,
        job_name=f"mim-{stage}",
    )


def training_job(
    args, stage: str, config: str | None, overrides: list[str], dependency: str | None
) -> JobSpec:
    resolved = load_config(
        TRAINING_STAGES[stage], config, overrides
    )  # types and keys checked before submitting
    run_dir = check_run(resolved.run)
    arguments = (["--config", config] if config else []) + overrides
    return spec_for(args, stage, arguments, run_dir, dependency)


def send(spec: JobSpec, dry_run: bool) -> str:
    script = render(spec)
    if dry_run:
        print(script)
        return f"<{spec.stage}>"
    path = spec.log_dir / f"submit-{spec.stage}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    job_id = submit(script, path)
    print(f"submitted {spec.stage} as job {job_id} (script {path})")
    return job_id


def chain(args, rest: list[str]) -> None:
    if not (rest and rest[0] == "--config" and args.linprobe_config and args.run_root):
        raise UserInputError(
            "mim submit chain needs --config PRETRAIN.yaml --linprobe-config L.yaml --run-root DIR"
        )
    config, overrides = rest[1], rest[2:]
    per_stage = {
        stage: [o.split(".", 1)[1] for o in overrides if o.startswith(f"{stage}.")]
        for stage in ("pretrain", "export", *EVALUATIONS)
    }
    stray = [o for o in overrides if o.split(".", 1)[0] not in per_stage]
    if stray:
        raise UserInputError(
            f"chain overrides must name their stage (pretrain./linprobe./finetune./segprobe.): {stray}"
        )
    root = args.run_root.resolve()
    pretrain = training_job(
        args, "pretrain", config, per_stage["pretrain"] + [f"run.dir={root / 'pretrain'}"], None
    )
    job = send(pretrain, args.dry_run)
    export = spec_for(
        args,
        "export",
        [str(root / "pretrain"), "--out", str(root / "export")],
        root / "pretrain",
        f"afterok:{job}",
    )
    export_job = send(export, args.dry_run)
    for stage in EVALUATIONS:
        stage_config = getattr(args, f"{stage}_config")
        if stage_config:
            stage_overrides = per_stage[stage] + [f"run.dir={root / stage}", f"init.from={root / 'export'}"]
            send(
                training_job(args, stage, stage_config, stage_overrides, f"afterok:{export_job}"),
                args.dry_run,
            )


@reports_user_errors("mim submit")
def main(argv: list[str] | None = None) -> int:
    args, rest = cluster_parser().parse_known_args(argv)
    if args.stage == "chain":
        chain(args, rest)
    elif args.stage == "export":
        if "--out" not in rest:
            raise UserInputError("mim submit export needs the stage's arguments: RUN_DIR --out DIR")
        out = Path(rest[rest.index("--out") + 1])
        send(spec_for(args, "export", rest, out, args.dependency), args.dry_run)
    else:
        config = rest[rest.index("--config") + 1] if "--config" in rest else None
        overrides = [
            a for i, a in enumerate(rest) if a != "--config" and (i == 0 or rest[i - 1] != "--config")
        ]
        send(training_job(args, args.stage, config, overrides, args.dependency), args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
