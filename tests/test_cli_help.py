"""--help of every command: each option explained, in the Model / Training and running /
Data / Output sections (npdraw/helpsections.py), and the glimpse count named --glimpses
everywhere, its old names kept as aliases."""
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from npdraw import cli as cli_mod
from npdraw import cli_options, config, helpsections

REPO = Path(__file__).resolve().parents[1]
cli = cli_mod.cli
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from bench import run as bench_run  # noqa: E402

COMMANDS = sorted(cli.commands)


def _options(command):
    ctx = click.Context(command, info_name=command.name)
    # the help option by its flags: its parameter name differs between click versions
    return [p for p in command.get_params(ctx) if isinstance(p, click.Option)
            and not set(p.opts) & {"-h", "--help"}]


def test_the_commands_are_all_there():
    assert {"train", "sample", "evaluate", "export", "classify", "classify-eval", "plot",
            "attention-demo", "bench"} <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_has_help_and_a_section(name):
    command = cli.commands[name]
    assert isinstance(command, helpsections.SectionedCommand)
    no_help = [p.opts[0] for p in _options(command) if not (p.help or "").strip()]
    assert no_help == [], f"{name}: options without help text: {no_help}"
    unplaced = [p.opts[0] for p in _options(command)
                if helpsections.section_of(p, command.sections) not in helpsections.SECTIONS]
    assert unplaced == [], f"{name}: options in no help section: {unplaced}"


@pytest.mark.parametrize("name", [n for n in COMMANDS if n != "bench"])
def test_help_lists_each_option_under_its_section(name):
    command = cli.commands[name]
    result = CliRunner().invoke(cli, [name, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    text = result.output
    headings = {key: text.find(heading + ":") for key, heading in helpsections.SECTIONS.items()}
    present = sorted((pos, key) for key, pos in headings.items() if pos >= 0)
    assert present, text
    # the sections come in SECTIONS' order, and each option lies inside its own
    assert [k for _, k in present] == [k for k in helpsections.SECTIONS if headings[k] >= 0]
    ends = {key: (present[i + 1][0] if i + 1 < len(present) else len(text))
            for i, (_, key) in enumerate(present)}
    for option in _options(command):
        key = helpsections.section_of(option, command.sections)
        block = text[headings[key]:ends[key]]
        assert option.opts[0] in block, f"{name}: {option.opts[0]} not under {key}"
    assert helpsections.OTHER + ":" in text and "--help" in text.split(helpsections.OTHER)[1]


def test_an_option_without_a_section_is_listed_as_other():
    @click.command(cls=helpsections.SectionedCommand)
    @click.option("--wobble", help="Not placed anywhere.")
    @click.option("--seed", help="Placed by SECTION_OF.")
    def tool(wobble, seed):
        """A tool."""
    text = CliRunner().invoke(tool, ["--help"]).output
    other = text.split(helpsections.OTHER + ":")[1]
    assert "--wobble" in other and "--seed" not in other
    assert "--seed" in text.split(helpsections.SECTIONS["training"] + ":")[1]
    with pytest.raises(ValueError, match="unknown help sections"):
        helpsections.SectionedCommand("x", sections={"seed": "nowhere"})


def test_the_bench_options_have_help_in_sections():
    parser = bench_run.build_parser()
    titles = [g.title for g in parser._action_groups]
    for heading in helpsections.SECTIONS.values():
        assert heading.lower() in titles
    missing = [a.option_strings[0] for a in parser._actions if not (a.help or "").strip()]
    assert missing == []


def _given(command, args):
    """The value of each parameter after parsing ``args`` for ``command`` (nothing runs)."""
    ctx = cli.commands[command].make_context(command, list(args), resilient_parsing=False)
    return ctx.params


@pytest.mark.parametrize("flag", ["--glimpses", "--niter"])
def test_train_takes_glimpses_and_its_old_name_niter(flag):
    assert _given("train", [flag, "7"])["T"] == 7


def test_classify_takes_glimpses():
    assert _given("classify", ["--glimpses", "5"])["glimpses"] == 5


@pytest.mark.parametrize("flag", ["--glimpses", "--T"])
def test_bench_takes_glimpses_and_its_old_name_T(flag):
    assert bench_run.parse_args([flag, "9"]).T == 9
    with pytest.raises(SystemExit):
        bench_run.parse_args([flag, "0"])


def test_classify_help_names_the_training_set_choice():
    text = CliRunner().invoke(cli, ["classify", "--help"], terminal_width=100).output
    data = text.split(helpsections.SECTIONS["data"] + ":")[1]
    assert "--train-set [npm10k|mnist]" in data and "60,000" in data


# What a --resume noted as ignored when cli.py listed it by hand (before issue 22)
IGNORED_ON_RESUME = {
    "train": ["dataset", "attention", "T", "enc_dim", "dec_dim", "z_dim", "name", "oldmodel",
              "seed", "subset", "eval_subset", "clip", "out", "dtype"],
    "classify": ["glimpses", "read_n", "hidden", "size", "distractors", "crop", "valid_size",
                 "train_set", "batch_size", "clip", "seed", "subset", "eval_subset", "name",
                 "out", "dtype"]}


@pytest.mark.parametrize("name, changeable", [
    ("train", config.RESUME_OVERRIDES), ("classify", cli_options.CLASSIFY_RESUME_OVERRIDES)])
def test_a_resume_ignores_every_option_it_neither_changes_nor_reads(name, changeable, tmp_path):
    """The options a --resume ignores are derived from config.RESUME_OVERRIDES (for
    classify its epochs, device and lr), not listed by hand: given all, the note names
    exactly the others, in --help's order, as the hand-made lists did."""
    command = cli.commands[name]
    assert set(changeable) <= set(config.RESUME_OVERRIDES)
    args, expected = ["--resume", str(tmp_path)], []
    for param in _options(command):
        flag = param.opts[0]
        if param.is_flag:
            args.append(flag)
        elif param.name == "oldmodel":
            args += [flag, str(REPO / "pretrained" / "bmnist_r2w5_t64.h5")]
        elif param.name != "resume":                 # given, though with its default
            args += [flag, str(param.default)]
        if param.name not in changeable and param.name not in cli_options.RESUME_READS:
            expected.append(param.name)
    ctx = command.make_context(name, args)
    ignored = cli_options.ignored_on_resume(ctx, changeable)
    assert ignored == expected == IGNORED_ON_RESUME[name]
    assert "data_dir" not in ignored and "epochs" not in ignored
