#!/usr/bin/env python3
"""Writes deploy/kubernetes/base/prometheusrule.yaml, the Prometheus Operator's PrometheusRule
wrapping deploy/prometheus/outbox-relay.rules.yml, so the alert rules are kept in one place.

    scripts/gen-prometheusrule.py           # regenerate after editing the rules file
    scripts/gen-prometheusrule.py --check   # exit 1 with a diff if the file is out of date

The rules file's `groups:` and everything after it is copied verbatim (comments included),
indented under `spec:`; its leading comment block is left out. Standard library only.
"""

import argparse
import difflib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RULES = Path("deploy/prometheus/outbox-relay.rules.yml")
OUTPUT = Path("deploy/kubernetes/base/prometheusrule.yaml")

HEADER = f"""\
# Generated from {RULES} by scripts/gen-prometheusrule.py; do not edit.
# Edit the rules file, then run scripts/gen-prometheusrule.py (scripts/check-deploy.sh fails
# while this file is out of date).
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: outbox-relay
  labels:
    app.kubernetes.io/name: outbox-relay
spec:
"""


def render(rules_text: str) -> str:
    lines = rules_text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("groups:")), None)
    if start is None:
        sys.exit(f"error: {RULES} has no top-level `groups:` line")
    if any(line.startswith("---") for line in lines[start:]):
        sys.exit(f"error: {RULES} must be a single YAML document")
    body = "".join(("  " + line).rstrip() + "\n" for line in lines[start:])
    return HEADER + body


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help=f"do not write; exit 1 and show a diff if {OUTPUT} is not what would be generated",
    )
    args = parser.parse_args()
    wanted = render((ROOT / RULES).read_text(encoding="utf-8"))
    target = ROOT / OUTPUT
    current = target.read_text(encoding="utf-8") if target.exists() else ""
    if args.check:
        if current == wanted:
            return 0
        sys.stdout.writelines(
            difflib.unified_diff(
                current.splitlines(keepends=True),
                wanted.splitlines(keepends=True),
                fromfile=f"{OUTPUT} (committed)",
                tofile=f"{OUTPUT} (generated from {RULES})",
            )
        )
        print(
            f"error: {OUTPUT} is out of date with {RULES}; run scripts/gen-prometheusrule.py",
            file=sys.stderr,
        )
        return 1
    if current != wanted:
        target.write_text(wanted, encoding="utf-8")
        print(f"wrote {OUTPUT}")
    else:
        print(f"{OUTPUT} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
