"""Reading compiled programs (`compiled.as_text()`, XLA's optimised HLO) for what the
compilers' own analyses leave out: the bytes the collectives move, the attention kernels,
the matmul FLOPs with every loop counted as many times as it runs, and which asynchronous
collectives have compute scheduled between their start and their end.

Why a reader of our own: `cost_analysis()` is None for a GPU compiled without the GPU, and
on TPU it counts a loop body once (a scan over 28 layers reports one layer's FLOPs;
TARGET_COMPILE.md). The FLOPs here are those of dots and convolutions (2 x multiply-adds),
in the program as compiled: rematerialised forward passes count, elementwise work does not,
and kernels (custom calls) count nothing (their FLOPs are the caller's to add).
"""

from __future__ import annotations

import dataclasses
import math
import re

_SHAPE = re.compile(r"(bf16|f32|f16|s32|u32|pred|s8|u8|s64|u64|f64|f8e4m3fn|f8e5m2)\[([\d,]*)\]")
_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1,
          "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
                "collective-permute", "collective-broadcast", "ragged-all-to-all")
# Custom-call targets of the attention kernels (dapo_jax.models.kernels).
KERNEL_CALLS = ("tpu_custom_call", "mosaic_gpu", "mosaic_gpu_v2", "__gpu$xla.gpu.triton")
_GEMM_CALLS = ("__cublas$gemm", "__cublas$lt$matmul", "__cublas$lt$matmul$f8")
# Ops that are bookkeeping, not work, when looking for compute between an async pair.
_NOT_COMPUTE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "copy-start",
                "copy-done", "after-all", "partition-id", "replica-id", "opt-barrier"}


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, dims) of the result(s)
    op: str
    operands: tuple[str, ...]
    attrs: str  # everything after the operand list
    value: int | None = None  # an integer constant's value


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split(",") if d)


def _bracket_end(text: str, depth: int, at_space: bool) -> int:
    """Where `text` ends a bracketed piece: starting `depth` brackets deep, the first space
    outside all brackets (`at_space`) or the bracket that closes the outermost one; -1 if
    neither comes."""
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0 and not at_space:
                return i
        elif ch == " " and depth == 0 and at_space:
            return i
    return -1


def _split_type(rest: str) -> tuple[str, str]:
    """'TYPE op(...)...' -> (TYPE, 'op(...)...'): the type ends at the first space outside
    brackets (tuple types and TPU layouts hold spaces and parentheses)."""
    i = _bracket_end(rest, 0, at_space=True)
    return (rest, "") if i < 0 else (rest[:i], rest[i + 1:])


def _operand_list(text: str) -> tuple[str, str]:
    """'a, b), attrs' (after the op's opening parenthesis) -> ('a, b', attrs)."""
    i = _bracket_end(text, 1, at_space=False)
    return (text, "") if i < 0 else (text[:i], text[i + 1:])


