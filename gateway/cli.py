"""The `tollway` command: parse arguments, load settings, call into the app."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

import yaml

from gateway import __version__, admin_cli
from gateway.settings import ConfigError, Settings, load_settings, redacted
from gateway.store.sqlite_journal import StoreLocked

log = logging.getLogger("tollway")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported OS
        log.warning("uvloop is not installed; using the default asyncio event loop")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def serve(settings: Settings) -> None:
    from aiohttp import web

    from gateway.app import create_app

    _install_uvloop()
    app = create_app(settings)
    s = settings.server
    access_log = logging.getLogger("aiohttp.access") if settings.logging.access_log else None
    log.info(
        "tollway %s listening on http://%s:%d (%d models, %d providers)",
        __version__, s.host, s.port, len(settings.models), len(settings.providers),
    )
    web.run_app(
        app,
        host=s.host,
        port=s.port,
        access_log=access_log,
        handler_cancellation=True,
        shutdown_timeout=s.shutdown_timeout_s,
        keepalive_timeout=s.keepalive_timeout_s,
        print=None,
        backlog=1024,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tollway", description="Tollway LLM gateway")
    parser.add_argument("--version", action="version", version=f"tollway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the gateway")
    p_serve.add_argument("--config", required=True, help="path to the YAML config")
    p_serve.add_argument("--host", help="override server.host")
    p_serve.add_argument("--port", type=int, help="override server.port")
    p_check = sub.add_parser("check-config", help="validate a config and print it, secrets redacted")
    p_check.add_argument("--config", required=True)
    admin_cli.add_parsers(sub)
    args = parser.parse_args(argv)
    if args.command in ("keys", "teams"):
        return admin_cli.run(args)

    try:
        settings = load_settings(args.config)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2

    if args.command == "check-config":
        from gateway.app import check_config  # late: the app imports the whole gateway

        try:
            check_config(settings)  # what `serve` would reject, without a server or the store
        except ConfigError as e:
            print(f"invalid config {args.config}: {e}", file=sys.stderr)
            return 2
        print(yaml.safe_dump(redacted(settings), sort_keys=False), end="")
        print(f"# config OK: {len(settings.models)} models, {len(settings.providers)} providers",
              file=sys.stderr)
        return 0
    if args.command == "serve":
        overrides = {}
        if args.host:
            overrides["host"] = args.host
        if args.port is not None:
            overrides["port"] = args.port
        if overrides:
            settings = settings.model_copy(
                update={"server": settings.server.model_copy(update=overrides)}
            )
        _setup_logging(settings.logging.level)
        try:
            serve(settings)
        except (ConfigError, StoreLocked) as e:
            print(f"tollway: {e}", file=sys.stderr)
            return 2
        return 0
    return 2  # pragma: no cover - argparse enforces the choices


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
