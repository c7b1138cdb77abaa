"""The `genflow` command. Every subcommand reads params.yaml (embedded defaults where it is
missing) and takes `-S key=value` overrides of any params key, as `dvc exp run -S` does.

    genflow data synth data/sample --n 2000
    genflow data prepare
    genflow train vae --workers 2 --max-steps 300
    genflow evaluate vae                     [--run RUN_ID]
    genflow register vae                     [--run RUN_ID]
    genflow registry list
    genflow registry promote celeba64-vae 3 --to staging
    genflow sample celeba64-vae@staging --n 64 --out grid.png
    genflow sample celeba64-ddpm@staging --n 64 --out grid.png --sampler ddim --steps 50 --eta 0
    genflow tune vae --trials 8              the winner -> tuned/vae.yaml, which every vae command
                                             (train, evaluate, register) applies unless --no-tuned
    genflow tuned pull vae                   [--run RUN_ID] tuned/vae.yaml from a search's MLflow run
    genflow fid samples/ data/shards:test [--extractor imagenet|celeba|inception] [--n N]
    genflow report
    genflow submit --address http://HEAD:8265 -- train vae --workers 8 --gpu
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import sys
from pathlib import Path

import genflow  # noqa: F401  (turns telemetry off before Ray/MLflow/DVC load)
from genflow.config import PARAMS_FILE, Params, ParamsError, load_params


def _params(args: argparse.Namespace, flags: dict[str, str] | None = None) -> Params:
    """params.yaml (or --params) with the command's flags and -S overrides on top.

    `flags` maps each override a flag stands for to the flag as typed ("train.max_steps=0":
    "--max-steps 0"), so that a bad value is reported as the flag's.
    """
    _params_file_exists(args)
    flags = flags or {}
    return load_params(args.params, list(flags) + list(args.set or []), flags=flags)


def _params_file_exists(args: argparse.Namespace) -> None:
    if args.params is not None and not Path(args.params).is_file():
        raise ParamsError(f"--params {args.params}: no such file; give an existing params file, or leave --params out "
                          f"to read ./{PARAMS_FILE} (embedded defaults where it is missing)")


def _family_params(args: argparse.Namespace, family: str, flags: dict[str, str] | None = None) -> Params:
    """As `_params`, with the winner of the family's search (tuned/FAMILY.yaml) between params.yaml
    and the command's flags and -S (which win), unless --no-tuned; says so when it applies one."""
    from genflow.tune.tuned import family_params

    _params_file_exists(args)
    flags = flags or {}
    params, tuned = family_params(family, args.params, list(flags) + list(args.set or []), flags=flags,
                                  use_tuned=not args.no_tuned)
    if tuned is not None:
        print(tuned.describe(f"{args.command} {family}"), file=sys.stderr)
    args.tuned_applied = tuned is not None
    return params


@contextlib.contextmanager
def _run_lookup_hint(args: argparse.Namespace):
    """When the params (tuned file included) name no finished run, say that the tuned file was part of them."""
    try:
        yield
    except FileNotFoundError as err:
        if not getattr(args, "tuned_applied", False) or args.run or "no finished training run" not in str(err):
            raise
        raise FileNotFoundError(f"{err}\n(tuned/{args.family}.yaml was applied, as every family command applies it; "
                                "`--no-tuned` looks for the runs trained without it)") from None


def _evaluate_on_the_runs_data(args: argparse.Namespace, params: Params) -> None:
    """`evaluate --run RUN_ID`: score the run on the test split of the shards it trained on (its
    logged data.shards), unless -S data.shards names other data."""
    from genflow import storage
    from genflow.config import parse_override
    from genflow.track import mlflow as tracking
    from genflow.track.identity import named_training_run

    if any(parse_override(text)[0][:2] in (["data"], ["data", "shards"]) for text in args.set or []):
        return
    tracking.configure(params.tracking)
    trained_on = named_training_run(args.family, args.run).data.params.get("data.shards")
    if not trained_on or trained_on == params.data.shards:
        return
    if storage.is_dir(trained_on):
        params.data.shards = trained_on
        print(f"genflow: evaluate {args.family}: run {args.run} trained on data.shards={trained_on}: evaluating on "
              "its test split (-S data.shards=DIR for other data)", file=sys.stderr)
    else:
        print(f"genflow: evaluate {args.family}: run {args.run} trained on data.shards={trained_on}, which is not "
              f"here; evaluating on data.shards={params.data.shards}", file=sys.stderr)


