"""The `qlora` command line: serve, worker, infer, db, keys, models, demo.

Each subcommand is a thin shim: it parses arguments and calls one function elsewhere, importing
heavy modules (torch, uvicorn, celery) only when that subcommand runs.
"""

from __future__ import annotations

import argparse
import os
import sys

from service.lifetime import adopt_from_env


def _cmd_models_import(args: argparse.Namespace) -> int:
    from qlora_core.store import ModelStore
    from service.objectstore import model_remote
    from service.settings import get_settings

    store = ModelStore(get_settings().models_dir, remote=model_remote(get_settings()))
    info = store.import_model(args.path, args.id, overwrite=args.force)
    print(f"imported {info['id']} -> {info['path']}")
    return 0


def _cmd_models_list(args: argparse.Namespace) -> int:
    from qlora_core.store import ModelStore
    from service.objectstore import model_remote
    from service.settings import get_settings

    store = ModelStore(get_settings().models_dir, remote=model_remote(get_settings()))
    for info in store.list_models():
        print(f"{info['id']}\t{info.get('n_parameters', '?')} params\t{info['path']}")
    return 0


def _cmd_models_ensure_bundled(args: argparse.Namespace) -> int:
    from qlora_core.store import ModelStore
    from service.objectstore import model_remote
    from service.settings import get_settings

    store = ModelStore(get_settings().models_dir, remote=model_remote(get_settings()))
    info = store.ensure_bundled()
    print(f"bundled model ready: {info['id']} -> {info['path']}")
    return 0


def _cmd_models_inspect(args: argparse.Namespace) -> int:
    from qlora_core.inspect import format_report, inspect_model
    from qlora_core.store import ModelStore
    from service.objectstore import model_remote
    from service.settings import get_settings

    store = ModelStore(get_settings().models_dir, remote=model_remote(get_settings()))
    report = inspect_model(
        store.model_path(args.id),
        double_quant=not args.no_double_quant,
        quant_type=args.quant_type,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        lora_r=args.lora_r,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        compute_dtype=args.compute_dtype,
    )
    print(format_report(args.id, report))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from qlora_cli.serve import serve

    return serve(host=args.host, port=args.port, with_worker=not args.no_worker, with_inference=not args.no_inference)


def _cmd_infer(args: argparse.Namespace) -> int:
    from inference.server import run_inference

    return run_inference(host=args.host, port=args.port)


def _cmd_worker(args: argparse.Namespace) -> int:
    import logging

    from worker.main import run_worker

    code = run_worker(concurrency=args.concurrency, hostname=args.hostname)
    # Celery has stopped and joined its pool and the workers table says this worker is gone:
    # nothing is left for the interpreter's teardown but torch's and billiard's finalizers,
    # which took ~3 s of a ~7 s idle shutdown (py-spy), against `qlora serve`'s 10 s grace.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    from service.migrate import upgrade

    upgrade()
    print("database is at the latest revision")
    return 0


def _cmd_keys_create(args: argparse.Namespace) -> int:
    from service.keys import create_key

    key = create_key(args.tenant, name=args.name)
    print(f"created an API key for tenant {args.tenant!r}")
    print(key)
    return 0


def _cmd_keys_revoke(args: argparse.Namespace) -> int:
    from service.keys import revoke_key

    n = revoke_key(args.key)
    print(f"revoked {n} key(s)")
    return 0 if n else 1


def _cmd_webhooks_create(args: argparse.Namespace) -> int:
    from service.database import session_scope
    from service.keys import get_or_create_tenant
    from service.migrate import upgrade
    from service.settings import get_settings
    from service.webhooks import InvalidWebhookUrl, WebhookRefused, register_endpoint

    settings = get_settings()
    upgrade(settings.database_url)
    try:
        with session_scope(settings.database_url) as session:
            tenant = get_or_create_tenant(session, args.tenant)
            row = register_endpoint(session, tenant.id, args.url, args.events, settings.webhook_allow_insecure)
            endpoint_id, secret = row.id, row.secret
    except (InvalidWebhookUrl, WebhookRefused) as e:
        print(f"qlora webhooks create: {e}", file=sys.stderr)
        return 2
    print(f"created webhook endpoint {endpoint_id} for tenant {args.tenant!r}: {args.url}")
    print(secret)  # the signing secret, shown this once
    return 0


