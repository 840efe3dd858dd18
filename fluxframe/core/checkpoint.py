"""Model weights from safetensors checkpoints, read tensor by tensor, into modules built on the meta device.

``resolve_weight_files`` turns a diffusers component folder (sharded with an index, or not) or one file
into the safetensors files to read (``check_weight_files`` also refuses a truncated one, from its header
alone); ``SafetensorsCheckpoint`` is a lazy view of their tensors;
``load_into`` fills a module from it tensor by tensor, after checking names and shapes from the headers
alone; ``save_sharded`` writes the diffusers layout. Pickled checkpoints are refused outright.

Every failure is a ``CheckpointError`` naming the file and, where known, the key.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fluxframe.core import files
from fluxframe.errors import CheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_INDEX_SUFFIX = ".safetensors.index.json"
_MAX_HEADER = 100_000_000  # safetensors' own limit
_ST_DTYPES = {  # safetensors dtype names read directly (little-endian, as the format and x86/ARM hosts are)
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}

Source = str | tuple[tuple[str, ...], Callable[[list[torch.Tensor]], torch.Tensor]]
"""A model key is filled from one checkpoint key, or from several combined by a function (e.g. q, k, v cat)."""


def _refuse_pickle(path: Path) -> None:
    if path.name.lower().endswith(PICKLE_SUFFIXES):
        raise CheckpointError(
            "pickled checkpoints are refused: unpickling can run arbitrary code. Convert it to safetensors "
            "in a trusted environment, e.g. safetensors.torch.save_file(torch.load(f, weights_only=True), "
            "'model.safetensors')",
            file=str(path),
        )


def _files_from_index(index: Path) -> list[Path]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError covers JSONDecodeError and UnicodeDecodeError
        raise CheckpointError(f"unreadable index: {e}", file=str(index)) from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError('index has no "weight_map" (a non-empty object: key -> shard file)', file=str(index))
    first_key: dict[str, str] = {}  # shard -> first key mapped to it, to name in the error
    for key, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(f"weight_map value {shard!r} is not a file name", file=str(index), key=key)
        first_key.setdefault(shard, key)
    files = []
    for shard, key in first_key.items():
        path = index.parent / shard
        if not path.is_file():
            raise CheckpointError(f"shard listed in {index.name} does not exist", file=str(path), key=key)
        _refuse_pickle(path)
        files.append(path)
    return sorted(files)


def resolve_weight_files(path: str | Path) -> list[Path]:
    """A diffusers component folder (e.g. ``transformer/``), one weights file or an index file -> the
    safetensors files to read. An index (``*.safetensors.index.json``) in the folder is authoritative;
    without one, every ``*.safetensors`` in the folder is read. Files of any other non-pickle suffix
    (e.g. ``.sft``) are accepted and judged by their header."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError("does not exist", file=str(path))
    if path.is_file():
        _refuse_pickle(path)
        return _files_from_index(path) if path.name.endswith(_INDEX_SUFFIX) else [path]
    try:
        entries = sorted(p for p in path.iterdir() if p.is_file())
    except OSError as e:
        raise CheckpointError(f"cannot list the folder: {e}", file=str(path)) from e
    indexes = [p for p in entries if p.name.endswith(_INDEX_SUFFIX)]
    if len(indexes) > 1:  # e.g. a diffusers fp16 variant next to the full weights
        names = ", ".join(p.name for p in indexes)
        raise CheckpointError(f"several weight indexes ({names}); pass the one to use", file=str(path))
    if indexes:
        return _files_from_index(indexes[0])
    files = [p for p in entries if p.name.endswith(".safetensors")]
    if files:
        return files
    for p in entries:
        _refuse_pickle(p)  # a folder of pickles gets the conversion hint, not just "nothing found"
    raise CheckpointError("no .safetensors weights", file=str(path))


