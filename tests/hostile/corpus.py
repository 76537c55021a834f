"""The hostile-input corpus of issue 19 item 6, generated here rather than stored (a 16 MiB file is written
into the test's own folder, never into the checkout).

Each ``Case`` is one class of hostile input given to one reader: the command that reads a kind of file (a
model YAML, a Hugging Face config.json, a cluster profile, a validation file, a check case, a plan, run
records) with the hostile thing where its input belongs. Every case must be refused with exit 2 in one
paragraph that names the input and the rule (``words``), no traceback, within ``TIME_LIMIT_S``, with nothing
written. The ``valid`` class is the control: the reader's base document as it is, accepted (exit 0), so a
refusal is the hostile part's doing and not a broken base; ``bom`` is that document after a UTF-8
byte-order mark, accepted alike in YAML and JSON.

``OUTPUT_CASES`` are targets of ``-o`` (and ``check --junit-xml``) that moeplan must not write through or
replace: each is refused with exit 2 and left as it was. ``OPTION_CASES`` are numeric options out of range.
``test_corpus.py`` runs every case in-process; the slow tests run one per class through a real process.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from planner.specfiles import MAX_INPUT_BYTES

REPO = Path(__file__).resolve().parents[2]
MY_CLUSTER = REPO / "examples" / "my-cluster.yaml"
TESTBED = REPO / "tests" / "data" / "calibration" / "testbed.yaml"
FIT_RUNS = REPO / "tests" / "data" / "calibration" / "fit"
GOLDEN_PLAN = REPO / "examples" / "golden" / "tiny-moe-v100-pcie.plan.json"

TIME_LIMIT_S = 10
"""Seconds any command may take to refuse one input (issue 19: within 10 s)."""
LONG_NAME = "n" * 300
"""A path component longer than any file system allows (NAME_MAX is 255): ENAMETOOLONG."""
BILLION_LAUGHS_LEVELS = 10
"""Levels of the alias bomb: 9^10 (3.5 billion) values once expanded, in ten short lines."""


# The readers: each kind of input file and the commands that read it.


@cache
def _doc(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)


def model_doc() -> dict[str, Any]:
    return _doc(REPO / "examples" / "my-moe.yaml")  # type: ignore[no-any-return]


def hf_doc() -> dict[str, Any]:
    return _doc(REPO / "tests" / "data" / "hf" / "mixtral-8x7b.json")  # type: ignore[no-any-return]


def hf_qwen_doc() -> dict[str, Any]:
    return _doc(REPO / "tests" / "data" / "hf" / "qwen3-30b-a3b.json")  # type: ignore[no-any-return]


def cluster_doc() -> dict[str, Any]:
    return _doc(MY_CLUSTER)  # type: ignore[no-any-return]


def validation_doc() -> dict[str, Any]:
    return _doc(REPO / "benchmarks" / "data" / "korthikanti-table5.yaml")  # type: ignore[no-any-return]


def check_doc() -> dict[str, Any]:
    return _doc(REPO / "examples" / "golden" / "tiny-moe-v100-pcie.check.yaml")  # type: ignore[no-any-return]


def plan_doc() -> dict[str, Any]:
    return _doc(GOLDEN_PLAN)  # type: ignore[no-any-return]


def run_record_doc() -> dict[str, Any]:
    return _doc(FIT_RUNS / "ep1-alltoall-seq64-mbs1.json")  # type: ignore[no-any-return]


def _check_setup(folder: Path) -> None:
    """A check case's expected plan, beside the case (its folder)."""
    shutil.copyfile(GOLDEN_PLAN, folder / "tiny-moe-v100-pcie.plan.json")


