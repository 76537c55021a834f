"""Run Megatron-LM's own argument validation on the Megatron arguments moeplan emits.

For every plan under ``examples/`` and ``examples/golden/`` (``*.plan.json``, and every plan a golden
``*.check.yaml`` names as ``expected``), plus a few plans solved here for catalog models with distinctive
semantics (``SOLVED``: DeepSeek-V3's sigmoid router, grouped routing, expert bias, MLA and MTP under
FP8; Qwen3's QK layernorm with CUDA graphs, and at 32k tokens; gpt-oss's quick-GeGLU, sinks and sliding
window under MXFP8 on GB200, as the catalog has it (YaRN: refused before 0.19, checked from 0.19 with
the config attributes GPTModel's YaRN reads, ``YARN_ATTRIBUTES``) and without YaRN; Mixtral's top-2
under FP8 with capacity routing), this script emits the Megatron-LM arguments in process (``megatron_args``, after the
checks ``moeplan emit --format megatron`` makes) and then, in a subprocess of its own per plan, runs what
``pretrain_gpt.py`` runs before building the model:

    args = megatron.training.arguments.parse_args()        # sys.argv = pretrain_gpt.py + the flags
    validate_args(args, {"tokenizer_type": "GPT2BPETokenizer"})
    core_transformer_config_from_args(args)                 # arguments.py, or argument_utils.py (0.18 on)
    gpt_config_from_args(args)                              # where the tag has it (pretrain_gpt's path, 0.19)

with the plan's environment (``megatron_env``; an ``OMP_NUM_THREADS`` shell expansion is left out),
``WORLD_SIZE`` = the plan's GPUs, ``RANK=0``, ``LOCAL_RANK=0``, and ``PYTHONPATH`` = the checkout (then
``--extra-path``). The subprocess keeps Megatron's import side effects (global args, patched torch) apart.

Flags moeplan does not own, added to every plan's (``EXTRA_ARGS``): synthetic data and tokenizer
(``--mock-data --tokenizer-type NullTokenizer --vocab-size <model vocabulary - 1>``), and a learning rate
and iteration count (``--lr 3e-4 --train-iters 10``).

What is stubbed in the subprocess (each run prints it; no validation rule is stubbed):

- ``torch.cuda.get_device_capability`` and ``torch.cuda.get_device_properties`` (CPU torch has no GPU):
  they answer the plan's GPU (its cluster profile's ``compute_capability``), so Megatron's rules on the
  GPU generation (grouped GEMM needs sm80, Megatron-FSDP on Blackwell, ...) judge the plan's own GPU.
- Transformer Engine's version (``megatron.core.utils._te_version``): TE is not installed, and
  ``is_te_min_version`` compares this version. It is the one the tag's ``uv.lock`` pins (2.12.0 at
  core_v0.16.1, 2.14.1 at 0.17.1, 2.16.0 at 0.18.2, 2.17.1 at 0.19.0), or ``--te-version``. Rules that
  ask for a newer TE (core_v0.17.1 on: CUDA graphs of attention with ``--delay-wgrad-compute`` need TE
  2.12) then judge that TE. Transformer Engine itself stays absent (``HAVE_TE`` is False).
- The TE kernels whose presence TransformerConfig checks (``TE_KERNELS``: fused RoPE for the default
  ``--apply-rope-fusion``, fused permutation for ``--moe-permute-fusion``): placeholders that raise if
  called, set only where the name is absent or None. The rules around them still run.
- ``typing.override`` on Python below 3.12 (core_v0.17 on need 3.12; moeplan's venv is 3.11): a decorator
  that returns its function, as Python 3.12's does at run time.

Megatron-LM's checkout needs ``six``, ``regex`` and ``triton`` importable (imported at module level by
its tokenizers and kernels; none is run here). Install them beside the venv, not into it, and pass the
folder with ``--extra-path``::

    pip install --no-deps --target /tmp/mlm-deps six regex triton    # triton's wheel is ~290 MB

A Megatron-LM checkout at a tag, from a git mirror::

    mkdir -p /tmp/mlm-core_v0.16.1
    git --git-dir=MIRROR archive core_v0.16.1 | tar -x -C /tmp/mlm-core_v0.16.1

Usage::

    python benchmarks/megatron_validate_args.py --megatron-lm /tmp/mlm-core_v0.16.1 \\
        --megatron-version 0.16.1 --extra-path /tmp/mlm-deps [--jobs 2] [--only deepseek] [--no-solve]

``--append-args '--no-rope-fusion'`` appends flags after moeplan's, to see what a FAIL hides (diagnosis
only; the header line says so). Each subprocess's flags, environment, stubs and output are kept in
``--log-dir`` (a temporary folder unless named).

Output: one line per (plan, version), ``PASS``, ``FAIL`` with Megatron's message and the file:line that
raised it, or ``REFUSED`` with moeplan's reason (a SpecError: moeplan will not emit the plan for that
release, which is not a failure); then the counts. Exit status 1 on any FAIL, 2 on bad arguments.

Time: 75-160 s per tag on 2 cores with ``--jobs 2``: 23 plans, 19 of them run in a subprocess of 6-15 s
each (importing torch and Megatron-LM; the first run on a fresh checkout also compiles its bytecode), and
~15 s for the solves of ``SOLVED``. Not part of the test suite: it needs a Megatron-LM checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULT_MARK = "MOEPLAN-MEGATRON-VALIDATE-RESULT "
"""Prefix of the one line of the subprocess's stdout that carries its result (Megatron prints much else)."""

