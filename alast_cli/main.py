"""The `alast` command line. With no command it runs the built-in demo (`alast train`)."""
from __future__ import annotations

from typing import Any

import click

from .bench_cmd import bench_command
from .errors import one_line_usage_error
from .export_cmd import eval_command, export_command
from .plan_cmd import plan_command, profile_command
from .train_cmd import train_command

_GROUP_OPTIONS = ("--version", "-h", "--help", "--")  # the options of `alast` itself, before a command


class _Cli(click.Group):
    """Takes ``--debug`` anywhere before ``--`` (``alast train ... --debug`` as well as ``alast --debug train``):
    every error message points the user at it. Without a command, the options are ``train``'s: the demo's
    ``alast --steps 50`` is ``alast train --steps 50``, and ``alast --resume --out RUN`` continues it."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        end = args.index("--") if "--" in args else len(args)
        if "--debug" in args[:end]:
            args = ["--debug"] + [a for a in args[:end] if a != "--debug"] + args[end:]
        first = 1 if args[:1] == ["--debug"] else 0
        if args[first:] and args[first].startswith("-") and args[first] not in _GROUP_OPTIONS:
            args = args[:first] + ["train"] + args[first:]
        return super().parse_args(ctx, args)

    # Usage errors (a bad option value, an unknown option) get one `error:` line like any other bad
    # input: those of the group's own options, and those of a command (raised inside invoke).
    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as exc:
            raise one_line_usage_error(exc) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise one_line_usage_error(exc) from None


@click.group(cls=_Cli, invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="show tracebacks (also accepted after the command)")
@click.version_option(package_name="alast")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """ALaST: adaptive layer selection fine-tuning for timm Vision Transformers."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    if ctx.invoked_subcommand is None:
        ctx.invoke(train_command)


cli.add_command(train_command)
cli.add_command(bench_command)
cli.add_command(profile_command)
cli.add_command(plan_command)
cli.add_command(export_command)
cli.add_command(eval_command)


def main() -> None:
    cli(prog_name="alast")


if __name__ == "__main__":
    main()
