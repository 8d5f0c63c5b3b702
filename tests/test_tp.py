"""Tensor parallelism: calibration shards, the cache's local-head geometry, and a real
two-process run of transformers' tensor parallelism (``tp_plan="auto"``) on CPU / gloo.

The two-process test saves a tiny random Llama with 4 KV heads (8 query heads), calibrates it
once in this process, then starts two workers (this file run as a script, with the environment
``torchrun`` would give them: RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, a free port; no GPU
visible, so transformers picks the CPU mesh and gloo). Each worker loads the model with
``tp_plan="auto"`` (2 KV heads per rank), loads its shard of the calibration and generates
greedily with an 8-bit HeadQCache; the tokens must equal the single-process HeadQ run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from headq_torch.cache import HeadQCache
from headq_torch.calibration import Calibration, CalibrationError
from headq_torch.tp import check_shard, tp_shard

pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated")

HERE = Path(__file__).resolve()
PROMPT_LEN = 40        # > group_size: the prompt's first group is quantised after prefill
NEW_TOKENS = 40        # decode crosses another group boundary
CACHE_KW = dict(key_bits=8, value_bits=8, group_size=32, value_group_size=32)


# ------------------------------------------------------------------------------ helpers


def make_tiny_llama_4kv(seed: int = 0):
    """conftest.make_tiny('llama') with 8 query / 4 KV heads (2 KV heads per rank of 2)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=8,
                      num_key_value_heads=4, head_dim=32, max_position_embeddings=1024,
                      initializer_range=0.02, tie_word_embeddings=False, num_hidden_layers=2)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(4.0)
        model.lm_head.weight.mul_(10.0)
    return model.eval()


def prompt_ids():
    g = torch.Generator().manual_seed(7)
    # no token 0: it is the pad_token_id given to generate(), which would hide it (no mask)
    return torch.randint(1, 128, (1, PROMPT_LEN), generator=g)


@torch.no_grad()
def headq_generate(model, calibration, headq_attention: bool = True, **cache_kw):
    """Greedy tokens with a HeadQCache (``"headq"`` attention or the model's sdpa)."""
    from headq_torch import attention

    if headq_attention:
        attention.enable(model)
    try:
        cache = HeadQCache(model.config, calibration, **CACHE_KW, **cache_kw)
        out = model.generate(prompt_ids(), max_new_tokens=NEW_TOKENS, do_sample=False,
                             min_new_tokens=NEW_TOKENS, past_key_values=cache,
                             pad_token_id=0)
    finally:
        if headq_attention:
            attention.disable(model)
    return out[0, PROMPT_LEN:].tolist(), cache


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ unit tests


@pytest.fixture(scope="module")
def model4():
    return make_tiny_llama_4kv()


@pytest.fixture(scope="module")
def cal4(model4):
    from conftest import tiny_calibration

    return tiny_calibration(model4)


def test_calibration_shard_slices_heads(cal4):
    assert cal4.shard_info == (0, 1) and not cal4.is_sharded and cal4.local_kv_heads == 4
    assert cal4.shard(0, 1) is cal4
    for world in (1, 2, 4):
        parts = [cal4.shard(r, world) for r in range(world)]
        for r, p in enumerate(parts):
            assert p.shard_info == (r, world) and p.num_kv_heads == 4
            assert p.local_kv_heads == 4 // world
            assert "shard=" in repr(p) or world == 1
        for i, b in enumerate(cal4.bases):
            torch.testing.assert_close(torch.cat([p.bases[i] for p in parts]), b, rtol=0, atol=0)
    # the same shard again is itself; another shard of a shard is an error
    s = cal4.shard(1, 2)
    assert s.shard(1, 2) is s
    with pytest.raises(CalibrationError, match="already the shard"):
        s.shard(0, 2)


@pytest.mark.parametrize("rank, world, match", [
    (0, 3, "cannot be split evenly over 3"),
    (1, 8, "cannot be split evenly over 8"),
    (2, 2, r"rank must be in \[0, world_size=2\)"),
    (-1, 2, r"rank must be in \[0, world_size=2\)"),
    (0, 0, "world_size must be >= 1"),
    (0.0, 2, "two integers"),
    (True, 2, "two integers"),
])
def test_calibration_shard_errors(cal4, rank, world, match):
    with pytest.raises(CalibrationError, match=match):
        cal4.shard(rank, world)


def test_calibration_shard_controls(cal4):
    """Controls built on a shard are the shard of the controls of the full calibration."""
    for method in ("random", "fisher", "key_pca"):
        full = cal4.with_bases(method)
        part = cal4.shard(1, 2).with_bases(method)
        assert part.shard_info == (1, 2)
        for b_full, b_part in zip(full.bases, part.bases):
            torch.testing.assert_close(b_part, b_full[2:4], rtol=1e-5, atol=1e-6)