@dataclass(frozen=True)
class Reader:
    """A command reading one kind of input file."""

    name: str
    base: Callable[[], dict[str, Any]]
    """The valid document the hostile classes start from."""
    file_name: str
    """The input file's name (its suffix picks YAML or JSON)."""
    argv: Callable[[Path, Path], list[str]]
    """The command's arguments for an input path and the output path it would write."""
    folder: str | None = None
    """The command takes a folder holding ``file_name`` (``check DIR``, ``calibrate --runs DIR``)."""
    setup: Callable[[Path], None] | None = None
    """Writes what a valid input needs beside it, in the input's folder."""
    skips_irregular: bool = False
    """The folder's files are found by a search that passes over what is not a regular file (``check``):
    such a thing inside the folder leaves no case, and the refusal names the folder."""
    rules: tuple[tuple[str, str], ...] = ()
    """Words of the rule for the path classes where this reader's differs from ``PATH_RULES``."""

    @property
    def json(self) -> bool:
        return self.file_name.endswith(".json")

    def place(self, work: Path, data: bytes) -> Path:
        """Write ``data`` where the reader's input goes; the path the command is given."""
        home = work / self.folder if self.folder else work
        home.mkdir(exist_ok=True)
        if self.setup is not None:
            self.setup(home)
        (home / self.file_name).write_bytes(data)
        return home if self.folder else home / self.file_name

    def inner(self, work: Path) -> Path:
        """Where the file goes inside the reader's folder (made), for a thing placed there."""
        assert self.folder is not None
        home = work / self.folder
        home.mkdir(exist_ok=True)
        return home / self.file_name


def _out(output: Path) -> list[str]:
    return ["-o", str(output)]


_CHECK_RULES = (("folder", "no case files"), ("empty-folder", "no case files"))
_RUNS_RULES = (("fifo", "is not a folder"), ("dev-zero", "is not a folder"), ("dev-urandom", "is not a folder"),
               ("empty-folder", "holds no run records"), ("folder-inside", "is a folder"))  # fmt: skip

READERS: tuple[Reader, ...] = (
    Reader("model-show", model_doc, "model.yaml", lambda p, o: ["show", "model", str(p)]),
    Reader(
        "model-estimate",
        model_doc,
        "model.yaml",
        lambda p, o: ["estimate", "--model", str(p), "--cluster", str(MY_CLUSTER)],
    ),
    Reader(
        "model-solve",
        model_doc,
        "model.yaml",
        lambda p, o: ["solve", "--model", str(p), "--cluster", str(MY_CLUSTER), *_out(o)],
    ),
    Reader("hf-show", hf_doc, "config.json", lambda p, o: ["show", "model", str(p)]),
    Reader(
        "hf-solve",
        hf_doc,
        "config.json",
        lambda p, o: ["solve", "--model", str(p), "--cluster", str(MY_CLUSTER), *_out(o)],
    ),
    Reader("hfqwen-show", hf_qwen_doc, "config.json", lambda p, o: ["show", "model", str(p)]),
    Reader("cluster-show", cluster_doc, "cluster.yaml", lambda p, o: ["show", "cluster", str(p)]),
    Reader(
        "cluster-estimate",
        cluster_doc,
        "cluster.yaml",
        lambda p, o: ["estimate", "--model", "tiny-moe", "--cluster", str(p)],
    ),
    Reader(
        "cluster-solve",
        cluster_doc,
        "cluster.yaml",
        lambda p, o: ["solve", "--model", "tiny-moe", "--cluster", str(p), *_out(o)],
    ),
    Reader(
        "cluster-calibrate",
        cluster_doc,
        "cluster.yaml",
        lambda p, o: ["calibrate", "--runs", str(FIT_RUNS), "--cluster", str(p), *_out(o)],
    ),
    Reader("validation", validation_doc, "validation.yaml", lambda p, o: ["validate", str(p)]),
    Reader(
        "check-dir",
        check_doc,
        "case.check.yaml",
        lambda p, o: ["check", str(p), "--junit-xml", str(o)],
        folder="cases",
        setup=_check_setup,
        skips_irregular=True,
        rules=_CHECK_RULES,
    ),
    Reader(
        "check-file",
        check_doc,
        "case.check.yaml",
        lambda p, o: ["check", str(p), "--junit-xml", str(o)],
        setup=_check_setup,
        rules=_CHECK_RULES,
    ),
    Reader("plan-emit", plan_doc, "plan.json", lambda p, o: ["emit", "--plan", str(p), "--format", "megatron"]),
    Reader("plan-yaml-emit", plan_doc, "plan.yaml", lambda p, o: ["emit", "--plan", str(p), "--format", "torchrun"]),
    Reader("plan-estimate", plan_doc, "plan.json", lambda p, o: ["estimate", "--plan", str(p)]),
    Reader(
        "runs-calibrate",
        run_record_doc,
        "record.json",
        lambda p, o: ["calibrate", "--runs", str(p), "--cluster", str(TESTBED), *_out(o)],
        folder="runs",
        rules=_RUNS_RULES,
    ),
    Reader(
        "runs-held-out",
        run_record_doc,
        "record.json",
        lambda p, o: ["calibrate", "--runs", str(FIT_RUNS), "--held-out", str(p), "--cluster", str(TESTBED), *_out(o)],
        folder="held-out",
        rules=_RUNS_RULES,
    ),
)  # fmt: skip
BY_NAME = {reader.name: reader for reader in READERS}
CONTROL_READERS = ("model-show", "hf-show", "cluster-show", "validation", "check-file", "plan-emit",
                   "plan-yaml-emit", "runs-calibrate")  # fmt: skip
