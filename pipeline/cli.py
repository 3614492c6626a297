"""The ``scoreda`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from importlib import import_module
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def _kv(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: {value!r} is not a number") from None


def _kv_option(text: str) -> tuple[str, object]:
    import yaml

    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, yaml.safe_load(value)


def build_parser() -> argparse.ArgumentParser:
    from kernels.dynamics import MODEL_NAMES

    p = argparse.ArgumentParser(
        prog="scoreda",
        description="Score-based data assimilation (SDA, EnSF) with parameter particles, "
                    "from one workstation to a SLURM cluster.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("simulate", help="integrate an ensemble of a model and store it (.nc/.zarr)",
                       description="Integrate an ensemble of one model, each member with its own "
                                   "θ, and write an xarray dataset (.nc via netCDF4 or .zarr).")
    s.add_argument("model", nargs="?", choices=MODEL_NAMES,
                   help="model name (or give --config)")
    s.add_argument("--config", help="a simulate config (file or shipped example name); "
                                    "command-line options override it")
    s.add_argument("--param", action="append", type=_kv, default=[], metavar="NAME=VALUE",
                   help="parameter value for every member (repeatable)")
    s.add_argument("--option", action="append", type=_kv_option, default=[], metavar="NAME=VALUE",
                   help="model constructor option, e.g. forcing_wavenumber=4 (repeatable)")
    s.add_argument("--size", type=int, help="state size (grid points / ring variables)")
    s.add_argument("--members", type=int, help="ensemble members B")
    s.add_argument("--steps", type=int, help="steps to integrate after spin-up")
    s.add_argument("--save-every", type=int, help="keep one state in this many steps")
    s.add_argument("--spinup", type=int, help="steps to discard first")
    s.add_argument("--dt", type=float, help="step size (default: the model's)")
    s.add_argument("--seed", type=int, help="base seed of the per-member random streams")
    s.add_argument("--theta", choices=["truth", "prior"], help="θ at truth or drawn per member")
    s.add_argument("--dtype", choices=["float32", "float64"])
    s.add_argument("--device", help="cpu, cuda, cuda:N")
    s.add_argument("--out", required=True, help="output path ending in .nc or .zarr")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output")

    c = sub.add_parser("config", help="show the example configs that ship with scoreda")
    csub = c.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    cs = csub.add_parser("show", help="print one example config (with its comments)")
    cs.add_argument("name")
    csub.add_parser("list", help="list the example configs")
    cv = csub.add_parser("validate", help="validate a config file")
    cv.add_argument("path")

    b = sub.add_parser("bench", help="benchmarks, each as a ratio to a floor measured in the same run")
    b.add_argument("suites", nargs="*", help="suites to run (default: all)")
    b.add_argument("--json", help="write the results as JSON to this path")
    b.add_argument("--quick", action="store_true", help="small sizes (for tests)")
    b.add_argument("--repeats", type=int, default=5, help="timed repeats per entry (min is kept)")
    b.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")

    d = sub.add_parser("demo", help="the main job on one machine: every stage, small (make demo)")
    d.add_argument("--out", default="demo_out", help="output directory (default demo_out)")

    # stages that live in their own modules register their sub-commands themselves
    for module in STAGE_MODULES:
        import_module(module).add_cli(sub)
    return p


def _simulate_config(args: argparse.Namespace):
    from pipeline.config import ConfigError, SimulateConfig, load_yaml, resolve_config_path, validate

    if args.config:
        path = resolve_config_path(args.config)
        data, source = load_yaml(path), str(path)
        if data.get("stage", "simulate") != "simulate":
            raise ConfigError(f"{path}: stage: simulate needs a 'simulate' config "
                              f"(got {data.get('stage')!r})")
    elif args.model:
        data, source = {"model": {"name": args.model}}, "command line"
    else:
        raise ConfigError("simulate: give a MODEL or --config")
    data = dict(data)
    model = dict(data.get("model") or {})
    if args.model:
        if args.config and model.get("name") not in (None, args.model):
            raise ConfigError(f"{source}: model.name: is {model.get('name')!r} but the command "
                              f"line says {args.model!r}")
        model["name"] = args.model
    if args.size is not None:
        model["size"] = args.size
    if args.dt is not None:
        model["dt"] = args.dt
    if args.param:
        model["params"] = {**(model.get("params") or {}), **dict(args.param)}
    if args.option:
        model["options"] = {**(model.get("options") or {}), **dict(args.option)}
    data["model"] = model
    for key in ("members", "steps", "save_every", "spinup", "seed", "theta", "dtype", "device"):
        value = getattr(args, key)
        if value is not None:
            data[key] = value
    if args.config is None:
        data.setdefault("save_every", 1)
    return validate(data, SimulateConfig, source if args.config else "command line")


def _cmd_simulate(args: argparse.Namespace) -> int:
    from pipeline.runtime import tune_allocator
    from pipeline.simulate import simulate

    cfg = _simulate_config(args)
    tune_allocator()
    ds = simulate(cfg, args.out, overwrite=args.overwrite)
    dims = ", ".join(f"{k}={v}" for k, v in ds.sizes.items())
    print(f"wrote {args.out} ({dims})")
    refined = json.loads(ds.attrs["refined"])
    if refined:
        print(f"{len(refined)} member(s) needed a smaller step than dt = {cfg.model.dt:g}: "
              + ", ".join(f"{m} (dt/{1 << h})" for m, h in refined.items()))
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from pipeline.config import example_names, example_path, load_config

    if args.config_command == "list":
        for name in example_names():
            print(name)
    elif args.config_command == "show":
        sys.stdout.write(example_path(args.name).read_text())
    else:
        cfg = load_config(args.path)
        print(f"{args.path}: valid {cfg.stage} config")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from pipeline.bench import run_bench
    from pipeline.runtime import tune_allocator

    tune_allocator()
    run_bench(args.suites, json_path=args.json, quick=args.quick, repeats=args.repeats,
              device=args.device)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo
    from pipeline.runtime import tune_allocator

    tune_allocator()
    run_demo(Path(args.out))
    return 0


COMMANDS = {"simulate": _cmd_simulate, "config": _cmd_config, "bench": _cmd_bench,
            "demo": _cmd_demo}

#: modules with ``add_cli(subparsers)``; each sub-parser sets ``func=handler(args) -> int``.
STAGE_MODULES: list[str] = ["pipeline.generate", "pipeline.assimilate", "pipeline.campaign",
                             "pipeline.train", "pipeline.smooth", "pipeline.calibrate", "pipeline.submit",
                             "pipeline.surrogate"]


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline import catch_early_usr1

    catch_early_usr1()  # first: SLURM's USR1 can come while torch is still being imported
    from pipeline.config import ConfigError  # (imports torch: this module's top stays light)

    parser = build_parser()
    args = parser.parse_args(argv)
    from pipeline.simulate import DivergenceError
    from pipeline.storage import OutputError

    try:
        handler = getattr(args, "func", None) or COMMANDS[args.command]
        return handler(args)
    except (ConfigError, OutputError) as exc:
        print(f"scoreda: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except DivergenceError as exc:
        print(f"scoreda: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("scoreda: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