def _cmd_webhooks_list(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from service.database import session_scope
    from service.db import Tenant, WebhookEndpoint
    from service.settings import get_settings

    with session_scope(get_settings().database_url) as session:
        rows = session.execute(select(WebhookEndpoint).join(Tenant, Tenant.id == WebhookEndpoint.tenant_id)
                               .where(Tenant.name == args.tenant, WebhookEndpoint.deleted_at.is_(None))
                               .order_by(WebhookEndpoint.seq)).scalars().all()
        for w in rows:
            print(f"{w.id}  {w.url}  {','.join(w.events)}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from qlora_cli.demo import run_demo

    return run_demo(steps=args.steps, n_examples=args.examples)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qlora", description="Self-hosted QLoRA fine-tuning service")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="migrate the database, start the API and one embedded worker")
    s.add_argument("--host", default=None)
    s.add_argument("--port", type=int, default=None)
    s.add_argument("--no-worker", action="store_true", help="API only; run `qlora worker` elsewhere")
    s.add_argument("--no-inference", action="store_true",
                   help="no inference server; run `qlora infer` elsewhere and set QLORA_INFERENCE_URL")
    s.set_defaults(func=_cmd_serve)

    inf = sub.add_parser("infer", help="run the inference server the API proxies chat/completions to")
    inf.add_argument("--host", default=None, help="default QLORA_INFERENCE_HOST (127.0.0.1)")
    inf.add_argument("--port", type=int, default=None, help="default QLORA_INFERENCE_PORT (8001)")
    inf.set_defaults(func=_cmd_infer)

    w = sub.add_parser("worker", help="run a Celery worker that trains one job at a time")
    w.add_argument("--concurrency", type=int, default=1)
    w.add_argument("--hostname", default=None)
    w.set_defaults(func=_cmd_worker)

    db = sub.add_parser("db", help="database maintenance").add_subparsers(dest="db_command", required=True)
    db.add_parser("upgrade", help="apply Alembic migrations").set_defaults(func=_cmd_db_upgrade)

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    kc = keys.add_parser("create", help="create a key; the key is the last line of stdout")
    kc.add_argument("--tenant", required=True)
    kc.add_argument("--name", default=None)
    kc.set_defaults(func=_cmd_keys_create)
    kr = keys.add_parser("revoke", help="revoke a key (by the key itself or its key-… id)")
    kr.add_argument("key")
    kr.set_defaults(func=_cmd_keys_revoke)

    models = sub.add_parser("models", help="the base-model store").add_subparsers(dest="models_command", required=True)
    mi = models.add_parser("import", help="import a Hugging Face directory or a GGUF file")
    mi.add_argument("path")
    mi.add_argument("--id", required=True)
    mi.add_argument("--force", action="store_true", help="replace an existing model with this id")
    mi.set_defaults(func=_cmd_models_import)
    models.add_parser("list", help="list base models").set_defaults(func=_cmd_models_list)
    models.add_parser("ensure-bundled", help="import the bundled SmolLM2 if missing").set_defaults(
        func=_cmd_models_ensure_bundled
    )
    ins = models.add_parser("inspect", help="parameters, 4-bit bytes, bits_per_param, memory estimate")
    ins.add_argument("id")
    ins.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"])
    ins.add_argument("--no-double-quant", action="store_true")
    ins.add_argument("--seq-len", type=int, default=1024)
    ins.add_argument("--batch-size", type=int, default=1)
    ins.add_argument("--lora-r", type=int, default=64)
    ins.add_argument("--no-gradient-checkpointing", action="store_true")
    ins.add_argument("--compute-dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                     help="auto (default): what this machine's device runs natively, as a worker here would")
    ins.set_defaults(func=_cmd_models_inspect)

    hooks = sub.add_parser("webhooks", help="tenants' webhook endpoints").add_subparsers(
        dest="webhooks_command", required=True)
    hc = hooks.add_parser("create", help="register an endpoint; its whsec_ secret is the last line of stdout")
    hc.add_argument("--tenant", required=True)
    hc.add_argument("--url", required=True)
    hc.add_argument("--events", nargs="+", default=None,
                    help="default: fine_tuning.job.succeeded fine_tuning.job.failed fine_tuning.job.cancelled")
    hc.set_defaults(func=_cmd_webhooks_create)
    hl = hooks.add_parser("list", help="a tenant's endpoints (without their secrets)")
    hl.add_argument("--tenant", required=True)
    hl.set_defaults(func=_cmd_webhooks_list)

    d = sub.add_parser("demo", help="the end-to-end demo on the embedded service")
    d.add_argument("--steps", type=int, default=None)
    d.add_argument("--examples", type=int, default=None)
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    adopt_from_env()  # started by `qlora serve` or the demo: die with it (See Note: owned children)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyError as e:  # str(KeyError) adds quotes; show the message itself
        print(f"qlora: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"qlora: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
