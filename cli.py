"""What the command-line programs (generate.py, evaluate.py, bench.py) share: one-line errors, the
device and dtype flags, Ctrl-C handling, and the clock they measure with.

The library files never import this one: they raise errors that describe the problem, and the
programs turn those into one `error:` line that adds the flag to change. torch is imported inside
the functions that need it, so a program can import this file before its slow imports.
"""

import argparse
import math
import signal
import sys


class UsageError(Exception):
    """A bad flag or input file; printed as one line, exit code 2."""


class OutputError(Exception):
    """The program's output (the answer, a picture, results) could not be written; one line, exit code 1."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        raise UsageError(f"{message} (see --help)")


def check_number(flag: str, value, low, high, low_open: bool = False) -> None:
    """A finite number in [low, high] (or (low, high] when low_open); None = not given, fine."""
    if value is None:
        return
    finite = not isinstance(value, float) or math.isfinite(value)
    if not (finite and (value > low if low_open else value >= low) and value <= high):
        bounds = f"{'(' if low_open else '['}{low}, {'inf)' if high == math.inf else f'{high}]'}"
        kind = "a finite number" if isinstance(value, float) else "an integer"
        raise UsageError(f"{flag} must be {kind} in {bounds}, got {value}")


def layer_list(flag: str, text: str) -> list[int]:
    """Comma-separated layer numbers (0 or more), as --probe-layers takes them."""
    try:
        layers = [int(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} must be comma-separated layer numbers, got {text!r}") from None
    if min(layers) < 0:
        raise UsageError(f"{flag} must be 0 or more")
    return layers


def check_not_empty(args, *names: str) -> None:
    """An empty path flag is an unset shell variable, never what was meant."""
    for name in names:
        if getattr(args, name) == "":
            raise UsageError(f"--{name.replace('_', '-')} is empty (an unset shell variable?)")


# ---------------------------------------------------------------------------------------------
# Devices, dtypes, and measuring
# ---------------------------------------------------------------------------------------------


def add_device_flags(p: argparse.ArgumentParser) -> None:
    """--device and --dtype, the same for every program of the project."""
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float16", "bfloat16", "float32"],
        help="auto: bfloat16 on a CPU; on a GPU float16 (bfloat16 for Qwen2.5-VL)",
    )


def pick_device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but no CUDA GPU is available; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps was asked for, but MPS is not available; use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return torch.device(name)


def now(device) -> float:
    """Wall clock after the device's queued work is done."""
    import time

    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def peak_memory_mb(device) -> float:
    """CUDA: the most memory tensors ever held on the device; CPU: this process's peak RSS."""
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------------------
# Ctrl-C and the exit code
# ---------------------------------------------------------------------------------------------


def quiet_ctrl_c(module_name: str) -> bool:
    """Call first thing in a program, before its slow imports (torch): Ctrl-C while they load ends
    the program quietly, as any Unix tool does (exit 130). Left alone where the caller ignores
    Ctrl-C (a background job) or when the file is imported as a module. Returns whether `run`
    should turn Ctrl-C into KeyboardInterrupt for `main`."""
    handled = module_name == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if handled:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    return handled


def run(main, handled: bool) -> None:
    """Run `main()` and exit with its code: during `main` Ctrl-C raises KeyboardInterrupt (so it can
    clean up and return 130); a second Ctrl-C during interpreter shutdown prints no traceback."""
    if handled:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    code = main()
    if handled:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(code)


def exit_code(work, user_errors: tuple, explain=str) -> int:
    """Run work() and turn what it raises into the programs' exit codes: 0 when it returns; a user
    error (UsageError or one of `user_errors`: bad flags, files, checkpoints, data) as one `error:`
    line from explain(e) (None: say nothing) and 2; an OutputError as one line and 1; a reader that
    went away (`| head`) quietly as 141, like any Unix filter; Ctrl-C quietly as 130."""
    try:
        work()
        return 0
    except OutputError as e:
        silence_stdout()
        print_error(str(e))
        return 1
    except (UsageError, *user_errors) as e:
        message = explain(e)
        if message is not None:
            print_error(message)
        return 2
    except BrokenPipeError:
        silence_stdout()
        return 141
    except KeyboardInterrupt:
        return 130


def silence_stdout() -> None:
    """Point file descriptor 1 at /dev/null, so the interpreter's last flush of a dead stdout
    (closed pipe, full disk) cannot print a second error at exit."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, AttributeError, ValueError):
        pass


def print_error(message: str) -> None:
    """One `error:` line on stderr, if there is a stderr left to print to."""
    try:
        if sys.stderr is not None:  # print(file=None) would write to stdout
            print(f"error: {message}", file=sys.stderr)
    except OSError:
        pass  # stderr is gone too: the exit code is all that is left
