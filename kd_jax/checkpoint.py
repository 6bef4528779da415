"""Checkpoints through orbax's CheckpointManager (the only module that imports orbax).

A checkpoint holds three items: "state" (student + training-only params, optimizer state, step,
RNG), "data" (the input iterator's state, JSON) and "meta" (teacher identity, stage, config).
The teacher's weights are never in it. Orbax writes into a temporary directory and renames it
when complete, so a crash mid-save leaves the previous step as the latest restorable one.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from kd_jax import sharding


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, *, data_state: dict, meta: dict, force: bool = False) -> bool:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
        )
        return self.manager.save(step, args=args, force=force)

    def restore(self, abstract_state, step: int | None = None):
        """-> (state, data_state, meta), placed with `abstract_state`'s shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No complete checkpoint in {self.directory}.")
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return out["state"], out["data"], out["meta"]

    def restore_saved(self, mesh, rules, step: int | None = None) -> dict:
        """The saved state as a plain dict tree, shaped by the checkpoint's own metadata (no
        model, data or optimizer needed), laid out on `mesh` by the sharding `rules` (the
        leading axis of each leaf is the seed axis)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No complete checkpoint in {self.directory}.")
        tree = self.manager.item_metadata(step)["state"].tree
        shapes = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype),
            tree,
            is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"),
        )
        target = abstract(shapes, sharding.tree_shardings(shapes, mesh, rules, leading=1))
        return self.restore(target, step)[0]

    def read_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract(tree, shardings):
    """ShapeDtypeStructs carrying target shardings, for a sharded restore."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def save_params(path: str, params) -> None:
    """Exports a params pytree (e.g. a trained teacher) as a standalone orbax checkpoint."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.abspath(path), params)


def load_params(path: str, abstract_params):
    if not os.path.exists(path):
        raise FileNotFoundError(f"Params checkpoint '{path}' not found.")
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.abspath(path), abstract_params)