DEFAULT_TE_VERSION = "2.12.0"
"""Transformer Engine version reported when the checkout has no uv.lock naming one."""

EXTRA_ARGS = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--lr", "3e-4", "--train-iters", "10"]
"""Flags pretrain_gpt.py needs that moeplan does not own (the vocabulary size is added per model)."""

PLAN_ENV_KEYS = ("CUDA_DEVICE_MAX_CONNECTIONS", "NCCL_GRAPH_REGISTER", "NCCL_NVLS_ENABLE", "OMP_NUM_THREADS")
"""Variables ``megatron_env`` may set: removed from the inherited environment, then set per plan."""


@dataclass(frozen=True)
class Solved:
    """A plan this script solves itself: catalog model, bundled cluster, training and search options."""

    label: str
    model: str
    cluster: str
    nodes: int | None
    training: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    model_update: dict[str, Any] = field(default_factory=dict)
    """Fields of the catalog model replaced before solving (as a user's own model file would)."""


SOLVED = (
    Solved("deepseek-v3-h800-32n-fp8", "deepseek-v3", "h800-dsv3", 32, {"seq_len": 4096, "global_batch": 1024, "precision": "fp8"}),
    Solved("qwen3-30b-a3b-dgx-h100-cudagraphs", "qwen3-30b-a3b", "dgx-h100", 2, {"seq_len": 4096, "global_batch": 256}, {"cuda_graphs": ("auto",)}),
    Solved("gpt-oss-120b-gb200-mxfp8", "gpt-oss-120b", "gb200-nvl72", None, {"seq_len": 4096, "global_batch": 512, "precision": "mxfp8"}),
    # moeplan refuses gpt-oss's YaRN for Megatron-LM and says to write the model without it: that model.
    Solved("gpt-oss-120b-no-yarn-gb200-mxfp8", "gpt-oss-120b", "gb200-nvl72", None, {"seq_len": 4096, "global_batch": 512, "precision": "mxfp8"}, model_update={"yarn": None}),
    Solved("qwen3-30b-a3b-dgx-h100-32k", "qwen3-30b-a3b", "dgx-h100", 4, {"seq_len": 32768, "global_batch": 64}),
    Solved("mixtral-8x7b-dgx-h100-fp8-capacity", "mixtral-8x7b", "dgx-h100", 2, {"seq_len": 4096, "global_batch": 256, "precision": "fp8", "routing": "capacity", "capacity_factor": 1.25}),
)  # fmt: skip


