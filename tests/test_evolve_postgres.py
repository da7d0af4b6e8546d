"""Two `mmerge evolve` processes, each with its own OUT (as on two machines), share one study in
a real PostgreSQL server: the one at MMERGE_TEST_POSTGRES_URL (`.ci/run` installs and starts
one), else one started here by `.ci/postgres` from an installed server, else the test is skipped
with the reason no server could be started."""

import os
import subprocess
import uuid
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")
pytest.importorskip("psycopg", reason="needs a PostgreSQL driver: pip install 'mmerge[evolve]'")

from evolve_case import cli, make_case  # noqa: E402

from mmerge.evolve.storage import OWNER, open_storage  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "postgres"


def start_server() -> tuple[str | None, str]:
    """(URL, data folder) of a server started from an installed PostgreSQL, or (None, why not)."""
    if not SCRIPT.exists():
        return None, f"{SCRIPT} is missing"
    try:
        r = subprocess.run(
            ["bash", str(SCRIPT), "start", "--no-install"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        return None, "the server did not start within 120 s"
    lines = r.stdout.split()
    if r.returncode != 0 or len(lines) != 2:
        why = [line for line in r.stderr.splitlines() if line.strip()]
        return None, why[-1] if why else f"{SCRIPT.name} start exited with {r.returncode}"
    return lines[0], lines[1]


@pytest.fixture(scope="module")
def postgres_url():
    url = os.environ.get("MMERGE_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    url, folder = start_server()
    if url is None:
        pytest.skip(f"no PostgreSQL server could be started: {folder}")
    try:
        yield url
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", folder], capture_output=True, timeout=60)


def test_two_workers_share_a_study_in_postgresql(family_files, tmp_path, postgres_url):
    case = make_case(family_files, tmp_path / "case")
    name = f"pg-{uuid.uuid4().hex[:8]}"
    args = ["evolve", case["search"], "--evaluator", case["scorer"], "--trials", 10]
    args += ["--storage", postgres_url, "--study", name, "--quiet"]
    procs = [cli(*args, "-o", tmp_path / f"machine{i}", cwd=case["folder"]) for i in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    study = optuna.load_study(study_name=name, storage=open_storage(postgres_url, 20))
    trials = study.get_trials()
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert 10 <= len(done) <= 11 and len(trials) == len(done)
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert len({t.system_attrs[OWNER]["pid"] for t in trials}) == 2
    best = study.best_trial.number
    for i in range(2):  # each machine's best.yaml names the study's best trial
        head = (tmp_path / f"machine{i}" / "best.yaml").read_text().splitlines()[0]
        assert f"trial {best}," in head
