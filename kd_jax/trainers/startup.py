"""A stage's start-up, overlapped: the student's init is compiled and run, and later the step is
compiled ahead of time, in a worker thread while the calling thread loads the teacher (its
weights, its placement) and builds the feature cache. XLA compiles and runs programs without the
GIL, so on a many-core host start-up costs about its longest part, not the sum.

Every program is traced and lowered in the calling thread; a worker only compiles and runs the
lowered programs. So whatever JAX configuration the caller has in effect, global or
thread-local (`with jax.default_matmul_precision(...)`, `jax.default_prng_impl`, x64, ...), is
already inside the programs the worker gets: nothing needs to be handed across threads and
nothing is dropped. With several processes there is no worker: every host runs its programs in
the same order, so that collectives meet.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable

import jax

from kd_jax import checkpoint as ckpt_lib
from kd_jax import multihost, sharding, stage_source

log = logging.getLogger("kd_jax")


class _Inline:
    """The executor of a multi-process run: a submitted function runs at once, in order."""

    def submit(self, fn, *args) -> concurrent.futures.Future:
        future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # re-raised by .result(), as from a thread.
            future.set_exception(e)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        del wait, cancel_futures


class StartUp:
    """`StartUp(stage, ctx, ckptr, make_step)` starts the student's init (unless the stage
    resumes); then `state()` gives (state, data_state, start step) and `step(...)` the compiled
    step. On resume the state is restored in the calling thread, after `check_resume` vetted
    the checkpoint (its clear message comes before any restore error)."""

    def __init__(self, stage, ctx, ckptr, make_step: Callable):
        self.stage, self.ctx, self.ckptr, self.make_step = stage, ctx, ckptr, make_step
        if jax.process_count() == 1:
            self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kd_startup")
        else:
            self.pool = _Inline()
        self.resume = ckptr.latest_step() is not None
        self._init = None
        if not self.resume:
            lowered = stage.init_fn.lower(stage.cfg.seed)
            self._init = self.pool.submit(lambda: lowered.compile()())

    def state(self):
        """(state, data iterator state or None, the step to start from)."""
        stage = self.stage
        if self.resume:
            abstract = ckpt_lib.abstract(stage.abstract_state, stage.state_shardings)
            state, data_state, _ = self.ckptr.restore(abstract)
            start = int(multihost.to_host(state.step)[0])
            log.info("stage %s: resumed from step %d", stage.name, start)
            return state, data_state, start
        state = self._init.result()
        if stage.cfg.student.init:  # a warm start reads files and traces: in this thread.
            state = stage_source.warm_start(stage, state, self.ctx)
        return state, None, 0

    def step(self, t_vars, t_axis, cache, fed=None) -> Step:
        """The stage's jitted step, lowered here for the state's and a batch's shapes and
        compiled in the worker; the first call waits for the compile. `fed`: the abstract
        `batch["teacher"]` of a teacher on a sub-mesh (`kd_jax.submesh.Feed.abstract`)."""
        stage = self.stage
        jitted = self.make_step(stage, t_axis, cache is not None or fed is not None)
        if not hasattr(jitted, "lower"):  # a plain function: compiled by its first call
            return Step(jitted, None)
        local = stage.data.example_batch()
        if cache is not None:
            local["teacher"] = {k: v[local["index"]] for k, v in cache.items()}
        batch = sharding.make_global(stage.mesh, local, stage.data.global_batch)
        if fed is not None:
            batch["teacher"] = fed
        state = ckpt_lib.abstract(stage.abstract_state, stage.state_shardings)
        lowered = jitted.lower(state, t_vars, batch)
        return Step(jitted, self.pool.submit(lowered.compile))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class Step:
    """The step compiled ahead of time. Should a call's arguments ever differ from the ones it was
    compiled for (shapes, dtypes, shardings), the jitted step takes over, logged."""

    def __init__(self, jitted, compiled: concurrent.futures.Future | None):
        self.jitted, self._future, self.compiled = jitted, compiled, None
        self._aot, self._fell_back = compiled is not None, False

    def program(self):
        """The ahead-of-time compiled program (waits for its compile), or None."""
        if self._future is not None:
            self.compiled, self._future = self._future.result(), None
        return self.compiled

    def __call__(self, *args):
        if self.program() is not None:
            try:
                return self.compiled(*args)
            except (TypeError, ValueError) as e:
                log.warning("ahead-of-time step not used (%s); compiling it for these inputs", e)
                self.compiled, self._fell_back = None, True
        return self.jitted(*args)

    def compiles(self) -> int:
        """1 for the ahead-of-time program, plus 1 once the jitted step took over."""
        return int(self._aot) + int(self._fell_back)
