"""`offseg serve`: a segmentation service with a web page (needs the `serve` extra)."""

from __future__ import annotations

import argparse

from ._options import add_scale_argument, add_test_mode_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="HTTP segmentation service with a web page (needs pip install 'offseg[serve]')",
        description="Serve a model over HTTP: POST /v1/segment, GET /v1/model, /healthz, /metrics, and a web "
        "page at / to try it on your own pictures. Requests arriving within a few milliseconds that pad to the "
        "same size run as one batch. See docs/serve.md.",
    )
    p.add_argument("--model", required=True, help="model name (see `offseg.list_models()`)")
    p.add_argument("--checkpoint", help="weights; without it the model is randomly initialised")
    p.add_argument("--num-classes", type=int, help="number of classes without a checkpoint (default 150)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--max-batch", type=int, default=8, help="most images per forward pass (default: 8)")
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=5.0,
        help="how long a batch waits for requests still being read (default: 5)",
    )
    p.add_argument("--queue", type=int, default=64, help="most requests waiting; beyond: 503 (default: 64)")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body in MB (default: 20)")
    p.add_argument("--max-pixels", type=float, default=16e6, help="largest image, width x height (default: 16e6)")
    p.add_argument("--threads", type=int, help="torch threads of the inference worker (default: torch's)")
    add_test_mode_arguments(p, "the official one for the checkpoint's dataset, else whole")
    add_scale_argument(p, "none (each picture at its own size)")
    p.add_argument("--log-level", default="info", help="uvicorn's log level (default: info)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from .._heap import one_arena

    # Before any other thread starts: the inference worker's forward passes then reuse the main
    # heap as a plain loop's do (docs/serve.md: 447 MB above idle under load, 595-704 without).
    one_arena()

    try:
        import uvicorn

        from ..serve import ServeSettings, create_app, load_served_model
    except ImportError as err:
        raise ValueError(f"offseg serve needs the serve extra: pip install 'offseg[serve]' ({err})") from err

    for name in ("max_batch", "queue", "port"):
        if getattr(args, name) < (0 if name == "port" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be at least {0 if name == 'port' else 1}")
    if args.max_body_mb <= 0 or args.max_pixels < 1 or args.batch_wait_ms < 0:
        raise ValueError("--max-body-mb and --max-pixels must be positive, --batch-wait-ms not negative")
    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads must be at least 1")
    if args.checkpoint is None:
        print(f"offseg serve: warning: no --checkpoint given, {args.model} is randomly initialised", file=sys.stderr)
    served = load_served_model(
        args.model,
        checkpoint=args.checkpoint,
        mode=args.mode,
        crop_size=args.crop,
        stride=args.stride,
        scale=args.scale,
        num_classes=args.num_classes,
    )
    settings = ServeSettings(
        max_batch=args.max_batch,
        queue=args.queue,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_pixels=int(args.max_pixels),
        threads=args.threads,
        batch_wait=args.batch_wait_ms / 1e3,
    )
    mode = served.mode["mode"] + (
        f" {served.mode['crop_size']}/{served.mode['stride']}" if served.mode["crop_size"] else ""
    )
    scale = f"{served.scale[0]}x{served.scale[1]}" if served.scale else "none"
    print(
        f"offseg serve: {served.name}, {served.num_classes} classes, test mode {mode}, test scale {scale}",
        file=sys.stderr,
    )
    uvicorn.run(create_app(served, settings), host=args.host, port=args.port, log_level=args.log_level)
    return 0
