"""Notebooks are integration tests: papermill runs them in smoke mode and we check what they record."""

import json
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).parents[2] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs_and_one_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: a cell carries outputs"
            assert cell.execution_count is None, f"{path.name}: a cell carries an execution count"
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"


def test_notebooks_use_only_public_api():
    import re

    private = re.compile(r"toolkit(\.\w+)*\._[a-z]|from toolkit[\w.]* import .*\b_[a-z]")
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not private.search(cell.source), f"{path.name}: private name in {cell.source[:80]!r}"


def run_notebook(name: str, tmp_path, monkeypatch, parameters: dict | None = None) -> dict:
    import papermill

    record = tmp_path / "record.json"
    monkeypatch.setenv("TOOLKIT_SMOKE", "1")
    monkeypatch.setenv("TOOLKIT_RECORD", str(record))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    src = Path(__file__).parents[2] / "notebooks" / name
    papermill.execute_notebook(str(src), str(tmp_path / name), parameters=parameters or {},
                               kernel_name="python3", cwd=str(tmp_path), progress_bar=False)
    return json.loads(record.read_text())


@pytest.mark.notebook
@pytest.mark.slow
def test_quickstart(tmp_path, monkeypatch):
    rec = run_notebook("00_quickstart.ipynb", tmp_path, monkeypatch)
    bpb = rec["bpb"]
    assert rec["roundtrips"] == len(bpb) >= 20
    assert rec["damage_caught"] is True
    assert rec["header_codec"] == "xz"
    # random bytes cost ~8 bits per byte and are never blown up beyond a header
    assert 7.9 < bpb["noise.bin/zstd"] < 8.6
    # text compresses, and auto is never much worse than the best classical codec
    assert bpb["prose.txt/xz"] < 5.0 and bpb["weather.csv/xz"] < 2.5
    for f in ["prose.txt", "weather.csv", "toolkit-sources.py"]:
        best = min(bpb[f"{f}/zstd"], bpb[f"{f}/xz"])
        assert bpb[f"{f}/auto"] <= best * 1.1 + 0.1


@pytest.mark.notebook
@pytest.mark.slow
def test_lm_lossless(tmp_path, monkeypatch):
    rec = run_notebook("10_lm_lossless.ipynb", tmp_path, monkeypatch)
    assert rec["loss_last"] < rec["loss_first"] - 1.0  # the small model learned something
    assert 0 < rec["small_bpb_code"] < 8.5
    assert 0 < rec["mean_cost_per_byte"] < 12
    assert set(rec["lm_bpb"]) == set(rec["xz_bpb"]) == {"code-heldout.py", "prose.txt"}
    for name, bpb in rec["lm_bpb"].items():
        # round trip verified inside; a small model trained for seconds is no xz, but the container stores
        # what it would blow up, so a file never costs much more than xz's
        assert bpb < rec["xz_bpb"][name] + 1.5, name
    v = rec["variant_bpb"]
    # what the file teaches the codec while it codes: mixing, then adaptation, each lower the cost
    assert v["+ n-gram mixing"] < v["model alone"] and v["+ adaptation"] < v["+ n-gram mixing"]
    before, after, side = rec["breaks"]
    assert after < before / 2 and 0 < side < 40  # the sample's wrapped lines are joined for a few bytes
    assert rec["wrap_bpb"]["lines joined"] < rec["wrap_bpb"]["lines as they are"]


@pytest.mark.notebook
@pytest.mark.slow
def test_pc_lossless(tmp_path, monkeypatch):
    rec = run_notebook("11_pc_lossless.ipynb", tmp_path, monkeypatch)
    assert rec["roundtrip_exact"] is True and rec["photo_exact"] is True
    # the circuit beats every classic coder on held-out digits, and its stream is near its ideal code length
    assert rec["digits_pc_bpd"] < min(rec["digits_baseline_bpd"].values())
    assert rec["digits_pc_bpd"] < rec["digits_ideal_bpd"] + 0.05
    assert rec["valid_bpd"] < 2.6
    assert rec["photo_bpd"]["pc"] < rec["photo_bpd"]["PNG (optimized)"]
    # the three evaluation orders code the same distribution (speed is the image benchmark's business)
    sizes = rec["method_stream_bytes"]
    assert set(sizes) == {"naive", "partial", "context"}
    assert max(sizes.values()) - min(sizes.values()) <= 0.01 * min(sizes.values()) + 8


