"""Two `mmerge evolve` processes, each with its own OUT (as on two machines), share one study in
a real PostgreSQL server. `.ci/run` starts one (`.ci/postgres`) and exports its URL."""

import os
import uuid

import pytest

optuna = pytest.importorskip("optuna")
pytest.importorskip("psycopg", reason="needs a PostgreSQL driver: pip install 'mmerge[evolve]'")

from evolve_case import cli, make_case  # noqa: E402

from mmerge.evolve.storage import OWNER, open_storage  # noqa: E402

URL = os.environ.get("MMERGE_TEST_POSTGRES_URL")


@pytest.mark.skipif(
    not URL,
    reason="no PostgreSQL server: set MMERGE_TEST_POSTGRES_URL (.ci/run starts one with "
    ".ci/postgres start)",
)
def test_two_workers_share_a_study_in_postgresql(family_files, tmp_path):
    case = make_case(family_files, tmp_path / "case")
    name = f"pg-{uuid.uuid4().hex[:8]}"
    args = ["evolve", case["search"], "--evaluator", case["scorer"], "--trials", 10]
    args += ["--storage", URL, "--study", name, "--quiet"]
    procs = [cli(*args, "-o", tmp_path / f"machine{i}", cwd=case["folder"]) for i in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    study = optuna.load_study(study_name=name, storage=open_storage(URL, 20))
    trials = study.get_trials()
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert 10 <= len(done) <= 11 and len(trials) == len(done)
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert len({t.system_attrs[OWNER]["pid"] for t in trials}) == 2
    best = study.best_trial.number
    for i in range(2):  # each machine's best.yaml names the study's best trial
        head = (tmp_path / f"machine{i}" / "best.yaml").read_text().splitlines()[0]
        assert f"trial {best}," in head
