"""Command line: ``rollout demo`` (GRPO on the default model; ``--sample-only``: a rollout),
``rollout serve`` and ``rollout generate`` (the Ray service from a YAML in ``configs/``).

    rollout serve --config configs/local.yaml
    rollout generate --config configs/local.yaml --prompts prompts.jsonl --output out.jsonl

``--prompts`` is JSON Lines: each line is a string, or an object with ``prompt`` (text) or
``input_ids``, and optional ``sampling_params`` (else ``--sampling-params`` applies). Output is
one JSON line per sample: ``{"index", "sample", "text", "output_ids", "meta_info"}``.
"""

from __future__ import annotations

import argparse
import json
import signal
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


def _config(args: argparse.Namespace):
    import yaml

    from rollout.config import load_config

    overrides: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"rollout: --set takes FIELD=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
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


def cmd_serve(args: argparse.Namespace, stop: threading.Event | None = None) -> int:
    """Deploy and keep the service up until SIGINT/SIGTERM (or ``stop`` is set)."""
    import ray

    from rollout.service import NAMESPACE, deploy

    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    with deploy(_config(args)) as service:
        where = [h and h["node_id"][:12] for h in service.health()]
        print(
            f"rollout service {service.name!r} up: {len(service.engines)} engines on nodes {where}"
            f"; Ray at {ray.get_runtime_context().gcs_address}\n"
            f"connect: ray.init(address=...); ray.get_actor({service.name!r}, "
            f"namespace={NAMESPACE!r}).generate.remote(...)",
            flush=True,
        )
        stop.wait()
        print("rollout service shutting down", flush=True)
    return 0


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
    serve = sub.add_parser("serve", help="run the Ray rollout service until interrupted")
    _add_service_args(serve)
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
