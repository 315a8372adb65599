"""Tests for salsa_lightning.soup on tiny models built from configs (offline, fast)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

import salsa_lightning
from salsa_lightning.commands import soup_main
from salsa_lightning.errors import SalsaError
from salsa_lightning.landscape import alpha_line, barycentric_grid
from salsa_lightning.soup import (
    SoupReference,
    average_state_dicts,
    check_weights,
    load_soup,
    soup_state_dict,
    write_soup,
)


def tiny_config(**overrides) -> LlamaConfig:
    kw = dict(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def save_tokenizer(path: Path, prefix: str = "t") -> None:
    vocab = {"<unk>": 0, **{f"{prefix}{i}": i for i in range(1, 64)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)


def save_model(path: Path, seed: int, dtype=torch.float32, shard: str | None = None, **cfg):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(**cfg), dtype=dtype)
    with torch.no_grad():  # random, not init-like, so averages differ clearly
        for p in model.parameters():
            p.normal_()
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    save_tokenizer(path)
    return path


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(path)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def expected_average(sds, weights):
    return {k: sum(w * sd[k].double() for sd, w in zip(sds, weights, strict=True)) for k in sds[0]}


def assert_matches(actual: dict, expected: dict, atol=1e-5):
    assert set(actual) == set(expected)
    for k in expected:
        torch.testing.assert_close(actual[k].double(), expected[k].double(), atol=atol, rtol=0)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return {
        "a": save_model(root / "a", 1, shard="10KB"),  # several shards
        "b": save_model(root / "b", 2),
        "c": save_model(root / "c", 3),
        "bf1": save_model(root / "bf1", 4, dtype=torch.bfloat16),
        "bf2": save_model(root / "bf2", 5, dtype=torch.bfloat16),
        "tied1": save_model(root / "tied1", 6, tie_word_embeddings=True),
        "tied2": save_model(root / "tied2", 7, tie_word_embeddings=True),
        "wide": save_model(root / "wide", 8, hidden_size=32),
    }


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> dict[str, Path]:
    """Three LoRA adapters (different ranks, one rsLoRA) on one base, and one on another."""
    root = tmp_path_factory.mktemp("loras")
    base = save_model(root / "base", 10)
    other = save_model(root / "other_base", 11)
    out = {"base": base}
    specs = {
        "l1": (base, dict(r=2, lora_alpha=4)),
        "l2": (base, dict(r=2, lora_alpha=8)),
        "l3": (base, dict(r=4, lora_alpha=4, use_rslora=True)),
        "lother": (other, dict(r=2, lora_alpha=4)),
    }
    for seed, (name, (base_dir, kw)) in enumerate(specs.items(), start=20):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base_dir)
        cfg = LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], **kw)
        peft = get_peft_model(model, cfg)
        with torch.no_grad():  # lora_B starts at zero; make every factor matter
            for n, p in peft.named_parameters():
                if "lora_" in n or "modules_to_save" in n:
                    p.normal_()
        peft.save_pretrained(root / name)
        out[name] = root / name
    return out


def merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


# --------------------------------------------------------------------------- weights


def test_check_weights():
    assert check_weights(None, 4) == [0.25] * 4
    assert check_weights([0.2, 0.8], 2) == [0.2, 0.8]
    assert check_weights([1, 3], 2, normalize=True) == [0.25, 0.75]
    with pytest.raises(SalsaError, match="got 1 weights for 2"):
        check_weights([1.0], 2)
    with pytest.raises(SalsaError, match="negative"):
        check_weights([1.5, -0.5], 2)
    with pytest.raises(SalsaError, match="finite"):
        check_weights([float("nan"), 1.0], 2)
    with pytest.raises(SalsaError, match="--normalize"):
        check_weights([0.5, 0.6], 2)


def test_simplex_helpers():
    assert alpha_line(3) == [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]
    grid = barycentric_grid(4)
    assert len(grid) == 15 and [1.0, 0.0, 0.0] in grid and [0.25, 0.25, 0.5] in grid
    assert all(abs(sum(w) - 1) < 1e-12 and min(w) >= 0 for w in grid)


def test_average_state_dicts_is_pure_and_checks_non_float():
    a = {"w": torch.ones(2, dtype=torch.bfloat16), "i": torch.tensor([1, 2])}
    b = {"w": torch.zeros(2, dtype=torch.bfloat16), "i": torch.tensor([1, 2])}
    out = average_state_dicts([a, b], [0.25, 0.75])
    assert out["w"].dtype == torch.bfloat16 and out["w"].tolist() == [0.25, 0.25]
    assert torch.equal(out["i"], a["i"]) and a["w"].tolist() == [1.0, 1.0]
    with pytest.raises(SalsaError, match="'i'"):
        average_state_dicts([a, {**b, "i": torch.tensor([1, 3])}], [0.5, 0.5])
    with pytest.raises(SalsaError, match="'w'"):
        average_state_dicts([a, {**b, "w": torch.zeros(3, dtype=torch.bfloat16)}], [0.5, 0.5])


# --------------------------------------------------------------------------- full soups


@pytest.mark.parametrize(
    ("names", "weights"), [(("a", "b"), [0.3, 0.7]), (("a", "b", "c"), [0.2, 0.3, 0.5])]
)
def test_write_soup_equals_weighted_average(ckpts, tmp_path, names, weights):
    dirs = [ckpts[n] for n in names]
    out = write_soup(dirs, weights, tmp_path / "soup")
    expected = expected_average([state_dict(d) for d in dirs], weights)
    assert_matches(state_dict(out), expected)  # loads in plain from_pretrained
    assert_matches(soup_state_dict(dirs, weights), expected)
    # The first input is sharded: the output keeps its file names and index.
    shards = sorted(p.name for p in ckpts["a"].glob("*.safetensors"))
    assert len(shards) > 1 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index == json.loads((ckpts["a"] / "model.safetensors.index.json").read_text())
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert not list(tmp_path.glob(".soup.tmp-*"))


def test_recipe(ckpts, tmp_path):
    out = write_soup([ckpts["b"], ckpts["c"]], None, tmp_path / "soup")
    recipe = json.loads((out / "soup_recipe.json").read_text())
    assert recipe["kind"] == "full" and recipe["weights"] == [0.5, 0.5]
    assert recipe["salsa_lightning_version"] == salsa_lightning.__version__
    assert [s["path"] for s in recipe["sources"]] == [str(ckpts["b"]), str(ckpts["c"])]
    assert recipe["sources"][0]["resolved"] == str(ckpts["b"].resolve())
    assert len(recipe["sources"][1]["sha256"]["model.safetensors"]) == 64
    assert set(recipe["output_sha256"]) == {"model.safetensors"}


def test_bf16_stays_bf16(ckpts, tmp_path):
    out = write_soup([ckpts["bf1"], ckpts["bf2"]], [0.25, 0.75], tmp_path / "soup")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118
    sds = [state_dict(ckpts["bf1"]), state_dict(ckpts["bf2"])]
    expected = {k: v.to(torch.bfloat16) for k, v in expected_average(sds, [0.25, 0.75]).items()}
    got = state_dict(out)
    assert all(torch.equal(got[k], expected[k]) for k in expected)  # fp32 accumulation


def test_tied_weights_stay_tied(ckpts, tmp_path):
    dirs = [ckpts["tied1"], ckpts["tied2"]]
    out = write_soup(dirs, [0.4, 0.6], tmp_path / "soup")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    for model in (AutoModelForCausalLM.from_pretrained(out), load_soup(dirs, [0.4, 0.6])):
        assert model.lm_head.weight is model.model.embed_tokens.weight
    expected = expected_average([state_dict(d) for d in dirs], [0.4, 0.6])
    assert_matches(state_dict(out), expected)


def test_load_soup_single_checkpoint_is_exact(ckpts):
    for name in ("a", "bf1"):
        model = load_soup([ckpts[name]], [1.0])
        assert not model.training and model.dtype == state_dict(ckpts[name])["lm_head.weight"].dtype
        ref = state_dict(ckpts[name])
        assert all(torch.equal(model.state_dict()[k], ref[k]) for k in ref)


def test_load_soup_builds_no_random_model_first(ckpts):
    """The soup is written into the first checkpoint's loaded weights: no random initialisation,
    so building a reference or policy leaves the random stream that sampling uses untouched."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    load_soup([ckpts["b"], ckpts["c"]], [0.3, 0.7])
    assert torch.equal(torch.rand(3), expected)


