"""Runs the stages of a config in order: resolve every stage's config once, then hand each to the
trainer of its kind (`kd_jax.trainers`). The workdir is locked for the run (`kd_jax.lock`).

Signals: SIGTERM (a preemption) and SIGINT (Ctrl-C) set the run's `Stop` (every stage's
`ctx.stop`): the running stage keeps what it has (a checkpoint at its next step; the finished
record shards of a data-writing stage; an unfinished teacher cache is discarded) and returns, no
later stage starts, the lock is released, and rerunning the same command resumes. A second
Ctrl-C stops at once (KeyboardInterrupt). `kd_jax.main` installs the handlers at its first line
(`stop_on_signals`); `run` called from Python installs them for its own duration. The previous
handlers are back in place afterwards."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading

import jax

from kd_jax import config as config_lib
from kd_jax import lock, multihost, sharding, stage_source, trainers
from kd_jax.errors import ConfigValueError

log = logging.getLogger("kd_jax")


def stage_dir(workdir: str, name: str | None) -> str:
    return os.path.join(workdir, name) if name else workdir


def resolve(config, workdir: str) -> dict:
    """{stage name: its effective config}, in run order, with "{workdir}" in data paths replaced
    by the run's workdir. Each stage's kind must be registered, and a stage may set only the
    free-form settings its own kind reads."""
    out = {}
    for name in config_lib.stage_names(config):
        cfg = config_lib.stage_config(config, name)
        for k, v in cfg.data.kwargs.items():
            if isinstance(v, str) and "{workdir}" in v:
                cfg.data.kwargs[k] = v.replace("{workdir}", workdir)
        own = set(trainers.TRAINERS.meta(cfg.kind)["settings"])
        defaults = config_lib.base_config()
        for other, entry in trainers.TRAINERS.items():
            for key in set(entry.meta["settings"]) - own:
                if key in cfg and cfg[key].to_dict() != defaults[key].to_dict():
                    raise ConfigValueError(
                        f"Stage '{cfg.stage_name}' (kind '{cfg.kind}') sets config.{key}, which "
                        f"only kind '{other}' reads; set kind='{other}' or remove config.{key}."
                    )
        prng_impl(cfg)  # an unknown name fails here, before any stage runs
        stage_source.inherit(cfg, out)  # a "stage:" teacher without a model: its source's
        out[cfg.stage_name] = cfg
    return out


def run(config, workdir: str, devices=None, stop: Stop | None = None) -> dict:
    """Runs every stage of `config` in order; returns {stage: result}. `stop`: a `Stop` whose
    signal handlers the caller installed (`kd_jax.main`); None: installed for this call."""
    config_lib.validate(config)  # also a config built in Python: keys and value ranges
    with contextlib.ExitStack() as stack:
        if stop is None:
            stop = stack.enter_context(stop_on_signals(Stop()))
        mesh = sharding.make_mesh(config.mesh, devices)
        log.info("mesh %s", dict(mesh.shape))
        stages = resolve(config, workdir)
        stack.enter_context(lock.workdir_lock(workdir))
        return _run_stages(config, stages, mesh, workdir, stop)


class Stop(threading.Event):
    """The run's stop request: set by SIGTERM or SIGINT; `signum` says which."""

    signum: int | None = None

    def request(self, signum: int) -> None:
        self.signum = signum
        self.set()


@contextlib.contextmanager
def stop_on_signals(stop: Stop, signals=(signal.SIGTERM, signal.SIGINT)):
    """While the block runs, `signals` request `stop` (a second SIGINT raises
    KeyboardInterrupt); the previous handlers are restored after it. Only the main thread can
    install handlers: elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handle(signum, frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.warning(
            "%s: stopping at the next safe point (a checkpoint is saved); rerun to resume%s",
            signal.Signals(signum).name,
            "; Ctrl-C again stops at once" if signum == signal.SIGINT else "",
        )
        stop.request(signum)

    previous = {s: signal.signal(s, handle) for s in signals}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


PRNG_IMPLS = ("", "threefry2x32", "rbg", "unsafe_rbg")


def prng_impl(cfg):
    """The stage's `prng_impl` as JAX's default PRNG while it runs (a context manager)."""
    if cfg.prng_impl not in PRNG_IMPLS:
        raise ConfigValueError(f"Unknown prng_impl '{cfg.prng_impl}'; use one of {PRNG_IMPLS}.")
    if not cfg.prng_impl:
        return contextlib.nullcontext()
    return jax.default_prng_impl(cfg.prng_impl)


def _contexts(config, stages, mesh, workdir: str, stop=None):
    stop = stop or threading.Event()
    for (name, cfg), raw in zip(stages.items(), config_lib.stage_names(config)):
        yield name, cfg, trainers.RunContext(mesh, workdir, stage_dir(workdir, raw), stages, stop)


def preflight(config, stages, mesh, workdir: str, stop=None) -> None:
    """Every stage's checks (`trainers.register(preflight=...)`) before any stage trains, so a
    mistake in the last stage fails at once, not after hours of the first ones."""
    for _, cfg, ctx in _contexts(config, stages, mesh, workdir, stop):
        if multihost.stop_requested(ctx.stop):
            return
        check = trainers.TRAINERS.meta(cfg.kind).get("preflight")
        if check is not None and trainers.read_result(ctx.stage_dir) is None:
            with prng_impl(cfg):
                check(cfg, ctx)


def _run_stages(config, stages, mesh, workdir: str, stop: threading.Event) -> dict:
    if config.preflight:
        preflight(config, stages, mesh, workdir, stop)
    results = {}
    for name, cfg, ctx in _contexts(config, stages, mesh, workdir, stop):
        if multihost.stop_requested(stop):  # stopped between stages: the next one does not start.
            results[name] = {"stage": name, "preempted": True, "step": 0}
            break
        with prng_impl(cfg):
            results[name] = trainers.TRAINERS.get(cfg.kind)(cfg, ctx)
        if results[name].get("preempted"):
            log.warning(
                "preempted in stage %s at step %d; checkpoint saved, rerun to resume",
                name,
                results[name]["step"],
            )
            break
    return results
