"""The CLI fits people's habits (issue 17): help panels, progress in logs, stdout for results only, --quiet /
--verbose / --json, timm's spellings, --results-file, and messages in the flags' words."""
from __future__ import annotations

import csv
import json

import pytest
import torch
import typer
from typer.testing import CliRunner

import custom_nets
from conftest import image_folder
from patchcsra.cli import app
from patchcsra.cli._common import PlainProgress, amp_choice, cli_message, habit_argv
from patchcsra.errors import PatchCSRAError
from patchcsra.report import RESULTS_FILE_COLUMNS

runner = CliRunner()
VERBS = ("patch", "describe", "sweep-lambda", "report", "explain", "train-head", "demo", "bench")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 4-class ImageFolder of 24 32x32 images and a resnet20 state dict for it."""
    d = tmp_path_factory.mktemp("habits")
    image_folder(d / "data", 4, 6)
    torch.manual_seed(0)
    torch.save(custom_nets.resnet20(num_classes=4).state_dict(), d / "m.pt")
    return d


def _sweep(tiny, out, *extra):
    return ["sweep-lambda", str(tiny / "m.pt"), "--arch", "custom_nets:resnet20", "--num-classes", "4",
            "--data", str(tiny / "data"), "--split", "train", "--workers", "0", "--device", "cpu", "--no-cache",
            "--bootstrap", "0", "--folds", "0", "--batch-size", "8", "--out", str(out), *extra]


# ----------------------------------------------------------------------------- help
def test_every_verb_files_every_option_in_a_panel_with_help():
    group = typer.main.get_command(app)
    assert set(VERBS) <= set(group.commands)
    for name in VERBS:
        cmd = group.commands[name]
        opts = [p for p in cmd.params if p.param_type_name == "option"]
        names = {o for p in opts for o in p.opts}
        assert {"--quiet", "-q", "--verbose", "-v"} <= names, name
        for p in opts:
            assert (p.help or "").strip(), f"{name} {p.opts}: no help"
            assert "\n" not in p.help.strip(), f"{name} {p.opts}: help is not one line"
            assert getattr(p, "rich_help_panel", None), f"{name} {p.opts}: no help panel"
        res = runner.invoke(app, [name, "-h"])
        assert res.exit_code == 0, res.output
        assert "Output" in res.output and "Running" in res.output, name
    help_of = {n: runner.invoke(app, [n, "--help"]).output for n in ("sweep-lambda", "patch", "explain")}
    for panel in ("Model", "Data", "Preprocessing", "λ/T grid and selection", "Output", "Running"):
        assert panel in help_of["sweep-lambda"], panel
    assert "Model" in help_of["patch"] and "Data" in help_of["explain"]


def test_completion_and_version_are_there():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0 and "--install-completion" in res.output and "--show-completion" in res.output
    assert runner.invoke(app, ["--version"]).output.startswith("patchcsra ")


def test_default_temperature_is_inf_where_it_patches():
    group = typer.main.get_command(app)
    t = {n: next(p.default for p in group.commands[n].params if p.name in ("temperature", "temperatures"))
         for n in ("patch", "sweep-lambda", "explain")}
    assert t["patch"] == t["sweep-lambda"] == "inf"
    assert t["explain"] == "1"  # a map at T=inf is a one-hot argmax; its help says so


# ----------------------------------------------------------------------------- timm's spellings
def test_habit_argv():
    assert habit_argv(["--input-size", "3", "32", "32", "--mean", "0.5", "0.5", "0.5", "--std", ".25", "x"]) == \
        ["--input-size", "3,32,32", "--mean", "0.5,0.5,0.5", "--std", ".25", "x"]
    assert habit_argv(["--input-size", "3,32,32"]) == ["--input-size", "3,32,32"]
    assert habit_argv(["--amp", "--out", "o"]) == ["--amp", "auto", "--out", "o"]
    assert habit_argv(["--amp"]) == ["--amp", "auto"]
    assert habit_argv(["--amp", "bf16"]) == ["--amp", "bf16"]
    assert habit_argv(["--amp"], has_amp=False) == ["--amp"]
    assert habit_argv(["--", "--input-size", "1", "2", "3"]) == ["--", "--input-size", "1", "2", "3"]
    assert amp_choice("auto", "bfloat16") == "bf16" and amp_choice("auto", "float16") == "fp16"
    assert amp_choice("bf16", None) == "bf16"
    with pytest.raises(PatchCSRAError, match="disagree"):
        amp_choice("fp16", "bfloat16")
    with pytest.raises(PatchCSRAError, match="--amp-dtype"):
        amp_choice("auto", "int8")


# ----------------------------------------------------------------------------- a sweep, as a log sees it
def test_sweep_json_progress_lines_results_file_and_timm_spellings(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHCSRA_PROGRESS_INTERVAL", "0")  # a line per update, not one every 10 s
    results = tmp_path / "results.csv"
    args = _sweep(tiny, tmp_path / "o", "--input-size", "3", "32", "32", "--mean", "0.5", "0.5", "0.5",
                  "--std", "0.25", "0.25", "0.25", "--amp", "--amp-dtype", "bfloat16", "--json",
                  "--results-file", str(results), "-v")
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)  # stdout: the JSON alone
    assert rec == json.loads(json.dumps(rec), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    saved = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert rec["metric"] == saved["metric"] and rec["choices"]["fixed"]["lam"] == saved["choices"]["fixed"]["lam"]
    assert saved["transform"]["input_size"] == [3, 32, 32] and saved["transform"]["mean"] == [0.5] * 3
    lines = res.stderr.splitlines()
    assert any(ln.startswith("collecting: ") and "/24" in ln and "img/s" in ln for ln in lines), res.stderr
    assert any(ln.startswith("debug: patchcsra") for ln in lines), res.stderr  # -v
    assert "┏" in res.stderr and "wrote" in res.stderr  # under --json the table and the last line go to stderr
    with open(results, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(RESULTS_FILE_COLUMNS) and len(rows) == 1
    r = rows[0]
    assert r["model"] == "m.pt" and r["img_size"] == "32" and r["metric"] == "top1"
    assert float(r["baseline"]) == pytest.approx(saved["baseline"]["top1"], abs=1e-4)
    assert float(r["fixed_lam"]) == 0.02 and r["cv_lam"] == ""  # --folds 0: no CV column
    assert float(r["oracle_score"]) == pytest.approx(saved["choices"]["oracle"]["score"], abs=1e-4)

    # --quiet: the final line alone; a second run adds a row
    res = runner.invoke(app, _sweep(tiny, tmp_path / "o", "--input-size", "3,32,32", "--mean", "0.5,0.5,0.5",
                                    "--std", "0.25", "--force", "-q", "--results-file", str(results)))
    assert res.exit_code == 0, res.output
    assert res.stderr == "" and res.stdout.startswith("wrote ") and len(res.stdout.splitlines()) == 1
    with open(results, newline="") as f:
        assert len(list(csv.DictReader(f))) == 2

    # a file with other columns is refused before the pass, in one line naming the flag
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    res = runner.invoke(app, _sweep(tiny, tmp_path / "o3", "--results-file", str(other)))
    assert res.exit_code == 2 and "--results-file" in res.output and not (tmp_path / "o3").exists()
    assert other.read_text() == "a,b\n1,2\n"
    res = runner.invoke(app, _sweep(tiny, tmp_path / "o3", "--amp", "fp16", "--amp-dtype", "bfloat16"))
    assert res.exit_code == 2 and "disagree" in res.output


def test_plain_progress_prints_every_interval(monkeypatch):
    import patchcsra.cli._common as C

    now, lines = [0.0], []
    monkeypatch.setattr(C.err, "print", lambda text, **kw: lines.append(text))
    with PlainProgress("img", interval=10.0, clock=lambda: now[0]) as p:
        t = p.add_task("collecting", total=1000)
        for i in range(1, 11):  # 100 images every 3 s
            now[0] = 3.0 * i
            p.update(t, completed=100 * i)
    assert lines == ["collecting: 400/1000 (40%), 33.3 img/s, ETA 18s",  # 12 s: the first update past 10 s
                     "collecting: 800/1000 (80%), 33.3 img/s, ETA 6s",  # 24 s
                     "collecting: 1000/1000 (100%), 33.3 img/s, in 30s"]  # the end
    lines.clear()
    with PlainProgress("img", interval=10.0, clock=lambda: now[0]) as p:  # a run shorter than the interval
        t = p.add_task("collecting", total=10)
        p.update(t, completed=10)
    assert lines == []


# ----------------------------------------------------------------------------- stdout is for results
def test_describe_and_patch_json_keep_library_chatter_off_stdout(tiny, tmp_path):
    chatty = tmp_path / "chatty.py"
    chatty.write_text("import custom_nets\n\ndef net(num_classes=4):\n"
                      "    print('Downloading: \"https://example.invalid/w.pth\" to /tmp/w.pth')\n"
                      "    return custom_nets.resnet20(num_classes=num_classes)\n")
    base = [str(tiny / "m.pt"), "--arch", f"{chatty}:net", "--num-classes", "4", "--input-size", "3", "32", "32"]
    res = runner.invoke(app, ["describe", *base, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["kind"] == "avg+Linear" and "Downloading" in res.stderr
    out = tmp_path / "p.pt"
    res = runner.invoke(app, ["patch", *base, "-o", str(out), "--lam", "0.25", "--json"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    assert rec["output"] == str(out) and rec["format"] == "torchscript" and rec["lam"] == 0.25
    assert rec["temperature"] == "inf" and rec["head"]["kind"] == "avg+Linear" and rec["bytes"] > 0
    assert "Downloading" in res.stderr and "wrote" in res.stderr
    res = runner.invoke(app, ["patch", *base, "-o", str(out), "--force", "-q"])
    assert res.exit_code == 0 and res.stdout.startswith("wrote ") and "[NCHW, 64 locations]" in res.stdout


# ----------------------------------------------------------------------------- messages in the flags' words
def test_errors_name_flags_not_keywords(tiny, tmp_path):
    ts = tmp_path / "net.pt"
    torch.jit.script(custom_nets.resnet20(num_classes=4).eval()).save(str(ts))
    res = runner.invoke(app, ["describe", str(ts)])
    assert res.exit_code == 2 and "pass --trust" in res.output and "trust=True" not in res.output
    assert "(CLI" not in res.output
    res = runner.invoke(app, ["describe", str(tiny / "m.pt"), "--input-size", "3,32,32"])
    assert res.exit_code == 2 and "--arch" in res.output and "arch=" not in res.output, res.output
    existing = tmp_path / "exists.pt"
    existing.write_text("x")
    res = runner.invoke(app, ["patch", str(tiny / "m.pt"), "--arch", "custom_nets:resnet20", "--num-classes", "4",
                              "-o", str(existing)])
    assert res.exit_code == 2 and "--force" in res.output and "force=True" not in res.output


@pytest.mark.parametrize("msg,given,want", [
    ("x.pt is a TorchScript archive (...), so it is refused: pass trust=True (CLI --trust) if you wrote it",
     (), "so it is refused: pass --trust if you wrote it"),
    ("timm:x: could not get pretrained weights (E); pass pretrained=False (CLI --no-pretrained) or weights=FILE",
     (), "(E); pass --no-pretrained or --weights FILE"),
    ("timm:x: could not get pretrained weights (E); pass pretrained=False (CLI --no-pretrained) or weights=FILE",
     ("--no-pretrained",), "(E); pass --weights FILE"),
    ("x: cannot load the weights of M (E); pass pretrained=False to build it from its config",
     ("--no-pretrained",), "x: cannot load the weights of M (E)"),
    ("p holds a state dict and no architecture; pass arch='timm:NAME', 'torchvision:NAME' or "
     "'package.module:factory' (CLI --arch)", (),
     "pass --arch timm:NAME, torchvision:NAME or package.module:factory"),
    ("p holds no EMA weights; leave out ema (CLI --ema)", (), "leave out --ema"),
    ("classes: 'cat' is a name but the model carries no class names; pass class_names=[...] or output indices", (),
     "pass --class-names FILE or output indices"),
    ("forward failed (E); pass input_size=(C, H, W) that the model accepts", (), "pass --input-size C,H,W that"),
    ("heads=3 does not match len(temperatures)=2; pass heads=2", (), "; pass --heads 2"),
    ("d has several splits (a, b); pass split= one of them", (), "pass --split one of them"),
    ("arch='x:y': cannot import module 'x'", (), "--arch='x:y': cannot import"),
    ("--lams=[1, 2]: give numbers", (), "--lams=[1, 2]: give numbers"),
])
def test_cli_message(msg, given, want):
    got = cli_message(msg, given)
    assert want in got, got
    assert "(CLI " not in got and "=True" not in got and "=False" not in got


def test_store_above_reads_sizes_in_the_units_people_write():
    from patchcsra.cli._common import parse_bytes
    from patchcsra.errors import PatchCSRAError

    assert parse_bytes(None, "--store-above") is None
    assert parse_bytes("0", "--store-above") == 0
    assert parse_bytes("2GiB", "--store-above") == 2 * 2 ** 30
    assert parse_bytes("500MB", "--store-above") == 500 * 10 ** 6
    assert parse_bytes(" 1.5 g ", "--store-above") == 1_500_000_000
    assert parse_bytes("4096", "--store-above") == 4096
    for bad in ("", "-1", "2 gallons", "GiB", "1..5g"):
        with pytest.raises(PatchCSRAError, match="--store-above"):
            parse_bytes(bad, "--store-above")
