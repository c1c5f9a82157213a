"""Every config compiled for the hardware it targets, without that hardware
(`python -m dapo_jax.experiments.compile`): the seed configs for 8x H100 through the CUDA
plugin and the shipped target description, their TPU versions for v5p-8 through libtpu,
arith_tiny for this CPU; sizes shrunk to a tiny model and short rows, everything else the
config's own (precision, remat, mesh, loss, engine).

The compiles run in the aot environment (`DAPO_AOT_PYTHON`, built by .ci/run: libtpu and the
CUDA plugin do not belong in the test environment, where they would start with every JAX
process), all in one process for the session. What is checked is the compiled program:
it fits, its memory is > 0, the attention kernel `auto` picks for the target is in it, and
its collective bytes are not above XLA attention's (the kernel runs on each device's own
rows and heads); an out-of-memory compile is "does not fit"; bad input is one line.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest

from dapo_jax.experiments import compile as compile_tool
from dapo_jax.experiments import hlo as hlo_lib
from dapo_jax.experiments import targets
from dapo_jax.train.config import load_config_file
from tests import side_envs

REPO = Path(__file__).resolve().parents[1]
# Sizes only: a tiny model, rows of 64 + 192 tokens, 4 prompts x 4 samples per step.
SHRINK = [
    "--config.trainer.max_prompt_length=64",
    "--config.generator.sampling_params.max_generate_length=192",
    "--config.generator.eval_sampling_params.max_generate_length=192",
    "--config.trainer.algorithm.overlong_buffer.len=64",
    "--config.trainer.train_batch_size=4", "--config.trainer.policy_mini_batch_size=2",
    "--config.generator.n_samples_per_prompt=4", "--config.generator.max_num_seqs=16",
]
GPU_SEEDS = {"dapo_qwen3_1p7b": "qwen3-tiny", "dapo_qwen3_4b": "qwen3-tiny",
             "dapo_qwen2p5_math_7b": "qwen2-tiny"}
BF16 = ["--config.model.compute_dtype=bfloat16"]
# name -> (config, target, preset, attention_impl, functions, arguments)
JOBS = {
    **{f"{c}_h100": (c, "h100x8", p, "", "update,logprobs,generate", SHRINK)
       for c, p in GPU_SEEDS.items()},
    "dapo_qwen3_1p7b_h100_xla": ("dapo_qwen3_1p7b", "h100x8", "qwen3-tiny", "xla",
                                 "update,logprobs", SHRINK),
    # The main job's own sizes in bf16: rows of 56 + 64 = 120 tokens (not a multiple of the
    # kernel's 128), prompts of 64 in the engine's prefill; in float32 `auto` is XLA.
    "arith_tiny_h100": ("arith_tiny", "h100x8", "", "", "update,logprobs,generate", BF16),
    "arith_tiny_h100_f32": ("arith_tiny", "h100x8", "", "", "update", []),
    **{f"{c}_v5p_v5p": (f"{c}_v5p", "v5p-8", p, "", "update,logprobs,generate", SHRINK)
       for c, p in GPU_SEEDS.items()},
    "dapo_qwen3_1p7b_v5p_xla": ("dapo_qwen3_1p7b_v5p", "v5p-8", "qwen3-tiny", "xla",
                                "update,logprobs", SHRINK),
    **{f"dapo_{m}_v6e_v6e": (f"dapo_{m}_v6e", "v6e-8", "qwen3-tiny", "",
                             "update,logprobs,generate", SHRINK)
       for m in ("qwen3_1p7b", "qwen3_4b")},
}
# 64 rows of 8,192 tokens per chip: more than a v5e chip's 16 GiB under every remat policy
# (remat=auto, the config's, tries each and takes full).
JOBS["oom_v5e"] = ("dapo_qwen3_1p7b", "v5e-8", "qwen3-tiny", "xla", "update", [
    "--config.trainer.max_prompt_length=64",
    "--config.generator.sampling_params.max_generate_length=8128",
    "--config.generator.eval_sampling_params.max_generate_length=8128",
    "--config.trainer.micro_train_batch_size_per_gpu=64",
    "--config.trainer.train_batch_size=32", "--config.trainer.policy_mini_batch_size=32"])


def aot_python() -> str:
    return side_envs.python("aot")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, dict]:
    """Every job's --json report, compiled in one aot process."""
    python = aot_python()
    out = tmp_path_factory.mktemp("compile")
    calls = []
    for name, (config, target, model_preset, impl, functions, extra) in JOBS.items():
        args = ["--config", f"configs/{config}.py", "--target", target, "--functions",
                functions, "--json", str(out / f"{name}.json"), *extra]
        args += ["--preset", model_preset] if model_preset else []
        args += ["--attention-impl", impl] if impl else []
        calls.append(args)
    script = textwrap.dedent(f"""
        import sys
        from dapo_jax.experiments import compile
        for args in {calls!r}:
            if compile.main(args):
                sys.exit(f"compile failed: {{args}}")
    """)
    proc = subprocess.run([python, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = {name: json.loads((out / f"{name}.json").read_text()) for name in JOBS}
    reports["_stderr"] = proc.stderr
    return reports


@pytest.mark.parametrize("name", [f"{c}_h100" for c in GPU_SEEDS] + ["arith_tiny_h100"])
def test_configs_compile_for_h100_with_the_mosaic_kernel(compiled, name):
    """`auto` on H100 in bf16: tokamax's Mosaic kernel in the update, the log-prob pass and
    the engine's prefill, the Pallas decode kernel in the engine's decode steps (the custom
    calls in each compiled program), on each device's own rows."""
    r = compiled[name]
    assert r["device_kind"] == "NVIDIA H100 80GB HBM3" and r["num_devices"] == 8
    assert r["versions"]["tokamax"] == "0.0.17", r["versions"]
    for fn in ("update", "logprobs", "generate"):
        f = r["functions"][fn]
        assert f["fits"] and 0 < f["peak_bytes"] < f["memory_bytes"], (fn, f)
        # The engine: tokamax's Mosaic kernel in its prefill, our Pallas (Triton) kernel in
        # its decode steps (ragged.decode_kernel).
        want = "__gpu$xla.gpu.triton,mosaic_gpu_v2" if fn == "generate" else "mosaic_gpu_v2"
        assert f["attention"] == want, (fn, f["attention"])
        # FSDP's collectives are asynchronous with compute between start and done (the
        # trainer's XLA GPU flags pipeline them; bench/gpu_flags.py compares the schedules).
        if name != "arith_tiny_h100":  # one device's worth of mesh: nothing to gather
            assert 0 < f["overlapped_collectives"] == f["async_collectives"], (fn, f)
        sidecar_note = [w for w in f["warnings"] if w.startswith("the run generates in vllm")]
        assert len(sidecar_note) == (fn == "generate" and name != "arith_tiny_h100"), f
        assert f["warnings"] == sidecar_note, f["warnings"]


def remat_note(f: dict) -> str:
    [note] = [n for n in f["notes"] if n.startswith("model.remat=auto")]
    return note


@pytest.mark.parametrize("name", [f"{c}_h100" for c in GPU_SEEDS] +
                         [f"{c}_v5p_v5p" for c in GPU_SEEDS])
def test_remat_auto_takes_the_least_recompute_that_fits(compiled, name):
    """The seed configs' remat=auto, compiled for the target: a tiny model fits with no
    recompute, and the update's FLOPs as compiled are remat=full's less the forward it would
    recompute (a third of a layer's dots; the LM head is not in the layers)."""
    f = compiled[name]["functions"]["update"]
    assert f["remat"] == "none" and f["fits"], f
    assert remat_note(f).startswith("model.remat=auto: none (update peak GiB per device: "
                                    "none "), f["notes"]
    assert 1.15 < f["full_flops"] / f["flops"] < 4 / 3, (f["flops"], f["full_flops"])
    assert compiled[name]["functions"]["logprobs"]["remat"] == "none"


def test_remat_auto_is_full_when_nothing_fits(compiled):
    f = compiled["oom_v5e"]["functions"]["update"]
    assert f["remat"] == "full" and not f["full_flops"], f
    note = remat_note(f)
    assert "none " in note and "dots_saveable " in note and "minimal " in note and \
        note.endswith("nothing fits)"), note


@pytest.mark.parametrize("config", GPU_SEEDS)
def test_remat_auto_on_gpu_budgets_the_trainers_share(compiled, config):
    """On a GPU remat=auto's budget is the trainer's XLA_PYTHON_CLIENT_MEM_FRACTION of the
    chip (`trainer.xla_memory_fraction`, different in each seed config) less the rollout
    copy, the trainer's own rule; on a TPU the whole HBM."""
    fraction = load_config_file(REPO / "configs" / f"{config}.py").trainer.xla_memory_fraction
    f = compiled[f"{config}_h100"]["functions"]["update"]
    budget = fraction * f["memory_bytes"] - f["resident_bytes"]
    assert f"budget {budget / 2**30:.2f} GiB" in remat_note(f), (fraction, remat_note(f))
    tpu = compiled[f"{config}_v5p_v5p"]["functions"]["update"]
    tpu_budget = tpu["memory_bytes"] - tpu["resident_bytes"]
    assert f"budget {tpu_budget / 2**30:.2f} GiB" in remat_note(tpu), remat_note(tpu)


def test_auto_in_float32_on_h100_is_xla_with_one_warning(compiled):
    f = compiled["arith_tiny_h100_f32"]["functions"]["update"]
    assert f["fits"] and f["attention"] == "xla" and not f["warnings"], f
    lines = [ln for ln in compiled["_stderr"].splitlines()
             if "model.attention_impl=auto: tokamax's Mosaic GPU kernel takes bfloat16" in ln]
    assert len(lines) == 1 and "attention runs in XLA" in lines[0], lines


@pytest.mark.parametrize("name", [f"{c}_v5p_v5p" for c in GPU_SEEDS])
def test_tpu_configs_compile_for_v5p_with_splash(compiled, name):
    r = compiled[name]
    assert r["device_kind"].startswith("TPU v5") and r["num_devices"] == 4
    for fn in ("update", "logprobs", "generate"):
        f = r["functions"][fn]
        assert f["fits"] and f["peak_bytes"] > 0, (fn, f)
        assert f["attention"] == "tpu_custom_call", (fn, f["attention"])  # prefill too
    # The engine: splash in its prefill, our Mosaic decode kernel (ragged.decode_kernel) in
    # its decode steps.
    assert "decode_attention" in r["functions"]["generate"]["kernel_names"], \
        r["functions"]["generate"]["kernel_names"]
    # The in-process engine runs beside the trainer's masters and AdamW moments.
    assert r["functions"]["generate"]["resident_bytes"] > 0


@pytest.mark.parametrize("kernel,xla", [("dapo_qwen3_1p7b_h100", "dapo_qwen3_1p7b_h100_xla"),
                                        ("dapo_qwen3_1p7b_v5p_v5p", "dapo_qwen3_1p7b_v5p_xla")])
def test_kernel_collectives_not_above_xla_attention(compiled, kernel, xla):
    """A kernel that XLA cannot partition runs on the all-gathered batch: its collective
    bytes would exceed XLA attention's (12.97 vs 1.63 GB per update at the seed shape)."""
    for fn in ("update", "logprobs"):
        k, x = compiled[kernel]["functions"][fn], compiled[xla]["functions"][fn]
        assert x["attention"] == "xla"
        assert k["collective_bytes"] <= x["collective_bytes"] * 1.001, (fn, k, x)


@pytest.mark.parametrize("name", ["dapo_qwen3_1p7b_v6e_v6e", "dapo_qwen3_4b_v6e_v6e"])
def test_v6e_configs_compile_for_v6e_with_splash(compiled, name):
    r = compiled[name]
    assert r["device_kind"].startswith("TPU v6") and r["num_devices"] == 8
    for fn in ("update", "logprobs", "generate"):
        f = r["functions"][fn]
        assert f["fits"] and f["peak_bytes"] > 0 and f["attention"] == "tpu_custom_call", f
    assert "decode_attention" in r["functions"]["generate"]["kernel_names"]


def test_out_of_memory_compile_is_does_not_fit(compiled):
    f = compiled["oom_v5e"]["functions"]["update"]
    assert not f["fits"] and "exceeds available HBM" in f["error"], f
    assert f["peak_bytes"] > f["memory_bytes"]


def run_tool(python: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-m", "dapo_jax.experiments.compile", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_targets_are_one_line_errors(tmp_path):
    python = aot_python()
    bad = tmp_path / "bad.txtpb"
    bad.write_text("gpu_device_info { core_count: \"many\" }\n")
    base = ["--config", "configs/dapo_qwen3_1p7b.py", "--preset", "qwen3-tiny", *SHRINK]
    one_line_error(run_tool(python, *base, "--target", "h200x3"), "unknown target 'h200x3'",
                   "h100x8")
    one_line_error(run_tool(python, *base, "--target", str(bad)), "does not parse",
                   "h100_sxm_80gb.txtpb")
    # A kernel asked for by name that cannot compile: float32 compute on H100.
    one_line_error(run_tool(python, "--config", "configs/arith_tiny.py", "--target", "h100x8",
                            "--attention-impl", "tokamax_mosaic"),
                   "model.attention_impl=tokamax_mosaic: tokamax's Mosaic GPU kernel takes "
                   "bfloat16 or float16 inputs", "set model.compute_dtype=bfloat16")
    # v5p-8 is 4 chips: the seed's (1, 8, 1) mesh does not fit on it.
    one_line_error(run_tool(python, *base, "--target", "v5p-8"), "mesh.shape",
                   "target v5p-8 has 4 devices", "--config.mesh.shape=(1,-1,1)")


def test_missing_plugin_is_a_one_line_error(capsys):
    """The test environment has no libtpu: asking for a TPU target says what to install."""
    if targets.installed("libtpu"):
        pytest.skip("libtpu is installed in this environment")
    code = compile_tool.main(["--config", "configs/arith_tiny.py", "--target", "v5p-8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "libtpu is not installed" in err[0], err
    assert 'pip install -e ".[aot]"' in err[0]


def test_arith_tiny_compiles_for_this_cpu():
    """The CPU job's own target; the CPU fallback the mesh and memory tools use, labelled."""
    s, model = targets.load_run("configs/arith_tiny.py", {}, "")
    target = targets.get_target("cpu")
    reports = targets.compile_config(s, model, target)
    assert set(reports) == set(targets.FUNCTIONS)
    for r in reports.values():
        assert r.fits and r.peak_bytes > 0 and r.attention == "xla", r
    fallback = targets.get_target("v5p-8", cpu_fallback=True) if not \
        targets.installed("libtpu") else None
    if fallback is not None:
        assert fallback.platform == "cpu" and "libtpu is not installed" in fallback.label


def test_hlo_reading():
    """Collective bytes count outputs (an async all-gather's start returns operand and
    output); kernels are found with their result shapes."""
    hlo = "\n".join([
        "  %ag = (bf16[2,64]{1,0}, bf16[16,64]{1,0}) all-gather-start(bf16[2,64] %p), "
        "replica_groups={}",
        "  %ar = f32[128]{0} all-reduce(f32[128]{0} %x), to_apply=%add",
        "  %k = (bf16[2,256,4,64]{3,2,1,0}, f32[2,4,256]{2,1,0}) custom-call(%q, %k, %v), "
        "custom_call_target=\"mosaic_gpu_v2\"",
        "  %c = f32[4]{0} custom-call(%q), custom_call_target=\"Sharding\"",
        "  %decode_attention.1 = bf16[32,8,2,128]{3,2,1,0} custom-call(%l, %n, %q), "
        "custom_call_target=\"tpu_custom_call\"",
        "  %pallas_call.4.double_buffer_clone = f32[2,2]{1,0} custom-call(%q), "
        "custom_call_target=\"__gpu$xla.gpu.triton\"",
    ])
    assert hlo_lib.collective_bytes(hlo) == 16 * 64 * 2 + 128 * 4
    assert hlo_lib.kernel_calls(hlo) == [("mosaic_gpu_v2", [(2, 256, 4, 64), (2, 4, 256)]),
                                         ("tpu_custom_call", [(32, 8, 2, 128)]),
                                         ("__gpu$xla.gpu.triton", [(2, 2)])]
    assert hlo_lib.Program.parse(hlo).kernel_names() == ["decode_attention", "k",
                                                         "pallas_call"]


def test_loop_copies_are_counted_in_loop_bodies_only():
    """A copy (layout change) of a big array inside a while body counts; one in the entry
    computation (once per call) and small ones do not."""
    text = "\n".join([
        "%body (b: (s32[], bf16[64,8,128])) -> (s32[], bf16[64,8,128]) {",
        "  %b = (s32[], bf16[64,8,128]{2,1,0}) parameter(0)",
        "  %x = bf16[64,8,128]{2,1,0} get-tuple-element(%b), index=1",
        "  %relaid = bf16[64,8,128]{2,0,1} copy(%x)",
        "  %small = bf16[8,128]{0,1} copy(%y)",
        "  ROOT %t = (s32[], bf16[64,8,128]{2,1,0}) tuple(%i, %relaid)",
        "}",
        "ENTRY %main (p: bf16[64,8,128]) -> bf16[64,8,128] {",
        "  %p = bf16[64,8,128]{2,1,0} parameter(0)",
        "  %once = bf16[64,8,128]{2,0,1} copy(%p)",
        "  %w = (s32[], bf16[64,8,128]{2,1,0}) while(%init), condition=%cond, body=%body",
        "  ROOT %r = bf16[64,8,128]{2,1,0} get-tuple-element(%w), index=1",
        "}",
    ])
    program = hlo_lib.Program.parse(text)
    assert program.loop_copy_bytes(min_bytes=1e4) == 64 * 8 * 128 * 2
    assert program.loop_copy_bytes(min_bytes=1e6) == 0


@pytest.mark.parametrize("name", [f"{c}_v5p_v5p" for c in GPU_SEEDS] +
                         [f"{c}_h100" for c in GPU_SEEDS])
def test_the_decode_loop_keeps_the_kv_pool_in_place(compiled, name):
    """No copy of half a KV pool or more inside the engine's loops (XLA:TPU re-laid the
    pool out in every decode step before the pool's columns led its layout)."""
    f = compiled[name]["functions"]["generate"]
    assert f["loop_copy_bytes"] == 0, f["warnings"]


def test_program_flops_count_every_loop_iteration():
    """Dot FLOPs of a compiled program (this CPU's): the gradient of a 6-layer scan of
    [128, 256] x [256, 256] matmuls is 3 x 6 x 2 x 128 x 256 x 256 (forward, and two
    matmuls per layer back), where XLA's own cost analysis counts the loop body once."""
    import jax
    import jax.numpy as jnp

    def f(w, x):
        return jnp.sum(jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0])

    compiled = jax.jit(jax.grad(f)).lower(jnp.ones((6, 256, 256)), jnp.ones((128, 256))) \
        .compile()
    assert hlo_lib.program_flops(compiled.as_text()) == 3 * 6 * 2 * 128 * 256 * 256


def test_loops_without_a_known_trip_count_and_async_collectives():
    """A loop XLA pipelined (no known_trip_count: its iterations from `i < 31` in its
    condition's fusion, i starting at 1, stepping by 1) runs its body 30 times; an
    asynchronous all-gather with a fusion between start and done is overlapped, one with
    nothing between is not."""
    text = "\n".join([
        "%fused_lt (p: s32[]) -> pred[] {",
        "  %p = s32[] parameter(0)",
        "  %c31 = s32[] constant(31)",
        "  ROOT %lt = pred[] compare(%p, %c31), direction=LT",
        "}",
        "%cond (t: (s32[], f32[8,8])) -> pred[] {",
        "  %t = (s32[], f32[8,8]{1,0}) parameter(0)",
        "  %i = s32[] get-tuple-element(%t), index=0",
        "  ROOT %f = pred[] fusion(%i), kind=kLoop, calls=%fused_lt",
        "}",
        "%body (b: (s32[], f32[8,8])) -> (s32[], f32[8,8]) {",
        "  %b = (s32[], f32[8,8]{1,0}) parameter(0)",
        "  %j = s32[] get-tuple-element(%b), index=0",
        "  %x = f32[8,8]{1,0} get-tuple-element(%b), index=1",
        "  %one = s32[] constant(1)",
        "  %next = s32[] add(%j, %one)",
        "  %d = f32[8,8]{1,0} dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}",
        "  %ag = (f32[8,8]{1,0}, f32[64,8]{1,0}) all-gather-start(%x), dimensions={0}",
        "  %fz = f32[8,8]{1,0} fusion(%d), kind=kLoop, calls=%fused_lt",
        "  %agd = f32[64,8]{1,0} all-gather-done(%ag)",
        "  %ar = f32[8,8]{1,0} all-reduce-start(%x), to_apply=%fused_lt",
        "  %ard = f32[8,8]{1,0} all-reduce-done(%ar)",
        "  ROOT %r = (s32[], f32[8,8]{1,0}) tuple(%next, %d)",
        "}",
        "ENTRY %main (a: f32[8,8]) -> f32[8,8] {",
        "  %a = f32[8,8]{1,0} parameter(0)",
        "  %start = s32[] constant(1)",
        "  %init = (s32[], f32[8,8]{1,0}) tuple(%start, %a)",
        "  %w = (s32[], f32[8,8]{1,0}) while(%init), condition=%cond, body=%body",
        "  ROOT %out = f32[8,8]{1,0} get-tuple-element(%w), index=1",
        "}",
    ])
    program = hlo_lib.Program.parse(text)
    assert program.flops() == 30 * 2 * 8 * 8 * 8
    # TPU's q projection as a convolution: a window of 16 heads slides over a padded
    # dimension of size 1, so only the 2,048 input features count per output element.
    conv = ("%c (lhs: bf16[2,64,2048,1], rhs: bf16[16,128,2048,1]) -> bf16[2,64,16,128] {\n"
            "  %lhs = bf16[2,64,2048,1]{3,2,1,0} parameter(0)\n"
            "  %rhs = bf16[16,128,2048,1]{3,2,1,0} parameter(1)\n"
            "  ROOT %q = bf16[2,64,16,128]{3,2,1,0} convolution(%lhs, %rhs), "
            "window={size=1x16 pad=0_0x15_0 rhs_reversal=0x1}, dim_labels=0bf1_1oi0->0b1f\n}")
    assert hlo_lib.Program.parse(conv).flops("c") == 2 * (2 * 64 * 16 * 128) * 2048
    assert program.async_collectives() == (2, 1)
    assert hlo_lib.collective_bytes(text) == 64 * 8 * 4 + 8 * 8 * 4