@pytest.mark.notebook
@pytest.mark.slow
def test_lossless_weights(tmp_path, monkeypatch):
    rec = run_notebook("12_lossless_weights.ipynb", tmp_path, monkeypatch)
    assert 2.0 < rec["exponent_entropy"] < 4.0  # trained BF16 weights: a few bits in the 8 of the exponent
    r = rec["ratios"]
    assert r["weights max"] < r["order-0 bound of the planes"] < r["weights fast"] + 0.01
    assert r["weights fast"] < r["zstd -19"]
    bits = rec["row_context_bits"]
    assert bits["64"] < bits["4"] < bits["1"]  # conditioning on the row's class lowers the entropy
    assert rec["load_exact"] is True
    mem = rec["in_memory"]
    assert mem["exact"] is True and mem["between_ratio"] < 0.7 and mem["held_ratio"] < 0.9


@pytest.mark.notebook
@pytest.mark.slow
def test_llm_quantization(tmp_path, monkeypatch):
    rec = run_notebook("20_llm_quantization.ipynb", tmp_path, monkeypatch)
    base = rec["float_ppl"]
    assert 1 < base < 200  # the shipped model on held-out text
    # 4-bit GPTQ is nearly free; at 3 bits GPTQ beats rounding; at 2 bits outliers beat both
    assert rec["gptq4_ppl"] < 1.05 * base and 4 < rec["gptq4_bpw"] < 4.3
    assert rec["gptq3_ppl"] < rec["rtn3_ppl"]
    assert rec["outlier2_ppl"] < min(rec["gptq2_ppl"], rec["rtn2_ppl"]) and rec["outlier2_bpw"] < 3
    # on one layer GPTQ's output error on held-out inputs is below RTN's, for every linear of the block
    assert rec["layer_error_ratio"] < 1 and max(rec["layer_error_ratios"].values()) < 1
    # a saved checkpoint reloads to the same logits (and transformers reads it, where compressed-tensors is there)
    assert rec["reload_identical"] is True and rec["hf_identical"] in (True, None)
    assert rec["checkpoint_bytes"]["gptq4"] < rec["checkpoint_bytes"]["float"] / 2
    # the bfloat16 int4 CPU path computes nearly the same model
    assert abs(rec["bf16_ppl"] / rec["gptq4_ppl"] - 1) < 0.02 and rec["bf16_top1_agreement"] > 0.9
    assert rec["top1_agreement_gptq4"] > rec["top1_agreement_rtn2"]


@pytest.mark.notebook
@pytest.mark.slow
def test_kv_cache(tmp_path, monkeypatch):
    rec = run_notebook("21_kv_cache.ipynb", tmp_path, monkeypatch)
    err = rec["quant_errors"]
    # keys' outlier channels: per-channel groups at least halve the 2-bit error of per-token groups
    assert err["keys, per channel"] < 0.7 * err["keys, per token"]
    assert rec["kivi2_codes_dtype"] == "torch.uint8" and rec["kivi2_bytes_fraction"] < 0.4
    c = rec["curve"]
    # more bits, less divergence; GEAR's correction improves on plain 2-bit KIVI
    assert c["KIVI-4"]["kl"] < c["KIVI-2"]["kl"] and c["GEAR-2"]["kl"] < c["KIVI-2"]["kl"]
    assert c["KIVI-4"]["bytes_per_token"] < 4096 / 2
    assert c["bitstream 0.5/0.7"]["kl"] < c["bitstream 1.0/1.4"]["kl"]
    assert c["bitstream 1.0/1.4"]["bytes_per_token"] < c["bitstream 0.5/0.7"]["bytes_per_token"] < 4096 / 4
    assert rec["recall"]["full"] >= 0.5 and rec["recall"]["KIVI-4"] >= rec["recall"]["full"] - 0.34
    assert rec["minicache_retained"] > 0.5  # what the notebook says: a 4-layer model's pair keeps most tokens
    assert rec["reload_same_tokens"] is True and rec["bitstream_fraction"] < 0.25
    assert rec["load_speedup"] > 1


