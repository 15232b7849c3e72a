"""FP8 (block-scaled `float8_e4m3fn` + `weight_scale_inv`) and MXFP4 (gpt-oss `*_blocks` / `*_scales`) ingredients
merged as the tensors transformers loads from them with dequantization, alone or with bf16 fine-tunes (issue 25,
item 1); other quantization methods refused by name."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from ame_hf import AmeConfig, check, merge, plan
from ame_hf.checkpoint import Checkpoint
from factories import tiny_llama_config, upload_to_hub
from test_engine import reference_ame_states
from test_reconcile import perturbed

FP8_BLOCK = [16, 16]


def _save_quantized(folder, state, config, quantization_config) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))


def save_fp8(source, folder) -> None:
    """`source` (a bf16 save) quantized as FP8 with transformers' own quantizing op (`Fp8Quantize`, which its
    quantizer runs on a GPU): float8_e4m3fn weights and per-block `weight_scale_inv`; tensors it cannot tile (the
    embeddings, the 1-D norms, a matrix whose shape the block does not divide) stay bf16, as in released FP8 models."""
    from safetensors.torch import load_file
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    config = FineGrainedFP8Config(weight_block_size=FP8_BLOCK)
    quantize = Fp8Quantize(FineGrainedFP8HfQuantizer(config))
    state = {}
    for k, v in load_file(source / "model.safetensors").items():
        state.update(quantize._quantize_one(k, v) if "layers" in k else {k: v})
    assert any(v.dtype == torch.float8_e4m3fn for v in state.values())
    _save_quantized(folder, state, json.loads((source / "config.json").read_text()), config.to_dict())


def save_mxfp4(source, folder, seed: int) -> None:
    """`source` (a bf16 gpt-oss save) with its expert tensors stored as MXFP4, written by hand (transformers'
    quantizer needs triton kernels): random e2m1 nibbles, two per byte, and e8m0 exponents near 2**0."""
    from safetensors.torch import load_file

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in load_file(source / "model.safetensors").items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            experts, inputs, outputs = v.shape  # the loaded (experts, in, out); stored (experts, out, in / 32, 16)
            state[k + "_blocks"] = torch.randint(0, 256, (experts, outputs, inputs // 32, 16), generator=gen,
                                                 dtype=torch.uint8)
            state[k + "_scales"] = torch.randint(118, 128, (experts, outputs, inputs // 32), generator=gen,
                                                 dtype=torch.uint8)
        else:
            state[k] = v
    _save_quantized(folder, state, json.loads((source / "config.json").read_text()),
                    {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                         "model.layers.*.mlp.router",
                                                                         "model.embed_tokens", "lm_head"]})


def loaded(folder) -> dict[str, torch.Tensor]:
    """What transformers loads from a folder, a quantized one dequantized (`dequantize=True`)."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config, Mxfp4Config

    config = json.loads((folder / "config.json").read_text())
    method = config.get("quantization_config", {}).get("quant_method")
    kwargs = {"fp8": {"quantization_config": FineGrainedFP8Config(dequantize=True)},
              "mxfp4": {"quantization_config": Mxfp4Config(dequantize=True)}}.get(method, {})
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, **kwargs)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert all(type(m).__module__.startswith("torch.nn") for m in model.modules() if "Linear" in type(m).__name__)
    return model.state_dict()


def mean(states) -> dict[str, torch.Tensor]:
    return {k: sum(s[k].double() for s in states) / len(states) for k in states[0]}


