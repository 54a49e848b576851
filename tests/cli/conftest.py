"""The command run in this process, as a user would see it."""

import pytest

from fastalign import cli


@pytest.fixture
def fastalign(capsys):
    """``fastalign(argv) -> (exit status, stdout, stderr)`` of ``fastalign ARGV`` run in this process."""
    def run(argv: list[str]) -> tuple[int, str, str]:
        try:
            status = cli.main(argv)
        except SystemExit as exit:
            status = exit.code
        out, err = capsys.readouterr()
        return status, out, err
    return run
