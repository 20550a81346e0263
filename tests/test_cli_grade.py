"""``minilora grade`` through the CLI's error policy: full marks exit 0, a failed test exit 1 with
the report, an ungradable input one line and exit 2."""
import pytest

from minilora import cli
from minilora.course.assignments import reference_solution


def test_reference_scores_full_marks(tmp_path, capsys):
    answer = tmp_path / "answer.py"
    answer.write_text(reference_solution("lora_merge"))
    assert cli.main(["grade", "lora_merge", str(answer)]) == 0
    assert "score: 10/10" in capsys.readouterr().out


def test_a_failed_test_exits_1_with_the_report(tmp_path, capsys):
    answer = tmp_path / "answer.py"
    answer.write_text(reference_solution("lora_merge").replace(  # merge forgets the scaling
        "return self.scaling * (self.B @ self.A)", "return self.B @ self.A"))
    with pytest.raises(SystemExit) as e:
        cli.main(["grade", "lora_merge", str(answer)])
    assert e.value.code == 1 and "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [
    (["grade", "no_such_assignment", "answer.py"], "no_such_assignment"),
    (["grade", "lora_merge", "missing.py"], "does not exist"),
])
def test_ungradable_input_is_one_line_and_exit_2(argv, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "answer.py").write_text("x = 1\n")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minilora: error:") and match in err[0]