def test_load_soup_other_model_classes(tmp_path):
    """Reward models soup too (AutoModelForSequenceClassification), as do concrete classes."""
    dirs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        cfg = tiny_config(num_labels=1, pad_token_id=0)
        AutoModelForSequenceClassification.from_config(cfg).save_pretrained(tmp_path / f"rm{seed}")
        dirs.append(tmp_path / f"rm{seed}")
    model = load_soup(dirs, [0.5, 0.5], AutoModelForSequenceClassification)
    sds = [AutoModelForSequenceClassification.from_pretrained(d).state_dict() for d in dirs]
    assert_matches(model.state_dict(), expected_average(sds, [0.5, 0.5]))
    assert type(load_soup(dirs[:1], [1.0], LlamaForSequenceClassification)).__name__ == (
        "LlamaForSequenceClassification"
    )
    with pytest.raises(SalsaError, match="lacks its weight 'lm_head.weight'.*'score.weight'"):
        load_soup(dirs, None, AutoModelForCausalLM)


def test_soup_reference(ckpts):
    ref = SoupReference(checkpoints=[str(ckpts["b"]), str(ckpts["c"])], weights=[0.3, 0.7])
    ref.validate()
    model = ref.build()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    expected = expected_average([state_dict(ckpts["b"]), state_dict(ckpts["c"])], [0.3, 0.7])
    assert_matches(model.state_dict(), expected)
    each = ref.build_each()
    assert len(each) == 2 and not any(p.requires_grad for m in each for p in m.parameters())
    fp = ref.fingerprint()
    assert fp["weights"] == [0.3, 0.7] and fp == ref.fingerprint()
    assert len(fp["sha256"][0]["model.safetensors"]) == 64
    with pytest.raises(SalsaError, match="reference.checkpoints is empty"):
        SoupReference(checkpoints=[]).validate()
    assert SoupReference([str(ckpts["b"])], [2.0], normalize=True).resolved_weights() == [1.0]


