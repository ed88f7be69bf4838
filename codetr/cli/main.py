"""The ``codetr`` command line."""

from __future__ import annotations

import typer

from codetr.cli import config_cmd, convert_cmd, plugins_cmd, quickstart_cmd, train_cmd

app = typer.Typer(
    name="codetr",
    help="Co-DETR and the DETR family: train, evaluate and serve detectors from validated YAML recipes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
quickstart_cmd.register(app)
train_cmd.register(app)
convert_cmd.register(app)
app.add_typer(config_cmd.app, name="config")
app.add_typer(plugins_cmd.app, name="plugins")


def _register_optional() -> None:
    """Sub-apps that live in other packages of codetr."""
    from codetr.data.cli import app as data_app

    app.add_typer(data_app, name="data", help="Convert COCO to webdataset shards, make synthetic data, inspect shards.")


_register_optional()

if __name__ == "__main__":  # pragma: no cover
    app()