"""Readers whose valid document is run as the control (one command per kind of file: the others read the
same file through the same reader, and a full solve or fit costs seconds)."""


# Rendering documents, with numbers JSON cannot spell.


def render(doc: Any, as_json: bool) -> str:
    """``doc`` as YAML or JSON text. JSON gets NaN as the literal ``NaN`` and infinities as ``1e999`` (which
    Python's parser reads as inf without complaint): what a hostile file would hold."""
    if not as_json:
        return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=120)
    raw: dict[str, str] = {}

    def mark(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: mark(item) for key, item in value.items()}
        if isinstance(value, list):
            return [mark(item) for item in value]
        if isinstance(value, float) and not math.isfinite(value):
            token = f"@raw{len(raw)}@"
            raw[token] = "NaN" if math.isnan(value) else ("1e999" if value > 0 else "-1e999")
            return token
        return value

    text = json.dumps(mark(doc), indent=2)
    for token, literal in raw.items():
        text = text.replace(f'"{token}"', literal)
    return text


def edited(doc: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    """A deep copy of ``doc`` with the value at ``path`` set."""
    document = copy.deepcopy(doc)
    node: Any = document
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return document


# The cases.


@dataclass(frozen=True)
class Case:
    """One hostile input for one reader."""

    cls: str
    reader: Reader
    build: Callable[[Path], Path]
    """Makes the input in the test's folder; returns the path the command is given."""
    words: tuple[str, ...]
    """Each must appear in stderr (whitespace and the error panel's borders ignored): the input's name, the
    field, the rule."""
    code: int = 2
    shared: tuple[str, ...] = field(default=())
    """Paths outside the test's folder the case touches (devices), checked unchanged."""

    @property
    def id(self) -> str:
        return f"{self.cls}/{self.reader.name}"


def _content(reader: Reader, make: Callable[[Reader], bytes]) -> Callable[[Path], Path]:
    return lambda work: reader.place(work, make(reader))


def _valid(reader: Reader) -> bytes:
    return render(reader.base(), reader.json).encode()


def _billion_laughs() -> str:
    """Extra fields of a document: ten levels of nine aliases each, 9^10 values once expanded."""
    lines = ["x_laugh_0: &x_laugh_0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for level in range(1, BILLION_LAUGHS_LEVELS):
        refs = ", ".join([f"*x_laugh_{level - 1}"] * 9)
        lines.append(f"x_laugh_{level}: &x_laugh_{level} [{refs}]")
    return "\n".join(lines) + "\n"


def _first_key(reader: Reader) -> tuple[str, Any]:
    key, value = next(iter(reader.base().items()))
    return key, value


def _dup_yaml(reader: Reader) -> bytes:
    """The document with its first field given again at the end (with the same value: still refused)."""
    key, value = _first_key(reader)
    return (_valid(reader).decode() + yaml.safe_dump({key: value}, sort_keys=False)).encode()


def _dup_json(reader: Reader) -> bytes:
    key, value = _first_key(reader)
    text = _valid(reader).decode()
    return ("{" + json.dumps(key) + ": " + json.dumps(value) + "," + text.lstrip()[1:]).encode()


def _non_utf8(reader: Reader) -> bytes:
    """A Latin-1 byte in a field's text."""
    if reader.json:
        return b'{"x_note": "caf\xe9",' + _valid(reader).lstrip()[1:]
    return b"x_note: caf\xe9\n" + _valid(reader)


def _over_size(reader: Reader) -> bytes:
    """The valid document padded past the size limit (trailing whitespace or a comment: still valid)."""
    pad = MAX_INPUT_BYTES + 1024 - len(_valid(reader))
    return _valid(reader) + (b" " * pad if reader.json else b"#" + b"x" * pad + b"\n")


YAML_CONTENT: dict[str, tuple[Callable[[Reader], bytes], tuple[str, ...]]] = {
    "alias-bomb": (lambda r: _valid(r) + _billion_laughs().encode(), ("aliases expand to more than",)),
    "self-alias": (lambda r: _valid(r) + b"x_loop: &x_loop [1, *x_loop]\n", ("refers to the mapping or list",)),
    "dup-key-yaml": (_dup_yaml, ("is given twice",)),
    "empty": (lambda r: b"", ("must hold a mapping",)),
    "tag-python": (
        lambda r: _valid(r) + b'x_run: !!python/object/apply:os.system ["touch PWNED"]\n',
        ("python/object/apply:os.system",),
    ),
    "tag-local": (lambda r: _valid(r) + b"x_ref: !include /etc/passwd\n", ("!include",)),
    "tag-binary": (lambda r: _valid(r) + b"x_blob: !!binary aGVsbG8=\n", ("binary",)),
    "deep-nesting": (lambda r: _valid(r) + b"x_deep: " + b"[" * 5_000 + b"]" * 5_000 + b"\n", ("is not valid YAML",)),
}  # fmt: skip
"""Classes only YAML can hold, and a rule word each."""
JSON_CONTENT: dict[str, tuple[Callable[[Reader], bytes], tuple[str, ...]]] = {
    "dup-key-json": (_dup_json, ("is given twice",)),
    "empty": (lambda r: b"", ("is not valid JSON",)),
    "nan-literal": (lambda r: b'{"x_nan": NaN,' + _valid(r).lstrip()[1:], ("NaN is not a number",)),
    "deep-nesting-json": (
        lambda r: b'{"x_deep": ' + b"[" * 5_000 + b"]" * 5_000 + b"," + _valid(r).lstrip()[1:],
        ("recursion",),
    ),
}  # fmt: skip
"""Classes of JSON text."""
ANY_CONTENT: dict[str, tuple[Callable[[Reader], bytes], tuple[str, ...]]] = {
    "non-utf8": (_non_utf8, ("is not UTF-8 text",)),
    "over-size": (_over_size, ("is larger than 16 MiB",)),
    "not-a-mapping": (lambda r: b"[1, 2, 3]\n", ("must hold a mapping",)),
}  # fmt: skip

NUMBERS: dict[str, tuple[tuple[tuple[str | int, ...], Any, str], ...]] = {
    "model": (
        (("hidden_size",), 10**400, "hidden_size"),
        (("num_layers",), 10**12, "num_layers"),
        (("ffn_hidden_size",), -1, "ffn_hidden_size"),
        (("norm_epsilon",), math.nan, "norm_epsilon"),
        (("moe_aux_loss_coeff",), math.inf, "moe_aux_loss_coeff"),
        (("rotary_base",), 1e308, "rotary_base"),
        (("vocab_size",), 5e-324, "vocab_size"),
    ),
    "hf": (
        (("hidden_size",), 10**400, "hidden_size"),
        (("hidden_size",), math.inf, "hidden_size"),
        (("num_hidden_layers",), -5, "num_layers"),
        (("rope_theta",), math.inf, "rope_theta"),
        (("rope_theta",), 1e308, "rotary_base"),
        (("rope_theta",), "1e6", "rope_theta"),
        (("tie_word_embeddings",), "false", "tie_word_embeddings"),
        (("rms_norm_eps",), -1.0, "norm_epsilon"),
        (("router_aux_loss_coef",), math.inf, "router_aux_loss_coef"),
        (("rms_norm_eps",), "tiny", "rms_norm_eps"),
        (("num_local_experts",), 1e308, "num_local_experts"),
    ),
    "hfqwen": (
        (("mlp_only_layers",), 5, "mlp_only_layers"),
        (("mlp_only_layers",), [0, "a"], "mlp_only_layers"),
        (("decoder_sparse_step",), 10**400, "decoder_sparse_step"),
        (("moe_intermediate_size",), math.inf, "moe_intermediate_size"),
        (("num_experts_per_tok",), 0, "moe_router_topk"),
    ),
    "cluster": (
        (("links", "inter_node", "collectives", "all_reduce", "bandwidth_gbps"), 5e-324, "bandwidth_gbps"),
        (("links", "intra_node", "nominal_gbps"), 1.7e308, "nominal_gbps"),
        (("links", "intra_node", "collectives", "all_reduce", "latency_us"), math.nan, "latency_us"),
        (("links", "inter_node", "collectives", "all_reduce", "bandwidth_gbps"), -1, "bandwidth_gbps"),
        (("step_overhead_s",), 1e308, "step_overhead_s"),
        (("num_nodes",), 10**9, "num_nodes"),
        (("num_gpus_per_node",), 2**40, "num_gpus_per_node"),
        (("num_nodes",), 10**400, "num_nodes"),
    ),
    "validation": (
        (("clusters", "selene", "intra_node_gbps"), 1.7e308, "intra_node_gbps"),
        (("clusters", "selene", "inter_node_gbps"), 5e-324, "inter_node_gbps"),
        (("cases", 0, "num_gpus"), 10**12, "num_gpus"),
        (("cases", 0, "measured", "value"), math.nan, "value"),
        (("cases", 0, "measured", "value"), math.inf, "value"),
        (("cases", 0, "measured", "value"), -1.42, "value"),
        (("cases", 0, "training", "seq_len"), 0, "seq_len"),
        (("models", "gpt-22b", "hidden_size"), 10**400, "hidden_size"),
    ),
    "check": (
        (("nodes",), 10**9, "nodes"),
        (("training", "seq_len"), 10**400, "seq_len"),
        (("training", "global_batch"), -64, "global_batch"),
        (("search",), {"time_limit_s": math.nan}, "time_limit_s"),
        (("search",), {"time_limit_s": -5}, "time_limit_s"),
        (("tolerance",), math.inf, "tolerance"),
    ),
    "plan": (
        (("num_gpus",), 10**12, "num_gpus"),
        (("parallel", "tp"), 10**400, "tp"),
        (("training", "global_batch"), -1, "global_batch"),
        (("training", "seq_len"), 0, "seq_len"),
        (("estimate", "step_time_s"), math.inf, "step_time_s"),
        (("num_nodes",), 10**9, "num_nodes"),
    ),
    "runs": (
        (("steps", 1, "time_s"), 0, "step time"),
        (("steps", 1, "time_s"), -2.5, "step time"),
        (("steps", 1, "time_s"), math.inf, "step time"),
        (("world_size",), math.inf, "world_size"),
        (("world_size",), 10**400, "world size"),
        (("ranks_per_node",), 0, "ranks_per_node"),
        (("collectives", "dp_grad_all_reduce"), -1, "collectives"),
        (("collectives", "dp_grad_all_reduce"), math.inf, "collectives"),
    ),
}
"""Per kind of file: (field path, value, the field the refusal names) for numbers out of physical range."""


def _kind(reader: Reader) -> str:
    return reader.name.split("-")[0]


def _numbers(reader: Reader) -> Iterator[Case]:
    for path, value, word in NUMBERS[_kind(reader)]:
        shown = "10^400" if value == 10**400 else repr(value)
        data = render(edited(reader.base(), path, value), reader.json).encode()
        yield Case(
            f"number-{'.'.join(map(str, path))}={shown}",
            reader,
            lambda work, reader=reader, data=data: reader.place(work, data),  # type: ignore[misc]
            (word,),
        )


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


def _through_file(work: Path, name: str) -> Path:
    regular = work / "regular.yaml"
    regular.write_text("a: 1\n")
    return regular / name


def _link(path: Path, target: str) -> Path:
    path.symlink_to(target)
    return path


PATH_RULES = {
    "fifo": "is not a regular file",
    "dev-zero": "is not a regular file",
    "dev-urandom": "is not a regular file",
    "path-through-file": "Not a directory",
    "name-too-long": "File name too long",
    "bare-name-too-long": "File name too long",
    "folder": "is a folder",
    "missing": "does not exist",
    "empty-folder": "",
    "fifo-inside": "is not a regular file",
    "dev-zero-inside": "is not a regular file",
    "folder-inside": "",
}
"""Words of the rule each path class breaks, as the file reader states it (``Reader.rules`` overrides)."""


def _paths(reader: Reader) -> Iterator[Case]:
    """The input's path is the hostile part: what it names is no regular file, or no file at all."""
    name = reader.folder or reader.file_name
    suffix = "" if reader.folder else Path(reader.file_name).suffix
    rules = PATH_RULES | dict(reader.rules)
    direct: list[tuple[str, Callable[[Path], Path], str]] = [
        ("fifo", lambda w: _fifo(w / name), name),
        ("dev-zero", lambda w: Path("/dev/zero"), "/dev/zero"),
        ("dev-urandom", lambda w: Path("/dev/urandom"), "/dev/urandom"),
        ("path-through-file", lambda w: _through_file(w, name), f"regular.yaml/{name}"),
        ("name-too-long", lambda w: w / (LONG_NAME + suffix), LONG_NAME),
        ("bare-name-too-long", lambda w: Path(LONG_NAME + suffix), LONG_NAME),
        ("missing", lambda w: w / ("missing-" + name), "missing-" + name),
        # a folder where a file belongs; where a folder belongs, an empty one holds nothing to read
        ("empty-folder" if reader.folder else "folder", lambda w: _folder(w / name), name),
    ]
    for cls, build, word in direct:
        yield Case(cls, reader, build, (word, rules[cls]))
    if reader.folder:
        named = reader.folder if reader.skips_irregular else reader.file_name
        inside: list[tuple[str, Callable[[Path], Path]]] = [
            ("fifo-inside", lambda w: _fifo(reader.inner(w)).parent),
            ("dev-zero-inside", lambda w: _link(reader.inner(w), "/dev/zero").parent),
            ("folder-inside", lambda w: _folder(reader.inner(w)).parent),
        ]
        for cls, build in inside:
            rule = "no case files" if reader.skips_irregular else rules[cls]
            yield Case(cls, reader, build, (named, rule))


def _contents(reader: Reader) -> Iterator[Case]:
    classes = {**ANY_CONTENT, **(JSON_CONTENT if reader.json else YAML_CONTENT)}
    for cls, (make, rule) in classes.items():
        yield Case(cls, reader, _content(reader, make), (reader.file_name, *rule))


def cases() -> list[Case]:
    """The whole input corpus: every class for every reader it applies to, and the controls."""
    found: list[Case] = []
    for reader in READERS:
        if reader.name in CONTROL_READERS:
            found.append(Case("valid", reader, _content(reader, _valid), (), code=0))
            bom = _content(reader, lambda r: b"\xef\xbb\xbf" + _valid(r))
            found.append(Case("bom", reader, bom, (), code=0))
        found.extend(_contents(reader))
        found.extend(_paths(reader))
        found.extend(_numbers(reader))
    return found


# Output targets.


@dataclass(frozen=True)
class Writer:
    name: str
    argv: Callable[[Path], list[str]]


WRITERS: tuple[Writer, ...] = (
    Writer("solve", lambda o: ["solve", "--model", "tiny-moe", "--cluster", "v100-pcie", "-o", str(o)]),
    Writer("calibrate", lambda o: ["calibrate", "--runs", str(FIT_RUNS), "--cluster", str(TESTBED), "-o", str(o)]),
    Writer(
        "check-junit",
        lambda o: ["check", str(REPO / "examples" / "golden" / "tiny-moe-v100-pcie.check.yaml"), "--junit-xml", str(o)],
    ),
)  # fmt: skip


@dataclass(frozen=True)
class OutputCase:
    """A target the writer must refuse, leaving it as it was."""

    cls: str
    writer: Writer
    build: Callable[[Path], Path]
    words: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.cls}/{self.writer.name}"


def _kept(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


TARGETS: tuple[tuple[str, Callable[[Path], Path], tuple[str, ...]], ...] = (
    ("folder", lambda w: _folder(w / "out"), ("it is a folder",)),
    ("path-through-file", lambda w: _kept(w / "regular.json", "keep") / "out.json", ("Not a directory",)),
    ("proc-version", lambda w: Path("/proc/version"), ("/proc/version",)),
    ("symlink", lambda w: _link(w / "link.json", str(_kept(w / "real.json", "keep"))), ("not a regular file",)),
    ("dangling-symlink", lambda w: _link(w / "link.json", str(w / "elsewhere.json")), ("not a regular file",)),
    ("fifo", lambda w: _fifo(w / "out.fifo"), ("not a regular file",)),
    ("dev-null", lambda w: Path("/dev/null"), ("not a regular file",)),
    ("name-too-long", lambda w: w / (LONG_NAME + ".json"), ("File name too long",)),
)  # fmt: skip


def output_cases() -> list[OutputCase]:
    return [OutputCase(cls, writer, build, words) for writer in WRITERS for cls, build, words in TARGETS]


# Numeric options out of range (in-process: commands that start no ranks).

OPTION_CASES: tuple[tuple[tuple[str, ...], str], ...] = tuple(
    (("solve", "--model", "tiny-moe", "--cluster", "v100-pcie", *args), word)
    for args, word in (
        (("--time-limit", "0"), "--time-limit"),
        (("--time-limit", "-5"), "--time-limit"),
        (("--time-limit", "nan"), "--time-limit"),
        (("--time-limit", "inf"), "--time-limit"),
        (("--gap", "-1"), "--gap"),
        (("--gap", "nan"), "--gap"),
        (("--gap", "inf"), "--gap"),
        (("--top-k", "-1"), "--top-k"),
        (("--nodes", "0"), "--nodes"),
        (("--nodes", "1" + "0" * 400), "--nodes"),
        (("--gbs", "1" + "0" * 400), "global_batch"),
        (("--seq-len", "0"), "seq_len"),
        (("--memory-margin", "nan"), "--memory-margin"),
        (("--memory-margin", "-5%"), "--memory-margin"),
        (("--condense", "nan"), "condense"),
        (("--capacity-factor", "inf"), "capacity"),
    )
) + tuple(
    (("estimate", "--model", "tiny-moe", "--cluster", "dgx-a100", *args), word)
    for args, word in (
        (("--gbs", "1" + "0" * 400), "global_batch"),
        (("--gbs", "0"), "global_batch"),
        (("--seq-len", "0"), "seq_len"),
        (("--tp", "0"), "tp"),
        (("--nodes", "-1"), "--nodes"),
        (("--capacity-factor", "nan"), "capacity"),
        (("--condense", "inf"), "condense"),
        (("--a2a-chunks", "0"), "chunks"),
    )
) + (
    (("show", "cluster", "dgx-h100", "--nodes", "0"), "--nodes"),
    (("show", "cluster", "dgx-h100", "--nodes", "1" + "0" * 400), "--nodes"),
    (("emit", "--plan", str(GOLDEN_PLAN), "--format", "slurm", "--cpus-per-task", "-1"), "cpus_per_task"),
)  # fmt: skip
"""(arguments, the option or field the refusal names)."""
