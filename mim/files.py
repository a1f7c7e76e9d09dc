"""Files that are whole or absent. Each is written under a temporary name beside its final one and
renamed onto it when complete (a rename within a directory is atomic on POSIX), so a reader, a
crash or a preemption never leaves half a file under the final name."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to: renamed onto `path` when the block ends, removed
    when it raises."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    try:
        yield temporary
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    temporary.replace(path)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text)
