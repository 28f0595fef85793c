"""`tollway keys …` and `tollway teams …`: a thin client of a running gateway's admin API."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote, urlencode


class AdminError(Exception):
    pass


def _call(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    url = args.url.rstrip("/") + path
    if not args.admin_key:
        raise AdminError("no admin key: pass --admin-key or set TOLLWAY_ADMIN_KEY")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", f"Bearer {args.admin_key}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = e.reason
        raise AdminError(f"HTTP {e.code}: {msg}") from None
    except urllib.error.URLError as e:
        raise AdminError(f"cannot reach {url}: {e.reason}") from None


def _limits(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if args.budget_usd is not None:
        body["budget"] = {"limit_usd": args.budget_usd, "period": args.period}
    if args.rpm is not None:
        body["rpm"] = args.rpm
    if args.tpm is not None:
        body["tpm"] = args.tpm
    if args.models:
        body["allowed_models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    return body


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _budget_str(b: dict[str, Any] | None) -> str | None:
    return None if not b else f"${b['limit_usd']:g}/{b['period']}"


def run(args: argparse.Namespace) -> int:
    try:
        if args.command == "teams":
            if args.action == "create":
                body = {"name": args.name, **_limits(args)}
                if args.id:
                    body["id"] = args.id
                out = _call(args, "POST", "/admin/teams", body)
                print(json.dumps(out, indent=2))
            else:
                data = _call(args, "GET", "/admin/teams")["data"]
                for t in data:
                    t["budget"] = _budget_str(t["budget"])
                print(_table(data, ["id", "name", "budget", "rpm", "tpm"]))
        else:
            if args.action == "create":
                body = {"team_id": args.team, "name": args.name or "", **_limits(args)}
                if args.expires_in_days is not None:
                    body["expires_in_s"] = args.expires_in_days * 86400
                out = _call(args, "POST", "/admin/keys", body)
                print(json.dumps(out, indent=2))
                print(f"\nThe key is shown only now: {out['key']}", file=sys.stderr)
            elif args.action == "list":
                path = "/admin/keys" + (f"?{urlencode({'team_id': args.team})}" if args.team else "")
                data = _call(args, "GET", path)["data"]
                for k in data:
                    k["budget"] = _budget_str(k["budget"])
                print(_table(data, ["id", "team_id", "name", "prefix", "status", "budget", "rpm", "tpm"]))
            else:
                out = _call(args, "POST", f"/admin/keys/{quote(args.key_id, safe='')}/revoke")
                print(f"revoked {out['id']} ({out['name'] or out['prefix']})")
    except AdminError as e:
        print(f"tollway: {e}", file=sys.stderr)
        return 1
    return 0


def add_parsers(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("TOLLWAY_URL", "http://127.0.0.1:8080"),
                        help="gateway base URL (env TOLLWAY_URL)")
    common.add_argument("--admin-key", default=os.environ.get("TOLLWAY_ADMIN_KEY"),
                        help="admin key (env TOLLWAY_ADMIN_KEY)")
    common.add_argument("--timeout", type=float, default=10.0)
    limits = argparse.ArgumentParser(add_help=False)
    limits.add_argument("--budget-usd", type=float)
    limits.add_argument("--period", choices=["daily", "weekly", "monthly", "total"], default="monthly")
    limits.add_argument("--rpm", type=int)
    limits.add_argument("--tpm", type=int)
    limits.add_argument("--models", help="comma-separated allowed public model names")

    keys = sub.add_parser("keys", help="manage virtual keys on a running gateway")
    ka = keys.add_subparsers(dest="action", required=True)
    kc = ka.add_parser("create", parents=[common, limits], help="create a key (printed once)")
    kc.add_argument("--team", required=True)
    kc.add_argument("--name")
    kc.add_argument("--expires-in-days", type=float)
    kl = ka.add_parser("list", parents=[common])
    kl.add_argument("--team")
    kr = ka.add_parser("revoke", parents=[common])
    kr.add_argument("key_id")

    teams = sub.add_parser("teams", help="manage teams on a running gateway")
    ta = teams.add_subparsers(dest="action", required=True)
    tc = ta.add_parser("create", parents=[common, limits])
    tc.add_argument("--name", required=True)
    tc.add_argument("--id")
    ta.add_parser("list", parents=[common])
