"""One options mechanism for every plugin kind (fluxframe.core.options): a third-party postprocessor, filter, memory
strategy and conditioner, registered through the host, each configured from TOML; their options arrive, and an
unknown key, a missing one or a bad value is named by its key path, at `config check` too (no weights loaded)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fluxframe import api, hookimpl
from fluxframe.core.interfaces import Conditioner, Filter, MemoryStrategy, Postprocessor, Verdict
from fluxframe.core.options import instantiate
from fluxframe.errors import Blocked, ConfigError, ProvenanceError, RequestError

TINY = ('[model]\npreset = "tiny"\ndtype = "float32"\ndevice = "cpu"\n'
        '[sampler]\nsteps = 1\nwidth = 64\nheight = 64\n')
COLOURS = {"red": (255, 0, 0), "blue": (0, 0, 255)}
BUILT: dict[str, object] = {}  # the last instance each factory below made, for the tests to look at


class Stamp(Postprocessor):
    """Paints a square into the top-left corner (order 150: after the watermark, before signing)."""

    name = "my-stamp"
    order = 150

    def __init__(self, colour: str, *, size: int = 2, base_dir: Path | None = None):
        if colour not in COLOURS:
            raise ValueError(f"colour: must be one of {', '.join(COLOURS)}, got {colour!r}")
        if not isinstance(size, int) or size < 1:
            raise ConfigError(f"must be a positive whole number, got {size!r}", key="size")  # relative to the table
        self.colour, self.size, self.base_dir = colour, size, base_dir
        BUILT["postprocessor"] = self

    def process_image(self, image, context):
        image = image.copy()
        image.paste(COLOURS[self.colour], (0, 0, self.size, self.size))
        context.records[self.name] = {"summary": f"stamped {self.colour}"}
        return image


class WordFilter(Filter):
    name = "word"
    targets = frozenset({"prompt"})

    def __init__(self, *, word: str = "forbidden"):
        if not isinstance(word, str) or not word.strip():
            raise ValueError(f"word: must be a non-empty string, got {word!r}")
        self.word = word
        BUILT["filter"] = self

    def check_prompt(self, text, target):
        allowed = self.word not in text
        return Verdict(self.name, "1", allowed, target, reason="" if allowed else f"says {self.word!r}")


class Counting(MemoryStrategy):
    """Keeps everything on the device, and remembers what it placed."""

    name = "counting"

    def __init__(self, *, label: str = "none", limit: int = 1):
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.label, self.placed = label, []
        BUILT["memory"] = self

    def place(self, component, module, device):
        self.placed.append(component)
        return module.to(device)


class Tint(Conditioner):
    """Records what it was given (an option and a per-request file input) as a note of the result."""

    name = "tint"
    file_inputs = ("image",)

    def __init__(self, *, amount: float = 0.5):
        if not isinstance(amount, (int, float)) or not 0 <= amount <= 1:
            raise ValueError(f"amount: must be a number in [0, 1], got {amount!r}")
        self.amount = amount
        BUILT["conditioner"] = self

    def prepare(self, model, request, inputs, conditioning):
        unknown = sorted(set(inputs) - {"image", "amount"})
        if unknown:
            raise RequestError("unknown input (tint takes image, amount)", field=f"conditioning.tint.{unknown[0]}")
        image = inputs.get("image")
        conditioning.info["tint"] = {"notes": [
            f"tint: amount {inputs.get('amount', self.amount)}, image {type(image).__name__}"
            + (f" {image.sha256[:12]}" if hasattr(image, "sha256") else "")]}


@hookimpl
def register_postprocessors(register):
    register("my-stamp", Stamp)


@hookimpl
def register_filters(register):
    register("word", WordFilter)


@hookimpl
def register_memory_strategies(register):
    register("counting", Counting)


@hookimpl
def register_conditioners(register):
    register("tint", Tint)


@pytest.fixture
def third_party(host):
    import sys

    host.add(sys.modules[__name__], name="options-test")
    BUILT.clear()
    return host


def deploy(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "deploy.toml"
    path.write_text(TINY + body)
    return path


FULL = '''
[memory]
strategy = "counting"
[memory.counting]
label = "from-toml"
[[conditioners]]
name = "tint"
amount = 0.75
[safety.filters.word]
word = "lighthouse"
[postprocessors.my-stamp]
colour = "blue"
size = 4
'''


def test_every_kind_of_third_party_plugin_is_configured_from_toml(third_party, tmp_path):
    config = api.load_config(deploy(tmp_path, FULL))
    pipeline = api.load(config, host=third_party)
    assert BUILT["memory"].label == "from-toml" and "transformer" in BUILT["memory"].placed
    assert BUILT["conditioner"].amount == 0.75 and BUILT["filter"].word == "lighthouse"
    stamp = BUILT["postprocessor"]
    assert (stamp.colour, stamp.size, stamp.base_dir) == ("blue", 4, tmp_path)
    result = pipeline.generate(api.GenerationRequest(prompt="a red circle", seed=1), write=False)
    assert [result.image.getpixel((x, x)) for x in (0, 3)] == [(0, 0, 255)] * 2 and result.image.getpixel((4, 4)) != \
        (0, 0, 255)
    assert "my-stamp: stamped blue" in result.notes and "tint: amount 0.75, image NoneType" in result.notes
    with pytest.raises(Blocked, match="lighthouse"):
        pipeline.generate(api.GenerationRequest(prompt="a lighthouse", seed=1), write=False)


@pytest.mark.parametrize(("body", "key", "words"), [
    ("[postprocessors.my-stamp]\ncolour = 'red'\nshade = 2\n", "postprocessors.my-stamp.shade", "unknown key"),
    ("[postprocessors.my-stamp]\ncolour = 'mauve'\n", "postprocessors.my-stamp.colour", "must be one of red, blue"),
    ("[postprocessors.my-stamp]\ncolour = 'red'\nsize = 0\n", "postprocessors.my-stamp.size", "positive whole"),
    ("[postprocessors.my-stamp]\n", "postprocessors.my-stamp.colour", "required key is missing"),
    ("[postprocessors.my-stamp]\ncolour = 'red'\nbase_dir = '/'\n", "postprocessors.my-stamp.base_dir", "unknown"),
    ("[postprocessors.nope]\n", None, "no postprocessor named 'nope'"),
    ("[postprocessors.watermark]\n", "postprocessors.watermark", "configured in [provenance.watermark]"),
    ("[safety.filters.word]\nwrod = 'x'\n", "safety.filters.word.wrod", "unknown key (known: word)"),
    ("[safety.filters.word]\nword = ''\naction = 'flag'\n", "safety.filters.word.word", "non-empty"),
    ("[memory]\nstrategy = 'counting'\n[memory.counting]\nlimt = 2\n", "memory.counting.limt", "unknown key"),
    ("[memory]\nstrategy = 'counting'\n[memory.counting]\nlimit = 0\n", "memory.counting.limit", "at least 1"),
    ("[[conditioners]]\nname = 'tint'\namout = 1\n", "conditioners.0.amout", "unknown key (known: amount)"),
    ("[[conditioners]]\nname = 'tint'\namount = 2\n", "conditioners.0.amount", "in [0, 1]"),
])
def test_bad_options_are_named_by_key_path_at_config_check(third_party, tmp_path, body, key, words):
    from fluxframe.errors import PluginError

    with pytest.raises((ConfigError, PluginError), match=re.escape(words)) as err:
        api.check_config(deploy(tmp_path, body), host=third_party)
    if key is not None:
        assert isinstance(err.value, ConfigError) and err.value.key == key
        assert str(err.value).startswith(f"{tmp_path / 'deploy.toml'}: {key}: ")


def test_config_check_validates_third_party_options_without_weights(third_party, tmp_path):
    warnings = api.check_config(deploy(tmp_path, FULL), host=third_party)
    assert any("random weights" in w for w in warnings)
    assert BUILT["postprocessor"].colour == "blue" and BUILT["memory"].placed == []  # built, nothing loaded


def test_postprocessors_run_in_order_and_the_provenance_tables_keep_their_paths(third_party, tmp_path):
    from fluxframe.core.pipeline import build_postprocessors
    from fluxframe.provenance.certs import make_dev_certificates

    make_dev_certificates(tmp_path / "certs")
    config = api.load_config(deploy(tmp_path, '[postprocessors.my-stamp]\ncolour = "red"\n'
                                    '[provenance.watermark]\nallow_unmarked_small = true\n'
                                    '[provenance.c2pa]\ncertificate = "certs/chain.pem"\n'
                                    'private_key = "certs/key.pem"\n'))
    posts = build_postprocessors(config, third_party)
    assert [p.name for p in posts] == ["watermark", "my-stamp", "c2pa"]
    assert posts[0].allow_unmarked_small is True
    assert (posts[2].certificate, posts[2].private_key) == (tmp_path / "certs/chain.pem", tmp_path / "certs/key.pem")


def test_instantiate():
    def factory(a, *, b=1, base_dir=None):
        return a, b, base_dir

    assert instantiate(factory, {"a": 1}, key="x.y", base_dir=Path("/cfg")) == (1, 1, Path("/cfg"))
    assert instantiate(lambda **kw: kw, {"any": 1}, key="x.y", base_dir=Path("/cfg")) == {"any": 1}  # no base_dir
    with pytest.raises(ConfigError, match="expected a table of options, got int") as err:
        instantiate(factory, 3, key="x.y")
    assert err.value.key == "x.y"

    def ink(colour="red", size=1):
        raise ProvenanceError(f"colour {colour}: the ink is dry")

    # the message names no option that was given: the table
    with pytest.raises(ProvenanceError, match=r"^x\.y: colour red: the ink is dry$"):
        instantiate(ink, {"size": 2}, key="x.y")
    with pytest.raises(ProvenanceError, match=r"^x\.y\.colour: colour blue: the ink"):  # the one option it names
        instantiate(ink, {"colour": "blue", "size": 2}, key="x.y")