@dataclass(frozen=True)
class Case:
    """One plan: where it came from, and what the subprocess needs to know about it."""

    name: str
    plan: Any  # planner.schema.Plan
    model: Any  # planner.schema.ModelSpec
    gpu: str
    capability: tuple[int, int]


@dataclass(frozen=True)
class Outcome:
    name: str
    version: str
    status: str  # PASS, FAIL, REFUSED
    message: str
    seconds: float
    stubs: tuple[str, ...] = ()


# --- the subprocess: Megatron-LM's own parse_args, validate_args and config builders ---------------------


def _stub(stubs: list[str], what: str) -> None:
    stubs.append(what)
    print(f"[stub] {what}", flush=True)


def _child() -> int:
    """Read one request (JSON on stdin), run Megatron-LM's validation, print one result line."""
    request = json.loads(sys.stdin.read())
    stubs: list[str] = []
    result: dict[str, Any] = {"stubs": stubs}
    stage = "import"
    try:
        import typing

        if request["needs_py312"] and not hasattr(typing, "override"):

            def override(func: Any) -> Any:
                try:
                    func.__override__ = True
                except (AttributeError, TypeError):
                    pass
                return func

            typing.override = override  # type: ignore[attr-defined]
            _stub(stubs, f"typing.override = identity decorator (Python {sys.version.split()[0]} < 3.12)")

        import torch

        major, minor = request["capability"]
        gpu = request["gpu"]

        def capability(device: Any = None) -> tuple[int, int]:
            return (major, minor)

        def properties(device: Any = None) -> SimpleNamespace:
            return SimpleNamespace(major=major, minor=minor, name=gpu, total_memory=80 * 2**30)

        torch.cuda.get_device_capability = capability
        torch.cuda.get_device_properties = properties  # type: ignore[assignment]
        _stub(stubs, f"torch.cuda.get_device_capability/get_device_properties -> ({major}, {minor}) ({gpu})")

        import importlib

        from packaging.version import Version

        mcore_utils: Any = importlib.import_module("megatron.core.utils")
        checkout = Path(request["checkout"]).resolve()
        where = Path(mcore_utils.__file__ or "?").resolve()
        if checkout not in where.parents:
            raise RuntimeError(f"megatron.core came from {where}, not from the checkout {checkout}")
        mcore_utils._te_version = Version(request["te_version"])
        _stub(stubs, f"megatron.core.utils._te_version = {request['te_version']} (Transformer Engine absent)")

        _te_kernel_placeholders(stubs)

        arguments = importlib.import_module("megatron.training.arguments")
        # Where the tag builds its configs: arguments.py to core_v0.17, argument_utils.py from core_v0.18
        # (and gpt_config_from_args, pretrain_gpt.py's path, from core_v0.19).
        utils = importlib.import_module("megatron.training.argument_utils")
        builders = [
            (f"argument_utils.{name}", getattr(utils, name))
            for name in ("core_transformer_config_from_args", "gpt_config_from_args")
            if hasattr(utils, name)
        ] or [("arguments.core_transformer_config_from_args", arguments.core_transformer_config_from_args)]

        sys.argv = ["pretrain_gpt.py", *request["argv"]]
        stage = "parse_args"
        args = arguments.parse_args()
        stage = "validate_args"
        arguments.validate_args(args, {"tokenizer_type": "GPT2BPETokenizer"})
        for name, build in builders:
            stage = name
            config = build(args)
            result.setdefault("configs", []).append(f"{name}: {type(config).__name__}")
            if name.endswith("core_transformer_config_from_args") and args.position_embedding_type == "yarn":
                # GPTModel reads these off the config with no default (gpt_model.py's yarn branch): each
                # must be there, or the model fails to build after validation passed.
                yarn = {attr: getattr(config, attr) for attr in YARN_ATTRIBUTES}
                result["configs"].append("yarn: " + ", ".join(f"{k[5:]}={v}" for k, v in yarn.items()))
        result["status"] = "PASS"
    except SystemExit as exc:  # argparse: an unknown flag or a bad value (its message went to stderr)
        result["status"] = "FAIL"
        result["message"] = f"{stage}: argparse exit {exc.code} (see stderr above)"
    except BaseException as exc:
        frames = traceback.extract_tb(exc.__traceback__)
        megatron_frames = [f for f in frames if "/megatron/" in f.filename]
        at = megatron_frames[-1] if megatron_frames else (frames[-1] if frames else None)
        place = f" at {_short(at.filename)}:{at.lineno}" if at is not None else ""
        result["status"] = "FAIL"
        result["message"] = f"{stage}: {type(exc).__name__}: {exc}{place}"
        traceback.print_exc()
    sys.stdout.flush()
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


