"""Data folders and symbolic links: followed once, loops and dangling links are exit 2 naming the path.

The rule (``privbench.datasets.imagefolder``): a split folder, class folder or image file that is a
link is read where it points; a link that loops (to itself, through a chain, or to a folder that
contains it), a dangling link, and two entries leading to one folder are DatasetErrors naming the path.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from privbench.cli import app
from privbench.datasets import DatasetError
from privbench.datasets.imagefolder import scan

runner = CliRunner()


def _image(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(path)


@pytest.fixture
def root(tmp_path):
    """A flat layout: classes a and b, three images each."""
    base = tmp_path / "data"
    for c, label in enumerate("ab"):
        for i in range(3):
            _image(base / label / f"{i}.png", seed=10 * c + i)
    return base


def _self_loop_image(root):
    os.symlink("loop.png", root / "a" / "loop.png")
    return root / "a" / "loop.png"


def _chain_loop_class(root):
    os.symlink("c2", root / "c1")
    os.symlink("c1", root / "c2")
    return root / "c1", root / "c2"  # either is named, whichever is listed first


def _link_to_root_in_class(root):
    os.symlink("..", root / "b" / "up")
    return root / "b" / "up"


def _class_link_to_root(root):
    os.symlink(".", root / "c")
    return root / "c"


def _link_to_ancestor(root):
    os.symlink(root.parent, root / "a" / "everything")
    return root / "a" / "everything"


def _dangling_image(root):
    os.symlink("missing.png", root / "a" / "gone.png")
    return root / "a" / "gone.png"


def _dangling_class(root):
    os.symlink(root.parent / "nowhere", root / "c")
    return root / "c"


def _same_folder_twice(root):
    os.symlink("a", root / "a2")
    return root / "a2"


def _split_loop(root):
    training = root.parent / "split" / "Training"
    for label in "ab":
        _image(training / label / "0.png", seed=ord(label))
    os.symlink("Testing", root.parent / "split" / "Testing")
    return root.parent / "split" / "Testing"


BROKEN = {
    "image linked to itself": (_self_loop_image, "loops"),
    "class folders linked to each other": (_chain_loop_class, "loops"),
    "link to the root inside a class folder": (_link_to_root_in_class, "contains the link itself"),
    "class folder linked to the root": (_class_link_to_root, "contains the link itself"),
    "link to an ancestor of the root": (_link_to_ancestor, "contains the link itself"),
    "dangling image link": (_dangling_image, "cannot be read"),
    "dangling class link": (_dangling_class, "cannot be read"),
    "one folder reached twice": (_same_folder_twice, "lead to the same folder"),
    "split folder linked to itself": (_split_loop, "loops"),
}


class TestBrokenLinks:
    @staticmethod
    def _plant(root, case):
        plant, message = BROKEN[case]
        links = plant(root)
        links = links if isinstance(links, tuple) else (links,)
        folder = links[0].parent if case == "split folder linked to itself" else root
        return folder, [str(link) for link in links], message

    @pytest.mark.parametrize("case", list(BROKEN))
    def test_scan_names_the_link(self, root, case):
        folder, links, message = self._plant(root, case)
        with pytest.raises(DatasetError, match=message) as info:
            scan(folder)
        assert any(link in str(info.value) for link in links)

    @pytest.mark.parametrize("case", list(BROKEN))
    def test_bench_run_exits_2_naming_the_path(self, bench_home, root, case):
        folder, links, message = self._plant(root, case)
        result = runner.invoke(app, ["run", "--dataset", f"imagefolder:{folder}", "--image-size", "16"])
        assert result.exit_code == 2, result.output
        assert any(link in result.output for link in links) and message in result.output
        assert "Traceback" not in result.output
        assert not (bench_home / "artifacts").exists() or not any((bench_home / "artifacts").iterdir())

    def test_a_root_that_is_a_looping_link(self, tmp_path):
        os.symlink("loop", tmp_path / "loop")
        with pytest.raises(DatasetError, match="loops"):
            scan(tmp_path / "loop")


class TestLinksAreFollowedOnce:
    def test_linked_class_folders_and_images_are_read_where_they_point(self, tmp_path, root):
        other = tmp_path / "other"
        _image(other / "a" / "own.png", seed=99)
        os.symlink(root / "b", other / "b")  # a class folder elsewhere
        os.symlink(root / "a" / "0.png", other / "a" / "linked.png")  # an image elsewhere
        found = scan(other)
        assert found.class_names == ("a", "b")
        assert found.files == ("a/linked.png", "a/own.png", "b/0.png", "b/1.png", "b/2.png")  # ids: paths under root

    def test_a_linked_split_folder_is_read(self, tmp_path):
        split = tmp_path / "split"
        for label in "ab":
            _image(split / "Training" / label / "0.png", seed=ord(label))
            _image(tmp_path / "elsewhere" / label / "1.png", seed=ord(label) + 1)
        os.symlink(tmp_path / "elsewhere", split / "Testing")
        assert scan(split).files == ("Testing/a/1.png", "Testing/b/1.png", "Training/a/0.png", "Training/b/0.png")

    def test_a_folder_inside_a_class_folder_is_not_searched_and_is_named(self, root, caplog):
        _image(root / "a" / "deeper" / "x.png")
        os.symlink(root / "b", root / "a" / "linked-folder")
        with caplog.at_level(logging.WARNING, logger="privbench.datasets.imagefolder"):
            found = scan(root)
        assert "a/deeper/x.png" not in found.files and len(found.files) == 6
        assert "deeper" in caplog.text and "linked-folder" in caplog.text and "one level deep" in caplog.text