def cmd_data_synth(args: argparse.Namespace) -> None:
    from genflow.data.synth import write_sample

    write_sample(args.out, n=args.n, layout=args.layout, seed=args.seed)


def data_prepare_flags(args: argparse.Namespace) -> dict[str, str]:
    """The overrides `data prepare`'s flags stand for (see _params)."""
    flags = {}
    if args.source:
        flags[f"data.source={args.source}"] = f"--source {args.source}"
    if args.out:
        flags[f"data.shards={args.out}"] = f"--out {args.out}"
    return flags


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from genflow.data.shards import prepare

    prepare(_params(args, data_prepare_flags(args)).data)


def cmd_train(args: argparse.Namespace) -> None:
    from genflow.train.trainer import train

    flags = {}
    if args.workers is not None:
        flags[f"train.workers={args.workers}"] = f"--workers {args.workers}"
    if args.gpu:
        flags["train.gpu=true"] = "--gpu"
    if args.max_steps is not None:
        flags[f"train.max_steps={args.max_steps}"] = f"--max-steps {args.max_steps}"
    result = train(args.family, _family_params(args, args.family, flags))
    print(f"run {result.mlflow_run_id}: {result.summary()}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from genflow.eval.report import evaluate_family

    params = _family_params(args, args.family)
    if args.run:
        _evaluate_on_the_runs_data(args, params)
    with _run_lookup_hint(args):
        evaluate_family(args.family, params, args.run)


def cmd_register(args: argparse.Namespace) -> None:
    from genflow.track.registry import register_family

    params = _family_params(args, args.family)
    with _run_lookup_hint(args):
        version = register_family(args.family, params, args.run)
    print(f"registered {version.name} version {version.version} (alias candidate)")


def cmd_registry_list(args: argparse.Namespace) -> None:
    from genflow.track.registry import format_registry

    print(format_registry(_params(args)))


def cmd_registry_promote(args: argparse.Namespace) -> None:
    from genflow.track.registry import promote

    message = promote(_params(args), args.model, args.version, args.to, force=args.force, reason=args.reason)
    print(message)


def cmd_sample(args: argparse.Namespace) -> None:
    from genflow.track.registry import sample_grid

    if args.n < 1:
        raise ParamsError(f"--n {args.n}: the number of images must be at least 1")
    sample_grid(_params(args), args.model, n=args.n, out=args.out, attrs=args.attr or [], seed=args.seed,
                sampler=args.sampler, steps=args.steps, eta=args.eta)
    print(f"wrote {args.out}")


def cmd_tune(args: argparse.Namespace) -> None:
    from genflow.tune.report import output_paths, write_outputs
    from genflow.tune.search import SearchInterrupted, tune

    flags = {f"tune.{args.family}.trials={args.trials}": f"--trials {args.trials}"} if args.trials is not None else {}
    try:
        result = tune(args.family, _params(args, flags))
    except SearchInterrupted as interrupted:
        print(f"genflow: {interrupted}", file=sys.stderr)
        raise SystemExit(130) from None
    print(result)
    earlier = [path.exists() for path in output_paths(args.family)]
    for path, replaced in zip(write_outputs(result), earlier):
        print(f"{'replaced the earlier' if replaced else 'wrote'} {path}")


def cmd_tuned_pull(args: argparse.Namespace) -> None:
    from genflow.track.mlflow import configure
    from genflow.tune.tuned import pull_tuned

    pulled = pull_tuned(args.family, configure(_params(args).tracking), args.run)
    said = {"none": "wrote", "the same": "already had", "another": "replaced the earlier"}[pulled.earlier]
    print(f"{said} {pulled.path}: the winner of the {args.family} "
          f"search {pulled.search} (MLflow run {pulled.run_id}): {', '.join(pulled.overrides) or 'no key'}")


def cmd_fid(args: argparse.Namespace) -> None:
    from genflow.eval.fid import fid

    print(fid(_params(args), args.a, args.b, args.extractor, args.n, args.save_stats))


def cmd_report(args: argparse.Namespace) -> None:
    from genflow.eval.compare import report

    written = report(_params(args))
    print(f"wrote {written['html']} and {written['md']}")


def cmd_submit(args: argparse.Namespace) -> None:
    from genflow.submit import list_jobs, project_root, stop_job, submit

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if sum((bool(command), args.list, args.stop is not None)) != 1:
        raise ParamsError("submit: give the genflow subcommand after --, e.g. -- train vae --workers 4; "
                          "or --list, or --stop JOB")
    if args.list:
        print(list_jobs(args.address))
    elif args.stop is not None:
        print(stop_job(args.address, args.stop, wait=not args.no_wait))
    else:
        submit(args.address, command, wait=not args.no_wait, working_dir=str(project_root(Path.cwd())))


def build_parser() -> argparse.ArgumentParser:
    from genflow.models.families import FAMILY_NAMES

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default=None, help="params file (default: ./params.yaml, else embedded defaults)")
    common.add_argument("-S", "--set", action="append", metavar="KEY=VALUE", help="override a params key (dotted), repeatable")
    # The commands that train, score or draw from one family apply its tuned params (genflow/tune/tuned.py).
    tuned = argparse.ArgumentParser(add_help=False)
    tuned.add_argument("--no-tuned", action="store_true",
                       help="leave out tuned/FAMILY.yaml (the winner of `genflow tune FAMILY`), applied by default "
                            "between params.yaml and -S")

    parser = argparse.ArgumentParser(prog="genflow", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"genflow {_version()}", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="CelebA sample and shards").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("synth", help="write a CelebA-format sample", parents=[common])
    p.add_argument("out", help="folder to write the sample into (NOT CelebA: synthetic faces in CelebA's layout)")
    p.add_argument("--n", type=int, required=True, help="number of images")
    p.add_argument("--layout", choices=["official", "zip", "kaggle"], default="official",
                   help="CelebA's file layout to imitate (default: official)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=cmd_data_synth)
    p = data.add_parser("prepare", help="CelebA -> 64x64 WebDataset shards", parents=[common])
    p.add_argument("--source", help="CelebA folder or zip, or 'sample' (default: data.source)")
    p.add_argument("--out", help="shard folder, or a URI: s3://BUCKET/PREFIX, gs://... (default: data.shards)")
    p.set_defaults(func=cmd_data_prepare)

    p = sub.add_parser("train", help="train a family with Ray Train", parents=[common, tuned])
    p.add_argument("family", choices=FAMILY_NAMES, help="the model family")
    p.add_argument("--workers", type=int, help="Ray Train workers, DDP ranks (default: train.workers)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (train.gpu=true)")
    p.add_argument("--max-steps", type=int, help="training steps (default: train.max_steps)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tune", help="search hyperparameters with Ray Tune; the winner -> tuned/FAMILY.yaml",
                       parents=[common])
    p.add_argument("family", choices=FAMILY_NAMES, help="the model family")
    p.add_argument("--trials", type=int, help="trials in the search (default: tune.FAMILY.trials)")
    p.set_defaults(func=cmd_tune)

    pull = sub.add_parser("tuned", help="the winners of searches (tuned/FAMILY.yaml)").add_subparsers(
        dest="tuned_command", required=True)
    p = pull.add_parser("pull", help="write tuned/FAMILY.yaml from the winner a search logged on its MLflow run "
                                     "(a search run elsewhere: `genflow submit -- tune FAMILY`)", parents=[common])
    p.add_argument("family", choices=FAMILY_NAMES, help="the model family")
    p.add_argument("--run", metavar="RUN_ID", help="the search's MLflow parent run (default: the family's newest "
                                                   "finished search)")
    p.set_defaults(func=cmd_tuned_pull)

    p = sub.add_parser("evaluate", help="evaluate the family's training run on the test split", parents=[common, tuned])
    p.add_argument("family", choices=FAMILY_NAMES, help="the model family")
    p.add_argument("--run", metavar="RUN_ID", help="the finished training run to evaluate (default: the one trained "
                                                   "with the current params), scored on the data it trained on")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("register", help="register the family's evaluated run as a candidate", parents=[common, tuned])
    p.add_argument("family", choices=FAMILY_NAMES, help="the model family")
    p.add_argument("--run", metavar="RUN_ID", help="the evaluated training run to register (default: the one trained "
                                                   "with the current params)")
    p.set_defaults(func=cmd_register)

    registry = sub.add_parser("registry", help="the MLflow model registry").add_subparsers(dest="registry_command", required=True)
    p = registry.add_parser("list", help="models, versions, aliases, key metrics", parents=[common])
    p.set_defaults(func=cmd_registry_list)
    p = registry.add_parser("promote", help="move an alias to a version (gated on metrics)", parents=[common])
    p.add_argument("model", help="registered model name, e.g. celeba64-vae")
    p.add_argument("version", help="the version to promote")
    p.add_argument("--to", choices=["staging", "production"], required=True, help="the alias to move to that version")
    p.add_argument("--force", action="store_true", help="promote even if the metric is worse")
    p.add_argument("--reason", default="", help="recorded on the version")
    p.set_defaults(func=cmd_registry_promote)

    # No tuned params: a registered model samples with what it was trained and registered with.
    p = sub.add_parser("sample", help="write a grid of samples from a registered model", parents=[common])
    p.add_argument("model", help="NAME@ALIAS or NAME/VERSION")
    p.add_argument("--n", type=int, default=64, help="number of images (default: 64)")
    p.add_argument("--out", required=True, help="the PNG file to write")
    p.add_argument("--seed", type=int, default=0, help="random seed of the samples (default: 0)")
    p.add_argument("--attr", action="append", metavar="NAME=0|1",
                   help="conditional models (cgan): set a CelebA attribute, repeatable; the unnamed ones are "
                        "drawn per image from a random training image (data.shards' manifest)")
    p.add_argument("--sampler", help="diffusion: ddpm (all T steps) or ddim (default: the model's)")
    p.add_argument("--steps", type=int, help="diffusion, ddim: denoising steps S (default: the model's)")
    p.add_argument("--eta", type=float, help="diffusion, ddim: η, 0 deterministic .. 1 ancestral (default: the model's)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("fid", help="Fréchet distance (and KID, precision, recall) between two image sets", parents=[common])
    p.add_argument("a", help="a folder of images, a shard folder (DIR or DIR:SPLIT), a stats .npz, or NAME@ALIAS")
    p.add_argument("b", nargs="?", help="the same kinds as A; omit it with --save-stats")
    p.add_argument("--extractor", choices=["imagenet", "celeba", "inception"], default=None,
                   help="feature network (default: evaluate.extractor, imagenet = EfficientNet-Lite0)")
    p.add_argument("--n", type=int, help="images per set (default: all; a model: evaluate.samples/cpu_samples)")
    p.add_argument("--save-stats", metavar="OUT.npz", help="write A's mu and sigma (float64), as pytorch-fid")
    p.set_defaults(func=cmd_fid)

    p = sub.add_parser("report", help="every evaluated family side by side (reports/index.html)", parents=[common])
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("submit", help="run a genflow subcommand on a Ray cluster (Ray Jobs API)")
    p.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://head:8265")
    p.add_argument("--no-wait", action="store_true",
                   help="return once submitted (print the job id), or once --stop has asked the job to stop")
    p.add_argument("--list", action="store_true", help="list the cluster's jobs, as `ray job list`")
    p.add_argument("--stop", metavar="JOB", help="stop job JOB, as `ray job stop`, and wait until it has stopped")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="-- then the genflow subcommand the job runs, e.g. -- train vae --workers 8 --gpu")
    p.set_defaults(func=cmd_submit)
    return parser


def _version() -> str:
    """The installed distribution's version (genflow.__version__ when run from a checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("genflow")
    except PackageNotFoundError:
        return genflow.__version__


def main(argv: list[str] | None = None) -> int:
    from genflow.submit import SubmitError
    import mlflow
    from mlflow.exceptions import MlflowException

    from genflow.track.mlflow import TrackingError, login_error
    from genflow.train.interrupt import TrainingInterrupted, sigterm_as_keyboard_interrupt

    args = build_parser().parse_args(argv)
    try:
        with sigterm_as_keyboard_interrupt():
            args.func(args)
    except (ParamsError, FileNotFoundError, ValueError, ConnectionError, SubmitError, TrackingError) as err:
        # Expected failures (bad params, missing data, refused promotion) end with one clear
        # line, not a traceback; anything else is a bug and keeps its traceback.
        print(f"genflow: error: {err}", file=sys.stderr)
        return 2
    except MlflowException as err:
        # A tracking server's refusal after the login checked out (HTTP 403: another user's model) is
        # one line too; any other MLflow error keeps its traceback.
        refusal = login_error(mlflow.get_tracking_uri(), err)
        if refusal is None:
            raise
        print(f"genflow: error: {refusal}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # Written under temporary names: what did not fit was removed, earlier outputs are intact.
        where = f" writing {err.filename}" if err.filename else ""
        print(f"genflow: error: {args.command}: the disk is full{where} ({err.strerror}); free space (or point "
              "data.shards / train.storage_path elsewhere) and run the same command again", file=sys.stderr)
        return 2
    except TrainingInterrupted as interrupted:
        print(f"genflow: {interrupted}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        # Every command writes to temporary names and renames at the end: nothing half-written.
        print(f"genflow: {args.command}: interrupted; nothing half-written was kept; run the same command again",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
