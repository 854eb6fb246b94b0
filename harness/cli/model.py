"""CLI commands of this family (filled in by the issue that owns them)."""

import click

commands: list[click.Command] = []
