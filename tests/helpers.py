"""Assertions and runners shared by the CLI, training, pipeline and predict tests."""
from pathlib import Path

from hydranets.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``hydranets ARGV`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str, *words: str) -> str:
    """The error: one line, the last on stderr (after any progress lines), no traceback, holding ``words``."""
    lines = [l for l in err.splitlines() if l.strip()]
    errors = [l for l in lines if "error" in l.lower()]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: to show that nothing was changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
