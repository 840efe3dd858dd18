"""Config validation: every error names the file and the key path, before anything heavy loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fluxframe import api
from fluxframe.errors import CheckpointError, ConfigError, PluginError

README = Path(__file__).resolve().parent.parent / "README.md"


def write(tmp_path, text, name="deploy.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("body,key,words", [
    ('[model]\npreset = "tiny"\ndtyp = "float32"\n', "model.dtyp", "unknown key"),
    ('[model]\npreset = "tiny"\n[samplr]\nsteps = 4\n', "samplr", "unknown key"),
    ('[model]\npreset = "tiny"\n[sampler]\nsteps = "4"\n', "sampler.steps", "valid integer"),
    ('[model]\npreset = "tiny"\n[sampler]\nsteps = 0\n', "sampler.steps", "greater than or equal to 1"),
    ('[model]\npreset = "tiny"\n[sampler]\nguidance = "high"\n', "sampler.guidance", "valid number"),
    ('[model]\npreset = "tiny"\ndtype = "float64"\n', "model.dtype", "float32"),
    ('[model]\npreset = "tiny"\ndevice = "gpu0"\n', "model.device", "cuda:N"),
    ('[model]\npath = "a"\npreset = "tiny"\n', "model", "exactly one"),
    ('[sampler]\nsteps = 4\n', "model", "missing"),
    ('model = 3\n', "model", "valid dictionary"),
    ('[model]\npreset = "tiny"\n[output]\nformat = "gif"\n', "output.format", "png"),
    ('[model]\npreset = "tiny"\n[plugins]\nblock = "x"\n', "plugins.block", "valid list"),
])
def test_bad_values_name_the_key(tmp_path, body, key, words):
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        api.load_config(path)
    assert info.value.key == key
    assert str(path) in str(info.value) and key in str(info.value) and words in str(info.value)


def test_several_problems_are_all_listed(tmp_path):
    path = write(tmp_path, '[model]\npreset = "tiny"\ncolour = 1\n[sampler]\nsteps = -1\n')
    with pytest.raises(ConfigError) as info:
        api.load_config(path)
    assert "model.colour" in str(info.value) and "sampler.steps" in str(info.value)


def test_not_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        api.load_config(write(tmp_path, "[model\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        api.load_config(tmp_path / "nope.toml")


def test_int_guidance_is_accepted_and_defaults_fill_in(tmp_path):
    config = api.load_config(write(tmp_path, '[model]\npreset = "tiny"\n[sampler]\nguidance = 4\n'))
    assert config.sampler.guidance == 4.0 and config.sampler.model_dump()["steps"] is None  # the model's default
    assert config.model.family == "flux2"


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    config = api.load_config(write(tmp_path, '[model]\npath = "ckpt/dev"\n[output]\ndir = "out"\n'))
    assert config.model_path == (tmp_path / "ckpt" / "dev").resolve()
    assert config.output_dir == (tmp_path / "out").resolve()


def test_check_names_unknown_family_sampler_and_missing_checkpoint(tmp_path, host):
    with pytest.raises(PluginError, match="no model family named 'flux9'.*known: flex2, flux2"):
        api.check_config(api.load_config(write(tmp_path, '[model]\nfamily = "flux9"\npreset = "tiny"\n')), host=host)
    with pytest.raises(PluginError, match="no sampler named 'ddim'"):
        api.check_config(api.load_config(write(tmp_path, '[model]\npreset = "tiny"\n[sampler]\nname = "ddim"\n')),
                         host=host)
    with pytest.raises(CheckpointError, match="does not exist"):
        api.check_config(api.load_config(write(tmp_path, '[model]\npath = "missing"\n')), host=host)
    with pytest.raises(ConfigError, match="model.preset"):
        api.check_config(api.load_config(write(tmp_path, '[model]\npreset = "huge"\n')), host=host)


def example_configs() -> list[tuple[str, str]]:
    """(name, text): the config examples of the README and the docs (TOML blocks with a [model] table) and the
    shipped configs/."""
    out = []
    for page in [README, *sorted((README.parent / "docs").glob("*.md"))]:
        blocks = [b for b in re.findall(r"```toml\n(.*?)```", page.read_text(), flags=re.S) if "[model]" in b]
        assert blocks or page != README, "the README shows no config example"
        out += [(f"{page.name} block {i}", b) for i, b in enumerate(blocks)]
    return out + [(p.name, p.read_text()) for p in sorted((README.parent / "configs").glob("*.toml"))]


def write_single_files(dit, ae):
    from safetensors.torch import save_file

    from fluxframe.plugins.flux2 import single_file
    from fluxframe.plugins.flux2.autoencoder import AutoencoderConfig, Flux2Autoencoder
    from fluxframe.plugins.flux2.transformer import Flux2Transformer, TransformerConfig

    t = Flux2Transformer(TransformerConfig(num_layers=1, num_single_layers=1, attention_head_dim=16,
                                           num_attention_heads=2, joint_attention_dim=96, axes_dims_rope=(4, 4, 4, 4)))
    v_config = AutoencoderConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1)
    v = Flux2Autoencoder(v_config)
    for path, state in ((dit, t.state_dict()), (ae, single_file.vae_to_original(v.state_dict(), v_config))):
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: x.contiguous() for k, x in state.items()}, path)


def provide_files(config, checkpoint):
    """Put what an example config points at where it points: a checkpoint, dev certificates, filter data."""
    from fluxframe.provenance.certs import make_dev_certificates

    if config.model.vae:  # a single-file checkpoint: tiny random DiT and autoencoder files, a text encoder folder
        write_single_files(config.model_path, config.resolve(config.model.vae))
        config.resolve(config.model.text_encoder).symlink_to(checkpoint, target_is_directory=True)
    elif config.model.path:
        target = config.model_path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(checkpoint, target_is_directory=True)
    if config.provenance and config.provenance.c2pa:
        cert = config.resolve(config.provenance.c2pa.certificate)
        paths = make_dev_certificates(cert.parent)
        assert paths["chain"] == cert and paths["key"] == config.resolve(config.provenance.c2pa.private_key)
    for settings in (config.safety.filters.values() if config.safety else []):
        for key, value in settings.options.items():
            path = config.resolve(value) if key.endswith(("_file", "_dir")) else None
            if path is not None and not path.exists():
                path.mkdir(parents=True) if key.endswith("_dir") else path.write_text("Example Name\n")


def test_readme_and_shipped_configs_pass_config_check(tmp_path, host, diffusers_flux2_folder, monkeypatch):
    """Every config example validates and passes `config check`, given the files it points at (and the audit key
    variable the README's example names)."""
    monkeypatch.setenv("FLUXFRAME_AUDIT_KEY", "an example key")
    examples = example_configs()
    assert len(examples) >= 2
    for i, (name, text) in enumerate(examples):
        folder = tmp_path / f"example{i}" / "configs"
        folder.mkdir(parents=True)
        config = api.load_config(write(folder, text))
        provide_files(config, diffusers_flux2_folder)
        try:
            api.check_config(config, host=host)
        except Exception as exc:
            raise AssertionError(f"{name}: {exc}") from exc


def test_shipped_demo_requires_the_builtin_filters_and_enables_provenance():
    config = api.load_config(README.parent / "configs" / "demo.toml")
    assert set(config.safety.require) >= {"prompt-nsfw", "image-nsfw", "ip"} and config.safety.audit_log
    assert config.provenance.watermark and config.provenance.c2pa
