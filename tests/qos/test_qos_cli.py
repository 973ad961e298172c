from __future__ import annotations

from pathlib import Path

import pytest

from tidal.cli.main import main


def test_rules_example_validates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["qos", "rules", "example"])
    assert info.value.code == 0
    example = capsys.readouterr().out
    p = tmp_path / "rules.yaml"
    p.write_text(example)
    with pytest.raises(SystemExit) as info:
        main(["qos", "rules", "check", str(p)])
    assert info.value.code == 0
    assert "slo_feedback" in capsys.readouterr().out


def test_bad_rules_and_unreachable_api_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = tmp_path / "rules.yaml"
    p.write_text("policy: {type: slo_feedback, step_cores: -1}\n")
    with pytest.raises(SystemExit) as info:
        main(["qos", "rules", "check", str(p)])
    assert info.value.code == 1
    errline = capsys.readouterr().err
    assert "step_cores" in errline and "Traceback" not in errline
    with pytest.raises(SystemExit) as info:
        main(["qos", "status", "--url", "http://127.0.0.1:9"])
    assert info.value.code == 1
    assert "not reachable" in capsys.readouterr().err
