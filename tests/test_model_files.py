"""The model cache: a GGUF conversion made before packed weights existed is converted again."""

import json

from jpaged import checkpoint
from jpaged.model_files import resolve_model
from tests.conftest import default_model_gguf


def test_gguf_converted_before_packing_is_converted_again(tmp_path, monkeypatch):
    monkeypatch.setenv("JPAGED_HOME", str(tmp_path))
    src = tmp_path / "model.gguf"
    src.symlink_to(default_model_gguf())
    out = resolve_model(str(src), progress=False)
    manifest_file = out / checkpoint.MANIFEST
    manifest = json.loads(manifest_file.read_text())
    assert manifest["quantization"]  # packed blocks
    del manifest["quantization"]  # as the older converter wrote it
    manifest_file.write_text(json.dumps(manifest))
    again = resolve_model(str(src), progress=False)
    assert again == out and "quantization" in checkpoint.read_manifest(again)
    assert not list(tmp_path.glob("models/.*old*"))