def check_weight_files(path: str | Path) -> list[Path]:
    """``resolve_weight_files(path)``, each file's header read and every tensor's data checked to lie within
    the file: a truncated file (or shard of an index) is refused, naming it, without reading any tensor data.
    Reads only the headers, so it is cheap enough for every ``config check`` and start-up."""
    files = resolve_weight_files(path)
    for file in files:
        try:
            with open(file, "rb") as fh:
                _read_header(fh, file)
        except OSError as e:
            raise CheckpointError(f"cannot read: {e}", file=str(file)) from e
    return files


def _read_header(fh: Any, file: Path) -> tuple[dict[str, Any], int]:
    """(header JSON, byte offset of the data section). Our own parse, ahead of safetensors', so a truncated
    file is reported with the first tensor it cuts into, and get() can re-check sizes later."""
    size = os.fstat(fh.fileno()).st_size
    head = fh.read(8)
    if len(head) < 8:
        raise CheckpointError(f"only {size} bytes: empty or truncated, not a safetensors file", file=str(file))
    n = int.from_bytes(head, "little")
    if n > min(size - 8, _MAX_HEADER):  # the cap keeps a garbage length from reading gigabytes
        raise CheckpointError(
            f"header claims {n} bytes but the file has {size}: truncated, or not a safetensors file", file=str(file)
        )
    try:
        header = json.loads(fh.read(n))
    except ValueError as e:
        raise CheckpointError(
            f"header is not valid JSON ({e}): corrupt, or not a safetensors file", file=str(file)
        ) from e
    if not isinstance(header, dict):
        raise CheckpointError("header is not a JSON object: corrupt, or not a safetensors file", file=str(file))
    start = 8 + n
    ends = sorted((_end(entry), key) for key, entry in header.items() if key != "__metadata__" and _end(entry) >= 0)
    for end, key in ends:
        if start + end > size:
            raise CheckpointError(
                f"file is truncated: this tensor's data ends at byte {start + end}, the file has {size} bytes",
                file=str(file),
                key=key,
            )
    return header, start


def _end(entry: Any) -> int:
    try:
        return int(entry["data_offsets"][1])
    except (TypeError, KeyError, IndexError, ValueError):
        return -1  # malformed entry: safe_open reports it