def test_calibration_load_shard(cal4, model4, tmp_path):
    path = tmp_path / "cal.safetensors"
    cal4.save(path)
    with pytest.raises(CalibrationError, match="save the full calibration"):
        cal4.shard(0, 2).save(tmp_path / "shard.safetensors")
    for r in range(2):
        s = Calibration.load(path, expected_config=model4.config, shard=(r, 2))
        assert s.shard_info == (r, 2)
        for a, b in zip(s.bases, cal4.bases):
            torch.testing.assert_close(a, b[2 * r:2 * r + 2], rtol=0, atol=0)
    # "auto" without TP (no torch.distributed, no distributed_config): the whole calibration
    full = Calibration.load(path, expected_config=model4.config, shard="auto")
    assert full.shard_info == (0, 1)
    with pytest.raises(CalibrationError, match="needs expected_config"):
        Calibration.load(path, shard="auto")
    with pytest.raises(CalibrationError, match="cannot be split evenly over 3"):
        Calibration.load(path, expected_config=model4.config, shard=(0, 3))
    with pytest.raises(CalibrationError, match="rank must be in"):
        Calibration.load(path, expected_config=model4.config, shard=(2, 2))


def test_check_shard():
    assert check_shard((1, 2), 4) == (1, 2)
    assert check_shard([0, 4], 4) == (0, 4)
    for bad in ((1,), (0, 1, 2), "01", None, (0, 2.0)):
        with pytest.raises(ValueError, match="expected \\(rank, world_size\\)"):
            check_shard(bad, 4)


def test_tp_shard_auto_without_distributed(model4):
    assert tp_shard(model4.config) is None
    cache = HeadQCache(model4.config, None, **CACHE_KW)
    assert cache.shard == (0, 1) and cache.num_kv_heads == cache.total_kv_heads == 4


def test_tp_shard_needs_initialised_distributed(model4):
    """A config that says tp_size=2 but no process group: not sharded (nothing to shard on)."""
    DistributedConfig = pytest.importorskip("transformers.distributed").DistributedConfig

    cfg = model4.config.__class__.from_dict(model4.config.to_dict())
    cfg.distributed_config = DistributedConfig(tp_plan="auto", tp_size=2)
    assert tp_shard(cfg) is None


def _states(H, L=40, D=32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, H, L, D, generator=g), torch.randn(1, H, L, D, generator=g)


def test_cache_geometry_local_heads(model4, cal4):
    """A cache for shard (r, 2) holds 2 of the 4 heads: it takes [B, 2, L, D] states (sliced
    calibration), rejects the full 4 heads and any other count."""
    for r in range(2):
        cache = HeadQCache(model4.config, cal4, shard=(r, 2), **CACHE_KW)
        assert cache.shard == (r, 2) and cache.num_kv_heads == 2 and cache.total_kv_heads == 4
        assert cache.calibration.shard_info == (r, 2)
        layer = cache.layers[0]
        torch.testing.assert_close(layer.basis_cpu, cal4.bases[0][2 * r:2 * r + 2])
        k, v = _states(2)
        kk, vv = cache.update(k, v, 0)
        assert kk.shape == (1, 2, 40, 32) and layer.n_quant == 32
        torch.testing.assert_close(kk, k, rtol=0.02, atol=0.05)
        assert layer.memory_breakdown()["k_codes"] == 32 * 2 * 32  # 2 heads, 32 tokens, 8 bit
        for H in (4, 1, 3):
            with pytest.raises(ValueError, match="sharded over 2 tensor-parallel ranks"):
                cache.update(*_states(H), 1)
    # an unsharded cache rejects the local head count, with a hint about tensor parallelism
    cache = HeadQCache(model4.config, cal4, **CACHE_KW)
    with pytest.raises(ValueError, match="4 KV heads of head_dim 32.*tensor-parallel"):
        cache.update(*_states(2), 0)
    with pytest.raises(ValueError, match="4 KV heads of head_dim 32"):
        cache.update(*_states(4, D=64), 0)
    # a calibration shard that is not the cache's shard
    with pytest.raises(CalibrationError, match="is the tensor-parallel shard \\(0, 2\\)"):
        HeadQCache(model4.config, cal4.shard(0, 2), shard=(1, 2), **CACHE_KW)
    with pytest.raises(CalibrationError, match="is the tensor-parallel shard"):
        HeadQCache(model4.config, cal4.shard(0, 2), shard=None, **CACHE_KW)
    # the matching shard is used as is
    s = cal4.shard(1, 2)
    assert HeadQCache(model4.config, s, shard=(1, 2), **CACHE_KW).calibration is s
    with pytest.raises(ValueError, match="cannot be split evenly over 3"):
        HeadQCache(model4.config, cal4, shard=(0, 3), **CACHE_KW)


