"""`harness model create | pack | info`: random-init checkpoints and the packed expert store."""

from __future__ import annotations

from pathlib import Path

import click

from harness.paths import check_output_dir
from harness.units import format_bytes


@click.group("model")
def model_group() -> None:
    """Create random-init MoE checkpoints and pack their experts for offloading."""


@model_group.command("create")
# --arch and --preset are checked by create_model (an unknown name is one line listing the choices); a
# click.Choice would print a usage block instead of the one-line error every command gives.
@click.option(
    "--arch",
    default="olmoe",
    show_default=True,
    help="transformers MoE architecture (model_type) to instantiate, e.g. olmoe, mixtral, qwen3_moe, gpt_oss "
    "(an unknown name lists every supported one).",
)
@click.option(
    "--preset",
    default="small",
    show_default=True,
    help="tiny: a few MB, for tests; small: the default bench model (2.25 GiB of experts).",
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder to write the checkpoint to.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random initialisation.")
@click.option("--force", is_flag=True, help="Replace an existing folder.")
def create(arch: str, preset: str, out: Path, seed: int, force: bool) -> None:
    """Build a random-init checkpoint of a real MoE architecture (saved with save_pretrained)."""
    from rich.console import Console
    from transformers.utils import logging as hf_logging

    from harness.models.factory import create_model

    check_output_dir(out, "--out")
    hf_logging.disable_progress_bar()
    with Console(stderr=True).status(f"creating {arch} ({preset}) in {out}"):
        create_model(arch, preset, out, seed=seed, force=force)
    click.echo(f"created {out}")


@model_group.command("pack")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Re-pack even when an up-to-date pack exists.")
@click.option(
    "--expert-dtype",
    type=click.Choice(["checkpoint", "int8", "int4"]),
    default=None,
    help="Store expert weights as in the checkpoint, or group-wise symmetric int8 / int4 with a float16 scale per "
    "group (dequantized in the forward). Default: keep an existing pack's format, else the checkpoint's.",
)
@click.option(
    "--group-size", type=click.IntRange(min=2), default=32, show_default=True, help="Weights per scale (int8/int4)."
)
def pack(model_dir: Path, force: bool, expert_dtype: str | None, group_size: int) -> None:
    """Write the 4 KiB-aligned expert file, its index and the non-expert weights (idempotent, verified).

    An existing pack is verified in full before it is called current; one that fails is re-packed."""
    from rich.progress import Progress

    from harness.models.packer import pack_model, pack_paths

    with Progress(transient=True) as bar:
        task = bar.add_task("packing experts", total=None)
        index, wrote = pack_model(
            model_dir,
            force=force,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
            repair=True,
            expert_dtype=expert_dtype,
            group_size=group_size,
        )
    paths = pack_paths(model_dir)
    state = "packed and verified" if wrote else "already packed (up to date)"
    click.echo(
        f"{state}: {paths['experts']} ({len(index.entries)} experts of {format_bytes(index.expert_bytes)}, "
        f"{format_bytes(index.total_expert_bytes)} in all; layers {index.moe_layers[0]}..{index.moe_layers[-1]},"
        f" top-{index.top_k} of {index.num_experts}; experts stored as {index.expert_dtype},"
        f" {index.bits_per_weight:g} bits per weight; non-expert weights {format_bytes(index.dense_bytes)})"
    )


commands: list[click.Command] = [model_group]