class SafetensorsCheckpoint:
    """Lazy view of the tensors in one or more safetensors files.

    Names, shapes and dtypes come from the headers; tensor data is read only by ``get``, one tensor at a
    time into memory of its own (never a view of the file, so the page cache is not counted in RSS twice).
    """

    def __init__(self, files: list[Path]):
        if not files:
            raise CheckpointError("no checkpoint files given")
        files = [Path(f) for f in files]
        self.path = files[0] if len(files) == 1 else files[0].parent  # what messages name for the whole
        self._files: list[tuple[Path, Any, Any, int]] = []  # (file, safe_open handle, raw handle, data start)
        self._where: dict[str, tuple[int, dict[str, Any]]] = {}  # key -> (file index, header entry)
        self._metadata: dict[str, str] = {}
        try:
            for file in files:
                self._add(file)
        except BaseException:
            self.close()
            raise

    def _add(self, file: Path) -> None:
        _refuse_pickle(file)
        try:
            fh = open(file, "rb")  # noqa: SIM115 - held open for fstat in get(), closed in close()
        except FileNotFoundError as e:
            raise CheckpointError("does not exist", file=str(file)) from e
        except OSError as e:
            raise CheckpointError(f"cannot open: {e}", file=str(file)) from e
        self._files.append((file, None, fh, 0))
        try:
            header, start = _read_header(fh, file)
        except OSError as e:
            raise CheckpointError(f"cannot read: {e}", file=str(file)) from e
        try:
            handle = safe_open(str(file), framework="pt")
        except Exception as e:  # SafetensorError (a plain Exception subclass) or OSError
            raise CheckpointError(f"not a valid safetensors file: {e}", file=str(file)) from e
        i = len(self._files) - 1
        self._files[i] = (file, handle, fh, start)
        for key, value in (header.pop("__metadata__", None) or {}).items():
            self._metadata.setdefault(key, value)
        for key, entry in header.items():
            if key in self._where:
                other = self._files[self._where[key][0]][0]
                raise CheckpointError(f"the same tensor is also in {other}", file=str(file), key=key)
            self._where[key] = (i, entry)

    @classmethod
    def open(cls, path: str | Path) -> SafetensorsCheckpoint:
        """The checkpoint of a component folder or file (see ``resolve_weight_files``)."""
        checkpoint = cls(resolve_weight_files(path))
        checkpoint.path = Path(path).expanduser()
        return checkpoint

    def keys(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def _entry(self, key: str) -> tuple[int, dict[str, Any]]:
        try:
            return self._where[key]
        except KeyError:
            raise CheckpointError("not in the checkpoint", file=str(self.path), key=key) from None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entry(key)[1]["shape"])

    def dtype(self, key: str) -> str:
        return self._entry(key)[1]["dtype"]

    def file_of(self, key: str) -> Path:
        return self._files[self._entry(key)[0]][0]

    def get(self, key: str) -> torch.Tensor:
        i, entry = self._entry(key)
        file, handle, fh, start = self._files[i]
        if handle is None:
            raise CheckpointError("checkpoint is closed", file=str(file), key=key)
        # Past the end of a file truncated since it was opened, a read comes up short (and the mmap of
        # the fallback would be SIGBUS, the process dies), so check first.
        end, size = start + entry["data_offsets"][1], os.fstat(fh.fileno()).st_size
        if size < end:
            raise CheckpointError(
                f"file was truncated after it was opened: this tensor's data ends at byte {end}, "
                f"the file now has {size} bytes",
                file=str(file),
                key=key,
            )
        dtype = _ST_DTYPES.get(entry.get("dtype"))
        try:
            if dtype is None:  # a dtype we do not map: safetensors' own reader, copied off its mmap
                return handle.get_tensor(key).clone()
            # Read into memory the tensor owns, not a view of safetensors' mmap: a loaded model must not
            # depend on a file that can change or vanish, and touched mmap pages would stay resident
            # (counted in RSS) until the checkpoint is closed, next to the copies made from them.
            begin = start + entry["data_offsets"][0]
            tensor = torch.empty(end - begin, dtype=torch.uint8)
            if end > begin:
                view, done = memoryview(tensor.numpy()), 0
                while done < end - begin:
                    n = os.preadv(fh.fileno(), [view[done:]], begin + done)
                    if n <= 0:
                        raise OSError(f"short read at byte {begin + done}")
                    done += n
            return tensor.view(dtype).reshape(entry["shape"])
        except Exception as e:
            raise CheckpointError(f"cannot read the tensor: {e}", file=str(file), key=key) from e

    def metadata(self) -> dict[str, str]:
        """``__metadata__`` of all files merged; the first file wins where they disagree."""
        return dict(self._metadata)

    def close(self) -> None:
        for i, (file, handle, fh, start) in enumerate(self._files):
            if handle is not None:
                handle.__exit__(None, None, None)
            fh.close()
            self._files[i] = (file, None, fh, start)

    def __enter__(self) -> SafetensorsCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _split_source(model_key: str, source: Source) -> tuple[tuple[str, ...], Callable | None]:
    if isinstance(source, str):
        return (source,), None
    if (
        isinstance(source, tuple)
        and len(source) == 2
        and isinstance(source[0], tuple)
        and source[0]
        and all(isinstance(k, str) for k in source[0])
        and callable(source[1])
    ):
        return source[0], source[1]
    raise TypeError(f"key_map[{model_key!r}] must be a key or ((keys, ...), combine), not {source!r}")


def _shape(shape: tuple[int, ...] | torch.Size) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def _quoted(keys: list[str], limit: int = 5) -> str:
    return ", ".join(repr(k) for k in keys[:limit]) + (", ..." if len(keys) > limit else "")


class _Plan(NamedTuple):
    """How one model tensor is filled: the model keys sharing it, the key whose sources the checkpoint has, those
    checkpoint keys, and the function combining them (None: one key, used as it is)."""

    group: list[str]
    key: str
    sources: tuple[str, ...]
    fn: Callable | None