def test_sharded_caches_equal_full_cache(model4, cal4):
    """The packed cache of shard r is the heads of rank r of the full cache (quantisation is per
    head), bit for bit."""
    k, v = _states(4, L=70)
    full = HeadQCache(model4.config, cal4, **CACHE_KW)
    kf, vf = full.update(k, v, 0)
    for r in range(2):
        part = HeadQCache(model4.config, cal4, shard=(r, 2), **CACHE_KW)
        kp, vp = part.update(k[:, 2 * r:2 * r + 2], v[:, 2 * r:2 * r + 2], 0)
        torch.testing.assert_close(kp, kf[:, 2 * r:2 * r + 2], rtol=0, atol=0)
        torch.testing.assert_close(vp, vf[:, 2 * r:2 * r + 2], rtol=0, atol=0)
        for name, t in part.layers[0].buf.items():
            torch.testing.assert_close(t, full.layers[0].buf[name][:, 2 * r:2 * r + 2],
                                       rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------------------ 2 processes


def test_two_process_tensor_parallel_generation_gloo(tmp_path, restore_attn):
    """transformers' own TP (tp_plan="auto") on 2 CPU processes over gloo: each rank holds
    2 of the 4 KV heads, loads its calibration shard, and greedy HeadQ generation gives the
    tokens of the single-process HeadQ run with the same calibration."""
    from conftest import tiny_calibration
    from transformers import AutoModelForCausalLM

    model_dir, cal_path = tmp_path / "model", tmp_path / "cal.safetensors"
    make_tiny_llama_4kv().save_pretrained(model_dir)
    ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    restore_attn.append(ref_model)
    cal = tiny_calibration(ref_model)
    cal.save(cal_path)
    cal = Calibration.load(cal_path, expected_config=ref_model.config)
    ref_headq, ref_cache = headq_generate(ref_model, cal)
    ref_sdpa, _ = headq_generate(ref_model, cal, headq_attention=False)
    assert ref_cache.layers[0].n_quant >= 64  # the packed region was read while decoding

    port = _free_port()
    procs = []
    for r in range(2):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                   LOCAL_WORLD_SIZE="2", GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", CUDA_VISIBLE_DEVICES="",
                   OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent.parent),
                                             env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        out = tmp_path / f"rank{r}.json"
        procs.append((subprocess.Popen([sys.executable, str(HERE), str(model_dir), str(cal_path),
                                        str(out)], env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True), out))
    deadline = time.monotonic() + 150
    logs = []
    try:
        for p, _ in procs:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, _) in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r][-4000:] if r < len(logs) else ''}"
    results = [json.loads(out.read_text()) for _, out in procs]
    for r, res in enumerate(results):
        assert res["tp_shard"] == [r, 2]
        assert res["k_proj_local_out"] == 2 * 32  # transformers really sharded k_proj
        assert res["cache_shard"] == [r, 2] and res["cache_kv_heads"] == 2
        assert res["calibration_shard"] == [r, 2]
        assert res["k_codes_heads"] == 2 and res["n_quant"] == ref_cache.layers[0].n_quant
        torch.testing.assert_close(torch.tensor(res["basis0"]), cal.bases[0][2 * r:2 * r + 2])
        assert res["tokens_loaded_shard"] == ref_headq, f"rank {r}"
        assert res["tokens_auto_shard"] == ref_headq, f"rank {r}"
        assert res["tokens_sdpa"] == ref_sdpa, f"rank {r}"
        # each rank holds half of the packed cache
        assert res["memory_bytes"] * 2 == ref_cache.memory_bytes()


def _worker(model_dir: str, cal_path: str, out: str) -> None:
    """One rank of the two-process test (run as a script with torchrun's environment)."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    try:  # tp_plan="auto"; transformers >= 5.17 wants it in a DistributedConfig
        from transformers.distributed import DistributedConfig
        tp = dict(distributed_config=DistributedConfig(tp_plan="auto"))
    except ImportError:
        tp = dict(tp_plan="auto")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **tp)
    model.eval()
    assert dist.is_initialized() and dist.get_backend() == "gloo", dist.get_backend()
    w = model.model.layers[0].self_attn.k_proj.weight
    w_local = w.to_local() if hasattr(w, "to_local") else w
    shard = tp_shard(model.config)
    # (1) the shard loaded from the file, (2) the full calibration sliced by the cache itself
    cal_shard = Calibration.load(cal_path, expected_config=model.config, shard="auto")
    cal_full = Calibration.load(cal_path, expected_config=model.config)
    tokens_loaded, cache = headq_generate(model, cal_shard)
    tokens_auto, cache2 = headq_generate(model, cal_full)
    tokens_sdpa, _ = headq_generate(model, cal_full, headq_attention=False)
    res = {
        "rank": dist.get_rank(),
        "tp_shard": list(shard) if shard else None,
        "k_proj_local_out": int(w_local.shape[0]),
        "cache_shard": list(cache.shard),
        "cache_kv_heads": cache.num_kv_heads,
        "calibration_shard": list(cache2.calibration.shard_info),
        "k_codes_heads": int(cache.layers[0].buf["k_codes"].shape[1]),
        "basis0": cache2.layers[0].basis_cpu.tolist(),
        "tokens_loaded_shard": tokens_loaded,
        "tokens_auto_shard": tokens_auto,
        "tokens_sdpa": tokens_sdpa,
        "memory_bytes": cache.memory_bytes(),
        "n_quant": cache.layers[0].n_quant,
    }
    Path(out).write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(*sys.argv[1:4])
