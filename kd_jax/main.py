"""Command line: `python -m kd_jax.main --config=configs/x.py:tiny --workdir=/tmp/w
[--config.optimizer.learning_rate=1e-3 ...] [--distributed]
[--compilation_cache=~/.cache/kd_jax_xla]`."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys

from kd_jax import hostmem

if __name__ == "__main__":  # KD_JAX_HOST_MALLOC=tuned: before JAX allocates, as glibc asks
    try:
        hostmem.reexec_tuned()
    except ValueError as e:  # a bad KD_JAX_HOST_MALLOC: the user's to fix, exit 2
        print(f"kd_jax: error: {e}", file=sys.stderr)
        sys.exit(2)

import jax  # noqa: E402

from kd_jax import checkpoint, report, runner  # noqa: E402
from kd_jax import config as config_lib  # noqa: E402
from kd_jax.errors import UserError  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True, help="path/to/config.py[:arg]")
    p.add_argument("--workdir", required=True)
    p.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() (auto-detects TPU pods / SLURM)",
    )
    p.add_argument("--coordinator_address", default=None)
    p.add_argument("--num_processes", type=int, default=None)
    p.add_argument("--process_id", type=int, default=None)
    p.add_argument("--cpu_devices", type=int, default=0, help="fake CPU devices (testing)")
    p.add_argument(
        "--compilation_cache",
        default=None,
        help="persistent XLA compilation cache directory: a rerun of the same config (a resume, "
        "the next seed, a sweep point of equal shapes) loads its compiled steps instead of "
        "compiling them; default $KD_JAX_COMPILATION_CACHE, unset = off",
    )
    args, rest = p.parse_known_args(argv)
    overrides = []
    for item in rest:
        if not item.startswith("--config."):
            p.error(
                f"unrecognised argument '{item}'; config overrides look like "
                "--config.optimizer.learning_rate=1e-3"
            )
        overrides.append(item[2:])
    return args, overrides


def main(argv=None) -> int:
    # SIGTERM and SIGINT from the first line: a stop request, acted on at the next safe point.
    with runner.stop_on_signals(runner.Stop()) as stop:
        return _main(argv, stop)


def _main(argv, stop) -> int:
    with contextlib.ExitStack() as stack:
        return _run(argv, stop, stack)


def _run(argv, stop, stack) -> int:
    args, overrides = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # orbax logs every file rename through absl at INFO; keep the console for our own lines.
    logging.getLogger("absl").setLevel(logging.WARNING)
    if os.environ.get(hostmem.APPLIED):
        print(f"kd_jax: host malloc: {hostmem.describe(os.environ)}", file=sys.stderr)
    # Flags take effect before the first computation initialises a backend.
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    enable_compilation_cache(args.compilation_cache or os.environ.get("KD_JAX_COMPILATION_CACHE"))
    if args.distributed:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
        # initialize() hands SIGTERM to JAX's preemption notifier; the run's own handlers take it
        # back (the hosts agree on a stop through `multihost.stop_requested`).
        stack.enter_context(runner.stop_on_signals(stop))

    try:
        config = config_lib.load(args.config, overrides)
    except (UserError, KeyError, ValueError, AttributeError, FileNotFoundError) as e:
        # A config mistake is the user's to fix: show the message, not a traceback.
        return _user_error("config error", e)
    results = {}
    try:
        if not stop.is_set():
            with checkpoint.cpu_arrays_written_by_one_replica():  # CPU saves: no replica slicing
                results = runner.run(config, args.workdir, stop=stop)
    except UserError as e:  # a bad data path, a corrupt user file, a busy workdir...
        return _user_error("error", e)
    if stop.is_set():
        return _stopped(stop, results, args.workdir)
    if jax.process_index() == 0:
        print(report.write(args.workdir, results))
    return 0


def _stopped(stop, results: dict, workdir: str) -> int:
    """One line for a run a signal stopped; exit status 128 + the signal's number."""
    where = next((r for r in results.values() if r.get("preempted")), None)
    at = f" in stage {where.get('stage')} at step {where.get('step')}" if where else ""
    name = signal.Signals(stop.signum).name
    print(
        f"kd_jax: stopped by {name}{at}; what was done is saved, the lock is released: rerun "
        f"the same command to resume ({workdir}).",
        file=sys.stderr,
    )
    return 128 + int(stop.signum)


def enable_compilation_cache(path: str | None) -> None:
    """Turns on JAX's persistent compilation cache at `path` for every compiled program (also
    the fast ones: a step is compiled once per shape, and start-up is the sum of many)."""
    if not path:
        return
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _user_error(what: str, e: BaseException) -> int:
    """Prints a user's mistake as one message (no traceback) and returns exit status 2."""
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"kd_jax {what}: {msg}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