_Slots = dict[str, tuple[torch.nn.Module, str, bool]]  # model key -> (owning submodule, attribute, is parameter)


def _model_tensors(module: torch.nn.Module) -> tuple[_Slots, list[list[str]], dict[str, torch.Tensor]]:
    """Phase 1: what there is to fill. (slots, the model keys grouped by tensor identity, each key's tensor as
    built). Grouping by identity means a shared parameter is read once and stays shared; non-persistent buffers
    are not in checkpoints, so they are left out."""
    slots: _Slots = {}
    groups: dict[int, list[str]] = {}
    expected: dict[str, torch.Tensor] = {}
    for prefix, sub in module.named_modules(remove_duplicate=False):
        owned = [(n, t, True) for n, t in sub._parameters.items()]
        owned += [(n, t, False) for n, t in sub._buffers.items() if n not in sub._non_persistent_buffers_set]
        for name, tensor, is_param in owned:
            if tensor is None:
                continue
            key = f"{prefix}.{name}" if prefix else name
            slots[key] = (sub, name, is_param)
            groups.setdefault(id(tensor), []).append(key)
            expected[key] = tensor
    return slots, list(groups.values()), expected


def _plan_sources(groups: list[list[str]], key_map: Mapping[str, Source], checkpoint: SafetensorsCheckpoint
                  ) -> tuple[list[_Plan], list[tuple[str, str]], set[str]]:
    """Phase 2: for each group, the first of its keys whose sources the checkpoint has. Returns (plans, missing
    as (model key, absent checkpoint key), every checkpoint key some model key names)."""
    plans: list[_Plan] = []
    missing: list[tuple[str, str]] = []
    used: set[str] = set()
    for group in groups:
        chosen = None
        for key in group:
            sources, fn = _split_source(key, key_map.get(key, key))
            used.update(sources)
            if chosen is None and all(s in checkpoint for s in sources):
                chosen = _Plan(group, key, sources, fn)
        if chosen is None:
            sources, _ = _split_source(group[0], key_map.get(group[0], group[0]))
            missing.append((group[0], next(s for s in sources if s not in checkpoint)))
        else:
            plans.append(chosen)
    return plans, missing, used


def _check_headers(checkpoint: SafetensorsCheckpoint, plans: list[_Plan], missing: list[tuple[str, str]],
                   used: set[str], expected: dict[str, torch.Tensor], *, what: str, total: int) -> None:
    """Phase 3, before any tensor data is read: every model tensor has its sources, every checkpoint tensor is
    used, and each plain source has the model's shape (combined ones are checked once combined)."""
    if missing:
        shown = [repr(s) + (f" (for {m!r})" if s != m else "") for m, s in missing[:5]]
        raise CheckpointError(
            f"{len(missing)} of the {what}'s {total} tensors are missing from the checkpoint: "
            + ", ".join(shown)
            + (", ..." if len(missing) > 5 else "")
            + "; is this the right checkpoint for this model?",
            file=str(checkpoint.path),
            key=missing[0][1],
        )
    unexpected = [k for k in checkpoint.keys() if k not in used]
    if unexpected:
        raise CheckpointError(
            f"{len(unexpected)} of the checkpoint's {len(checkpoint)} tensors are not used by the {what}: "
            f"{_quoted(unexpected)}; "
            "a different model variant, or a key_map entry missing?",
            file=str(checkpoint.file_of(unexpected[0])),
            key=unexpected[0],
        )
    for _, key, sources, fn in plans:
        want = tuple(expected[key].shape)
        if fn is None and checkpoint.shape(sources[0]) != want:
            raise CheckpointError(
                f"shape {_shape(checkpoint.shape(sources[0]))} in the checkpoint, the {what} expects "
                f"{_shape(want)}" + (f" (for {key!r})" if sources[0] != key else ""),
                file=str(checkpoint.file_of(sources[0])),
                key=sources[0],
            )


