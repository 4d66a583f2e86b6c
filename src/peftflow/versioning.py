"""Code and data versions: the git commit, and DVC for the pipeline's data stages.

DVC owns the data graph (``base_model`` -> ``prepare`` in ``dvc.yaml``): the flows call
:func:`repro`, which runs a stage only when its deps or params changed, and restores its outputs
from the DVC cache when they are cached but missing, so nothing DVC already has is recomputed.
:func:`restore` materializes an older data version from the cache or the remote by its hash,
for ``reproduce``.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml

log = logging.getLogger(__name__)


class VersioningError(RuntimeError):
    """A git or DVC step failed; the message says which and why, in one line."""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def git_commit(root: Path) -> str | None:
    """HEAD's commit in the project at ``root``, or None outside a git repository."""
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def git_dirty(root: Path) -> bool:
    """True if tracked files differ from HEAD (the commit alone does not describe the code).

    DVC's bookkeeping is left out: dvc.lock, ``.dvc`` files and ``.gitignore`` files, which ``dvc
    repro`` and ``dvc add`` (of ``peftflow predict``'s output) rewrite; runs record their data's
    hashes themselves."""
    out = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!dvc.lock", ":!*.dvc", ":!*.gitignore"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    return out.returncode == 0 and bool(out.stdout.strip())


def check_project(root: Path) -> None:
    """A flow's project: a git work tree with DVC initialized (what ``dvc repro`` and the runs'
    ``git.commit`` tags need), named in one line before any flow run starts."""
    root = Path(root)
    if not root.is_dir():
        raise VersioningError(f"{root}: no such project folder (--root)")
    inside = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=root, capture_output=True, text=True)
    if inside.stdout.strip() != "true":
        raise VersioningError(
            f"{root}: not a git repository; a peftflow project versions its code with git and its data with DVC "
            f"(`git init && dvc init`, then commit params/ and dvc.yaml)"
        )
    if not (root / ".dvc").is_dir():
        raise VersioningError(f"{root}: not a DVC project (no .dvc folder); run `dvc init` there")


