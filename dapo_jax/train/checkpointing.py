"""Training checkpoints with orbax's CheckpointManager.

Each step directory holds the parameters, the optimiser state and a JSON host state (step,
data position, weight version). Checkpoints are written between steps, so no
dynamic-sampling accumulator is in flight then. orbax writes a step under a
temporary name and renames it when complete, so a run killed at any moment (also during a
save) resumes from the last complete checkpoint; sampling seeds are derived from (seed,
step), so the resumed run reproduces the uninterrupted one.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from dapo_jax.models import Precision, Qwen, read_config

# Room kept beyond the arrays' bytes: orbax's metadata, the JSON host state, small files.
HEADROOM_BYTES = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (the run stops; the last complete one is intact)."""


def _no_space(e: BaseException) -> bool:
    """Whether ENOSPC is somewhere in the exception, its causes or (exception groups) its
    parts: orbax raises from its writer threads, wrapped."""
    seen: set[int] = set()
    todo = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if (isinstance(x, OSError) and x.errno == errno.ENOSPC) or \
                "No space left on device" in str(x):
            return True
        todo += [x.__cause__, x.__context__, *getattr(x, "exceptions", ())]
    return False


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int):
        self.directory = Path(directory).resolve()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False))

    def save(self, step: int, params: Any, opt_state: Any, host: dict[str, Any]) -> None:
        """Writes checkpoint `step`. When the filesystem cannot hold it (checked before
        writing: this process's shards of the arrays plus headroom; or a write failing with
        ENOSPC), raises `CheckpointError` naming the checkpoint, the path, the space needed
        and free, and the last complete checkpoint, which is left intact."""
        arrays = jax.tree.leaves((params, opt_state))
        needed = HEADROOM_BYTES + sum(
            shard.data.nbytes for x in arrays for shard in x.addressable_shards
            if shard.replica_id == 0)
        free = shutil.disk_usage(self.directory).free
        if free < needed:
            raise self._full(step, needed, free)
        try:
            self.manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state), host=ocp.args.JsonSave(host)))
            self.manager.wait_until_finished()
        except Exception as e:
            if _no_space(e):
                raise self._full(step, needed, shutil.disk_usage(self.directory).free) from None
            raise

    def _full(self, step: int, needed: int, free: int) -> CheckpointError:
        self.manager.reload()  # what is complete on disk now
        last = self.manager.latest_step()
        intact = f"the last complete checkpoint, {self.directory / str(last)}, is intact " \
                 "(the run resumes from it)" if last is not None else "no earlier checkpoint"
        return CheckpointError(
            f"checkpoint {step} does not fit in {self.directory}: it needs about "
            f"{_gib(needed)}, {_gib(free)} is free; {intact}. Free space or set "
            "trainer.run_dir / trainer.max_ckpts_to_keep")

    def restore(self, step: int, params: Any, opt_state: Any) -> tuple[Any, Any, dict[str, Any]]:
        """Restores into the structure, dtypes and shardings of the given (live) trees."""
        abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract(params)),
            opt_state=ocp.args.StandardRestore(abstract(opt_state)),
            host=ocp.args.JsonRestore()))
        return out.params, out.opt_state, dict(out.host)

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the parameters, into `abstract_params`' structure, dtypes and shardings
        (`jax.ShapeDtypeStruct`s: nothing else is allocated)."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params)))
        return out.params

    def close(self) -> None:
        self.manager.close()


def resolve_resume(mode: str, run_ckpt: Checkpointer, resume_path: str) -> tuple[Path, int] | None:
    """(checkpoint directory, step) to resume from, or None to start fresh.

    `latest`: the newest complete checkpoint of this run (`run_ckpt`, already created, so
    every process of a multi-process job sees the same directory: deciding before it exists
    raced with process 0 creating it), if any; `from_path`: a step directory
    (`.../checkpoints/<step>`) of any run; `none`: start fresh."""
    if mode == "none":
        return None
    if mode == "latest":
        step = run_ckpt.manager.latest_step()
        return None if step is None else (run_ckpt.directory, step)
    path = Path(resume_path).resolve()
    if not path.name.isdigit():
        raise ValueError(f"trainer.resume_path {resume_path!r} must be a step directory "
                         "(<run_dir>/checkpoints/<step>)")
    return path.parent, int(path.name)


def checkpoint_base_model(checkpoint: str | Path) -> Path:
    """The base model directory a training checkpoint `<run_dir>/checkpoints/<step>` was
    trained from (its run's config.json), without restoring anything."""
    step_dir = Path(checkpoint).resolve()
    run_config = step_dir.parent.parent / "config.json"
    if not run_config.exists():
        raise ValueError(f"{run_config} does not exist: pass --base-model")
    return Path(json.loads(run_config.read_text())["model"]["path"])


def checkpoint_model(checkpoint: str | Path, base_model: str | Path | None = None
                     ) -> tuple[Qwen, Path]:
    """(the policy of a training checkpoint `<run_dir>/checkpoints/<step>`, its base model
    directory), restoring only the parameters (float32 masters), on one device."""
    step_dir = Path(checkpoint).resolve()
    if not step_dir.name.isdigit() or not step_dir.is_dir():
        raise ValueError(f"--checkpoint {checkpoint}: expected a step directory "
                         "<run_dir>/checkpoints/<step>")
    base_model = Path(base_model or checkpoint_base_model(step_dir))
    cfg = read_config(base_model)
    abstract = nnx.eval_shape(lambda: Qwen(cfg, precision=Precision("float32", "float32"),
                                           attention_impl="xla", rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          state)
    ckpt = Checkpointer(step_dir.parent, keep=10**6)
    try:
        params = ckpt.restore_params(int(step_dir.name), target)
    finally:
        ckpt.close()
    return nnx.merge(graphdef, params), base_model
