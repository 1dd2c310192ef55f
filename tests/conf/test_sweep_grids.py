"""The Makefile's sweep grids live in ``conf/experiment/sweeps/`` (``hydra.sweeper.params``): each target
runs the jobs, by config hash, that its command lines ran when the grids were in the Makefile, so its
sweeps resume on the records already in ``results/``."""

import re
import shutil
import subprocess

import pytest
from hydra import initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException
from hydra.types import RunMode

from speft_bench import records
from speft_bench.config import Compositions, is_value, register_schemas
from speft_bench.launcher import task_config
from tests.helpers import CONF, ROOT

# The Table 1/4 targets' command lines before the grids moved (commit d0663b1's Makefile), variables expanded:
# the overrides after `python -m speft_bench --multirun`.
SALIENCE = "magnitude,gradient,synflow,snip,force,taylor_fo,grasp,fisher"
CPU = "experiment=cpu_minilm_glue paths.output_dir=results/cpu"
PROTOCOL = "experiment=cpu_minilm_glue hydra/launcher=local train.num_threads=1 paths.output_dir=results/cpu"
SEEDS = "task=mrpc,stsb,sst2,rte train.seed=1,2"
OLD = {
    "sweep-cpu-speft-table1": [f"{CPU} method=lora,pissa", f"{CPU} method=speft metric={SALIENCE}"],
    "sweep-cpu-speft-table4": [
        f"{CPU} method=speft metric=gradient masking=static_global,static_local",
        f"{CPU} method=speft metric=gradient masking=dynamic_global,dynamic_local masking.interval=100"],
}
# Two of the protocol's old lines: one that swept value overrides beside group choices, and one that failed.
OLD_DYNAMIC_SEEDS = (f"{PROTOCOL} method=speft metric=gradient masking=dynamic_global,dynamic_local "
                     f"masking.interval=100 {SEEDS}")
OLD_REFERENCE = (f"{PROTOCOL} method=speft metric=grasp,synflow metric.variant=reference task=mrpc,stsb,sst2,rte "
                 "train.seed=0,1,2")
# What each target runs now, in order (the protocol: most decisive first).
NEW = {
    "sweep-cpu-speft-table1": ["speft_table1/lora_pissa", "speft_table1/speft"],
    "sweep-cpu-speft-table4": ["speft_table4/static", "speft_table4/dynamic"],
    "sweep-cpu-spsft": ["spsft/l2_taylor", "spsft/head", "protocol/spsft_qm_taylor", "protocol/spsft_l2_mlp",
                        "protocol/full_lr"],  # the protocol's, at its thread count: one set of records
    "sweep-cpu-protocol": [
        "protocol/lora_pissa_seeds", "protocol/speft_gradient_seeds", "protocol/spsft_qm_taylor",
        "protocol/spsft_l2_mlp", "protocol/full_lr", "protocol/speft_gradient_static_local_seeds",
        "protocol/speft_gradient_dynamic_seeds", "protocol/lora_lr", "protocol/speft_gradient_lr",
        "protocol/spsft_seeds", "protocol/speft_reference_grasp_synflow", "protocol/speft_grasp_synflow_seeds",
        "protocol/speft_reference_fisher", "protocol/speft_other_metrics_seeds"],
    "results-mrpc": ["mrpc_full/lora", "mrpc_full/speft_gradient", "mrpc_full/spsft", "mrpc_full/spsft_taylor_mlp"],
    "results-llm": ["llm/commonsense_pretrained_lora", "llm/commonsense_speft", "llm/commonsense_spsft",
                    "llm/gsm8k_pretrained_lora", "llm/gsm8k_speft", "llm/gsm8k_spsft"],
}
# the sweep-cpu-* targets write to results/cpu
OUTPUT = {"results-mrpc": "paths.output_dir=results/mrpc_full", "results-llm": "paths.output_dir=results/llm"}