_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\((.*)\)\s*->.*\{\s*$")
_PARAM = re.compile(r"([\w.\-]+):\s*(\w+)\[([\d,]*)\]")
_OPERAND = re.compile(r"%([\w.\-]+)")


@dataclasses.dataclass
class Program:
    """A compiled module's computations, each an ordered list of instructions (the
    schedule, for scheduled modules), and the shapes of every named value."""

    computations: dict[str, list[Instruction]]
    shapes: dict[str, dict[str, tuple[int, ...]]]  # computation -> value -> dims
    entry: str
    roots: dict[str, str]  # computation -> its ROOT instruction's name
    _flops: dict[str, float] = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_name = {(c, i.name): i for c, insts in self.computations.items() for i in insts}
        self._owner = {i.name: c for c, insts in self.computations.items() for i in insts}
        self._root = {c: self._by_name[(c, r)] for c, r in self.roots.items()}

    @classmethod
    def parse(cls, hlo: str) -> Program:
        # Lines before any computation header (a snippet) form the computation "".
        computations: dict[str, list[Instruction]] = {"": []}
        shapes: dict[str, dict[str, tuple[int, ...]]] = {"": {}}
        roots: dict[str, str] = {}
        entry = current = ""
        for line in hlo.splitlines():
            header = _HEADER.match(line)
            if header:
                current = header.group(1)
                computations[current] = []
                shapes[current] = {n: _dims(d) for n, _, d in _PARAM.findall(header.group(2))}
                if line.startswith("ENTRY"):
                    entry = current
                continue
            if " = " not in line:
                continue
            left, rest = line.split(" = ", 1)
            name = left.strip().removeprefix("ROOT").strip().lstrip("%")
            if left.strip().startswith("ROOT"):
                roots[current] = name
            type_text, rest = _split_type(rest.strip())
            if "(" not in rest:
                continue
            op, rest = rest.split("(", 1)
            operands, attrs = _operand_list(rest)
            result = tuple((d, _dims(s)) for d, s in _SHAPE.findall(type_text))
            value = int(operands) if op.strip() == "constant" and \
                re.fullmatch(r"-?\d+", operands.strip()) else None
            computations[current].append(Instruction(
                name, result, op.strip(), tuple(_OPERAND.findall(operands)), attrs, value))
            if len(result) == 1:
                shapes[current][name] = result[0][1]
        return cls(computations, shapes, entry, roots)

    def _attr(self, attrs: str, key: str) -> str | None:
        m = re.search(rf"\b{key}=%?([\w.\-]+)", attrs)
        return m.group(1) if m else None

    def trip_count(self, while_: Instruction) -> int:
        """A while loop's iterations: XLA's known_trip_count, else worked out from the loop as
        a scan lowers it (`i < N` in the condition, i's start in the loop's initial tuple, its
        step in the body; pipelined, double-buffered loops start at 1 and step by 2), else 1
        (unknown)."""
        m = re.search(r'"known_trip_count":\{"n":"(\d+)"', while_.attrs)
        if m:
            return int(m.group(1))
        bound = self._compare_bound(self._attr(while_.attrs, "condition"))
        if bound is None:
            return 1
        comp = self._owner[while_.name]
        init = self._constant(comp, self._tuple_operand(comp, while_.operands[0], 0)) \
            if while_.operands else None
        body = self._attr(while_.attrs, "body")
        root = self._root.get(body)
        step = self._step(body, root.operands[0]) if root and root.op == "tuple" and \
            root.operands else None
        init, step = init or 0, step or 1
        return max(0, -(-(bound - init) // step))

    def _compare_bound(self, comp: str | None) -> int | None:
        """N of the `x < N` a loop condition computes (within fusions too)."""
        for inst in self.computations.get(comp, []):
            if inst.op == "compare" and "direction=LT" in inst.attrs and len(inst.operands) == 2:
                value = self._constant(comp, inst.operands[1])
                if value is not None:
                    return value
            if inst.op == "fusion":
                bound = self._compare_bound(self._attr(inst.attrs, "calls"))
                if bound is not None:
                    return bound
        return None

    def _inst(self, comp: str, name: str) -> Instruction | None:
        return self._by_name.get((comp, name))

    def _constant(self, comp: str, name: str | None) -> int | None:
        """The integer a value is, through copies, bitcasts and fusions of a constant."""
        inst = self._inst(comp, name) if name else None
        while inst is not None and inst.op in ("copy", "bitcast", "fusion") and inst.value is None:
            if inst.op == "fusion":
                root = self._root.get(self._attr(inst.attrs, "calls"))
                return root.value if root is not None and root.op == "constant" else None
            inst = self._inst(comp, inst.operands[0]) if inst.operands else None
        return inst.value if inst is not None else None

    def _tuple_operand(self, comp: str, name: str, index: int) -> str | None:
        inst = self._inst(comp, name)
        return inst.operands[index] if inst is not None and inst.op == "tuple" and \
            len(inst.operands) > index else None

    def _step(self, body: str | None, name: str) -> int | None:
        """c of the body's `i + c` (an add, or a fusion computing one, maybe copied)."""
        inst = self._inst(body, name) if body else None
        while inst is not None and inst.op == "copy" and inst.operands:
            inst = self._inst(body, inst.operands[0])
        if inst is None:
            return None
        comp = body
        if inst.op == "fusion":
            comp = self._attr(inst.attrs, "calls")
            inst = self._root.get(comp)
        if inst is None or inst.op != "add":
            return None
        values = [self._constant(comp, o) for o in inst.operands]
        return next((v for v in values if v is not None), None)

    def _dot_flops(self, comp: str, inst: Instruction) -> float:
        out = math.prod(inst.shapes[0][1]) if inst.shapes else 0
        lhs = self.shapes[comp].get(inst.operands[0], ()) if inst.operands else ()
        if inst.op == "dot":
            m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst.attrs)
            contracted = math.prod(lhs[int(d)] for d in _dims(m.group(1))) if m and lhs else 0
        elif inst.op == "convolution":
            # Each output element sums the input features times the window positions that
            # meet the input: TPU writes a matmul over heads as a convolution whose window
            # (16) slides over a padded spatial dimension of size 1, where only 1 position
            # does, so each spatial dimension counts min(window, input size).
            labels = re.search(r"dim_labels=(\w+)_", inst.attrs)
            window = re.search(r"window=\{size=([\dx]+)", inst.attrs)
            groups = re.search(r"feature_group_count=(\d+)", inst.attrs)
            lhs_labels = labels.group(1) if labels else ""
            f = lhs_labels.find("f")
            contracted = lhs[f] if 0 <= f < len(lhs) else 0
            if window:
                for d, size in enumerate(int(w) for w in window.group(1).split("x")):
                    at = lhs_labels.find(str(d))
                    contracted *= min(size, lhs[at]) if 0 <= at < len(lhs) else size
            contracted //= int(groups.group(1)) if groups else 1
        else:  # a cuBLAS gemm: its contracting dimensions are in the backend config
            m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', inst.attrs)
            dims = [int(d) for d in re.findall(r"\d+", m.group(1))] if m else []
            contracted = math.prod(lhs[d] for d in dims) if lhs and dims else 0
        return 2.0 * out * contracted

    def flops(self, comp: str | None = None) -> float:
        """Dot and convolution FLOPs of computation `comp` (default: the entry) with what it
        calls: fusions and calls once per call, while bodies times their trip count,
        conditionals their costliest branch."""
        comp = self.entry if comp is None else comp
        if comp not in self._flops:
            self._flops[comp] = self._computation_flops(comp)
        return self._flops[comp]

    def _computation_flops(self, comp: str) -> float:
        total = 0.0
        for inst in self.computations.get(comp, []):
            if inst.op in ("dot", "convolution") or (
                    inst.op == "custom-call" and any(f'"{g}"' in inst.attrs
                                                     for g in _GEMM_CALLS)):
                total += self._dot_flops(comp, inst)
            elif inst.op == "while":
                total += self.trip_count(inst) * self.flops(self._attr(inst.attrs, "body"))
            elif inst.op == "conditional":
                branches = re.findall(r"%([\w.\-]+)", inst.attrs.split("branch_computations=")[-1]
                                      .split("}")[0]) if "branch_computations" in inst.attrs \
                    else [self._attr(inst.attrs, k) for k in ("true_computation",
                                                              "false_computation")]
                total += max((self.flops(b) for b in branches if b), default=0.0)
            elif inst.op == "call" or inst.op == "fusion" or inst.op.endswith("-start"):
                callee = self._attr(inst.attrs, "calls") or (
                    self._attr(inst.attrs, "to_apply") if inst.op == "call" else None)
                if callee:
                    total += self.flops(callee)
        return total

    def loop_copy_bytes(self, min_bytes: float) -> float:
        """Bytes of the copies of at least `min_bytes` each in loop bodies: layout changes
        XLA repeats in every iteration (e.g. a KV pool re-laid out for each decode step)."""
        total = 0.0
        for insts in self.computations.values():
            for inst in insts:
                body = self._attr(inst.attrs, "body") if inst.op == "while" else None
                for i in self.computations.get(body or "", []):
                    if i.op == "copy" and len(i.shapes) == 1:
                        size = _BYTES.get(i.shapes[0][0], 4) * math.prod(i.shapes[0][1])
                        total += size if size >= min_bytes else 0.0
        return total

    def collective_bytes(self) -> float:
        """Bytes the collectives produce, per device and call: each collective's output size
        (an async all-gather's or collective-permute's start returns (operand, output): only
        the output counts). A loop body's collectives count once per appearance in the text,
        not per iteration, alike for every attention backend."""
        total = 0.0
        for insts in self.computations.values():
            for inst in insts:
                op = inst.op.removesuffix("-start")
                if op not in _COLLECTIVES or inst.op.endswith("-done"):
                    continue
                shapes = inst.shapes
                if inst.op.endswith("-start") and op in ("all-gather", "collective-permute") \
                        and len(shapes) >= 2:
                    shapes = shapes[1:2]
                total += sum(_BYTES[d] * math.prod(s) for d, s in shapes)
        return total

    def kernel_calls(self) -> list[tuple[str, list[tuple[int, ...]]]]:
        """(custom-call target, result shapes) of every attention kernel in the program."""
        out = []
        for insts in self.computations.values():
            for inst in insts:
                if inst.op != "custom-call":
                    continue
                target = re.search(r'custom_call_target="([^"]+)"', inst.attrs)
                if target and target.group(1) in KERNEL_CALLS:
                    out.append((target.group(1), [s for _, s in inst.shapes]))
        return out

    def kernel_names(self) -> list[str]:
        """The attention kernels' instruction names, without XLA's numbering and clone
        suffixes: a Pallas call's `name` on TPU ("decode_attention"), "pallas_call" or the
        library's own on GPU."""
        names = set()
        for insts in self.computations.values():
            for inst in insts:
                target = re.search(r'custom_call_target="([^"]+)"', inst.attrs) \
                    if inst.op == "custom-call" else None
                if target and target.group(1) in KERNEL_CALLS:
                    names.add(re.sub(r"(\.\d+)?(\.[a-z_]*clone[a-z_]*|\.peeled[a-z_]*)*$", "",
                                     inst.name.lstrip("%")))
        return sorted(names)

    def _is_collective_start(self, inst: Instruction) -> bool:
        op = inst.op.removesuffix("-start")
        if op in _COLLECTIVES:
            return True
        callee = self._attr(inst.attrs, "calls") if inst.op == "async-start" else None
        return any(i.op.removesuffix("-start") in _COLLECTIVES
                   for i in self.computations.get(callee, []))

    def async_collectives(self) -> tuple[int, int]:
        """(asynchronous collectives, those with compute scheduled between their start and
        their done): the latency the compiler hides behind work, in every computation."""
        pairs = overlapped = 0
        for insts in self.computations.values():
            position = {inst.name: i for i, inst in enumerate(insts)}
            for i, inst in enumerate(insts):
                start = position.get(inst.operands[0]) if inst.operands and \
                    inst.op.endswith("-done") else None
                if start is None or not self._is_collective_start(insts[start]):
                    continue
                pairs += 1
                between = insts[start + 1:i]
                if any(b.op not in _NOT_COMPUTE and not b.op.endswith(("-start", "-done"))
                       for b in between):
                    overlapped += 1
        return pairs, overlapped


def collective_bytes(hlo: str) -> float:
    """`Program.collective_bytes` of a compiled program's text."""
    return Program.parse(hlo).collective_bytes()


def kernel_calls(hlo: str) -> list[tuple[str, list[tuple[int, ...]]]]:
    """`Program.kernel_calls` of a compiled program's text."""
    return Program.parse(hlo).kernel_calls()


def program_flops(hlo: str) -> float:
    """`Program.flops` of a compiled program's text."""
    return Program.parse(hlo).flops()
