"""fluxframe.core.checkpoint: round trips into meta-built modules, and one fault test per failure mode."""

from __future__ import annotations

import itertools
import json
import os
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fluxframe.core.checkpoint import SafetensorsCheckpoint, load_into, resolve_weight_files, save_sharded
from fluxframe.errors import CheckpointError


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.norm = nn.BatchNorm1d(3)  # brings the integer buffer num_batches_tracked
        self.register_buffer("cache", torch.zeros(2), persistent=False)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = Block()
        self.b = nn.Linear(3, 2, bias=False)
        self.register_buffer("steps", torch.arange(3))


def saved_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    sd = {k: v.clone() for k, v in Net().state_dict().items()}
    for v in sd.values():
        if v.is_floating_point():
            v.normal_()
    sd["a.norm.num_batches_tracked"].fill_(7)
    return sd


def meta_net() -> Net:
    with torch.device("meta"):
        return Net()


def assert_loaded(module: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = module.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key


def header_end_key(path: Path) -> str:
    """The key whose data lies at the very end of a safetensors file."""
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    header.pop("__metadata__", None)
    return max(header, key=lambda k: header[k]["data_offsets"][1])


def assert_names(err: pytest.ExceptionInfo, file: Path | str, key: str | None = None) -> None:
    msg = str(err.value)
    assert str(file) in msg
    assert err.value.file is not None and str(file) in str(err.value.file)
    if key is not None:
        assert repr(key) in msg and err.value.key == key


# --- round trips ---------------------------------------------------------------------------------


def test_round_trip_single_file(tmp_path):
    sd = saved_state()
    files = save_sharded(sd, tmp_path, metadata={"model": "tiny"})
    assert files == [tmp_path / "diffusion_pytorch_model.safetensors"]
    module = meta_net()
    with SafetensorsCheckpoint.open(tmp_path) as ckpt:
        assert ckpt.metadata() == {"format": "pt", "model": "tiny"}
        assert ckpt.shape("a.lin.weight") == (3, 4) and ckpt.dtype("a.lin.weight") == "F32"
        assert ckpt.dtype("steps") == "I64" and len(ckpt) == len(sd) and "b.weight" in ckpt
        load_into(module, ckpt)
    assert_loaded(module, sd)
    assert not any(p.is_meta for p in module.parameters())
    assert module.a.cache.is_meta  # non-persistent buffers are the module's business


def test_round_trip_sharded_with_index(tmp_path):
    sd = saved_state()
    files = save_sharded(sd, tmp_path, max_shard_bytes=64)
    assert len(files) > 2 and files[0].name == f"diffusion_pytorch_model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(sd)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in sd.values())
    assert resolve_weight_files(tmp_path) == files
    for source in (tmp_path, tmp_path / "diffusion_pytorch_model.safetensors.index.json"):
        module = meta_net()
        with SafetensorsCheckpoint.open(source) as ckpt:
            assert {ckpt.file_of(k) for k in ckpt.keys()} == set(files)
            load_into(module, ckpt)
        assert_loaded(module, sd)


def test_resave_unsharded_removes_stale_index(tmp_path):
    save_sharded(saved_state(), tmp_path, max_shard_bytes=64)
    files = save_sharded(saved_state(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diffusion_pytorch_model.safetensors"]
    assert resolve_weight_files(tmp_path) == files


def test_cast_to_bfloat16_keeps_integer_buffers(tmp_path):
    sd = saved_state()
    save_sharded(sd, tmp_path)
    module = meta_net()
    with SafetensorsCheckpoint.open(tmp_path) as ckpt:
        load_into(module, ckpt, dtype=torch.bfloat16, device="cpu")
    assert_loaded(module, {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()})
    assert module.a.norm.num_batches_tracked.dtype == torch.int64 and module.steps.dtype == torch.int64


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 12, bias=False)
        self.proj = nn.Linear(4, 4, bias=False)


def qkv_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    sd = {k: torch.randn(4, 4) for k in ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.weight")}
    save_sharded(sd, folder)
    return sd


def test_combined_source(tmp_path):
    sd = qkv_checkpoint(tmp_path)
    key_map = {
        "qkv.weight": (("to_q.weight", "to_k.weight", "to_v.weight"), lambda ts: torch.cat(ts, dim=0)),
        "proj.weight": "to_out.weight",
    }
    with torch.device("meta"):
        module = Attention()
    with SafetensorsCheckpoint.open(tmp_path) as ckpt:
        load_into(module, ckpt, key_map=key_map)
    expected = torch.cat([sd["to_q.weight"], sd["to_k.weight"], sd["to_v.weight"]])
    assert torch.equal(module.qkv.weight, expected) and torch.equal(module.proj.weight, sd["to_out.weight"])


def test_shared_parameter_is_read_once_and_stays_shared(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(5, 3)
            self.head = nn.Linear(3, 5, bias=False)
            self.head.weight = self.embed.weight

    weight = torch.randn(5, 3)
    save_sharded({"embed.weight": weight}, tmp_path)
    with torch.device("meta"):
        module = Tied()
    with SafetensorsCheckpoint.open(tmp_path) as ckpt:
        load_into(module, ckpt)
    assert module.head.weight is module.embed.weight and torch.equal(module.embed.weight, weight)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_load_keeps_no_second_copy(tmp_path, monkeypatch, dtype):
    """Each key is read once, and when the next one is read every tensor read before is held by the
    module alone: a loader that gathers a state dict first, or keeps the uncast tensors, fails here."""
    sd = saved_state()
    save_sharded(sd, tmp_path)
    module = meta_net()
    ckpt = SafetensorsCheckpoint.open(tmp_path)
    real_get, reads = ckpt.get, []

    def get(key):
        owned = {t.untyped_storage().data_ptr() for t in itertools.chain(module.parameters(), module.buffers())}
        stray = [k for k, ref in reads if ref() is not None and ref().untyped_storage().data_ptr() not in owned]
        assert not stray, f"still alive outside the module when reading {key!r}: {stray}"
        tensor = real_get(key)
        reads.append((key, weakref.ref(tensor)))
        return tensor

    monkeypatch.setattr(ckpt, "get", get)
    load_into(module, ckpt, dtype=dtype)
    ckpt.close()
    assert sorted(k for k, _ in reads) == sorted(sd)
    assert_loaded(module, {k: v.to(dtype) if dtype and v.is_floating_point() else v for k, v in sd.items()})


# --- finding the files ---------------------------------------------------------------------------


def test_path_does_not_exist(tmp_path):
    missing = tmp_path / "transformer"
    with pytest.raises(CheckpointError, match="does not exist") as err:
        SafetensorsCheckpoint.open(missing)
    assert_names(err, missing)


def test_pickled_file_refused(tmp_path):
    path = tmp_path / "diffusion_pytorch_model.bin"
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="pickled checkpoints are refused.*safetensors") as err:
        resolve_weight_files(path)
    assert_names(err, path)
    with pytest.raises(CheckpointError, match="pickled"):  # also when handed straight to the reader
        SafetensorsCheckpoint([path])


def test_folder_of_pickles_refused(tmp_path):
    path = tmp_path / "pytorch_model.pt"
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="pickled checkpoints are refused") as err:
        resolve_weight_files(tmp_path)
    assert_names(err, path)


def test_empty_folder(tmp_path):
    with pytest.raises(CheckpointError, match=r"no \.safetensors weights") as err:
        resolve_weight_files(tmp_path)
    assert_names(err, tmp_path)


def test_malformed_index_json(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"a": ')
    with pytest.raises(CheckpointError, match="unreadable index") as err:
        resolve_weight_files(tmp_path)
    assert_names(err, index)


def test_index_without_weight_map(tmp_path):
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}}))
    with pytest.raises(CheckpointError, match="weight_map") as err:
        resolve_weight_files(tmp_path)
    assert_names(err, index)


