"""Crash-safe files: atomic writes and the resume state of a block-by-block run.

Every file goes to a temporary name in the same directory, is flushed and
fsynced, then renamed over the target, so a reader (or a resumed run) sees
either the old file or the complete new one. The resume state lives in
``<out>/.codegemm-partial/``: one safetensors file per finished block, the
hidden states that feed the next block, and ``state.json`` (written last)
saying how many blocks are done and with which settings. Global fine-tuning
adds the unquantized model's final hidden states (``teacher.safetensors``,
written before block 0) and, after each of its epochs, the trained tensors
with Adam's moments (``global-NNNN.safetensors``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from codegemm.errors import CheckpointError

logger = logging.getLogger(__name__)

PARTIAL_DIR = ".codegemm-partial"
STATE_VERSION = 1


def _default_mode() -> int:
    """Permissions a plain ``open()`` would give a new file (mkstemp makes them 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_target(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success fsync it and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file and a rename."""
    with _atomic_target(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """``safetensors`` file written atomically (tensors made contiguous, on CPU)."""
    with _atomic_target(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))


def move_into(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, last: tuple[str, ...] = ()) -> None:
    """Rename every file of ``src_dir`` into ``dst_dir`` (same filesystem), ``last`` names at the end."""
    src, dst = Path(src_dir), Path(dst_dir)
    names = sorted(p.name for p in src.iterdir() if p.is_file())
    ordered = [n for n in names if n not in last] + [n for n in last if n in names]
    mode = _default_mode()
    for name in ordered:
        os.chmod(src / name, mode)
        os.replace(src / name, dst / name)
    _fsync_dir(dst)


class ResumeState:
    """Progress of one quantization run inside its output directory.

    ``fingerprint`` holds everything that changes the result (model, config,
    options, calibration); resuming with a different one is refused.
    """

    def __init__(self, out_dir: str | os.PathLike, fingerprint: dict[str, Any]) -> None:
        self.dir = Path(out_dir) / PARTIAL_DIR
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        self.completed = 0
        self.global_epochs = 0

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    def exists(self) -> bool:
        return self.state_file.is_file()

    def load(self) -> int:
        """Read ``state.json``; returns the number of finished blocks (0 when there is none)."""
        if not self.exists():
            self.completed = 0
            return 0
        try:
            data = json.loads(self.state_file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"cannot read resume state {self.state_file}: {err}") from err
        if data.get("version") != STATE_VERSION:
            raise CheckpointError(f"resume state {self.state_file} has version {data.get('version')}; "
                                  f"expected {STATE_VERSION}")
        if data.get("fingerprint") != self.fingerprint:
            old, new = data.get("fingerprint", {}), self.fingerprint
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise CheckpointError(
                f"--resume: the partial run in {self.dir.parent} used different settings ({', '.join(diff)}); "
                "rerun with the same arguments or choose a new --out"
            )
        self.completed = int(data["completed"])
        self.global_epochs = int(data.get("global_epochs", 0))
        return self.completed

    def block_file(self, index: int) -> Path:
        return self.dir / f"block-{index:04d}.safetensors"

    def hidden_file(self, index: int) -> Path:
        return self.dir / f"hidden-{index:04d}.safetensors"

    def _write_state(self, extra: dict[str, Any]) -> None:
        atomic_write_json(
            self.state_file,
            {"version": STATE_VERSION, "completed": self.completed, "global_epochs": self.global_epochs,
             "fingerprint": self.fingerprint, "extra": extra},
        )

    def save_block(self, index: int, block_tensors: dict[str, torch.Tensor], hidden: torch.Tensor,
                   extra: dict[str, Any], teacher_hidden: torch.Tensor | None = None) -> None:
        """Record block ``index`` as finished; ``hidden`` (and the unquantized model's ``teacher_hidden``) feed block ``index + 1``."""
        atomic_save_tensors(block_tensors, self.block_file(index))
        feed = {"hidden": hidden} if teacher_hidden is None else {"hidden": hidden, "teacher": teacher_hidden}
        atomic_save_tensors(feed, self.hidden_file(index))
        self.completed = index + 1
        self._write_state(extra)
        old = self.hidden_file(index - 1)
        if index > 0 and old.exists():
            old.unlink()

    def load_block(self, index: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.block_file(index)))

    def load_hidden(self, index: int, key: str = "hidden") -> torch.Tensor:
        """The hidden states saved after block ``index``; ``key="teacher"`` for the unquantized model's."""
        return load_file(str(self.hidden_file(index)))[key]

    @property
    def teacher_file(self) -> Path:
        return self.dir / "teacher.safetensors"

    def save_teacher(self, teacher: torch.Tensor) -> None:
        """The unquantized model's final hidden states, recorded before any block changes."""
        atomic_save_tensors({"teacher": teacher}, self.teacher_file)

    def load_teacher(self) -> torch.Tensor | None:
        return load_file(str(self.teacher_file))["teacher"] if self.teacher_file.is_file() else None

    def global_file(self, epoch: int) -> Path:
        return self.dir / f"global-{epoch:04d}.safetensors"

    def save_global(self, epoch: int, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        """Record global fine-tuning epoch ``epoch`` as finished (parameters and Adam moments in ``tensors``)."""
        atomic_save_tensors(tensors, self.global_file(epoch))
        self.global_epochs = epoch + 1
        self._write_state(extra)
        old = self.global_file(epoch - 1)
        if epoch > 0 and old.exists():
            old.unlink()

    def load_global(self) -> dict[str, torch.Tensor] | None:
        """The record of the last finished global epoch, or None before the first."""
        if not self.global_epochs:
            return None
        return load_file(str(self.global_file(self.global_epochs - 1)))

    def extra(self) -> dict[str, Any]:
        if not self.exists():
            return {}
        return json.loads(self.state_file.read_text()).get("extra", {})

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
