"""vlt's shipped tables of fla kernel configs (vlt.kernels.fla_tables): what a process's autotuners
picked is written in fla's file format and read back by fla's own lookup (the next process on a
fresh machine skips the timing), and the table folder is chosen per GPU model without overriding a
user's own fla settings. fla's autotuner objects are real; nothing is launched (CPU)."""
import json
import types

import pytest
import torch

pytest.importorskip("fla")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from fla.ops.utils import cache as fla_cache  # noqa: E402

from vlt.kernels import fla_tables  # noqa: E402


def make_tuner():
    @fla_cache.fla_cache_autotune(configs=[triton.Config({"BK": bk}, num_warps=w, num_stages=s)
                                           for bk in (32, 64) for w in (2, 4) for s in (2, 3)], key=["K", "BT"])
    @triton.jit
    def vlt_test_kernel(x, K, BT: tl.constexpr, BK: tl.constexpr):
        pass
    return vlt_test_kernel


def picked(tuner, key, i):
    tuner.cache[key] = tuner.configs[i]
    return tuner.configs[i]


@pytest.fixture
def strict(monkeypatch, tmp_path):
    monkeypatch.setenv("FLA_CONFIG_DIR", str(tmp_path))
    monkeypatch.setattr(fla_cache, "FLA_CACHE_MODE", fla_cache.FlaCacheMode.STRICT)
    fla_cache.load_config_file.cache_clear()
    yield tmp_path
    fla_cache.load_config_file.cache_clear()


def test_dumped_configs_are_what_fla_reads_back_for_the_same_key_only(strict):
    tuner = make_tuner()
    k1, k2 = (128, 64, "torch.bfloat16"), (64, 64, "torch.float32")
    c1, c2 = picked(tuner, k1, 5), picked(tuner, k2, 2)
    written = fla_tables.dump_tables(strict, modules=[types.SimpleNamespace(kernel=tuner)])
    assert [p.name for p in written] == ["vlt_test_kernel.json"]
    for key, cfg in ((k1, c1), (k2, c2)):
        got = fla_cache.load_cached_config("vlt_test_kernel", fla_cache.AutotuneKey(key))
        assert got["kwargs"] == cfg.kwargs and (got["num_warps"], got["num_stages"]) == (cfg.num_warps,
                                                                                          cfg.num_stages)
    assert fla_cache.load_cached_config("vlt_test_kernel", fla_cache.AutotuneKey((256, 64, "torch.bfloat16"))) is None
    # the next process: a fresh autotuner takes the config from the file instead of timing the 8 candidates
    fresh = make_tuner()
    fresh.maybe_load_cached_config(fla_cache.AutotuneKey(k1), nargs={}, runtime_kwargs={})
    cfg = fresh.cache[k1]
    assert (cfg.kwargs, cfg.num_warps, cfg.num_stages) == (c1.kwargs, c1.num_warps, c1.num_stages)


def test_dumps_merge_and_skip_kernels_that_never_ran(strict):
    a, idle = make_tuner(), make_tuner()
    picked(a, (128, 64, "torch.bfloat16"), 1)
    fla_tables.dump_tables(strict, modules=[types.SimpleNamespace(kernel=a, idle=idle)])
    b = make_tuner()
    picked(b, (64, 64, "torch.bfloat16"), 3)
    picked(b, (128, 64, "torch.bfloat16"), 6)  # a later run's pick for the same key replaces the old one
    fla_tables.dump_tables(strict, modules=[types.SimpleNamespace(kernel=b)])
    fla_cache.load_config_file.cache_clear()
    got = fla_cache.load_cached_config("vlt_test_kernel", fla_cache.AutotuneKey((128, 64, "torch.bfloat16")))
    assert got["kwargs"] == b.configs[6].kwargs and got["num_stages"] == b.configs[6].num_stages
    assert fla_cache.load_cached_config("vlt_test_kernel", fla_cache.AutotuneKey((64, 64, "torch.bfloat16")))


