"""Custom tasks from a JSONL file: the shipped example, bare ``PATH.jsonl`` names, one spelling in errors."""
import json
from pathlib import Path

import pytest

import circuitbench
from circuitbench.cli import main
from circuitbench.errors import UserError
from circuitbench.sweep import Sweep
from circuitbench.tasks import CUSTOM_FORM, canonical_task_name, get_task

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "datasets" / "custom" / "example.jsonl"


@pytest.fixture(scope="module")
def tok():
    return circuitbench.load_model("random:gpt2-tiny").tokenizer


def test_example_file_is_documented_and_well_formed():
    lines = [json.loads(line) for line in EXAMPLE.read_text().splitlines() if line.strip()]
    assert len(lines) >= 12
    assert all(set(r) <= {"clean", "corrupted", "answer", "wrong_answer", "split"} for r in lines)
    readme = (ROOT / "README.md").read_text()
    assert "## Custom tasks" in readme and "datasets/custom/example.jsonl" in readme
    for field in ("clean", "corrupted", "answer", "wrong_answer", "split"):
        assert f"`{field}`" in readme


def test_example_builds_every_split_without_drops(tok):
    task = get_task(f"custom:{EXAMPLE}")
    assert all(n >= 4 for n in task.sizes.values())
    splits = task.build(tok)
    assert splits.dropped == {"train": 0, "validation": 0, "test": 0}
    assert {s: len(splits.split(s)) for s in splits.names} == task.sizes


def test_bare_jsonl_path_is_the_custom_task():
    assert canonical_task_name("my/file.jsonl") == "custom:my/file.jsonl"
    assert canonical_task_name("custom:my/file.jsonl") == "custom:my/file.jsonl"
    assert canonical_task_name("gt") == "gt"
    task = get_task(str(EXAMPLE))
    assert task.name == f"custom:{EXAMPLE}" and task.sizes == get_task(f"custom:{EXAMPLE}").sizes


def test_errors_spell_the_custom_form_one_way(tmp_path):
    assert CUSTOM_FORM == "custom:PATH.jsonl"
    for name in ("custom", "custom:", "nope", "my.json", "data/task.txt"):
        with pytest.raises(UserError) as err:
            get_task(name)
        assert "custom:PATH.jsonl" in str(err.value)
        assert "custom:PATH.json " not in str(err.value) + " "
    with pytest.raises(UserError, match="not found"):
        get_task(str(tmp_path / "missing.jsonl"))


def test_cli_evaluate_and_show_take_a_bare_path(capsys):
    assert main(["evaluate", "--task", str(EXAMPLE), "--model", "random:gpt2-tiny", "--circuit", "full",
                 "--no-progress", "--json"]) == 0
    values = json.loads(capsys.readouterr().out)
    assert values["kl"] == pytest.approx(0.0, abs=1e-5) and values["n_examples"] > 0
    assert main(["tasks", "show", str(EXAMPLE), "--model", "random:gpt2-tiny", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["task"] == f"custom:{EXAMPLE}" and len(shown["examples"]) == 3
    assert main(["tasks"]) == 0
    assert "custom:PATH.jsonl" in capsys.readouterr().out


@pytest.mark.parametrize("prefix", ["", "custom:"])
def test_cli_malformed_line_names_it_in_one_line(tmp_path, capsys, prefix):
    bad = tmp_path / "bad.jsonl"
    good = EXAMPLE.read_text().splitlines()[:3]
    bad.write_text("\n".join(good + ['{"clean": "a", "corrupted": "b"}']) + "\n")
    code = main(["evaluate", "--task", f"{prefix}{bad}", "--model", "random:gpt2-tiny", "--circuit", "full"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.strip().count("\n") == 0 and "Traceback" not in err
    assert f"{bad}:4: missing field(s) answer, wrong_answer" in err


def test_run_stores_a_bare_path_under_the_custom_name(tmp_path, capsys):
    flags = {"methods": "eap", "tasks": str(EXAMPLE), "models": "random:gpt2-tiny", "method_preset": "smoke"}
    jobs, refs = Sweep.build(flags=flags).plan()
    assert {j.task for j in jobs} == {r.task for r in refs} == {f"custom:{EXAMPLE}"}
    same, _ = Sweep.build(flags={**flags, "tasks": f"custom:{EXAMPLE}"}).plan()
    assert [j.job_id for j in same] == [j.job_id for j in jobs]
    cfg = tmp_path / "sweep.toml"
    cfg.write_text(f'[task."{EXAMPLE}"]\nsparsities = [0.7]\n')
    per_task, _ = Sweep.build(config=str(cfg), flags=flags).plan()
    assert {j.sparsities for j in per_task} == {(0.7,)}
    assert main(["run", "--methods", "eap", "--task", str(EXAMPLE), "--model", "random:gpt2-tiny",
                 "--preset", "smoke", "--results", str(tmp_path / "results"), "--dry-run"]) == 0
    assert f"custom:{EXAMPLE}" in capsys.readouterr().out