class Sweeps:
    """A multirun's jobs as Hydra makes them: the master config's ``hydra.sweeper.params`` before the command
    line's task overrides, the basic sweeper's cartesian product (``Hydra.multirun``, ``BasicSweeper.sweep``),
    and each job's config composed by the config loader as a launcher does (``load_sweep_config``).

    The master is composed from the command's group choices and hydra overrides only: they are all the
    sweeper params, the launcher and the jobs' hydra overrides come from (a value override of a swept
    group, ``metric.variant=reference`` beside ``metric=grasp,synflow``, fails in Hydra's own master).
    Value overrides are applied after composition (``_load_configuration_impl``), so jobs that differ
    only in them share one composition of their group choices: ``fast`` shares it through
    :class:`speft_bench.config.Compositions`; ``fast=False`` composes every job."""

    def __init__(self, fast: bool = True):
        self.hydra = GlobalHydra.instance().hydra
        self.parser = OverridesParser.create()
        self.fast = fast
        self.masters, self.composed = {}, {}

    def master(self, command: list[str]):
        base = tuple(o.input_line for o in self.parser.parse_overrides(command)
                     if not o.is_sweep_override() and (o.is_hydra_override() or not is_value(o)))
        if base not in self.masters:
            self.masters[base] = self.hydra.compose_config("config", list(base), run_mode=RunMode.MULTIRUN,
                                                           with_log_configuration=False)
        return self.masters[base]

    def jobs(self, command: list[str]) -> list[list[str]]:
        params = [f"{k}={v}" for k, v in (self.master(command).hydra.sweeper.params or {}).items()]
        task = [o.input_line for o in self.parser.parse_overrides(command) if not o.is_hydra_override()]
        [batch] = BasicSweeper.split_arguments(self.parser.parse_overrides([*params, *task]), None)
        return batch

    def config(self, command: list[str], job: list[str]):
        master = self.master(command)
        if not self.fast:
            return task_config(self.hydra.config_loader.load_sweep_config(master, job))
        key = tuple(master.hydra.overrides.hydra)  # the jobs' hydra overrides: one set of compositions each
        if key not in self.composed:
            self.composed[key] = Compositions(lambda groups: self.hydra.config_loader.load_sweep_config(master, groups))
        return task_config(self.composed[key].compose(job))

    def hashes(self, command: list[str]) -> list[str]:
        return [records.config_hash(records.resolved_config(self.config(command, job))) for job in self.jobs(command)]


@pytest.fixture(scope="module")
def sweeps():
    register_schemas()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield Sweeps()


@pytest.fixture(scope="module")
def committed() -> dict:
    """Config hash → completed record, of every record committed under results/cpu (read once)."""
    return records.completed_records(ROOT / "results" / "cpu")


def new_command(target: str, name: str) -> list[str]:
    return [f"experiment=sweeps/{name}", *OUTPUT.get(target, "paths.output_dir=results/cpu").split()]


# The Table 1/4 grids are complete in results/ (70 jobs): each job must find its committed record, so the
# targets resume on them instead of rerunning.  All six targets matched their old command lines by hash when
# the grids moved (commit 0675076); the records those lines wrote stand for them here, since composing ~400
# old and new jobs costs minutes of the suite.  The dynamic records ran before masking.optimizer_reset, whose
# default then was the values' state only: the grid at that setting must find them.
@pytest.mark.slow
@pytest.mark.parametrize("target, grid, setting, jobs", [
    ("sweep-cpu-speft-table1", "speft_table1/lora_pissa", [], 10),
    ("sweep-cpu-speft-table1", "speft_table1/speft", [], 40),
    ("sweep-cpu-speft-table4", "speft_table4/static", [], 10),
    ("sweep-cpu-speft-table4", "speft_table4/dynamic", ["masking.optimizer_reset=values"], 10)])
def test_each_grid_resumes_on_the_records_its_old_command_lines_wrote(sweeps, committed, target, grid, setting,
                                                                     jobs):
    command = [*new_command(target, grid), *setting]
    new = sweeps.hashes(command)
    assert len(new) == len(set(new)) == jobs  # no job twice
    assert [h for h in new if h not in committed] == []
    # the same launcher (the protocol's 2 local jobs) as the old lines, whose records these are
    [launcher] = {str(sweeps.master(line.split()).hydra.launcher) for line in OLD[target]}
    assert str(sweeps.master(command).hydra.launcher) == launcher


@pytest.mark.slow
def test_the_shortcut_composes_as_hydra_does(sweeps):
    """``Sweeps(fast=True)`` (value overrides on a shared composition) against a full composition per job."""
    slow = Sweeps(fast=False)
    for command in (OLD_DYNAMIC_SEEDS.split(), new_command("sweep-cpu-protocol", "protocol/full_lr"),
                    new_command("results-llm", "llm/gsm8k_speft")):
        jobs = sweeps.jobs(command)
        for job in (jobs[0], jobs[-1]):
            fast, full = sweeps.config(command, job), slow.config(command, job)
            assert records.resolved_config(fast) == records.resolved_config(full)