@pytest.fixture
def fresh_process(monkeypatch, tmp_path):
    for var in ("FLA_CONFIG_DIR", "FLA_CACHE_MODE", fla_tables.DUMP_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(fla_tables, "_prepared", False)
    monkeypatch.setattr(fla_tables, "TABLE_ROOT", tmp_path)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(fla_cache, "FLA_CACHE_MODE", fla_cache.FlaCacheMode.DISABLED)
    return tmp_path


def test_the_table_of_this_gpu_model_is_used_with_strict_keys(fresh_process, monkeypatch):
    (fresh_process / "NVIDIA_H200").mkdir()
    assert fla_tables.use_shipped_tables("cuda") == fresh_process / "NVIDIA_H200"
    assert fla_cache.FLA_CACHE_MODE is fla_cache.FlaCacheMode.STRICT  # fla had read its mode at import
    assert fla_tables.use_shipped_tables("cuda") == fresh_process / "NVIDIA_H200"  # once per process


def test_no_table_or_the_users_own_fla_settings_leave_fla_autotuning(fresh_process, monkeypatch):
    assert fla_tables.use_shipped_tables("cuda") is None  # no folder for this GPU model
    assert fla_cache.FLA_CACHE_MODE is fla_cache.FlaCacheMode.DISABLED
    (fresh_process / "NVIDIA_H200").mkdir()
    monkeypatch.setattr(fla_tables, "_prepared", False)
    monkeypatch.setenv("FLA_CACHE_MODE", "disabled")
    assert fla_tables.use_shipped_tables("cuda") is None
    assert "FLA_CONFIG_DIR" not in __import__("os").environ
    assert fla_tables.gpu_folder("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3"


def test_picks_are_written_when_a_time_limit_ends_the_process(tmp_path):
    """`timeout` ends a stage with SIGTERM, which skips atexit: the picks are written anyway, and the
    process still ends by the signal (exit status -15)."""
    import subprocess
    import sys
    import textwrap
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
        from test_fla_tables import make_tuner
        from vlt.kernels import fla_tables
        tuner = make_tuner()
        tuner.cache[(64, 64)] = tuner.configs[3]
        fla_tables.collect_tables = lambda modules=None, _real=fla_tables.collect_tables: _real([sys.modules[__name__]])
        vlt_kernel = tuner
        fla_tables.dump_at_exit({str(tmp_path)!r})
        os.kill(os.getpid(), signal.SIGTERM)
        print("not reached")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == -15, res.stderr
    assert "not reached" not in res.stdout
    written = json.loads((tmp_path / "vlt_test_kernel.json").read_text())
    (entry,) = written["autotune_entries"].values()
    assert entry["config"]["kwargs"] == {"BK": 32} and entry["config"]["num_warps"] == 4


def test_autotune_off_takes_the_first_fitting_config_and_dumps_nothing(strict, monkeypatch):
    """VLT_FLA_AUTOTUNE=off: one candidate per new shape (the first that fla's pruning keeps), so Triton
    compiles and times nothing else; a table's entry is still used; the untimed picks are never dumped."""
    tuner = make_tuner()
    assert len(tuner.prune_configs({})) == 8
    ns = types.SimpleNamespace(kernel=tuner)
    assert fla_tables.skip_autotuning(modules=[ns]) == 1
    assert fla_tables.skip_autotuning(modules=[ns]) == 0   # once
    assert tuner.prune_configs({}) == [tuner.configs[0]]
    # fla's own pruning still decides what fits: the first config it keeps is taken
    pruned = make_tuner()
    pruned.early_config_prune = lambda configs, nargs, **kw: [c for c in configs if c.kwargs["BK"] == 64]
    fla_tables.skip_autotuning(modules=[types.SimpleNamespace(kernel=pruned)])
    pruned.nargs = {}
    (only,) = pruned.prune_configs({})
    assert only.kwargs == {"BK": 64} and only is pruned.configs[4]
    # an untimed pick is not written as a table entry
    picked(tuner, (128, 64, "torch.bfloat16"), 0)
    assert fla_tables.dump_tables(strict, modules=[ns]) == []


def test_autotune_setting_is_checked(monkeypatch, fresh_process):
    monkeypatch.setenv(fla_tables.AUTOTUNE_ENV, "sometimes")
    with pytest.raises(ValueError, match=r"VLT_FLA_AUTOTUNE='sometimes'.*\['on', 'off'\]"):
        fla_tables.use_shipped_tables("cuda")
    monkeypatch.setattr(fla_tables, "_prepared", False)
    monkeypatch.setenv(fla_tables.AUTOTUNE_ENV, "OFF")
    calls = []
    monkeypatch.setattr(fla_tables, "skip_autotuning", lambda modules=None: calls.append(1) or 0)
    fla_tables.use_shipped_tables("cuda")
    assert calls == [1]
    monkeypatch.setattr(fla_tables, "_prepared", False)
    monkeypatch.delenv(fla_tables.AUTOTUNE_ENV)
    fla_tables.use_shipped_tables("cuda")
    assert calls == [1]   # on by default


def test_autotune_off_reaches_the_kernels_that_stalled_on_the_h200():
    """skip_autotuning over the fla modules a model imports patches fla's real autotuners, among them the
    two whose candidate compiles held up the H200 runs (GDN's fused kkt/solve, GDN-2's inter-subchunk solve)."""
    import subprocess
    import sys
    code = ("import sys, fla.layers; from vlt.kernels import fla_tables; "
            "mods = [m for n, m in list(sys.modules.items()) if n == 'fla' or n.startswith('fla.')]; "
            "tuners = list(fla_tables._autotuners(mods)); n = fla_tables.skip_autotuning(); "
            "names = {getattr(t, 'kernel_name', None) or t.base_fn.__name__ for t in tuners if t._vlt_untimed}; "
            "print(n, len(tuners), 'chunk_gated_delta_rule_fwd_kkt_solve_kernel' in names, "
            "'chunk_gdn2_fwd_kernel_inter_solve_fused' in names)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    n, total, kkt, gdn2 = out.stdout.split()
    assert int(n) == int(total) >= 100 and kkt == gdn2 == "True", out.stdout
