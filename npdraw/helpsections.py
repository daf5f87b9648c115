"""--help in sections: the options of a command listed under Model, Training and running,
Data and Output headings (click has no option groups of its own; docs/DESIGN.md says why
this small subclass rather than a library).

An option's section is its tag in SECTION_OF, looked up by the option's Python name (the
same name means the same thing in every command: --seed, --out, --data-dir...). A command
may add or change entries with ``sections={...}``. An option in neither is listed under
"Other options", which tests/test_cli_help.py refuses, so a new option must be placed.

    @click.group(cls=SectionedGroup)        # every cli.command() is then a SectionedCommand
"""
from __future__ import annotations

import click

# section key -> heading, in the order --help writes them
SECTIONS = {
    "model": "Model options",
    "training": "Training and running options",
    "data": "Data options",
    "output": "Output options",
}
OTHER = "Other options"

# option's Python name -> its section key
SECTION_OF = {
    "dataset": "data", "data_dir": "data", "mirror": "data", "folder": "data",
    "subset": "data", "eval_subset": "data", "split": "data", "valid_size": "data",
    "train_set": "data", "distractors": "data", "crop": "data", "size": "data",
    "T": "model", "glimpses": "model", "attention": "model", "read_n": "model",
    "hidden": "model", "enc_dim": "model", "dec_dim": "model", "z_dim": "model",
    "peepholes": "model",
    # attention-demo: the one attention window it draws
    "N": "model", "cx": "model", "cy": "model", "stride": "model", "sigma": "model",
    "dtype": "training", "device": "training", "ranks": "training", "seed": "training",
    "batch_size": "training", "lr": "training", "epochs": "training", "clip": "training",
    "resume": "training", "oldmodel": "training", "lr_schedule": "training",
    "lr_min": "training", "lr_hold": "training", "lr_gamma": "training",
    "lr_decay_epochs": "training", "eval_every": "training", "ema_decay": "training",
    "eval_noise": "training", "K": "training", "tensorboard": "output",
    "check_n": "output", "check_seed": "output",
    "out": "output", "name": "output", "no_progress": "output", "as_json": "output",
    "rows": "output", "cols": "output", "scale": "output", "fps": "output",
    "boxes": "output", "pictures": "output", "from_epoch": "output", "hold": "output",
    "every": "output", "show_kl": "output", "count": "data",
}


def section_of(param: click.Parameter, sections=None) -> str:
    """The section key of an option: the command's ``sections``, else SECTION_OF, else ""
    (other; the help option too)."""
    return (sections or {}).get(param.name) or SECTION_OF.get(param.name, "")


class SectionedCommand(click.Command):
    """A click.Command whose --help lists its options under SECTIONS' headings.

    sections: option name -> section key, for this command's own options (over SECTION_OF).
    """

    def __init__(self, *args, sections=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.sections = dict(sections or {})
        unknown = sorted(set(self.sections.values()) - set(SECTIONS))
        if unknown:
            raise ValueError(f"unknown help sections {unknown}; valid: {', '.join(SECTIONS)}")

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = {key: [] for key in SECTIONS}
        other = []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            key = section_of(param, self.sections) if isinstance(param, click.Option) else ""
            (rows[key] if key in rows else other).append(record)
        for key, heading in SECTIONS.items():
            if rows[key]:
                with formatter.section(heading):
                    formatter.write_dl(rows[key])
        if other:
            with formatter.section(OTHER):
                formatter.write_dl(other)


class SectionedGroup(click.Group):
    """A click.Group whose commands are SectionedCommands unless they say otherwise."""
    command_class = SectionedCommand
