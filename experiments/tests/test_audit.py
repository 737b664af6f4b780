"""experiments.audit: the presence judge against labels a person gave generated images."""

import pytest

from experiments.audit import agreement, format_groups, main, read_labels
from mole_diffusion.demo import world


def test_agreement_counts_recall_and_precision_against_the_eye():
    eye = [{"a": True, "b": True}, {"a": True, "b": False}, {"a": False, "b": True}, {"a": False, "b": False}]
    judge = [{"a": True, "b": True}, {"a": False, "b": False}, {"a": True, "b": True}, {"a": False, "b": False}]
    table = agreement(eye, judge, ["a", "b"])
    assert table["a"] == {"n": 4, "eye": 2, "judge": 2, "both": 1, "agree": 2, "recall": 0.5, "precision": 0.5}
    assert table["b"] == {"n": 4, "eye": 2, "judge": 2, "both": 2, "agree": 4, "recall": 1.0, "precision": 1.0}
    # every concept at once: the eye sees both in image 0 only, the judge in images 0 and 2
    assert table["all"] == {"n": 4, "eye": 1, "judge": 2, "both": 1, "agree": 3, "recall": 1.0, "precision": 0.5}
    nothing = agreement([{"a": False}], [{"a": False}], ["a"])["a"]
    assert nothing["recall"] is None and nothing["precision"] is None


def test_bad_labels_name_the_file_and_line(tmp_path):
    bad = tmp_path / "labels.csv"
    bad.write_text("prompt,image,eye_star\na sks,x.png,yes\n")
    with pytest.raises(ValueError, match=r"labels.csv, line 2: eye_star is 'yes'; expected 1 or 0"):
        read_labels(bad)
    bad.write_text("prompt,picture,eye_star\na sks,x.png,1\n")
    with pytest.raises(ValueError, match="expected a header with prompt, image and eye_<concept>"):
        read_labels(bad)
    with pytest.raises(FileNotFoundError, match="no labels file"):
        read_labels(tmp_path / "nope.csv")


def test_the_shipped_judge_agrees_with_labels_of_clean_drawings(tmp_path, capsys):
    """Two drawn scenes (a striped star on a board; a plain circle), labelled as they are: the judge reads them as
    the labels say, so every concept and 'all' agree on 2 of 2; a missing image is refused by name."""
    scenes = [world.Scene("star", "red", "checker", "large", (0.5, 0.5), style="stripes"),
              world.Scene("circle", "blue", "yellow", "large", (0.5, 0.5))]
    for i, scene in enumerate(scenes):
        world.draw(scene).save(tmp_path / f"{i}.png")
    labels = tmp_path / "labels.csv"
    labels.write_text("prompt,image,eye_star,eye_stripes,eye_checker\n"
                      f"{scenes[0].caption},0.png,1,1,1\n{scenes[1].caption},1.png,0,0,0\n")
    main([str(labels)])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| star", "| stripes", "| checker", "| all"]
    assert all(line.endswith("| 2/2 |") for line in lines[2:])
    (tmp_path / "1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 labelled images are missing, e.g. .*1.png"):
        main([str(labels)])


def test_a_method_column_counts_each_method_apart():
    eye = [{"a": True}, {"a": True}, {"a": False}]
    judge = [{"a": True}, {"a": False}, {"a": True}]
    lines = format_groups(eye, judge, ["a"], ["x", "x", "y"])
    assert lines[0] == "| method | n | a: eye / judge / both | all: eye / judge / both |"
    assert lines[2:] == ["| x | 2 | 2 / 1 / 1 | 2 / 1 / 1 |", "| y | 1 | 0 / 1 / 0 | 0 / 1 / 0 |"]


def test_every_labels_file_in_the_docs_reads_and_has_its_images():
    """The labelled audits kept in experiments/docs parse, and every image they label is there beside them."""
    from pathlib import Path

    files = sorted((Path(__file__).parents[1] / "docs").glob("eye-audit-*.csv"))
    assert len(files) >= 3
    for path in files:
        rows, concepts = read_labels(path)
        assert concepts == ["star", "stripes", "checker"], path
        assert all(row["image"].is_file() for row in rows), path


def test_the_labelled_images_are_not_ignored_by_git():
    """A labelled image git ignores is there in the checkout that made it and missing from every clean clone."""
    import shutil
    import subprocess
    from pathlib import Path

    docs = Path(__file__).parents[1] / "docs"
    if shutil.which("git") is None or subprocess.run(["git", "-C", str(docs), "rev-parse"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    images = [str(row["image"]) for path in sorted(docs.glob("eye-audit-*.csv")) for row in read_labels(path)[0]]
    ignored = subprocess.run(["git", "-C", str(docs), "check-ignore", "--no-index", "--stdin"], input="\n".join(images),
                             capture_output=True, text=True).stdout.split()
    assert ignored == [], f"{len(ignored)} labelled images are ignored by .gitignore, e.g. {ignored[:1]}"