# --------------------------------------------------------------------------- LoRA


def test_lora_soup_merged_and_adapter(loras, tmp_path):
    names, weights = ["l1", "l2", "l3"], [0.2, 0.3, 0.5]
    dirs = [loras[n] for n in names]
    expected = expected_average([merged(loras["base"], d) for d in dirs], weights)

    out = write_soup(dirs, weights, tmp_path / "merged")
    assert (out / "config.json").is_file()
    assert_matches(state_dict(out), expected)
    assert_matches(load_soup(dirs, weights).state_dict(), expected)
    assert json.loads((out / "soup_recipe.json").read_text())["kind"] == "lora"

    out = write_soup(dirs, weights, tmp_path / "adapter", lora_output="adapter")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 2 + 2 + 4 and cfg["lora_alpha"] == 8 and not cfg["use_rslora"]
    assert_matches(merged(loras["base"], out), expected)


def test_naive_lora_factor_average_is_wrong(loras):
    """Averaging A and B separately adds cross terms: the reason the soup merges first."""
    sd1, sd2 = (merged(loras["base"], loras[n]) for n in ("l1", "l2"))
    exact = soup_state_dict([loras["l1"], loras["l2"]], [0.5, 0.5])
    key = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(exact[key], (sd1[key] + sd2[key]) / 2)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    factors = []
    for n in ("l1", "l2"):
        with safe_open(str(loras[n] / "adapter_model.safetensors"), "pt") as f:
            factors.append(
                (f.get_tensor(f"{prefix}.lora_A.weight"), f.get_tensor(f"{prefix}.lora_B.weight"))
            )
    a = (factors[0][0] + factors[1][0]) / 2
    b = (factors[0][1] * 4 / 2 + factors[1][1] * 8 / 2) / 2  # scales folded into B
    naive = state_dict(loras["base"])[key] + b @ a
    assert (naive - exact[key]).abs().max() > 0.1


# --------------------------------------------------------------------------- bad inputs