def test_missing_shard_named_with_its_first_key(tmp_path):
    files = save_sharded(saved_state(), tmp_path, max_shard_bytes=64)
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    first_key = next(k for k, shard in index["weight_map"].items() if shard == files[1].name)
    files[1].unlink()
    with pytest.raises(CheckpointError, match="does not exist") as err:
        SafetensorsCheckpoint.open(tmp_path)
    assert_names(err, files[1], first_key)


# --- damaged files -------------------------------------------------------------------------------


def test_file_cut_in_half(tmp_path):
    path = save_sharded(saved_state(), tmp_path)[0]
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    for cut, reason in ((len(raw) // 2, "truncated"), (8 + header_len // 2, "header claims"), (5, "only 5 bytes")):
        path.write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match=reason) as err:
            SafetensorsCheckpoint.open(tmp_path)
        assert_names(err, path)


def test_file_cut_in_data_section_names_the_key(tmp_path):
    path = save_sharded(saved_state(), tmp_path)[0]
    key = header_end_key(path)
    path.write_bytes(path.read_bytes()[:-3])
    # safetensors itself only says "incomplete metadata, file not fully covered", at open; we name the tensor
    with pytest.raises(CheckpointError, match="file is truncated") as err:
        load_into(meta_net(), SafetensorsCheckpoint.open(tmp_path))
    assert_names(err, path, key)


def test_file_truncated_after_open_is_an_error_not_a_crash(tmp_path):
    path = save_sharded(saved_state(), tmp_path)[0]
    key = header_end_key(path)
    with SafetensorsCheckpoint.open(tmp_path) as ckpt:
        os.truncate(path, path.stat().st_size - 3)  # reading this through the mmap would be SIGBUS
        with pytest.raises(CheckpointError, match="truncated after it was opened") as err:
            load_into(meta_net(), ckpt)
    assert_names(err, path, key)


def test_garbage_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match="not a safetensors file") as err:
        SafetensorsCheckpoint.open(path)
    assert_names(err, path)