def assert_close(out, expected, atol=1e-6):
    merged = loaded(out)
    assert set(merged) == set(expected)
    for name, value in expected.items():
        assert torch.allclose(merged[name].double(), value.double(), rtol=0, atol=atol), name


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    """{name: folder}: bf16 fine-tunes `a`, `b`, `c` of one tiny llama, and `a`, `c` as FP8 releases."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("fp8")
    config = tiny_llama_config(hidden_size=32, intermediate_size=64, dtype="bfloat16")
    folders = {}
    for i, name in enumerate("abc"):
        torch.manual_seed(0)
        perturbed(LlamaForCausalLM(config), i + 1, 0.05).to(torch.bfloat16).save_pretrained(root / name)
        folders[name] = root / name
    for name in "ac":
        save_fp8(folders[name], root / f"{name}-fp8")
        folders[f"{name}-fp8"] = root / f"{name}-fp8"
    return folders


@pytest.fixture(scope="module")
def mxfp4(tmp_path_factory):
    """{name: folder}: bf16 gpt-oss fine-tunes `a`, `b` and MXFP4 releases `a-mx`, `b-mx`."""
    from transformers import GptOssConfig, GptOssForCausalLM

    root = tmp_path_factory.mktemp("mxfp4")
    config = GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=4,
                          num_experts_per_tok=2, max_position_embeddings=64, sliding_window=8,
                          layer_types=["sliding_attention", "full_attention"], rope_parameters={"rope_type": "default",
                                                                                                 "rope_theta": 1e4})
    folders = {}
    for i, name in enumerate("ab"):
        torch.manual_seed(0)
        perturbed(GptOssForCausalLM(config), i + 1, 0.05).to(torch.bfloat16).save_pretrained(root / name)
        folders[name] = root / name
        save_mxfp4(folders[name], root / f"{name}-mx", seed=i)
        folders[f"{name}-mx"] = root / f"{name}-mx"
    return folders


def test_transformers_loads_the_checkpoints_dequantized(fp8, mxfp4):
    for quantized, plain in [(fp8["a-fp8"], fp8["a"]), (mxfp4["a-mx"], mxfp4["a"])]:
        state, original = loaded(quantized), loaded(plain)
        assert set(state) == set(original) and all(v.dtype == torch.bfloat16 for v in state.values())
        assert any(not torch.equal(state[k], original[k]) for k in state)  # the quantized values, not the bf16 ones
    # FP8: dequantized values stay near the originals they were quantized from
    state, original = loaded(fp8["a-fp8"]), loaded(fp8["a"])
    for k in state:
        assert torch.allclose(state[k].float(), original[k].float(), rtol=0.07, atol=1e-3), k


def test_check_says_the_format_in_one_line(fp8, mxfp4):
    report = check([fp8["a-fp8"], fp8["b"]])
    assert report.ok, report.errors
    lines = [n for n in report.notes if "dequantized" in n]
    assert lines == [f"{fp8['a-fp8']} is FP8 (float8_e4m3fn, 16x16 blocks, 14 tensors): dequantized to bfloat16 as "
                     "transformers loads it (dequantize=True), block by block of rows"], report.notes
    assert not any("quantization_config" in n for n in report.notes), report.notes
    report = check([mxfp4["a-mx"], mxfp4["b"]])
    assert report.ok, report.errors
    assert [n for n in report.notes if "dequantized" in n] == [
        f"{mxfp4['a-mx']} is MXFP4 (4-bit e2m1 values, an e8m0 scale per 32, 4 expert tensors): dequantized to "
        "bfloat16 as transformers loads it (dequantize=True), block by block of rows"], report.notes


def test_the_cli_check_says_the_format_and_merge_writes_a_plain_model(fp8, tmp_path, capsys):
    from factories import run_cli

    code, out, _ = run_cli(capsys, "check", fp8["a-fp8"], fp8["b"])
    assert code == 0 and out.startswith("OK"), out
    said = [line for line in out.splitlines() if "FP8" in line]
    assert len(said) == 1 and "float8_e4m3fn, 16x16 blocks" in said[0] and "dequantized to bfloat16" in said[0], out
    code, _, err = run_cli(capsys, "merge", fp8["a-fp8"], fp8["b"], "--out", tmp_path / "out", "--quiet")
    assert code == 0, err
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())


def test_a_checkpoint_reads_the_rows_transformers_loads_and_only_their_bytes(fp8):
    ckpt = Checkpoint(fp8["a-fp8"])
    name = "model.layers.0.mlp.gate_proj.weight"  # (64, 32): scales (4, 2) of 16x16 blocks
    assert "model.layers.0.mlp.gate_proj.weight_scale_inv" not in ckpt.tensors
    assert ckpt.info(name).shape == (64, 32) and ckpt.info(name).dtype == torch.bfloat16
    before = ckpt.reads.bytes
    rows = ckpt.read(name, rows=(20, 37), dtype=torch.float32)
    assert torch.equal(rows, loaded(fp8["a-fp8"])[name][20:37].float())
    assert ckpt.reads.bytes - before == 17 * 32 * 1 + 2 * 2 * 4  # 17 FP8 rows and the 2 rows of scales they use


@pytest.mark.parametrize("order", [["a-fp8", "b"], ["b", "a-fp8", "c-fp8"]])
def test_the_soup_of_fp8_and_bf16_ingredients_is_the_mean_of_what_transformers_loads(fp8, tmp_path, order):
    refs = [fp8[o] for o in order]
    out = merge(refs, tmp_path / "soup", AmeConfig(optimizer="sgd", dtype="float32"), progress=False).path
    assert_close(out, mean([loaded(r) for r in refs]))


def test_adam_over_fp8_ingredients_equals_the_whole_model_reference(fp8, tmp_path):
    refs = [fp8["a-fp8"], fp8["b"], fp8["c-fp8"]]
    config = AmeConfig(optimizer="adam", lr=0.01, epochs=2, dtype="float32")
    out = merge(refs, tmp_path / "adam", config, progress=False).path
    assert_close(out, reference_ame_states([loaded(r) for r in refs], config))


def test_the_default_output_is_a_plain_bf16_model(fp8, tmp_path):
    out = merge([fp8["a-fp8"], fp8["c-fp8"]], tmp_path / "soup", optimizer="sgd", progress=False).path
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    merged = loaded(out)  # no quantizer: plain nn.Linear layers (checked by `loaded`)
    expected = mean([loaded(fp8["a-fp8"]), loaded(fp8["c-fp8"])])
    assert all(v.dtype == torch.bfloat16 for v in merged.values())
    for k, v in expected.items():  # the float64 mean, rounded once to bf16
        assert torch.allclose(merged[k].double(), v, rtol=2 ** -8, atol=0), k


def test_fp8_ingredients_that_agree_give_their_values_bit_for_bit(fp8, tmp_path):
    out = merge([fp8["a-fp8"], fp8["a-fp8"]], tmp_path / "adam", AmeConfig(optimizer="adam", lr=0.1, epochs=2),
                progress=False).path
    merged, expected = loaded(out), loaded(fp8["a-fp8"])
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


@pytest.mark.parametrize("kind", ["fp8", "mxfp4"])
def test_the_bytes_do_not_depend_on_the_block_size(fp8, mxfp4, tmp_path, monkeypatch, kind):
    refs = [fp8["a-fp8"], fp8["b"], fp8["c-fp8"]] if kind == "fp8" else [mxfp4["a-mx"], mxfp4["b"]]
    config = AmeConfig(optimizer="adam", lr=0.01)
    whole = merge(refs, tmp_path / "whole", config, progress=False).path
    monkeypatch.setattr(plan, "BLOCK_ELEMENTS", 7 * 32)  # 7 rows of a 32-column matrix: blocks across 16-row scales
    small = merge(refs, tmp_path / "small", config, progress=False).path
    assert (whole / "model.safetensors").read_bytes() == (small / "model.safetensors").read_bytes()


def test_the_soup_and_adam_over_mxfp4_ingredients_equal_the_references(mxfp4, tmp_path):
    refs = [mxfp4["a-mx"], mxfp4["b"], mxfp4["b-mx"]]
    states = [loaded(r) for r in refs]
    soup = merge(refs, tmp_path / "soup", AmeConfig(optimizer="sgd", dtype="float32"), progress=False).path
    assert_close(soup, mean(states))
    config = AmeConfig(optimizer="adam", lr=0.01, epochs=2, dtype="float32")
    adam = merge(refs, tmp_path / "adam", config, progress=False).path
    assert_close(adam, reference_ame_states(states, config))
    assert "quantization_config" not in json.loads((adam / "config.json").read_text())


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes", "compressed-tensors"])
def test_other_quantization_methods_are_refused_by_name(fp8, tmp_path, method):
    folder = tmp_path / method
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((fp8["b"] / "model.safetensors").read_bytes())
    config = json.loads((fp8["b"] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": method}}))
    report = check([fp8["a"], folder])
    assert report.errors == [f"{folder} is quantized with {method} (quantization_config); AME averages "
                             "full-precision weights: merge the unquantized originals (e.g. the fine-tune's "
                             "float16/bfloat16 release), then quantize the merge (FP8 and MXFP4 checkpoints merge "
                             "as they are)"]


def test_fp8_scales_that_do_not_fit_the_blocks_are_refused_by_name(fp8, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((fp8["a-fp8"] / "model.safetensors").read_bytes())
    config = json.loads((fp8["a-fp8"] / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [32, 32]
    (folder / "config.json").write_text(json.dumps(config))
    report = check([folder, fp8["b"]])
    assert not report.ok
    assert f"{folder}: model.layers.0.mlp.down_proj.weight has scales of shape [2, 4], not the [1, 2] its 32x32 " \
           "blocks need" in report.errors, report.errors


@pytest.mark.parametrize("dtype", ["fp8", "mxfp6", "float8_e5m2", "fp4"])
def test_other_quantized_output_dtypes_are_refused_saying_why(dtype):
    with pytest.raises(ValueError, match=f"dtype '{dtype}': ame-hf writes a merge back in its quantized ingredients' "
                                         r"format as float8_e4m3fn \(FP8, block-scaled\) or mxfp4 \(MXFP4\) only; "
                                         "choose one of: auto, float32, bfloat16, float16, float8_e4m3fn, mxfp4"):
        AmeConfig(dtype=dtype)


def _fp8_reference(bf16_output, names):
    """transformers' `Fp8Quantize` over whole tensors of a dequantized merge: the FP8 output's expected tensors."""
    from safetensors.torch import load_file
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    quantize = Fp8Quantize(FineGrainedFP8HfQuantizer(FineGrainedFP8Config(weight_block_size=FP8_BLOCK)))
    out = {}
    for k, v in load_file(bf16_output / "model.safetensors").items():
        out.update(quantize._quantize_one(k, v) if k in names else {k: v})
    return out


def test_fp8_ingredients_merge_back_into_fp8_with_their_block_layout(fp8, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    refs = [fp8["a-fp8"], fp8["b"], fp8["c-fp8"]]
    config = AmeConfig(optimizer="adam", lr=0.01)
    plain = merge(refs, tmp_path / "bf16", config, progress=False).path
    back = merge(refs, tmp_path / "fp8", dataclasses.replace(config, dtype="float8_e4m3fn"), progress=False).path
    stored = load_file(fp8["a-fp8"] / "model.safetensors")
    quantized = {k for k, v in stored.items() if v.dtype == torch.float8_e4m3fn}
    written = load_file(back / "model.safetensors")
    expected = _fp8_reference(plain, quantized)
    assert set(written) == set(stored) == set(expected)  # the ingredient's tensors and scales, by name
    for k, v in expected.items():
        assert written[k].dtype == stored[k].dtype and written[k].shape == stored[k].shape, k
        assert torch.equal(written[k].view(torch.uint8) if v.dtype == torch.float8_e4m3fn else written[k],
                           v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v), k
    config_out = json.loads((back / "config.json").read_text())
    assert config_out["quantization_config"]["weight_block_size"] == FP8_BLOCK
    assert config_out["dtype"] == "bfloat16"
    assert "float8_e4m3fn as its FP8 ingredients (14 tensors in 16x16 blocks" in (back / "README.md").read_text()
    state = loaded(back)  # transformers loads it (dequantized), close to the bf16 merge
    for k, v in loaded(plain).items():
        assert torch.allclose(state[k].float(), v.float(), rtol=0.07, atol=1e-3), k
    monkeypatch.setattr("ame_hf.requantize._BAND_ELEMENTS", 16 * 32)  # one band of block rows at a time
    small = merge(refs, tmp_path / "small", dataclasses.replace(config, dtype="float8_e4m3fn"), progress=False).path
    assert (small / "model.safetensors").read_bytes() == (back / "model.safetensors").read_bytes()


def test_an_fp8_output_in_several_shards_lists_the_scales_in_its_index(fp8, tmp_path):
    refs = [fp8["a-fp8"], fp8["c-fp8"]]
    config = AmeConfig(optimizer="sgd", dtype="float8_e4m3fn", max_shard_size="8KB")
    out = merge(refs, tmp_path / "fp8", config, progress=False).path
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    from safetensors import safe_open

    sizes = 0
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(out / shard, framework="pt") as f:
            assert all(index["weight_map"][k] == shard for k in f.keys())
            sizes += sum(f.get_tensor(k).nbytes for k in f.keys())
    assert sum(k.endswith("_scale_inv") for k in index["weight_map"]) == 14 and index["metadata"]["total_size"] == sizes
    single = merge(refs, tmp_path / "one", dataclasses.replace(config, max_shard_size="5GB"), progress=False).path
    merged, expected = loaded(out), loaded(single)
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


def test_an_fp8_output_needs_an_fp8_ingredient(fp8, tmp_path, capsys):
    from factories import cli_error_line

    line = cli_error_line(capsys, "merge", fp8["a"], fp8["b"], "--out", tmp_path / "out", "--dtype", "float8_e4m3fn",
                          needles=["no ingredient is FP8"])
    assert "--dtype" in line and not (tmp_path / "out").exists(), line


def _mxfp4_reference(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 of a loaded (experts, in, out) tensor, written from the OCP Microscaling definition in float64, value by
    value: per 32 inputs of an output row the scale 2**k with k the least integer where max |v| <= 6 * 2**k, each
    value the nearest of +-{0, 0.5, 1, 1.5, 2, 3, 4, 6} * 2**k (a tie to the even code), packed low nibble first."""
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
    groups = values.double().transpose(1, 2).reshape(values.shape[0], values.shape[2], -1, 32)
    codes = torch.zeros(groups.shape, dtype=torch.uint8)
    scales = torch.zeros(groups.shape[:-1], dtype=torch.uint8)
    for index in torch.cartesian_prod(*[torch.arange(n) for n in groups.shape[:-1]]).tolist():
        group = groups[tuple(index)]
        amax = float(group.abs().max())
        k = -127 if amax == 0 else max(-127, math.ceil(math.log2(amax / 6)))
        scales[tuple(index)] = k + 127
        for j, v in enumerate(group.tolist()):
            distance = (grid * 2.0 ** k - abs(v)).abs()
            best = [c for c in range(8) if distance[c] == distance.min()]
            code = best[0] if len(best) == 1 else [c for c in best if c % 2 == 0][0]
            codes[tuple(index)][j] = code | (8 if math.copysign(1, v) < 0 else 0)
    return codes[..., 0::2] | codes[..., 1::2] << 4, scales


