"""CI (.ci/run) runs exactly the test command the README gives a newcomer."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    command = ci[ci.index("# --- the README's test command, verbatim ---") + 1]
    assert "--durations=15" in command  # CI's log lists the slowest tests, so the README's times stay honest
    assert f"```bash\n{command}\n```" in (ROOT / "README.md").read_text(encoding="utf-8")
