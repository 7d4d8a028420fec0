"""Run every command that README.md and docs/*.md show in a ```bash block, as written, from the repository root.

    python3 scripts/check_docs_commands.py [--list]

A line's trailing comment says how it is checked:
- `# long: ...`: too long (or needs hardware) for CI; its scripts must exist and, for a Python script of this
  repository, every `--option` it uses must be one its `--help` lists;
- `# checked by PATH ...`: PATH exists and `.ci/run` runs it;
- a command that is a line of `.ci/run` is run there, not again;
- anything else runs here, in file order (README first), and must exit 0.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASH_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
TRAILING_COMMENT = re.compile(r"^(.*?)\s+#\s+(.*)$")
TIMEOUT_S = 900


def documents() -> list[Path]:
    return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def commands(doc: Path) -> list[tuple[str, str]]:
    """(command, trailing comment) for every command line of the document's bash blocks."""
    found = []
    for block in BASH_BLOCK.findall(doc.read_text(encoding="utf-8")):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            match = TRAILING_COMMENT.match(line)
            found.append((match.group(1), match.group(2)) if match else (line, ""))
    return found


def check_long(command: str) -> None:
    """The scripts a long command names exist, and a repository Python script takes the options it is given."""
    words = shlex.split(command)
    scripts = [w for w in words if re.search(r"\.(py|sh)$|^\.ci/", w)]
    for script in scripts:
        if not (ROOT / script).exists():
            raise SystemExit(f"{command!r}: {script} does not exist")
    python_scripts = [s for s in scripts if s.endswith(".py")]
    if python_scripts:
        python = os.path.join(ROOT, ".venv", "bin", "python")
        usage = subprocess.run(
            [python, python_scripts[0], "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        if usage.returncode != 0:
            raise SystemExit(f"{python_scripts[0]} --help failed:\n{usage.stderr[-2000:]}")
        for option in (w.split("=")[0] for w in words if w.startswith("--")):
            if option not in usage.stdout:
                raise SystemExit(f"{command!r}: {python_scripts[0]} has no option {option}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--list", action="store_true", help="say how each command is checked, run nothing")
    args = ap.parse_args(argv)
    ci = {line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()}
    env = dict(os.environ, PATH=f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}")
    counts = {"ran": 0, "long": 0, "in CI": 0, "checked by": 0}
    for doc in documents():
        for command, comment in commands(doc):
            where = doc.relative_to(ROOT)
            if command in ci:
                kind = "in CI"
            elif comment.startswith("long"):
                kind = "long"
            elif comment.startswith("checked by "):
                kind = "checked by"
            else:
                kind = "ran"
            counts[kind] += 1
            print(f"{where}: [{kind}] {command}", flush=True)
            if args.list or kind == "in CI":
                continue
            if kind == "long":
                check_long(command)
            elif kind == "checked by":
                script = comment.removeprefix("checked by ").split()[0].rstrip(",;:")
                if not (ROOT / script).exists() or not any(script in line for line in ci):
                    raise SystemExit(
                        f"{where}: {command!r} is said to be checked by {script}, which .ci/run does not run"
                    )
            else:
                started = time.time()
                done = subprocess.run(
                    ["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
                )
                if done.returncode != 0:
                    raise SystemExit(
                        f"{where}: {command!r} exited {done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}"
                    )
                print(f"    ok, {time.time() - started:.0f} s", flush=True)
    print("docs commands: " + ", ".join(f"{n} {kind}" for kind, n in counts.items()))


if __name__ == "__main__":
    sys.exit(main())