def test_mxfp4_rounds_to_nearest_ties_to_even_and_never_saturates():
    """Every midpoint between e2m1 values, both signs, at several scales: the codes a float64 reference of the
    definition gives (a tie goes to the even code), and the scale leaves the largest value at most 6."""
    from ame_hf.requantize import mxfp4_quantize

    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0]
    codes, scales = mxfp4_quantize(torch.tensor([ties + [-t for t in ties] + [0.0, -0.0] + [0.1] * 14]))
    unpacked = torch.stack([codes & 15, codes >> 4], -1).reshape(-1)
    assert unpacked[:18].tolist() == [0, 2, 2, 4, 4, 6, 6, 7, 8, 10, 10, 12, 12, 14, 14, 15, 0, 8]
    assert scales.tolist() == [127]
    gen = torch.Generator().manual_seed(0)
    values = torch.randint(-24, 25, (2, 64, 3), generator=gen).float() / 4  # many values on a midpoint
    values = values * 2.0 ** torch.randint(-6, 7, (2, 1, 3), generator=gen).float()  # various scales
    expected = _mxfp4_reference(values)
    got = mxfp4_quantize(values.transpose(1, 2).reshape(2, 3, 2, 32))
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_mxfp4_ingredients_merge_back_into_mxfp4(mxfp4, tmp_path, monkeypatch):
    """`dtype="mxfp4"`: the expert tensors an MXFP4 ingredient stores as *_blocks / *_scales are written so again,
    equal to a float64 reference of the MXFP4 definition over the dequantized merge; transformers loads the output
    (dequantize=True) close to the bf16 merge; the bytes do not depend on the band size; equal MXFP4 ingredients
    give back their own values bit for bit."""
    import shutil

    from safetensors.torch import load_file

    refs = [mxfp4["a-mx"], mxfp4["b"]]
    config = AmeConfig(optimizer="adam", lr=0.01)
    plain = merge(refs, tmp_path / "bf16", config, progress=False).path
    back = merge(refs, tmp_path / "mx", dataclasses.replace(config, dtype="mxfp4"), progress=False).path
    stored = load_file(mxfp4["a-mx"] / "model.safetensors")
    written, dequantized = load_file(back / "model.safetensors"), load_file(plain / "model.safetensors")
    assert set(written) == set(stored)  # the ingredient's tensors, blocks and scales, by name
    quantized = [k.removesuffix("_blocks") for k in stored if k.endswith("_blocks")]
    assert len(quantized) == 4
    for k in quantized:
        blocks, scales = _mxfp4_reference(dequantized[k])
        assert written[k + "_blocks"].dtype == torch.uint8 and torch.equal(written[k + "_blocks"], blocks), k
        assert torch.equal(written[k + "_scales"], scales), k
    for k, v in stored.items():
        assert written[k].dtype == v.dtype and written[k].shape == v.shape, k
        if not k.endswith(("_blocks", "_scales")):
            assert torch.equal(written[k], dequantized[k]), k
    config_out = json.loads((back / "config.json").read_text())
    assert config_out["quantization_config"] == json.loads((mxfp4["a-mx"] / "config.json").read_text())[
        "quantization_config"]
    assert "mxfp4 as its MXFP4 ingredients (4 expert tensors" in (back / "README.md").read_text()
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    # transformers loads it (dequantized): the reference's values, within an MXFP4 step of the bf16 merge
    state, reference = loaded(back), loaded(plain)
    for k, v in reference.items():
        if k in quantized:
            expected = convert_moe_packed_tensors(*_mxfp4_reference(dequantized[k]), dtype=torch.bfloat16)
            assert torch.equal(state[k], expected), k
            assert float((state[k].float() - v.float()).abs().max()) <= float(v.float().abs().max()) / 3, k
        else:
            assert torch.equal(state[k], v), k
    monkeypatch.setattr("ame_hf.requantize._BAND_ELEMENTS", 1)  # one expert at a time
    small = merge(refs, tmp_path / "small", dataclasses.replace(config, dtype="mxfp4"), progress=False).path
    assert (small / "model.safetensors").read_bytes() == (back / "model.safetensors").read_bytes()
    twin = tmp_path / "a-mx-copy"
    shutil.copytree(mxfp4["a-mx"], twin)
    same = merge([mxfp4["a-mx"], twin], tmp_path / "same", dataclasses.replace(config, dtype="mxfp4"),
                 progress=False).path
    own = loaded(mxfp4["a-mx"])
    assert all(torch.equal(v, own[k]) for k, v in loaded(same).items())