def test_bad_header_caught_by_safetensors_is_wrapped(tmp_path):
    path = tmp_path / "model.safetensors"
    header = json.dumps({"w": {"dtype": "NOPE", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    with pytest.raises(CheckpointError, match="not a valid safetensors file") as err:
        SafetensorsCheckpoint.open(path)
    assert_names(err, path)


# --- checkpoint does not fit the model -----------------------------------------------------------


def test_key_missing_from_checkpoint(tmp_path):
    sd = saved_state()
    del sd["a.lin.bias"], sd["b.weight"]
    save_sharded(sd, tmp_path)
    with SafetensorsCheckpoint.open(tmp_path) as ckpt, pytest.raises(CheckpointError, match="2 of the vae's") as err:
        load_into(meta_net(), ckpt, what="vae")
    assert_names(err, tmp_path, "a.lin.bias")
    assert "'b.weight'" in str(err.value)


def test_mapped_source_missing_names_both_keys(tmp_path):
    qkv_checkpoint(tmp_path)
    key_map = {"qkv.weight": (("to_q.weight", "to_k.weight", "to_x.weight"), torch.cat), "proj.weight": "to_out.weight"}
    with torch.device("meta"):
        module = Attention()
    with SafetensorsCheckpoint.open(tmp_path) as ckpt, pytest.raises(CheckpointError, match="missing") as err:
        load_into(module, ckpt, key_map=key_map)
    assert_names(err, tmp_path, "to_x.weight")
    assert "'qkv.weight'" in str(err.value)  # the model key it was needed for


def test_extra_key_in_checkpoint(tmp_path):
    sd = saved_state()
    sd["c.weight"] = torch.zeros(2)
    path = save_sharded(sd, tmp_path)[0]
    message = "1 of the checkpoint's 10 tensors are not used by the transformer"
    with SafetensorsCheckpoint.open(tmp_path) as ckpt, pytest.raises(CheckpointError, match=message) as err:
        load_into(meta_net(), ckpt, what="transformer")
    assert_names(err, path, "c.weight")


def test_shape_mismatch(tmp_path):
    sd = saved_state()
    sd["b.weight"] = torch.zeros(2, 5)
    path = save_sharded(sd, tmp_path)[0]
    module = meta_net()
    with SafetensorsCheckpoint.open(tmp_path) as ckpt, pytest.raises(
        CheckpointError, match=r"shape \(2, 5\) in the checkpoint, the model expects \(2, 3\)"
    ) as err:
        load_into(module, ckpt)
    assert_names(err, path, "b.weight")
    assert all(p.is_meta for p in module.parameters())  # checked before any data was read


def test_combined_shape_mismatch(tmp_path):
    qkv_checkpoint(tmp_path)
    key_map = {
        "qkv.weight": (("to_q.weight", "to_k.weight", "to_v.weight"), lambda ts: torch.cat(ts[:2], dim=0)),
        "proj.weight": "to_out.weight",
    }
    with torch.device("meta"):
        module = Attention()
    with SafetensorsCheckpoint.open(tmp_path) as ckpt, pytest.raises(
        CheckpointError, match=r"shape \(8, 4\) after combining.*expects \(12, 4\)"
    ) as err:
        load_into(module, ckpt, key_map=key_map)
    assert_names(err, tmp_path / "diffusion_pytorch_model.safetensors", "to_q.weight")


def test_duplicate_key_across_files(tmp_path):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": torch.zeros(2), "x": torch.zeros(1)}, first)
    save_file({"w": torch.ones(2)}, second)
    with pytest.raises(CheckpointError, match="also in") as err:
        SafetensorsCheckpoint.open(tmp_path)
    assert_names(err, second, "w")
    assert str(first) in str(err.value)


def test_get_unknown_key(tmp_path):
    save_sharded({"w": torch.zeros(1)}, tmp_path)
    with SafetensorsCheckpoint.open(tmp_path) as ckpt, pytest.raises(CheckpointError, match="not in the") as err:
        ckpt.get("v")
    assert_names(err, tmp_path, "v")
