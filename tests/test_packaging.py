"""Recipes are package data: a built wheel holds every one, and an installed copy finds them (and a user's own
folders first) from any working directory."""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cxrlab.config import BUILTIN_RECIPES, find_recipe, list_recipes, load_recipe
from cxrlab.errors import CxrlabError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.name for p in (ROOT / "src" / "cxrlab" / "recipes").glob("*.yaml"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built offline (this environment's setuptools) from a copy of the sources, so no
    build/ folder is left in the checkout and no stale build/lib file slips in."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp / "dist"), str(src)], check=True, timeout=300)
    (built,) = (tmp / "dist").glob("cxrlab-*.whl")
    return built


def test_the_wheel_holds_every_recipe_and_the_web_page(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert len(SHIPPED) > 50
    missing = [n for n in SHIPPED if f"cxrlab/recipes/{n}" not in names]
    assert not missing, f"recipes missing from the wheel: {missing}"
    assert {f"cxrlab/inference/static/{n}" for n in ("index.html", "app.js", "style.css")} <= names


def test_an_installed_wheel_finds_its_recipes_from_anywhere(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # a pure-Python wheel, installed = unpacked on the path
    work = tmp_path / "work"
    (work / "recipes").mkdir(parents=True)
    # a user's recipe that starts from a built-in one: inheritance crosses the two folders
    (work / "recipes" / "mine.yaml").write_text("base: demo\ntrain: {epochs: 1}\n")
    probe = ("import json, cxrlab.config as c; r = c.load_recipe('mine'); b = c.load_recipe('lcl_chexpert_bce');"
             "print(json.dumps({'module': c.__file__, 'demo': str(c.find_recipe('demo')), 'names': c.list_recipes(),"
             "'mine': [r.train.epochs, r.model.backbone], 'base_head': b.model.head}))")
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    env.pop("CXRLAB_RECIPES", None)
    out = subprocess.run([sys.executable, "-c", probe], cwd=work, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert found["module"].startswith(str(site))  # the unpacked wheel, not the checkout's src/
    assert found["demo"] == str(site / "cxrlab" / "recipes" / "demo.yaml")
    assert sorted(found["names"]) == sorted([Path(n).stem for n in SHIPPED] + ["mine"])
    assert found["mine"] == [1, load_recipe("demo").model.backbone]
    assert found["base_head"] == "linear"


def test_recipe_folders_on_cxrlab_recipes_come_before_the_builtin_ones(tmp_path, monkeypatch, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    (first / "exp.yaml").write_text("base: shared\ntrain: {epochs: 3}\n")
    (second / "shared.yaml").write_text("base: demo\noptim: {lr: 0.5}\n")
    (second / "demo.yaml").write_text("train: {epochs: 7}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CXRLAB_RECIPES", f"{first}{os.pathsep}{second}")
    recipe = load_recipe("exp")  # exp (a) -> shared (b) -> demo (b replaces the built-in, with a note)
    assert (recipe.train.epochs, recipe.optim.lr) == (3, 0.5)
    assert "replaces the built-in" in capsys.readouterr().err
    assert {"exp", "shared", "spml_an"} <= set(list_recipes())
    monkeypatch.setenv("CXRLAB_RECIPES", str(tmp_path / "nope"))
    with pytest.raises(CxrlabError, match="CXRLAB_RECIPES: no such folder: .*nope"):
        find_recipe("demo")


def test_builtin_recipes_are_found_inside_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./recipes folder in the way
    monkeypatch.delenv("CXRLAB_RECIPES", raising=False)
    assert BUILTIN_RECIPES == Path(__import__("cxrlab").__file__).parent / "recipes"
    assert find_recipe("demo") == BUILTIN_RECIPES / "demo.yaml"
