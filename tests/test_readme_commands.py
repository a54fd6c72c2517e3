"""Every CPU command of the README and of docs/*.md runs: the fenced blocks marked `<!-- cpu -->`
are extracted, bash blocks run line by line (`megatron-tsp` as `python -m megatron_tsp.cli`: the
console script is not installed in the test environments), python blocks as a script. Skipped,
with the reason: package installs (the environment already has them) and the whole test suite
(this test is part of it). A training run takes more than 20 s on 2 cores: those commands are
`slow`."""

import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = {
    "pip install": "a package install (downloads; the test environment already has these packages)",
    "bash scripts/test.sh": "the whole test suite, which this test is part of (.ci/run runs it)",
}


def pages():
    """README.md and docs/*.md, the pages whose `<!-- cpu -->` blocks run here."""
    docs = sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(REPO, "docs")) if f.endswith(".md"))
    return ["README.md"] + docs


def readme_commands(page="README.md"):
    """(kind, command) of every `<!-- cpu -->` block of `page` (a path relative to the repository)."""
    text = open(os.path.join(REPO, page)).read()
    found = []
    for lang, body in re.findall(r"<!-- cpu -->\n```(\w+)\n(.*?)```", text, re.S):
        if lang == "python":
            found.append(("python", body))
            continue
        assert lang == "bash", f"{page}: a <!-- cpu --> block of {lang}, which this test does not run"
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                found.extend(("bash", part.strip()) for part in line.split(" && "))
    return found


def test_readme_has_cpu_commands():
    kinds = [k for k, _ in readme_commands()]
    assert kinds.count("bash") >= 4
    cmds = [c for _, c in readme_commands()]
    assert any(c.startswith("megatron-tsp train") for c in cmds) and "bash scripts/test.sh" in cmds
    assert any(c.startswith("megatron-tsp plan") for c in cmds)  # "when to use it"
    assert "bash scripts/test.sh" in open(os.path.join(REPO, ".ci", "run")).read()  # the README's test command
    # the Python example moved to docs/python_api.md with the public names: still run
    assert "python" in [k for k, _ in readme_commands(os.path.join("docs", "python_api.md"))]


def _params():
    out = []
    for page in pages():
        for kind, cmd in readme_commands(page):
            marks = [pytest.mark.slow] if (kind == "python" or " train" in cmd) else []
            name = cmd if kind == "bash" else "python snippet"
            out.append(pytest.param(kind, cmd, marks=marks, id=f"{page}: {name}"[:80]))
    return out


@pytest.mark.parametrize("kind,cmd", _params())
def test_readme_command_runs(kind, cmd, tmp_path):
    for prefix, why in SKIP.items():
        if cmd.startswith(prefix):
            pytest.skip(why)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    if kind == "python":
        script = tmp_path / "snippet.py"
        script.write_text(cmd)
        argv = [sys.executable, str(script)]
    else:
        argv = shlex.split(cmd)
        assert argv[0] == "megatron-tsp", f"a README CPU command this test does not know how to run: {cmd}"
        argv = [sys.executable, "-m", "megatron_tsp.cli", *argv[1:]]
    res = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, f"{cmd}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    assert res.stdout.strip()