def _read_tensor(checkpoint: SafetensorsCheckpoint, plan: _Plan, want: torch.Size, *, what: str) -> torch.Tensor:
    """Phase 4a: one model tensor's data, read (and combined, then checked to have the shape ``want``)."""
    _, key, sources, fn = plan
    if fn is None:
        return checkpoint.get(sources[0])
    parts = [checkpoint.get(s) for s in sources]
    try:
        tensor = fn(parts)
    except Exception as e:
        raise CheckpointError(
            f"combining {_quoted(list(sources))} for {key!r} failed: {e}",
            file=str(checkpoint.file_of(sources[0])),
            key=sources[0],
        ) from e
    del parts
    if tuple(tensor.shape) != tuple(want):
        raise CheckpointError(
            f"shape {_shape(tensor.shape)} after combining {_quoted(list(sources))}, the {what} "
            f"expects {_shape(want)} for {key!r}",
            file=str(checkpoint.file_of(sources[0])),
            key=sources[0],
        )
    return tensor


def _put_in_place(tensor: torch.Tensor, plan: _Plan, slots: _Slots, *, dtype: torch.dtype | None,
                  device: torch.device | str) -> None:
    """Phase 4b: cast and move one tensor and set it under every key of its group (a parameter stays a
    parameter, trainable only where the one it replaces was)."""
    cast = dtype if dtype is not None and tensor.is_floating_point() else None
    tensor = tensor.to(device=device, dtype=cast)
    sub, name, is_param = slots[plan.key]
    if is_param:
        old = sub._parameters[name]
        tensor = torch.nn.Parameter(tensor, requires_grad=bool(old.requires_grad) and tensor.is_floating_point())
    for k in plan.group:
        sub, name, is_param = slots[k]
        (sub._parameters if is_param else sub._buffers)[name] = tensor


def _announce(plan: _Plan, slots: _Slots, on_loaded: Callable[[str], None] | None) -> None:
    """Phase 4c: forget the group's slots (not to keep a submodule alive that the hook may replace, as quantize
    does) and call ``on_loaded`` with each of its keys."""
    for k in plan.group:
        del slots[k]
        if on_loaded is not None:
            on_loaded(k)


def load_into(
    module: torch.nn.Module,
    checkpoint: SafetensorsCheckpoint,
    *,
    key_map: Mapping[str, Source] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    what: str = "model",
    on_loaded: Callable[[str], None] | None = None,
) -> None:
    """Fill every parameter and persistent buffer of ``module`` (typically built under
    ``with torch.device('meta')``) from ``checkpoint``, replacing the tensors in place.

    ``key_map`` maps model state_dict keys to sources; keys absent from it map to themselves, and entries
    for keys the module lacks are ignored (their checkpoint keys then show up as unexpected).
    Before any data is read, the headers must show that every model key has its sources, that every
    checkpoint key is used, and that plain sources have the model's shape; combined sources are
    shape-checked after combining, so a bad one can leave the module partly loaded.
    Floating tensors are cast to ``dtype`` if given (otherwise they keep the checkpoint's dtype);
    integer ones (e.g. ``num_batches_tracked``) always keep theirs. Only one checkpoint tensor (plus its
    parts, for a combined source) is alive beyond the module's own at any time.
    Parameters shared between submodules stay shared, and are filled from whichever of their names the
    checkpoint has. Non-persistent buffers are not in checkpoints and are left untouched: if the module
    was built on meta, the caller (or the module) must recompute them on ``device``.
    ``what`` names the component in messages ("transformer", "vae"). ``on_loaded``, if given, is called with
    each model key as soon as its tensor is in place (a memory strategy's ``while_loading`` hook).
    """
    slots, groups, expected = _model_tensors(module)
    plans, missing, used = _plan_sources(groups, key_map or {}, checkpoint)
    _check_headers(checkpoint, plans, missing, used, expected, what=what, total=len(groups))
    for plan in plans:  # one tensor at a time, held by no name here, so the module's copy is its only one
        _put_in_place(_read_tensor(checkpoint, plan, expected[plan.key].shape, what=what), plan, slots,
                      dtype=dtype, device=device)
        _announce(plan, slots, on_loaded)  # after the call above let go of the tensor as read


