"""The committed run records stay findable: each is current with today's schema (resume by config
hash finds it), and a migration accepts only the schema changes it lists; the code version a record names."""

import copy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from speft_bench import records
from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import migrate_records  # noqa: E402

COMMITTED = sorted((ROOT / "results").rglob(records.RECORD_NAME))


@pytest.fixture(scope="module")
def composed():
    with migrate_records.compositions() as compositions:
        yield compositions


@pytest.mark.slow
def test_every_committed_record_is_current_and_hashes_to_itself(composed):
    assert len(COMMITTED) >= 95
    for path in COMMITTED:
        record = records.read_record(path)
        assert records.config_hash(record["config"]) == record["config_hash"], path
        assert migrate_records.migrated(record, path, composed) is None, path  # a rerun of its command has its hash


@pytest.mark.slow
def test_shared_compositions_compose_as_hydra_does(composed):
    """Records that differ only in values (seeds, lrs) share a composition: each must equal Hydra's own."""
    from hydra import compose

    commands = sorted({records.read_record(p)["command"] for p in COMMITTED})
    for command in [c for c in commands if "train.seed=2" in c][:3] + commands[::40]:  # seeds share one
        overrides = [a for a in shlex.split(command)[3:] if not a.startswith("--")]
        assert migrate_records.recompose(command, composed) == records.resolved_config(compose("config", overrides))


def test_a_record_from_before_a_new_knob_is_migrated_and_one_with_another_difference_is_refused(composed):
    path = next(p for p in COMMITTED if "/cpu/" in str(p))
    record = records.read_record(path)
    old = copy.deepcopy(record)
    del old["config"]["train"]["precision"]  # as written before train.precision existed
    old["config_hash"] = records.config_hash(old["config"])
    update = migrate_records.migrated(old, path, composed)
    assert update["config_hash"] == record["config_hash"]
    assert update["migrations"][-1]["changes"] == {"train.precision": {"added": "fp32"}}
    wrong = copy.deepcopy(old)
    wrong["config"]["train"]["lr"] = 1.0  # not a schema change: the record would be relabelled
    with pytest.raises(ValueError, match=r"train.lr is 1.0 in the record but 0.0005"):
        migrate_records.migrated(wrong, Path("x"), composed)


def test_checkpoint_every_is_hashed_at_its_default_and_every_other_train_knob_counts():
    """Periodic checkpoints turned on for a rerun keep the run's identity (and the records made without)."""
    record = records.read_record(COMMITTED[0])
    config = copy.deepcopy(record["config"])
    assert config["train"]["checkpoint_every"] is None
    config["train"]["checkpoint_every"] = 50
    assert records.config_hash(config) == record["config_hash"]
    assert config["train"]["checkpoint_every"] == 50  # the record keeps the value it ran with
    config["train"]["max_steps"] = 7
    assert records.config_hash(config) != record["config_hash"]


def test_git_state_names_changed_code_and_leaves_results_out(tmp_path):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "bench.json").write_text("{}")
    (tmp_path / "run.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "c")
    (tmp_path / "results" / "bench.json").write_text('{"rows": []}')  # a bench writing while runs go on
    assert records.git_state(tmp_path) | {"commit": None} == {"commit": None, "dirty": False, "changed": []}
    (tmp_path / "run.py").write_text("x = 2\n")
    assert records.git_state(tmp_path)["changed"] == ["run.py"] and records.git_state(tmp_path)["dirty"]
