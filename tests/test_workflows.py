"""GitHub Actions workflows: they parse, and each runs what the project says it runs.

YAML 1.1 reads the bare key ``on`` as the boolean True, so the triggers are looked up under both.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"


def load(name: str) -> dict:
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    assert isinstance(data, dict) and data.get("jobs"), f"{name}: no jobs"
    return data


def triggers(workflow: dict) -> dict:
    on = workflow.get("on", workflow.get(True))
    return {on: None} if isinstance(on, str) else dict(on)


def steps(job: dict) -> list[dict]:
    assert job.get("runs-on") == "ubuntu-latest" and job.get("steps"), job
    return job["steps"]


def runs(job: dict) -> str:
    return "\n".join(step.get("run", "") for step in steps(job))


def uses(job: dict) -> list[str]:
    return [step["uses"].split("@")[0] for step in steps(job) if "uses" in step]


def readme_command(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(rf"<!-- {marker} -->\s*```bash\n(.*?)\n```", text, re.S)
    assert block, f"README.md has no bash block under <!-- {marker} -->"
    return block.group(1).strip()


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("*.yml")), ids=lambda p: p.name)
def test_every_workflow_parses_with_triggers_steps_and_pinned_actions(path):
    workflow = load(path.name)
    assert workflow.get("name")
    assert {"push", "pull_request"} <= set(triggers(workflow)) or "workflow_dispatch" in triggers(workflow)
    for job in workflow["jobs"].values():
        for step in steps(job):
            assert ("run" in step) != ("uses" in step), f"{path.name}: a step needs run or uses: {step}"
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w.-]+@v\d+", step["uses"]), step["uses"]


def test_tests_workflow_runs_readmes_test_command_through_ci_run():
    job = load("tests.yml")["jobs"]["tests"]
    assert "bash .ci/run" in runs(job)
    assert "playwright install --with-deps chromium" in runs(job)  # no Debian chromium on GitHub's runners
    ci_run = (ROOT / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in ci_run and "apt-get install" in ci_run
    assert "pytest" in readme_command("test-command")
    assert job.get("timeout-minutes", 360) <= 90


def test_smoke_workflow_runs_the_smoke_grid():
    job = load("smoke.yml")["jobs"]["smoke"]
    assert "python -m safelib.reproduce notebooks/grids/smoke.yaml --out" in runs(job)
    assert (ROOT / "notebooks" / "grids" / "smoke.yaml").is_file()
    assert job["env"]["HF_HUB_OFFLINE"] == "1"


def test_book_workflow_builds_strictly_tests_in_a_browser_and_deploys_main_to_pages():
    workflow = load("book.yml")
    build, deploy = workflow["jobs"]["build"], workflow["jobs"]["deploy"]
    script = runs(build)
    assert re.search(r"jupyter-book build \. .*(--warningiserror|-W)", script)
    assert "playwright install --with-deps chromium" in script
    assert "tests/test_browser.py" in script
    assert "actions/upload-pages-artifact" in uses(build)
    upload = next(s for s in steps(build) if s.get("uses", "").startswith("actions/upload-pages-artifact"))
    assert upload["with"]["path"] == "_build/html"
    assert deploy["needs"] == "build"
    assert uses(deploy) == ["actions/configure-pages", "actions/deploy-pages"]
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"}
    assert deploy["environment"]["name"] == "github-pages"
    assert "refs/heads/main" in deploy["if"] and "push" in deploy["if"]
    assert triggers(workflow)["push"]["branches"] == ["main"]