def _truncated(ckpts, tmp_path):
    bad = tmp_path / "trunc"
    shutil.copytree(ckpts["b"], bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    return [ckpts["c"], bad], None, str(bad / "model.safetensors")


def _missing_tensor(ckpts, tmp_path):
    bad = tmp_path / "missing"
    shutil.copytree(ckpts["b"], bad)
    with safe_open(str(bad / "model.safetensors"), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys() if "layers.1.mlp.up_proj" not in k}  # noqa: SIM118
    from safetensors.torch import save_file

    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    return [ckpts["c"], bad], None, "model.layers.1.mlp.up_proj.weight"


def _vocab_mismatch(ckpts, tmp_path):
    bad = tmp_path / "vocab"
    shutil.copytree(ckpts["b"], bad)
    save_tokenizer(bad, prefix="x")
    return [ckpts["c"], bad], None, "tokenizer vocabulary"


BAD_INPUTS = {
    "hidden size": lambda c, t: ([c["b"], c["wide"]], None, "hidden_size"),
    "vocab": _vocab_mismatch,
    "missing tensor": _missing_tensor,
    "truncated": _truncated,
    "weight count": lambda c, t: ([c["b"], c["c"]], [1.0], "2 checkpoints"),
    "negative weight": lambda c, t: ([c["b"], c["c"]], [1.5, -0.5], "negative"),
    "sum": lambda c, t: ([c["b"], c["c"]], [0.5, 0.6], "--normalize"),
    "dtype": lambda c, t: ([c["b"], c["bf1"]], None, "dtype"),
    "missing dir": lambda c, t: ([c["b"], t / "nope"], None, "nope"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_raise_and_write_nothing(ckpts, tmp_path, case):
    dirs, weights, culprit = BAD_INPUTS[case](ckpts, tmp_path)
    with pytest.raises(SalsaError) as info:
        write_soup(dirs, weights, tmp_path / "soup")
    assert culprit in str(info.value)
    assert not (tmp_path / "soup").exists() and not list(tmp_path.glob(".soup.tmp-*"))
    with pytest.raises(SalsaError):  # the PPO reference runs the same checks
        SoupReference([str(d) for d in dirs], weights).validate()


def test_shape_mismatch_message_names_file_and_tensor(ckpts, tmp_path):
    with pytest.raises(SalsaError) as info:
        write_soup([ckpts["b"], ckpts["wide"]], None, tmp_path / "soup")
    assert str(ckpts["wide"] / "config.json") in str(info.value)
    # Same config but other shapes (e.g. a hand-edited config): the tensor check catches it.
    bad = tmp_path / "edited"
    shutil.copytree(ckpts["wide"], bad)
    shutil.copy(ckpts["b"] / "config.json", bad / "config.json")
    with pytest.raises(SalsaError, match=r"model.safetensors: tensor '.*' has shape \[.*\], but"):
        write_soup([ckpts["b"], bad], None, tmp_path / "soup")


def test_normalize_fixes_sum(ckpts, tmp_path):
    out = write_soup([ckpts["b"], ckpts["c"]], [1.0, 3.0], tmp_path / "soup", normalize=True)
    expected = expected_average([state_dict(ckpts["b"]), state_dict(ckpts["c"])], [0.25, 0.75])
    assert_matches(state_dict(out), expected)


def test_output_exists(ckpts, tmp_path):
    (tmp_path / "soup").mkdir()
    (tmp_path / "soup" / "keep.txt").write_text("x")
    with pytest.raises(SalsaError, match="already exists"):
        write_soup([ckpts["b"], ckpts["c"]], None, tmp_path / "soup")
    assert (tmp_path / "soup" / "keep.txt").exists()
    write_soup([ckpts["b"], ckpts["c"]], None, tmp_path / "soup", overwrite=True)
    assert not (tmp_path / "soup" / "keep.txt").exists()
    with pytest.raises(SalsaError, match="one of the soup's inputs"):
        write_soup([ckpts["b"], ckpts["c"]], None, ckpts["b"], overwrite=True)


def test_lora_on_different_bases(loras, tmp_path):
    with pytest.raises(SalsaError) as info:
        write_soup([loras["l1"], loras["lother"]], None, tmp_path / "soup")
    assert "lother" in str(info.value) and "base model" in str(info.value)
    assert not (tmp_path / "soup").exists()


def test_lora_layout_mismatch(loras, tmp_path):
    bad = tmp_path / "layout"
    shutil.copytree(loras["l2"], bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj"]
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(SalsaError, match="target_modules"):
        write_soup([loras["l1"], bad], None, tmp_path / "soup")


# --------------------------------------------------------------------------- command line


def test_soup_main(ckpts, tmp_path, capsys):
    args = ["--checkpoints", str(ckpts["b"]), str(ckpts["c"]), "--weights", "0.5", "0.6"]
    assert soup_main([*args, "--output", str(tmp_path / "bad")]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "bad").exists()

    assert soup_main([*args, "--output", str(tmp_path / "ok"), "--normalize"]) == 0
    assert "written to" in capsys.readouterr().out and (tmp_path / "ok").is_dir()

    yaml = tmp_path / "soup.yaml"
    yaml.write_text(
        f"checkpoints: [{ckpts['b']}, {ckpts['c']}]\nweights: [0.5, 0.5]\n"
        f"output: {tmp_path / 'from_yaml'}\n"
    )
    assert soup_main(["--config", str(yaml)]) == 0
    assert (tmp_path / "from_yaml" / "soup_recipe.json").is_file()
    assert soup_main(["--config", str(yaml)]) == 2  # exists now
    assert "already exists" in capsys.readouterr().err