def test_the_cli_writes_mxfp4_back_and_needs_an_mxfp4_ingredient_for_it(mxfp4, tmp_path, capsys):
    from safetensors import safe_open

    from factories import cli_error_line, run_cli

    code, _, err = run_cli(capsys, "merge", mxfp4["a-mx"], mxfp4["b"], "--out", tmp_path / "mx", "--dtype", "mxfp4",
                           "--quiet")
    assert code == 0, err
    assert json.loads((tmp_path / "mx" / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    with safe_open(tmp_path / "mx" / "model.safetensors", framework="pt") as f:
        assert sum(k.endswith("_blocks") for k in f.keys()) == sum(k.endswith("_scales") for k in f.keys()) == 4
    line = cli_error_line(capsys, "merge", mxfp4["a"], mxfp4["b"], "--out", tmp_path / "out", "--dtype", "mxfp4",
                          needles=["no ingredient is MXFP4"])
    assert "--dtype" in line and not (tmp_path / "out").exists(), line


def test_an_fp8_repo_on_the_hub_is_checked_from_its_headers_and_merged(fp8, hub, hub_token, tmp_path):
    repos = upload_to_hub(hub_token, {"org/tiny-fp8": fp8["a-fp8"], "org/tiny-bf16": fp8["b"]})
    report = check(repos)
    assert report.ok, report.errors
    assert any(n.startswith("org/tiny-fp8 is FP8 (float8_e4m3fn, 16x16 blocks") for n in report.notes), report.notes
    remote = merge(repos, tmp_path / "remote", optimizer="sgd", progress=False).path
    local = merge([fp8["a-fp8"], fp8["b"]], tmp_path / "local", optimizer="sgd", progress=False).path
    from safetensors.torch import load_file

    remote, local = load_file(remote / "model.safetensors"), load_file(local / "model.safetensors")
    assert set(remote) == set(local) and all(torch.equal(remote[k], local[k]) for k in local)


def test_a_gguf_only_model_is_refused_with_what_to_do(fp8, tmp_path, capsys):
    from factories import cli_error_line

    folder = tmp_path / "gguf"
    folder.mkdir()
    (folder / "config.json").write_text((fp8["b"] / "config.json").read_text())
    (folder / "model-Q4_K_M.gguf").write_bytes(b"GGUF")
    line = cli_error_line(capsys, "check", folder, fp8["b"], needles=["model-Q4_K_M.gguf", "GGUF"])
    assert line.endswith("merge the safetensors originals, then convert the merge to GGUF"), line


def test_fp8_shapes_that_are_no_multiple_of_the_block_take_each_elements_own_block_scale(fp8, tmp_path):
    """A matrix the block does not tile (DeepSeek-V3's 576-row `kv_a_proj_with_mqa` under 128x128 blocks): each
    element is scaled by its own block's scale, as transformers' FP8 layers compute with it
    (`_dequantize_fp8_weight`, given the config's block size), in float32, then rounded to the load dtype."""
    from safetensors.torch import load_file
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    block = (24, 24)
    state, stored = {}, {}
    for k, v in load_file(fp8["a"] / "model.safetensors").items():
        if "layers" not in k or v.ndim != 2:
            state[k] = v
            continue
        rows, cols = v.shape
        grid = (-(-rows // block[0]), -(-cols // block[1]))
        padded = torch.zeros(grid[0] * block[0], grid[1] * block[1])
        padded[:rows, :cols] = v.float()
        tiles = padded.reshape(grid[0], block[0], grid[1], block[1])
        scale_inv = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448
        q = (tiles / scale_inv[:, None, :, None]).reshape(padded.shape)[:rows, :cols].to(torch.float8_e4m3fn)
        state[k], state[k + "_scale_inv"], stored[k] = q, scale_inv, (q, scale_inv)
    folder = tmp_path / "fp8-24"
    _save_quantized(folder, state, json.loads((fp8["a"] / "config.json").read_text()),
                    {"quant_method": "fp8", "weight_block_size": list(block), "activation_scheme": "dynamic"})
    ckpt = Checkpoint(folder)
    for name, (q, scale_inv) in stored.items():
        expected = _dequantize_fp8_weight(q, scale_inv, list(block), torch.float32).to(torch.bfloat16)
        assert torch.equal(ckpt.read(name), expected), name
        stop = min(29, q.shape[0])  # rows across a block's edge, and a partial last block
        assert torch.equal(ckpt.read(name, rows=(5, stop)), expected[5:stop]), name
    report = check([folder, fp8["b"]])
    assert report.ok, report.errors


def test_a_lora_adapter_of_an_fp8_base_merges_as_peft_merges_it_into_the_dequantized_base(fp8, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    from factories import make_lora_adapter

    adapter = make_lora_adapter(fp8["a-fp8"], tmp_path / "adapter", {"r": 4, "lora_alpha": 8,
                                                                      "target_modules": ["q_proj", "up_proj"]}, seed=3)
    base = AutoModelForCausalLM.from_pretrained(fp8["a-fp8"], quantization_config=FineGrainedFP8Config(dequantize=True))
    peft = PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()
    refs = [adapter, fp8["b"]]
    out = merge(refs, tmp_path / "soup", AmeConfig(optimizer="sgd", dtype="float32"), progress=False).path
    merged, expected = loaded(out), mean([peft, loaded(fp8["b"])])
    assert set(merged) == set(expected)
    for name, value in expected.items():  # peft adds the delta in the base's bf16, ame-hf in float32: one rounding
        rounding = peft[name].double().abs() * 2 ** -8  # peft's bf16 roundings (at most an ulp), halved in the mean
        assert ((merged[name].double() - value).abs() <= rounding + 1e-6).all(), name
        if "q_proj" not in name and "up_proj" not in name:  # the tensors the adapter leaves: the dequantized base's
            assert torch.allclose(merged[name].double(), value, rtol=0, atol=1e-6), name