YARN_ATTRIBUTES = (
    "yarn_rotary_scaling_factor", "yarn_original_max_position_embeddings", "yarn_beta_fast", "yarn_beta_slow",
    "yarn_mscale", "yarn_mscale_all_dim", "yarn_correction_range_round_to_int",
)  # fmt: skip
"""The config attributes GPTModel's YaRN reads with ``getattr`` (gpt_model.py at core_v0.19.0)."""

TE_KERNELS = {
    "megatron.core.models.common.embeddings.rope_utils": ("fused_apply_rotary_pos_emb",),
    "megatron.core.transformer.moe.moe_utils": (
        "fused_permute", "fused_permute_with_probs", "fused_sort_chunks_by_index",
        "fused_sort_chunks_by_index_with_probs", "fused_unpermute",
    ),
}  # fmt: skip
"""Transformer Engine kernels whose presence TransformerConfig checks (``--apply-rope-fusion``'s and
``--moe-permute-fusion``'s "is not available. Please install TE"): placeholders where TE is absent."""


def _te_kernel_placeholders(stubs: list[str]) -> None:
    """Give each absent TE kernel of ``TE_KERNELS`` a placeholder that raises if called (none is here)."""
    import importlib

    def placeholder(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a Transformer Engine kernel placeholder was called")

    for module_name, names in TE_KERNELS.items():
        module = importlib.import_module(module_name)
        absent = [name for name in names if getattr(module, name, None) is None]
        for name in absent:
            setattr(module, name, placeholder)
        if absent:
            _stub(stubs, f"{module_name}.{{{', '.join(absent)}}} = placeholder (TE kernels, never called)")


def _short(filename: str) -> str:
    """``.../megatron/training/arguments.py`` from a full path."""
    index = filename.rfind("/megatron/")
    return filename[index + 1 :] if index >= 0 else filename


# --- the parent: plans, emission, and one subprocess per plan ---------------------------------------------


def _plan_files() -> list[Path]:
    """Every plan file under examples/ and examples/golden/, and every plan a golden case expects."""
    import yaml

    found = set(REPO.glob("examples/*.plan.json")) | set(REPO.glob("examples/golden/*.plan.json"))
    for check in REPO.glob("examples/golden/*.check.yaml"):
        expected = yaml.safe_load(check.read_text()).get("expected")
        if expected:
            found.add((check.parent / expected).resolve())
    return sorted(path.resolve() for path in found)


def _capability(cluster: Any) -> tuple[str, tuple[int, int]]:
    text = cluster.gpu.compute_capability
    if text is None:
        raise SystemExit(f"cluster {cluster.name}'s GPU {cluster.gpu.name} states no compute_capability")
    major, minor = text.split(".")
    return cluster.gpu.name, (int(major), int(minor))


def _file_cases(only: str | None) -> list[Case]:
    from planner.workflows.plans import read_plan

    cases = []
    for path in _plan_files():
        name = str(path.relative_to(REPO))
        if only and only not in name:
            continue
        found = read_plan(path)
        gpu, capability = _capability(found.cluster())
        cases.append(Case(name, found.plan, found.model(), gpu, capability))
    return cases


def _solved_cases(only: str | None) -> list[Case]:
    from planner.catalog import resolve_cluster, resolve_model
    from planner.schema import TrainingSpec
    from planner.search import SearchOptions, solve

    cases = []
    for item in SOLVED:
        name = f"solved:{item.label}"
        if only and only not in name:
            continue
        model, model_ref = resolve_model(item.model)
        if item.model_update:
            model = model.model_copy(update=item.model_update)
        resolved = resolve_cluster(item.cluster, item.nodes)
        result = solve(
            model, TrainingSpec(**item.training), resolved.profile, SearchOptions(**item.options),
            model_ref=model_ref, cluster_ref=resolved.ref,
        )  # fmt: skip
        gpu, capability = _capability(resolved.profile)
        cases.append(Case(name, result.plan, model, gpu, capability))
    return cases


def _emit(case: Case, version: str) -> tuple[list[str], dict[str, str]]:
    """The flags and environment ``moeplan emit --format megatron --megatron-version VERSION`` writes
    (SpecError when moeplan refuses)."""
    from planner.emit import megatron_args, megatron_env
    from planner.feasibility import require_feasible

    plan, model = case.plan, case.model
    require_feasible(model, plan.training, plan.parallel, plan.num_gpus, megatron=True)
    argv = megatron_args(plan, model, version)
    env = {k: v for k, v in megatron_env(plan).items() if not v.startswith("$((")}
    return argv, env


def _needs_py312(checkout: Path) -> bool:
    """Whether the checkout's pyproject.toml asks for Python 3.12 (core_v0.17 on)."""
    import tomllib

    pyproject = checkout / "pyproject.toml"
    if not pyproject.is_file():
        return False
    requires = str(tomllib.loads(pyproject.read_text()).get("project", {}).get("requires-python", ""))
    return ">=3.12" in requires.replace(" ", "")


def _locked_te_version(checkout: Path) -> str:
    """The Transformer Engine release the checkout's uv.lock pins (its public part: 2.14.1 of
    2.14.1+366798ef), else ``DEFAULT_TE_VERSION``."""
    lock = checkout / "uv.lock"
    text = lock.read_text() if lock.is_file() else ""
    match = re.search(r'^name = "transformer-engine"\nversion = "([^"+]+)', text, re.MULTILINE)
    return match[1] if match else DEFAULT_TE_VERSION


def _run_one(case: Case, version: str, options: argparse.Namespace, log_dir: Path) -> Outcome:
    from planner.errors import SpecError

    start = time.monotonic()
    try:
        argv, plan_env = _emit(case, version)
    except SpecError as exc:
        return Outcome(case.name, version, "REFUSED", str(exc), time.monotonic() - start)
    argv = [*argv, *EXTRA_ARGS, "--vocab-size", str(case.model.vocab_size - 1), *options.append_args]
    env = {k: v for k, v in os.environ.items() if k not in PLAN_ENV_KEYS}
    env.update(plan_env)
    paths = [str(Path(options.megatron_lm).resolve()), *options.extra_path]
    env.update(
        PYTHONPATH=os.pathsep.join(paths), WORLD_SIZE=str(case.plan.num_gpus), RANK="0", LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", PYTHONWARNINGS="ignore",
    )  # fmt: skip
    request = {
        "argv": argv, "capability": list(case.capability), "gpu": case.gpu,
        "checkout": str(Path(options.megatron_lm).resolve()), "te_version": options.te_version,
        "needs_py312": _needs_py312(Path(options.megatron_lm)),
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child"],
            input=json.dumps(request), capture_output=True, text=True, env=env, cwd=cwd,
            timeout=options.timeout,
        )  # fmt: skip
    log = log_dir / (case.name.replace("/", "_").replace(":", "_") + f".{version}.log")
    log.write_text(
        "env: " + json.dumps({k: env[k] for k in sorted(plan_env)}) + "\nargv: " + " ".join(argv)
        + "\n--- stdout\n" + proc.stdout + "\n--- stderr\n" + proc.stderr
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    seconds = time.monotonic() - start
    if not lines:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        return Outcome(case.name, version, "FAIL", f"subprocess exit {proc.returncode}: {tail}", seconds)
    result = json.loads(lines[-1][len(RESULT_MARK) :])
    message = result.get("message", "")
    if result["status"] == "FAIL" and "argparse" in message:
        argparse_lines = [line for line in proc.stderr.splitlines() if "error:" in line]
        message += ": " + " | ".join(argparse_lines[-2:])
    if result["status"] == "PASS":
        message = "; ".join(result.get("configs", []))
    return Outcome(case.name, version, result["status"], message, seconds, tuple(result.get("stubs", ())))


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--child"]:
        return _child()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--megatron-lm", required=True, help="a Megatron-LM source checkout at one tag")
    parser.add_argument("--megatron-version", required=True, help="the tag's release, as moeplan takes it")
    parser.add_argument(
        "--extra-path", action="append", default=[], help="more PYTHONPATH (six, regex, triton)"
    )
    parser.add_argument(
        "--te-version",
        default=None,
        help="Transformer Engine version to report (default: the tag's uv.lock pin)",
    )
    parser.add_argument(
        "--append-args", default="", help="diagnosis only: more Megatron flags after moeplan's (one string)"
    )
    parser.add_argument("--jobs", type=int, default=2, help="subprocesses at once")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per subprocess")
    parser.add_argument("--only", default=None, help="only the plans whose name holds this text")
    parser.add_argument("--no-solve", action="store_true", help="skip the plans solved here (SOLVED)")
    parser.add_argument("--log-dir", default=None, help="keep each subprocess's output here")
    options = parser.parse_args(argv)
    checkout = Path(options.megatron_lm)
    if not (checkout / "megatron" / "training" / "arguments.py").is_file():
        parser.error(f"--megatron-lm {checkout} holds no megatron/training/arguments.py")
    options.te_version = options.te_version or _locked_te_version(checkout)
    options.append_args = shlex.split(options.append_args)

    start = time.monotonic()
    cases = _file_cases(options.only)
    if not options.no_solve:
        cases += _solved_cases(options.only)
    print(
        f"{len(cases)} plans, Megatron-LM at {checkout} as --megatron-version {options.megatron_version}, "
        f"Transformer Engine reported as {options.te_version}"
        + (f", appended (diagnosis): {shlex.join(options.append_args)}" if options.append_args else "")
    )
    log_dir = Path(options.log_dir or tempfile.mkdtemp(prefix="megatron-validate-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, options.jobs)) as pool:
        outcomes = list(pool.map(lambda c: _run_one(c, options.megatron_version, options, log_dir), cases))
    stubs: dict[str, None] = {}
    for outcome in outcomes:
        print(
            f"{outcome.status:8} {outcome.name} @ {outcome.version} ({outcome.seconds:.1f} s): {outcome.message}"
        )
        stubs.update(dict.fromkeys(outcome.stubs))
    for stub in stubs:
        print(f"stubbed: {stub}")
    counts = {s: sum(o.status == s for o in outcomes) for s in ("PASS", "FAIL", "REFUSED")}
    print(
        f"{counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['REFUSED']} REFUSED at Megatron-LM "
        f"{options.megatron_version} in {time.monotonic() - start:.0f} s; logs (with the stubs) in {log_dir}"
    )
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
