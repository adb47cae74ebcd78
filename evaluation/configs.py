"""Configuration names, the one grammar every tool that compares configurations speaks (bench.py,
evaluate.py, lmms_todre.py): `todre-0.10`, `stage1-keep-64`, `cls-0.10`, `full`, ... -> todre.Settings."""

from todre import NO_PRUNING, Settings, variant

CONFIG_NAMES = """configuration names:
  full                  no pruning
  stage2                Stage 2 only (all visual tokens enter the LLM)
  stage1-R, todre-R     Stage 1 only, or both stages, keeping a fraction R of the patch tokens (todre-0.10)
  cls-R, cls-global-R   the [CLS] top-k baseline (FasterVLM per crop, or one global top-k), Stage 1 only
  METHOD-keep-N         any of the above keeping N tokens instead of a fraction (stage1-keep-64)
  keep-N                the same as todre-keep-N
  ...-v2                with the paper's v2 settings (max-sum selection, one probe at 7L/8, tau 0.10)"""


def parse_config(name: str) -> Settings:
    """A configuration name (todre-0.10, stage1-0.25, keep-64, cls-0.10, todre-0.10-v2, ...) -> Settings.

    One grammar for every tool that compares configurations (bench.py, evaluate.py); CONFIG_NAMES
    lists it. Raises ValueError for a name outside it.
    """
    if name == "full":
        return NO_PRUNING
    base, version = (name[:-3], "v2") if name.endswith("-v2") else (name, "v1")
    if base == "stage2":
        return variant(version, retain=1.0)
    if base.startswith("keep-"):
        base = "todre-" + base
    for method, overrides in (
        ("cls-global", dict(select="cls-global", tau=0.0)),
        ("cls", dict(select="cls", tau=0.0)),
        ("stage1", dict(tau=0.0)),
        ("todre", {}),
    ):
        if base.startswith(method + "-"):
            budget = base[len(method) + 1 :]
            if budget.isdigit():
                raise ValueError(
                    f"configuration {name!r}: the budget is a fraction such as 0.10; "
                    f"for {budget} tokens write {method}-keep-{budget}\n{CONFIG_NAMES}"
                )
            try:
                if budget.startswith("keep-"):
                    return variant(version, retain=1.0, keep_tokens=int(budget[5:]), **overrides)
                return variant(version, retain=float(budget), **overrides)
            except ValueError as e:
                raise ValueError(f"configuration {name!r}: {e}\n{CONFIG_NAMES}") from None
    raise ValueError(f"unknown configuration {name!r}\n{CONFIG_NAMES}")
