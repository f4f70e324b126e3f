"""On-disk cache of generated data sets: one `.npz` per call, keyed by all arguments.

Files live in `$FPX_DATA_DIR` (default `~/.cache/fpx`), named
`<name>-<hash>.npz` where the hash covers the generator's name, every argument that changes
the data and `FORMAT_VERSION` (bumped whenever a generator's output changes). Files are
written to a temporary file in the same directory and moved into place with `os.replace`,
so a reader never sees a half-written file; an unreadable or mismatched file is
regenerated (with a warning) and overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable

import numpy as np

FORMAT_VERSION = 1


def data_dir() -> pathlib.Path:
    """The cache directory of `fpx.data`: `$FPX_DATA_DIR` if set (and non-empty), else `~/.cache/fpx`.

    Read at every call, so changing the environment variable takes effect at once.

    ```python
    import os
    import pathlib
    import fpx.data

    expected = os.environ.get("FPX_DATA_DIR") or pathlib.Path.home() / ".cache" / "fpx"
    assert fpx.data.data_dir() == pathlib.Path(expected).expanduser()
    ```
    """
    root = os.environ.get("FPX_DATA_DIR")
    return pathlib.Path(root).expanduser() if root else pathlib.Path.home() / ".cache" / "fpx"


def _key(name: str, args: dict) -> str:
    return json.dumps({"name": name, "version": FORMAT_VERSION, "args": args}, sort_keys=True)


def cache_path(name: str, args: dict) -> pathlib.Path:
    """Where `name(**args)` is cached."""
    digest = hashlib.sha256(_key(name, args).encode()).hexdigest()[:20]
    return data_dir() / f"{name}-{digest}.npz"


def _load(path: pathlib.Path, key: str) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        # Opened here, not by np.load: np.load leaks its own handle when the file is not a zip.
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        if str(arrays.pop("__key__")) != key:
            raise ValueError("the file was written for other arguments")
        return arrays
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        warnings.warn(f"fpx.data: cache file {path} is unreadable ({e}); regenerating it.", RuntimeWarning, stacklevel=4)
        return None


def _save(path: pathlib.Path, key: str, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".npz.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, __key__=np.asarray(key), **arrays)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def cached(
    name: str, args: dict, generate: Callable[[], dict[str, np.ndarray]], cache: bool
) -> dict[str, np.ndarray]:
    """`generate()`, read from / written to the cache unless `cache` is False.

    `args` must be JSON-serialisable and hold every argument that changes the result
    (normalised: floats as floats, ints as ints), and nothing that does not (progress bars).
    """
    if not cache:
        return generate()
    key = _key(name, args)
    path = cache_path(name, args)
    arrays = _load(path, key)
    if arrays is None:
        arrays = generate()
        try:
            _save(path, key, arrays)
        except OSError as e:  # a read-only or full disk must not lose the generated data
            print(f"fpx.data: could not write the cache file {path} ({e}).", file=sys.stderr)
    return arrays
