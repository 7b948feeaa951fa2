"""The model repository as the server sees it over time: what to load at start-up, and rescans that load,
swap and unload versions while serving.

A rescan (on SIGHUP, or every --poll-seconds) compares the repository with what the engine serves, per model,
from its highest version down, until keep_versions versions are ready:
- a version already served whose files are unchanged stays;
- a new or changed version is verified (sha256 of every artifact), loaded and warmed up with one run, off the
  event loop, next to the versions serving;
- a version that fails is refused, logged, counted (on_failure) and recorded as FAILED with its error, and
  the next lower version is tried; the same broken files are not retried until they change;
- then the engine swaps the model's versions in one step (Engine.set_versions): the highest ready version is
  the default, and every other loaded version is retired once its in-flight requests are done.
A model whose folder is gone is removed the same way. A repository that cannot be read, or holds no models at
all, changes nothing: that is far likelier a mount or a mistake than a wish to serve nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from export.manifest import ManifestError, VersionFolder, scan_repository
from server.core.engine import Engine, EngineSettings, FailedVersion
from server.core.runtime import CUDA, ModelRuntime, load_version

logger = logging.getLogger(__name__)

FailureHook = Callable[[str, int, str], None]
"""Told (model, version, error) of every version a rescan refuses."""


def fingerprint(folder: Path) -> str:
    """A digest of the names, sizes and modification times of a version folder's files: a re-export or an
    edited file changes it; reading the files does not. Empty if the folder is gone."""
    digest = hashlib.sha256()
    try:
        entries = sorted(entry for entry in folder.iterdir() if entry.is_file())
        for entry in entries:
            stat = entry.stat()
            digest.update(f"{entry.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    except OSError:
        return ""
    return digest.hexdigest()


def _load(source: VersionFolder, device: str, run_threads: int) -> ModelRuntime:
    mark = fingerprint(source.path)  # before loading: a change while it loads is seen by the next rescan
    model = load_version(source, device, run_threads)
    model.fingerprint = mark
    return model


def load_initial(repository: Path, settings: EngineSettings) -> dict[str, list[ModelRuntime]]:
    """The newest settings.keep_versions versions of every model, loaded and warmed up (blocking); at start-up a
    version that fails stops the server (ManifestError naming it), as a bad model always has."""
    scanned = scan_repository(repository)
    if not scanned:
        raise ManifestError(
            f"{repository}: no models (expected <name>/<version>/manifest.json folders); run charrnn-export first"
        )
    device = settings.device
    loaded: dict[str, list[ModelRuntime]] = {}
    for name, versions in scanned.items():
        for source in reversed(versions[-settings.keep_versions :]):
            model = _load(source, device, settings.run_threads)
            loaded.setdefault(name, []).append(model)
            if device == "auto" and model.provider != CUDA:
                device = "cpu"  # CUDA could not start for this model: do not retry (and log) it for every other one
    return loaded


@dataclass(slots=True)
class RescanReport:
    """What one rescan changed: (model, version) pairs loaded, retired and refused."""

    loaded: list[tuple[str, int]] = field(default_factory=list)
    retired: list[tuple[str, int]] = field(default_factory=list)
    failed: list[tuple[str, int, str]] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the log."""
        def pairs(items: list[tuple[str, int]]) -> str:
            return ", ".join(f"{name} v{version}" for name, version in items) or "none"

        failed = ", ".join(f"{name} v{version}" for name, version, _ in self.failed) or "none"
        return f"loaded {pairs(self.loaded)}; unloading {pairs(self.retired)}; refused {failed}"


class RepositoryWatcher:
    """Rescans a repository into an engine (see the module doc); rescans never overlap."""

    def __init__(
        self, repository: Path, engine: Engine, settings: EngineSettings, on_failure: FailureHook | None = None
    ) -> None:
        self.repository = repository
        self.engine = engine
        self.settings = settings
        self.on_failure = on_failure
        self._lock = asyncio.Lock()

    async def rescan(self) -> RescanReport:
        """Bring the engine in line with the repository; raises ManifestError (changing nothing) if the
        repository cannot be read or holds no models."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            scanned = await loop.run_in_executor(None, scan_repository, self.repository)
            if not scanned:
                raise ManifestError(f"{self.repository}: no models found; keeping the loaded ones")
            report = RescanReport()
            for name in sorted(set(scanned) | self.engine.names()):
                await self._reconcile(name, scanned.get(name, []), report)
            logger.info("repository rescan: %s", report.summary())
            return report

    async def _reconcile(self, name: str, versions: list[VersionFolder], report: RescanReport) -> None:
        loop = asyncio.get_running_loop()
        served = self.engine.served_versions(name)
        failed_before = self.engine.failed_versions(name)
        marks = await loop.run_in_executor(None, lambda: [fingerprint(source.path) for source in versions])
        keep: list[int] = []
        new: list[ModelRuntime] = []
        failed: dict[int, FailedVersion] = {}
        for source, mark in reversed(list(zip(versions, marks, strict=True))):
            if len(keep) + len(new) >= self.settings.keep_versions:
                break
            version = source.version
            current = served.get(version)
            if current is not None and current.fingerprint == mark:
                keep.append(version)
                if version in failed_before:  # a refused reload of a version that still serves
                    failed[version] = failed_before[version]
                continue
            previous = failed_before.get(version)
            if previous is not None and previous.fingerprint == mark:
                failed[version] = previous  # the same broken files: not retried (nor logged) again
                if current is not None:
                    keep.append(version)
                continue
            try:
                model = await loop.run_in_executor(None, _load, source, self.settings.device, self.settings.run_threads)
            except Exception as error:  # noqa: BLE001 - any failure to load refuses this version, nothing more
                message = str(error) or type(error).__name__
                logger.error("%s version %d refused: %s", name, version, message)
                failed[version] = FailedVersion(version, message, mark)
                report.failed.append((name, version, message))
                if self.on_failure is not None:
                    self.on_failure(name, version, message)
                if current is not None:
                    keep.append(version)  # its files changed and are broken: the loaded copy keeps serving
                continue
            new.append(model)
            report.loaded.append((name, version))
        retired = self.engine.set_versions(name, keep, new, failed)
        report.retired.extend((name, version) for version in retired if version not in {m.version for m in new})
        default = self.engine.models.get(name)
        if new:
            logger.info(
                "%s: serving version(s) %s, default %s [%s]", name, ", ".join(map(str, sorted(self.engine.served_versions(name)))),
                default.version if default else "none", default.provider if default else "-",
            )