def build_and_load(build: Callable[[], torch.nn.Module], checkpoint: SafetensorsCheckpoint, *, what: str,
                   memory: Any = None, **options: Any) -> Any:
    """``build()`` on the meta device, then filled from ``checkpoint`` by ``load_into`` (``options``: key_map,
    dtype, device); ``memory``'s ``while_loading`` hook, if it has one for component ``what``, sees every key as
    its tensor lands. Returns the module in eval mode, without gradients."""
    with torch.device("meta"):
        model = build()
    on_loaded = memory.while_loading(what, model) if memory is not None else None
    load_into(model, checkpoint, what=what, on_loaded=on_loaded, **options)
    return model.eval().requires_grad_(False)


def save_sharded(
    state_dict: dict[str, torch.Tensor],
    folder: Path,
    *,
    base_name: str = "diffusion_pytorch_model",
    max_shard_bytes: int | None = None,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write ``state_dict`` in the diffusers/transformers layout: one ``<base_name>.safetensors``, or shards
    ``<base_name>-00001-of-0000N.safetensors`` plus ``<base_name>.safetensors.index.json`` when
    ``max_shard_bytes`` splits it. Each write is atomic; files of an earlier save under the same
    ``base_name`` that this one does not rewrite are removed, so a stale index cannot win. Returns the
    weight files written."""
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"cannot save a {type(tensor).__name__}, only tensors", key=key)
        if tensor.is_meta:
            raise CheckpointError("cannot save a meta tensor: it has no data", key=key)
        tensor = tensor.detach().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if tensor.numel() and ptr in seen:  # safetensors refuses tensors sharing memory (tied weights, views)
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        tensors[key] = tensor

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        n = tensor.numel() * tensor.element_size()
        if max_shard_bytes is not None and shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += n
    count = len(shards)
    names = (
        [f"{base_name}.safetensors"]
        if count == 1
        else [f"{base_name}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    )
    file_metadata = {"format": "pt", **(metadata or {})}  # transformers refuses files without "format"

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create the folder: {e}", file=str(folder)) from e
    written = []
    for name, shard in zip(names, shards):
        written.append(atomic_write(folder / name, lambda tmp, shard=shard: save_file(shard, tmp, file_metadata)))
    keep = set(written)
    if count > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {key: name for name, shard in zip(names, shards) for key in shard},
        }
        text = json.dumps(index, indent=2) + "\n"
        keep.add(atomic_write(folder / f"{base_name}{_INDEX_SUFFIX}", lambda tmp: Path(tmp).write_text(text)))
    stale = re.compile(re.escape(base_name) + r"(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")
    for path in folder.iterdir():
        if stale.fullmatch(path.name) and path not in keep:
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                raise CheckpointError(f"cannot remove a file of an earlier save: {e}", file=str(path)) from e
    return written


def atomic_write(path: Path, write: Callable[[str], object]) -> Path:
    """fluxframe.core.files.atomic_write for weights: a failure is a CheckpointError naming the file."""
    try:
        return files.atomic_write(path, lambda tmp: write(str(tmp)))
    except Exception as e:
        raise CheckpointError(f"cannot write: {e}", file=str(path)) from e


def fingerprint(*paths: Path) -> str:
    """A stable identity of a checkpoint: sha256 over the components' config.json files and each weight
    file's safetensors header and size, for component folders or single files, in the order given.

    Hashing every byte of a 60 GB checkpoint on each start is not affordable; the header pins every
    tensor's name, dtype, shape and offset, and the size pins the data length.
    """
    digest = hashlib.sha256()
    for item in map(Path, paths):
        if item.is_dir() and (item / "config.json").exists():
            digest.update((item / "config.json").read_bytes())
        for file in resolve_weight_files(item):
            with open(file, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                digest.update(fh.read(min(n, 100_000_000)))
            digest.update(str(file.stat().st_size).encode())
    return "sha256:" + digest.hexdigest()
