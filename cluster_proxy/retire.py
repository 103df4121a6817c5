"""What removing an account leaves behind, put away so a new account of the same name starts empty.

The account store forgets the account (its token and sessions go with it);
this module handles the rest, for the ``users remove`` command and the admin
page alike:
    tasks     the user's queued tasks are cancelled, running ones lose their
              record (their result is dropped) and their history is deleted
    files     ``DIR/users/<name>`` moves to ``DIR/users/.removed/<name>-<account_id>``
              (kept for the admin to archive or delete; ``.removed`` is never a user name)
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from standard.datadir import DataDir

from .store import DONE, PENDING, RUNNING, StateStore

REMOVED_FOLDER = ".removed"


async def retire_user(data_dir: DataDir, store: StateStore, name: str, account_id: str) -> Path | None:
    """Forget ``name``'s tasks and move their files aside; returns where the files went (None: no files)."""
    for state in (PENDING, RUNNING, DONE):  # in the order tasks move, so none slips through
        await store.delete(name, None, state)
    return await asyncio.to_thread(_move_aside, data_dir, name, account_id)


def _move_aside(data_dir: DataDir, name: str, account_id: str) -> Path | None:
    source = data_dir.users / name
    if not source.exists():
        return None
    target = data_dir.users / REMOVED_FOLDER / f"{name}-{account_id}"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(source), str(target))
    return target