@contextlib.contextmanager
def _repo(root: Path) -> Iterator:
    """The project's DVC repo, with the cwd at its root while in use: DVC resolves targets and
    output paths against the cwd, as its command line does (so calls must not run concurrently)."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    with contextlib.chdir(root):
        try:
            repo = Repo(".")
        except NotDvcRepoError:
            raise VersioningError(f"{root}: not a DVC project (no .dvc folder); run `dvc init` there") from None
        with repo:
            yield repo


def repro(root: Path, targets: list[str]) -> list[str]:
    """``dvc repro`` the targets; the names of the stages that actually ran (empty: all cached).
    In a fresh clone that lacks a stage's input (the raw data is not in git), a stage that is
    otherwise unchanged is skipped (``--allow-missing``) instead of failing: its outputs come from
    the remote (``dvc pull``). Not ``--pull``: it counts an uncached output (``base_model``'s) as
    pulled without rebuilding it."""
    from dvc.exceptions import DvcException

    with _repo(root) as repo:
        try:
            stages = [s for t in targets for s in repo.stage.collect(t, with_deps=True)]
            absent = any(not dep.exists for s in stages for dep in s.deps)
            stages = repo.reproduce(targets=targets, allow_missing=absent)
        except DvcException as e:
            raise VersioningError(f"dvc repro {' '.join(targets)}: {_one_line(e)}") from None
    return [s.addressing for s in stages]


def default_remote(root: Path) -> tuple[str, str] | None:
    """(name, url) of the project's default DVC remote, or None."""
    with _repo(root) as repo:
        name = repo.config["core"].get("remote")
        if not name:
            return None
        return name, str(repo.config["remote"][name]["url"])


def push(root: Path, targets: list[str]) -> int:
    """``dvc push`` the targets' outputs to the default remote; the number of files sent."""
    from dvc.exceptions import DvcException

    if default_remote(root) is None:
        log.warning("no default DVC remote: data stays in the local cache only (dvc remote add -d NAME URL)")
        return 0
    with _repo(root) as repo:
        try:
            return repo.push(targets=targets)
        except DvcException as e:
            raise VersioningError(f"dvc push {' '.join(targets)}: {_one_line(e)}") from None


def out_hash(root: Path, path: str) -> str:
    """The DVC hash (``<md5>.dir`` for folders) that dvc.lock records for a stage output."""
    lock = Path(root) / "dvc.lock"
    if not lock.is_file():
        raise VersioningError(f"{lock}: missing; run `dvc repro` first")
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    for stage in stages.values():
        for out in stage.get("outs", []):
            if Path(out["path"]) == Path(path) and "md5" in out:
                return out["md5"]
    raise VersioningError(f"{lock}: no stage output {path!r} with a hash")


def track(root: Path, path: Path) -> str:
    """``dvc add`` a file of the project (its ``.dvc`` file beside it, git ignoring the file); its md5."""
    from dvc.exceptions import DvcException

    rel = Path(path).resolve().relative_to(Path(root).resolve())
    with _repo(root) as repo:
        try:
            repo.add(str(rel))
        except DvcException as e:
            raise VersioningError(f"dvc add {rel}: {_one_line(e)}") from None
    return yaml.safe_load((Path(root) / f"{rel}.dvc").read_text())["outs"][0]["md5"]


def restore(root: Path, md5: str, dest: Path) -> Path:
    """Materialize the data with DVC hash ``md5`` at ``dest``, from the cache or the default remote.

    A throwaway DVC project (no git) that shares the project's cache and remote holds a one-output
    ``.dvc`` file naming the hash; ``dvc pull`` there fetches and checks it out. The project's own
    files (dvc.lock, .gitignore) are not touched.
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    dest = Path(dest).resolve()
    if dest.exists():
        raise VersioningError(f"{dest}: already exists; restore needs a new folder")
    with _repo(root) as project:
        cache_dir = project.cache.local_cache_dir
        remote = project.config["core"].get("remote")
        url = str(project.config["remote"][remote]["url"]) if remote else None
    with tempfile.TemporaryDirectory(prefix="peftflow-restore-") as tmp, contextlib.chdir(tmp):
        Repo.init(tmp, no_scm=True).close()
        with Repo(tmp) as scratch:
            with scratch.config.edit() as cfg:
                cfg["cache"]["dir"] = cache_dir
                if remote:
                    cfg["core"]["remote"] = remote
                    cfg["remote"][remote] = {"url": url}
        (Path(tmp) / "data.dvc").write_text(yaml.safe_dump({"outs": [{"md5": md5, "path": "data", "hash": "md5"}]}))
        with Repo(tmp) as scratch:
            try:
                scratch.pull(targets=[str(Path(tmp) / "data.dvc")])
            except DvcException:
                where = f"the DVC cache ({cache_dir})" + (f" or the remote {remote!r} ({url})" if remote else "")
                raise VersioningError(
                    f"data version {md5}: not found in {where}; was it pushed (dvc push) where it was made?"
                ) from None
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(Path(tmp) / "data", dest)
    return dest


def restored(root: Path, md5: str, under: Path) -> Path:
    """The data with DVC hash ``md5`` in ``under/data/<hash>`` (relative to ``root``), restored by
    :func:`restore` unless an earlier call left it there; the folder, relative to ``root``."""
    from peftflow.atomic import atomic_dir

    rel = Path(under) / "data" / md5.removesuffix(".dir")
    if not (Path(root) / rel / "manifest.json").is_file():
        log.info("restoring data version %s into %s", md5, rel)
        with atomic_dir(Path(root) / rel) as tmp:  # whole or absent, for the runs that read it
            for item in restore(root, md5, tmp / "restored").iterdir():
                shutil.move(item, tmp / item.name)
            (tmp / "restored").rmdir()
    return rel


def frozen(root: Path, src: Path, md5: str, under: Path) -> Path:
    """The prepared folder ``src`` (relative to ``root``, just reproduced: DVC hash ``md5``) as the
    copy ``under/data/<hash>`` that a flow run's steps read: a later ``dvc repro prepare`` (another
    flow, a user) rewrites ``src``, never the copy, so a run is trained, evaluated and registered on
    one data version. Made atomically, once per hash; its files read-only."""
    from peftflow.atomic import atomic_dir

    rel = Path(under) / "data" / md5.removesuffix(".dir")
    if not (Path(root) / rel / "manifest.json").is_file():
        with atomic_dir(Path(root) / rel) as tmp:
            shutil.copytree(Path(root) / src, tmp, dirs_exist_ok=True)
            for path in tmp.rglob("*"):
                if path.is_file():
                    path.chmod(0o444)
    return rel


@contextlib.contextmanager
def project_lock(root: Path, what: str, timeout: float) -> Iterator[None]:
    """The project's data lock for the block (``dvc repro``/``push`` and the frozen copy): one flow
    run at a time does them, others wait up to ``timeout`` seconds, then fail in one line naming
    who holds it (DVC's own lock would fail at once, as "failed to reproduce 'prepare'")."""
    import json
    import os
    import socket
    import time

    from filelock import FileLock, Timeout

    path = Path(root) / ".dvc" / "tmp" / "peftflow.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = path.with_suffix(".holder")
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        who = holder.read_text().strip() if holder.is_file() else "unknown"
        log.info("the project's data lock is held (%s); waiting up to %.0f s", who, timeout)
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            who = holder.read_text().strip() if holder.is_file() else "unknown"
            raise VersioningError(
                f"{path}: held for more than {timeout:.0f} s by {who}; another flow is preparing this project's "
                f"data (wait for it, or raise runner.data_lock_timeout_s)"
            ) from None
    try:
        holder.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                                      "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")  # fmt: skip
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()
