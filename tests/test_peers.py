"""The peer servers' side of the benchmark that needs no peer running: the one folder infinity reads."""

from __future__ import annotations

from bench.peers import InfinityPeer, merged_model_folder, start_command


def test_the_merged_folder_links_model_and_processor_files_once(tmp_path, tiny_model_dir):
    out = merged_model_folder(tiny_model_dir, tmp_path / "merged")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors"} <= names and "tokenizer_config.json" in names
    assert "clipsite-prepared" not in names  # clipsite's own cache stays out
    assert (out / "config.json").resolve() == (tiny_model_dir / "model-clip" / "config.json").resolve()
    before = {p.name: p.resolve() for p in out.iterdir()}
    assert {p.name: p.resolve() for p in merged_model_folder(tiny_model_dir, out).iterdir()} == before
    assert start_command(out, 7997)[:4] == ["infinity_emb", "v2", "--model-id", str(out)]


def test_an_unreachable_peer_is_a_clear_error(tmp_path):
    import socket

    import pytest

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens here once it is closed
    with pytest.raises(RuntimeError, match="unreachable"):
        InfinityPeer(f"http://127.0.0.1:{port}")
