"""Command line: ``rollout demo`` (GRPO on the default model; ``--sample-only``: a rollout),
``rollout serve`` (HTTP: SGLang's endpoints and the OpenAI API over one in-process engine, or
over the Ray service with ``--num-engines K`` / ``--config``) and ``rollout generate`` (the Ray
service from a YAML in ``configs/``).

    rollout serve --model-path DIR --port 30000
    rollout serve --config configs/local.yaml --port 30000
    rollout generate --config configs/local.yaml --prompts prompts.jsonl --output out.jsonl

``--prompts`` is JSON Lines: each line is a string, or an object with ``prompt`` (text) or
``input_ids``, and optional ``sampling_params`` (else ``--sampling-params`` applies). Output is
one JSON line per sample: ``{"index", "sample", "text", "output_ids", "meta_info"}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
from typing import Any, TextIO


def _add_service_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="service YAML (see configs/)")
    parser.add_argument("--model-path", default=None, help="override the config's model_path")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=YAML",
        help="override a config field, value parsed as YAML (repeatable), e.g. num_engines=2",
    )


def _add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", default=None, help="HF directory (default: SmolLM2-135M)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
    parser.add_argument("--port", type=int, default=30000, help="0: any free port")
    parser.add_argument("--tp-size", type=int, default=None, help="tensor-parallel ranks")
    parser.add_argument(
        "--num-engines", type=int, default=1, help="more than 1: the Ray service fronted"
    )
    parser.add_argument("--config", default=None, help="service YAML: the Ray service fronted")
    parser.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY")
    parser.add_argument("--served-model-name", default=None, help="the OpenAI model name")
    parser.add_argument(
        "--max-body-mb", type=int, default=1024, help="largest request body (413 above it)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=YAML",
        help="override a service config field (with --config / --num-engines > 1)",
    )
    parser.add_argument(
        "--engine",
        action="append",
        default=[],
        metavar="FIELD=YAML",
        help="an Engine keyword (EngineConfig or SGLang ServerArgs name), e.g. device=cpu",
    )


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    overrides: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"rollout: --set takes FIELD=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    return overrides


def _config(args: argparse.Namespace):
    from rollout.config import load_config

    overrides = _overrides(args)
    if args.model_path is not None:
        overrides["model_path"] = args.model_path
    return load_config(args.config, **overrides)


def read_prompts(path: str) -> tuple[list[Any], bool, list[dict | None]]:
    """Parse a prompts JSONL: (items, is_text, per-line sampling params or None)."""
    items: list[Any] = []
    params: list[dict | None] = []
    kinds: set[str] = set()
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if isinstance(row, str):
                row = {"prompt": row}
            if not isinstance(row, dict) or ("prompt" in row) == ("input_ids" in row):
                raise ValueError(
                    f"{path}:{lineno}: need a string or an object with exactly one "
                    "of 'prompt', 'input_ids'"
                )
            kind = "prompt" if "prompt" in row else "input_ids"
            kinds.add(kind)
            items.append(row[kind])
            params.append(row.get("sampling_params"))
    if len(kinds) > 1:
        raise ValueError(f"{path}: mixes 'prompt' and 'input_ids' lines; use one kind per file")
    if not items:
        raise ValueError(f"{path}: no prompts")
    return items, kinds == {"prompt"}, params


def write_outputs(outputs: list[dict], groups: list[int], out: TextIO) -> None:
    """One JSON line per sample; ``groups[i]`` is the number of samples of prompt i."""
    pos = 0
    for index, n in enumerate(groups):
        for sample in range(n):
            o = outputs[pos]
            pos += 1
            row = {"index": index, "sample": sample, **o}
            out.write(json.dumps(row) + "\n")


def cmd_generate(args: argparse.Namespace) -> int:
    from rollout.service import deploy

    items, is_text, per_line = read_prompts(args.prompts)
    default = json.loads(args.sampling_params) if args.sampling_params else {}
    params = [p if p is not None else default for p in per_line]
    groups = [int(p.get("n", 1)) for p in params]
    with deploy(_config(args)) as service:
        kwargs = {"prompt": items} if is_text else {"input_ids": items}
        outputs = service.generate(
            **kwargs, sampling_params=params, return_logprob=args.return_logprob
        )
        progress = service.progress()
    if args.output:
        with open(args.output, "w") as f:
            write_outputs(outputs, groups, f)
    else:
        write_outputs(outputs, groups, sys.stdout)
    if progress:
        print(
            f"{progress['finished_samples']} samples, {progress['completion_tokens']} tokens in "
            f"{progress['elapsed_s']:.1f}s ({progress['tokens_per_s']:.1f} tok/s)",
            file=sys.stderr,
        )
    return 0


def _engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    kwargs: dict[str, Any] = {}
    for item in args.engine:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"rollout: --engine takes FIELD=VALUE, got {item!r}")
        kwargs[key] = yaml.safe_load(value)
    if args.tp_size is not None:
        kwargs["tp_size"] = args.tp_size
    return kwargs


def _serve_backend(args: argparse.Namespace):
    """One in-process engine (no Ray) unless a config or ``--num-engines`` > 1 asks for the
    Ray service."""
    from rollout.http.streams import check_cumulative_engines

    engine_kwargs = _engine_kwargs(args)
    check_cumulative_engines(engine_kwargs)
    if args.config is None and args.num_engines == 1:
        from engine_core import Engine
        from engine_core.default_model import ensure_default_model
        from rollout.http.engine_backend import EngineBackend

        return EngineBackend(Engine(args.model_path or ensure_default_model(), **engine_kwargs))
    from rollout.config import ServiceConfig
    from rollout.http.service_backend import ServiceBackend
    from rollout.service import deploy

    if args.config is not None:
        config = _config(args)
    else:
        config = ServiceConfig.from_dict({"model_path": args.model_path, **_overrides(args)})
    if args.num_engines != 1:
        config = dataclasses.replace(config, num_engines=args.num_engines)
    if engine_kwargs:
        config = dataclasses.replace(config, engine={**config.engine, **engine_kwargs})
    check_cumulative_engines(config.engine)
    return ServiceBackend(deploy(config))


def cmd_serve(args: argparse.Namespace, stop: threading.Event | None = None) -> int:
    """Serve HTTP (SGLang's endpoints and the OpenAI API) until SIGINT/SIGTERM (or ``stop``)."""
    from rollout.http.config import HTTPConfig
    from rollout.http.server import run

    http = HTTPConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        served_model_name=args.served_model_name,
        max_body_bytes=args.max_body_mb << 20,
    )
    return run(_serve_backend(args), http, stop)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rollout")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="GRPO on the embedded default model (the main job)")
    demo.add_argument("--model-path", default=None, help="HF directory (default: SmolLM2-135M)")
    demo.add_argument("--steps", type=int, default=10, help="GRPO steps")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--disaggregated",
        action="store_true",
        help="engines and trainer on separate simulated nodes, refits over a gloo group",
    )
    demo.add_argument("--plot", default="grpo_demo.png", help="PNG of reward and tok/s per step")
    demo.add_argument("--sample-only", action="store_true", help="only a rollout, no training")
    demo.add_argument("--n", type=int, default=2, help="--sample-only: samples per prompt")
    demo.add_argument("--max-new-tokens", type=int, default=48, help="--sample-only")
    demo.add_argument("--engines", type=int, default=2, help="--sample-only: engine actors")
    demo.add_argument("--in-process", action="store_true", help="--sample-only: no Ray")
    serve = sub.add_parser("serve", help="serve HTTP (SGLang + OpenAI API) until interrupted")
    _add_serve_args(serve)
    gen = sub.add_parser("generate", help="roll out a JSONL of prompts through the service")
    _add_service_args(gen)
    gen.add_argument("--prompts", required=True, help="JSONL of prompts")
    gen.add_argument("--output", default=None, help="JSONL of samples (default: stdout)")
    gen.add_argument(
        "--sampling-params",
        default=None,
        help='JSON object for lines without their own, e.g. \'{"n": 4, "max_new_tokens": 64}\'',
    )
    gen.add_argument("--return-logprob", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo" and not args.sample_only:
        from rollout.demo import run_rl_demo

        run_rl_demo(args.model_path, args.steps, args.disaggregated, args.seed, args.plot)
        return 0
    if args.command == "demo":
        from rollout.demo import run_demo

        run_demo(
            args.model_path,
            n=args.n,
            max_new_tokens=args.max_new_tokens,
            in_process=args.in_process,
            engines=args.engines,
        )
        return 0
    if args.command == "serve":
        return cmd_serve(args)
    return cmd_generate(args)


if __name__ == "__main__":
    sys.exit(main())