@pytest.mark.parametrize("grid", NEW["sweep-cpu-protocol"])
def test_the_protocol_grids_run_every_seed_before_the_next(sweeps, grid):
    """Seed-major (cpu_minilm_glue's key order): a resumed sweep gives each claim its next pair of every task
    before any claim gets a further seed."""
    seeds = [int(o.split("=")[1]) for job in sweeps.jobs(new_command("sweep-cpu-protocol", grid))
             for o in job if o.startswith("train.seed=")]
    assert seeds == sorted(seeds)


@pytest.mark.slow
def test_grasp_and_synflow_seeds_regrouped_run_the_same_jobs(sweeps):
    """GRaSP's and SynFlow's seeds 1-2, paper and reference variants, moved into one grid (a pair needs both):
    by config hash the two grids run what the reference grid (seeds 0-2) and the other metrics' seed grid's
    GRaSP and SynFlow ran before, so the records either wrote count for both; that grid keeps the other five."""
    new = [h for grid in ("speft_reference_grasp_synflow", "speft_grasp_synflow_seeds")
           for h in sweeps.hashes(new_command("sweep-cpu-protocol", f"protocol/{grid}"))]
    old = sweeps.hashes([*new_command("sweep-cpu-protocol", "protocol/speft_reference_grasp_synflow"),
                         "train.seed=0,1,2"])
    old += sweeps.hashes(f"{PROTOCOL} method=speft metric=synflow,grasp {SEEDS}".split())
    assert len(set(new)) == len(new) == 8 + 32
    assert sorted(new) == sorted(old)
    others = sweeps.master(new_command("sweep-cpu-protocol", "protocol/speft_other_metrics_seeds"))
    assert others.hydra.sweeper.params.metric == "fisher,force,snip,taylor_fo,magnitude"


def test_the_old_reference_lines_failed_in_hydra_before_any_job(sweeps):
    """Why ``metric.variant`` is a sweeper param: on the command line beside ``metric=grasp,synflow`` it was
    applied to the master config, whose metric is ``none`` (the old protocol stopped at that line)."""
    line = OLD_REFERENCE.split()
    with pytest.raises(ConfigCompositionException, match="metric.variant"):
        sweeps.hydra.compose_config("config", line, run_mode=RunMode.MULTIRUN, with_log_configuration=False)


def test_every_sweep_config_is_run_by_its_target():
    folder = CONF / "experiment" / "sweeps"
    on_disk = sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.yaml"))
    assert on_disk == sorted({n for names in NEW.values() for n in names})


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("target", list(NEW))
def test_the_makefile_target_runs_its_sweeps_in_order(target):
    dry = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    lines = [line for line in dry.splitlines() if "-m speft_bench" in line]
    assert all("--multirun" in line and OUTPUT.get(target, "paths.output_dir=results/cpu") in line for line in lines)
    assert [name for line in lines for name in grids_of(line)] == NEW[target]


def grids_of(line: str) -> list[str]:
    """The sweep configs of one dry-run line: one grid, or the Makefile's ``sweeps`` loop over several."""
    loop = re.match(r"for grid in (.+?); do .*experiment=sweeps/(\S+)/\$grid ", line)
    if loop:
        return [f"{loop[2]}/{grid}" for grid in loop[1].split()]
    return [re.search(r"experiment=sweeps/(\S+)", line).group(1)]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_sweep_status_totals_each_target_and_fails_on_a_grid_that_fails(tmp_path):
    """The Makefile's status loop and total, with a stand-in for the harness that counts 3 of 4 jobs done
    for every grid but one named ``broken`` (no count: Hydra failed)."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\ncase "$*" in *broken*) echo "Error";; *) echo "3 of 4 jobs have a completed record'
                    ' of their config; 1 to run";; esac\n')
    fake.chmod(0o755)

    def status(*variables):
        return subprocess.run(["make", "-s", "sweep-status", f"PY={fake}", *variables], cwd=ROOT,
                              capture_output=True, text=True)

    done = status()
    assert done.returncode == 0
    totals = [line for line in done.stdout.splitlines() if "all grids:" in line]
    assert [" ".join(line.split()) for line in totals] == [
        f"{folder}, all grids: {3 * n} of {4 * n} jobs have a completed record"
        for folder, n in (("speft_table1", 2), ("speft_table4", 2), ("spsft", 2),
                          ("protocol", len(NEW["sweep-cpu-protocol"])))]
    broken = status("TABLE1_GRIDS=lora_pissa broken speft")
    assert broken.returncode != 0
    assert [" ".join(line.split()) for line in broken.stdout.splitlines()] == [
        "speft_table1/lora_pissa: 3 of 4 jobs have a completed record of their config; 1 to run",
        "speft_table1/broken: failed", "speft_table1, all grids: 3 of 4 jobs have a completed record"]
