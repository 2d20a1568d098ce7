"""fskd bench chain rows (fskd.bench.chains): a cell distils a student on its split and seed, encodes
the store with it, fits a head on the student's features and scores the protocol, and equals those
commands run by hand; the tables name the stages; a teacher stage becomes the student's
--teacher-state; regime/protocol mismatches and ill-formed chains are refused before any cell;
mtkd's label-free proxy trains with no label term; examples/Makefile runs the same pipeline.
Tiny students (test_distill's settings) on test_distill's tiny store: each test well under a minute."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fskd import api
from fskd.cli import app
from fskd.config import DistillConfig
from fskd.errors import ConfigError
from fskd.methods import load_state
from fskd.methods.distill.losses import LABEL_FREE, DistillLoss, TeacherBatch
from fskd.methods.distill.mtkd import MTKDOptions

from .test_distill import TINY, TINY_OPTS, tiny_images, tiny_teacher_store  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
#: the tiny student and a short syntrans / residual-adapter fit
STUDENT = {**TINY_OPTS, "student": TINY, "epochs": 1}
SYNTRANS = {"meta_steps": 5, "meta_episodes": 4, "val_episodes": 20, "val_query": 2}
EPISODES = dict(way=2, query=5, episodes=30)


def _toml(d: dict) -> str:
    return "\n".join(f"{k} = {json.dumps(v)}" for k, v in d.items())


def _sets(prefix: str, d: dict) -> list[str]:
    return [a for k, v in d.items() for a in ("--set", f"{prefix}{k}={json.dumps(v)}")]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_syntrans_e2e_cell_equals_the_commands_by_hand(tiny_teacher_store, tiny_images, tmp_path):  # noqa: F811
    """An episodic grid's syntrans-e2e cell = fskd distill (base-novel) -> fskd extract --encoder
    student:DIR -> fskd adapt --method syntrans on the student store -> fskd eval: the same
    accuracy with the same seeds; the row and the table name the stages; scratch is removed."""
    grid = tmp_path / "grid.toml"
    grid.write_text(
        f'stores = ["{tiny_teacher_store}"]\nmethods = ["syntrans-e2e"]\nshots = [1]\nseeds = [2]\n'
        f'protocol = "episodic"\n{_toml(EPISODES)}\ndevice = "cpu"\n'
        f"[options.syntrans-e2e.mtkd]\n{_toml(STUDENT)}\n[options.syntrans-e2e.syntrans]\n{_toml(SYNTRANS)}\n"
    )
    out = tmp_path / "b"
    res = runner.invoke(app, ["bench", "--grid", str(grid), "--out", str(out)])
    assert res.exit_code == 0, res.output
    (row,) = _rows(out)
    assert row["status"] == "ok", row
    assert row["method"] == "syntrans-e2e" and row["stages"] == "mtkd(base-novel) -> syntrans"
    assert row["encoder"].startswith("student:") and row["extract_seconds"] > 0
    assert [(d["stage"], d["role"]) for d in row["stages_detail"]] == [("mtkd", "student"), ("syntrans", "head")]
    assert row["stages_detail"][0]["hparams"]["regime"] == "base-novel"
    assert row["options"] == {"mtkd": STUDENT, "syntrans": SYNTRANS}
    assert not list(out.glob(".cell-*")) and not list(out.glob("..cell-*"))  # scratch states and student store gone
    table = (out / "table.md").read_text()
    assert "syntrans-e2e = mtkd(base-novel) -> syntrans" in table

    # the same pipeline, command by command (the documented CLI pipeline)
    student, s_store, head = tmp_path / "student", tmp_path / "student.zarr", tmp_path / "head"
    r = runner.invoke(
        app,
        [
            "distill",
            "--store",
            tiny_teacher_store,
            "--regime",
            "base-novel",
            "--shots",
            "1",
            "--seed",
            "2",
            "--student",
            TINY,
            "--epochs",
            "1",
            "--out",
            str(student),
            "--device",
            "cpu",
            *_sets("", TINY_OPTS),
        ],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app,
        [
            "extract",
            "folder",
            "--root",
            str(tiny_images),
            "--encoder",
            f"student:{student}",
            "--store",
            str(s_store),
            "--workers",
            "0",
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app,
        [
            "adapt",
            "--store",
            str(s_store),
            "--method",
            "syntrans",
            "--shots",
            "1",
            "--seed",
            "2",
            "--out",
            str(head),
            "--device",
            "cpu",
            *_sets("", SYNTRANS),
        ],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app,
        [
            "eval",
            "--store",
            str(s_store),
            "--state",
            str(head),
            "--way",
            "2",
            "--shots",
            "1",
            "--query",
            "5",
            "--episodes",
            "30",
            "--seed",
            "0",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    by_hand = json.loads(r.output)["accuracy"]
    assert f"{row['accuracy']:.2f}" == f"{by_hand:.2f}"
    assert row["accuracy"] == pytest.approx(by_hand, abs=1e-6)
    assert f"| syntrans-e2e | {by_hand:.2f} |" in table


def test_allway_chains_and_a_teacher_stage(tiny_teacher_store, tmp_path):  # noqa: F811
    """mtkd-2stage (semi student -> residual-adapter) and a grid's own chain whose first stage (an
    adapt method fitted on the teacher store with the cell's shots and seed) is the student's
    --teacher-state, with --set CHAIN.STAGE.KEY options; --keep-states keeps every stage."""
    grid = tmp_path / "grid.toml"
    grid.write_text(
        f'stores = ["{tiny_teacher_store}"]\nmethods = ["mtkd-2stage", "tip-mtkd"]\nshots = [2]\n'
        f'seeds = [1]\nprotocol = "allway"\ndevice = "cpu"\n'
        f'[chains]\ntip-mtkd = ["tip-adapter", "mtkd", "prototype"]\n'
        f"[options.mtkd-2stage.mtkd]\n{_toml(STUDENT)}\n"
        f"[options.mtkd-2stage.residual-adapter]\nsteps = 20\n"
    )
    out = tmp_path / "b"
    res = runner.invoke(
        app, ["bench", "--grid", str(grid), "--out", str(out), "--keep-states", *_sets("tip-mtkd.mtkd.", STUDENT)]
    )
    assert res.exit_code == 0, res.output
    rows = {r["method"]: r for r in _rows(out)}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert rows["mtkd-2stage"]["stages"] == "mtkd(semi) -> residual-adapter"
    assert rows["tip-mtkd"]["stages"] == "tip-adapter (teacher) -> mtkd(semi) -> prototype"
    teacher, student, head = rows["tip-mtkd"]["stages_detail"]
    assert (teacher["role"], teacher["method"]) == ("teacher", "tip-adapter")
    given = student["hparams"]["teacher_state"]
    assert (given["method"], given["shots"], given["seed"]) == ("tip-adapter", 2, 1)
    assert Path(given["path"]) == Path(teacher["state"]) and Path(teacher["state"]).name == "2shot-seed1.teacher"
    assert rows["tip-mtkd"]["state"] == head["state"] and load_state(head["state"]).method == "prototype"
    # the student stage records its teacher's accuracy as the fit measured it (the state's metrics)
    assert student["teacher"] == {
        k: v for k, v in load_state(student["state"]).metrics.items() if k.startswith("teacher_") and v is not None
    }
    assert "teacher_val_accuracy" in student["teacher"] and "teacher" not in head
    table = (out / "table.md").read_text()
    assert "mtkd-2stage = mtkd(semi) -> residual-adapter" in table and "tip-mtkd = tip-adapter (teacher)" in table


@pytest.mark.parametrize(
    ("args", "grid", "words"),
    [
        (
            ["--methods", "syntrans-e2e", "--protocol", "allway"],
            "",
            "its student mtkd runs the base-novel regime; --protocol allway takes semi students",
        ),
        (
            ["--methods", "mtkd-2stage", "--protocol", "episodic"],
            "",
            "its student mtkd runs the semi regime; --protocol episodic takes base-novel students",
        ),
        (
            ["--methods", "mine", "--protocol", "allway", "--set", "mine.mtkd.regime=base-novel"],
            '[chains]\nmine = ["mtkd", "prototype"]\n',
            "--protocol allway takes semi students",
        ),
        (
            ["--methods", "mine", "--protocol", "episodic"],
            '[chains]\nmine = ["tip-adapter", "mtkd", "syntrans"]\n',
            "which a student of --protocol episodic must not learn from",
        ),
        (["--methods", "syntrans-e2e", "--protocol", "base-to-new"], "", "distill rows run the episodic protocol"),
        (["--methods", "dho"], "", "dho distils semi students only; the episodic protocol's cells need a base-novel"),
        (["--methods", "mine"], '[chains]\nmine = ["dho", "prototype"]\n', "dho distils semi students only"),
        (["--methods", "mine"], '[chains]\nmine = ["mtkd", "mtkd"]\n', "two stages are named 'mtkd'"),
        (
            ["--methods", "mine"],
            '[chains]\nmine = ["prototype", "tip-adapter"]\n',
            "a chain is [teacher], student, [head]",
        ),
        (["--methods", "mine"], '[chains]\nmine = ["mtkd", "prototype", "tip-adapter"]\n', "a chain is [teacher]"),
        (["--methods", "mine"], '[chains]\nmine = ["mtkd", "no-such-method"]\n', "Unknown method 'no-such-method'"),
        (["--methods", "prototype"], '[chains]\nmine = ["mtkd", "prototype"]\n', "chains are given that no --methods"),
        (["--methods", "fma"], '[chains]\nfma = ["mtkd", "prototype"]\n', "is a method's name"),
        (["--methods", "syntrans-e2e"], '[chains]\nsyntrans-e2e = ["mtkd", "prototype"]\n', "is a built-in chain"),
        (["--methods", "syntrans-e2e", "--set", "syntrans-e2e.syntrans.nope=1"], "", "stage syntrans (syntrans)"),
        (
            ["--methods", "syntrans-e2e", "--set", "syntrans-e2e.head.rho=1"],
            "",
            "does not have; its stages: mtkd, syntrans",
        ),
        (["--methods", "syntran-e2e"], "", "or a chain: syntrans-e2e, syntrans-e2e-label-free, mtkd-2stage"),
        (["--methods", "mtkd", "--set", "mtkd.teacher_state=/no/such/state"], "", "is not a state fskd adapt or align"),
        (
            ["--methods", "syntrans-e2e", "--protocol", "episodic", "--set", "syntrans-e2e.mtkd.proxy=nope"],
            "",
            "proxy must be labelled or label-free",
        ),
    ],
)
def test_bad_chains_are_refused_before_any_cell(tiny_teacher_store, tmp_path, args, grid, words):  # noqa: F811
    path = tmp_path / "grid.toml"
    path.write_text(f'stores = ["{tiny_teacher_store}"]\nshots = [1]\nseeds = [1]\nprotocol = "episodic"\n{grid}')
    res = runner.invoke(app, ["bench", "--grid", str(path), "--out", str(tmp_path / "b"), *args])
    assert res.exit_code == 2 and words in " ".join(res.output.split()), res.output
    assert not (tmp_path / "b").exists()


def test_label_free_proxy_has_no_label_term(tiny_teacher_store, tmp_path):  # noqa: F811
    """--set proxy=label-free: the feature, affinity and image-text terms only, w_task 0; the loss is
    the same whatever the labels; a student trains so (recorded in its state); label terms refused."""
    opts = MTKDOptions.from_dict({"proxy": "label-free"})
    assert opts.w_task == 0.0 and MTKDOptions().w_task == 1.0
    with pytest.raises(ConfigError, match="no label term"):
        MTKDOptions.from_dict({"proxy": "label-free", "w_task": 0.5})
    g = torch.Generator().manual_seed(0)
    feats, logits, proj = torch.randn(6, 8, generator=g), torch.randn(6, 3, generator=g), torch.randn(6, 4, generator=g)
    proj = torch.nn.functional.normalize(proj, dim=-1)
    emb = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(3, 4, generator=g), dim=-1)
    loss = DistillLoss(LABEL_FREE, opts.weights(), text_anchors=text)
    a = loss(feats, logits, proj, TeacherBatch(emb, torch.randn(6, 3, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])))
    b = loss(feats, logits, proj, TeacherBatch(emb, torch.randn(6, 3, generator=g), torch.tensor([2, 2, 1, 0, 0, 1])))
    assert float(a["loss"]) == pytest.approx(float(b["loss"])) and float(a["loss"]) == pytest.approx(
        float(a["kd_loss"])
    )

    res = api.distill(
        DistillConfig(
            store=tiny_teacher_store,
            student=TINY,
            regime="base-novel",
            shots=1,
            epochs=1,
            out=str(tmp_path / "lf"),
            device="cpu",
            force=True,
            options={**TINY_OPTS, "proxy": "label-free"},
        ),
        progress=None,
    )
    assert res.hparams["losses"] == list(LABEL_FREE)
    assert res.hparams["weights"] == {"task": 0.0, "feature": 1.0, "affinity": 2.0, "image_text": 2.0}
    for entry in res.metrics["log"]:  # the epoch's loss is its distillation terms alone
        assert entry["loss"] == pytest.approx(entry["kd_loss"], abs=1e-4)
    with pytest.raises(ConfigError, match="learn\\(s\\) from the teacher's head"):
        api.distill(
            DistillConfig(
                store=tiny_teacher_store,
                student=TINY,
                regime="base-novel",
                shots=1,
                epochs=1,
                losses="logit,feature",
                out=str(tmp_path / "lf2"),
                device="cpu",
                options={**TINY_OPTS, "proxy": "label-free"},
            ),
            progress=None,
        )
    # the bench chain of that configuration names it
    path = tmp_path / "grid.toml"
    path.write_text(
        f'stores = ["{tiny_teacher_store}"]\nmethods = ["syntrans-e2e-label-free"]\nprotocol = "episodic"\n'
    )
    from fskd.bench.runner import GridPlan
    from fskd.config import BenchConfig

    plan = GridPlan(BenchConfig.from_dict({**api.load_grid(str(path)), "out": str(tmp_path / "b")}), create_out=False)
    assert plan.cells[0].stages == "mtkd(base-novel, proxy=label-free) -> syntrans"


def test_makefile_e2e_targets(tiny_teacher_store, tiny_images, tmp_path):  # noqa: F811
    """examples/Makefile's syntrans-e2e and mtkd-2stage run distill -> extract -> adapt -> eval
    (make -n); mtkd-2stage runs for real on the tiny store with tiny settings."""
    fskd = Path(sys.executable).parent / "fskd"
    store = tmp_path / "teacher.zarr"
    shutil.copytree(tiny_teacher_store, store)
    common = [
        f"FSKD={fskd}",
        f"STORE={store}",
        f"DATA={tiny_images}",
        f"OUT={tmp_path / 'mk'}",
        "DATASET=folder",
        "SHOTS=2",
        f"STUDENT={TINY}",
        "EPOCHS=1",
        "WAY=2",
        "EPISODES=30",
        "DISTILL_SET=" + " ".join(f"--set {k}={json.dumps(v)}" for k, v in TINY_OPTS.items()),
        "DEVICE=cpu",
    ]
    for target, regime, head in (
        ("syntrans-e2e", "base-novel", "syntrans"),
        ("mtkd-2stage", "semi", "residual-adapter"),
    ):
        dry = subprocess.run(
            ["make", "-n", "-f", "examples/Makefile", target, *common],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert dry.returncode == 0, dry.stderr
        verbs = [m.group(1) for m in re.finditer(rf"^{re.escape(str(fskd))} (\w+)", dry.stdout, re.M)]
        assert verbs == ["distill", "extract", "adapt", "eval"], dry.stdout
        assert f"--regime {regime}" in dry.stdout and f"--method {head}" in dry.stdout
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        ["make", "-f", "examples/Makefile", "mtkd-2stage", *common, "HEAD_SET=--set steps=20"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    (report,) = (tmp_path / "mk" / "reports").glob("*.json")
    rep = json.loads(report.read_text())
    assert 0 <= rep.get("accuracy", rep.get("result", {}).get("accuracy")) <= 100
    assert load_state(tmp_path / "mk" / "e2e" / "mtkd-2stage" / "head").method == "residual-adapter"


def test_builtin_chains_are_listed_where_users_look():
    """Every built-in chain is named in fskd bench --help and in docs/cli/bench.md with its stages."""
    from fskd.bench.chains import BUILTIN_CHAINS, Chain, Stage

    helptext = " ".join(runner.invoke(app, ["bench", "--help"], terminal_width=200).output.split())
    doc = (ROOT / "docs" / "cli" / "bench.md").read_text()
    for name, chain in BUILTIN_CHAINS.items():
        assert name in helptext, name
        stages = Chain(
            name,
            name,
            tuple(
                Stage(
                    s, s, "student" if s == "mtkd" else "head", chain.preset.get(s, {}), preset=chain.preset.get(s, {})
                )
                for s in chain.stages
            ),
        ).text()
        assert f"| `{name}` | `{stages}`" in doc, (name, stages)