@pytest.mark.notebook
@pytest.mark.slow
def test_mllm_tokens(tmp_path, monkeypatch):
    rec = run_notebook("30_mllm_tokens.ipynb", tmp_path, monkeypatch)
    assert rec["n_image_tokens"] == 256
    assert set(rec["kept_counts"].values()) == {32}
    # the model reads the image: well above the best image-blind answerer
    assert rec["full_accuracy"] > rec["text_only_accuracy"] + 0.1
    c = rec["curve"]
    best25 = max(c[m]["0.25"] for m in ("fastv", "visionzip", "multistage"))
    assert best25 >= 0.85 * rec["full_accuracy"]
    assert best25 > c["random"]["0.25"]
    costs = rec["costs_at_25"]
    assert costs["visionzip"][0] < 0.5 and costs["visionzip"][1] < 0.35
    assert costs["fastv"][1] > costs["multistage"][1]  # FastV's early layers keep every token
    assert len(rec["example_answers"]["full"]) == 6


@pytest.mark.notebook
@pytest.mark.slow
def test_mllm_mod(tmp_path, monkeypatch):
    rec = run_notebook("31_mllm_mod.ipynb", tmp_path, monkeypatch)
    assert rec["schedule"] == pytest.approx([1.0, 0.65, 0.15, 0.15])
    assert rec["kept_per_layer"] == {"0": 256, "1": 166, "2": 38, "3": 38}  # int(share * 256) per layer
    steps = rec["training_steps"]
    assert steps["vlm-scenes-ft"] == steps["vlm-scenes-mod"] > 0  # matched training
    rows = rec["comparison"]
    dense, mod = rows["dense"], rows["p-MoD"]
    assert mod[1] < 0.6 and mod[2] < 0.6  # FLOPs and KV bytes against dense
    assert mod[0] > dense[0] - 0.1  # 60 questions in the smoke run: a loose bound; the benchmark has 1,000
    (zip_label,) = [k for k in rows if k.startswith("visionzip")]
    assert abs(rows[zip_label][1] - mod[1]) < 0.05  # compared at the same FLOPs


@pytest.mark.notebook
@pytest.mark.slow
def test_sam_slim(tmp_path, monkeypatch):
    rec = run_notebook("32_sam_slim.ipynb", tmp_path, monkeypatch)
    assert rec["importance_shapes"] == {"embed": [192], "qk": [6, 32], "v": [6, 6, 32], "mlp": [6, 768]}
    assert rec["parameter_share_of_encoder"] > 0.7  # the encoder is what there is to compress
    assert min(rec["example_box_iou"]) > 0.5  # the teacher segments held-out objects from boxes
    assert rec["live_params_share"] == pytest.approx(0.5, abs=0.005)
    c = rec["comparison"]
    assert c["SlimSAM 50%"]["params_share"] == pytest.approx(0.5, abs=0.005)
    assert c["SlimSAM 25%"]["params_share"] == pytest.approx(0.25, abs=0.005)
    assert c["MobileSAM"]["macs_share"] <= 0.2
    # 12 held-out images (48 objects) in the smoke run: looser than the benchmark's 500-image figures
    for name, floor in (("SlimSAM 50%", 0.9), ("SlimSAM 25%", 0.8), ("MobileSAM", 0.8)):
        assert c[name]["share_of_teacher"]["box"] > floor, name


@pytest.mark.notebook
@pytest.mark.slow
def test_audio_codec(tmp_path, monkeypatch):
    rec = run_notebook("40_audio_codec.ipynb", tmp_path, monkeypatch)
    assert rec["streaming_identical"] is True
    m = rec["metrics"]
    assert set(m) == {"1.5", "3.0", "6.0", "12.0"}
    # the shipped model beats Opus 6 kbps on mel distance at every bitrate (Opus at 6 kbps is narrowband)
    assert all(m[kb]["mel"] < rec["opus"][0]["mel"] for kb in m)
    assert all(m[kb]["stoi"] > 0.6 for kb in m)
    for kbps, disk in rec["kbps_on_disk"].items():
        # the priors code below the nominal rate; the header adds ~0.3 kbps on this 8 s clip
        assert 0.5 * float(kbps) < disk < float(kbps) + 0.5
    assert all(5 < r["kbps"] < 25 for r in rec["opus"])
    stoi = [r["stoi"] for r in sorted(rec["opus"], key=lambda r: r["kbps"])]
    assert stoi[0] < stoi[-1]  # Opus at its higher rate is the more intelligible: the measure tells rates apart
    assert rec["train_steps_logged"] == 3 and rec["train_mel_finite"] is True
