"""experiments.rejudge: an earlier evaluator run read again by its presence model, with whether each image keeps
its prompt."""

import json

from experiments.rejudge import rejudge
from mole_diffusion.demo import world
from mole_diffusion.demo.run import ASSETS


def test_rejudge_adds_the_faithful_rate_to_an_earlier_run(tmp_path):
    prompt = "a red sks in zwx style on a qkx background"
    colours = {"mole": ["red", "red", "blue", "purple"], "sum": ["red", "green", "red", "red"]}
    rows = []
    for method, per_seed in colours.items():
        for seed, colour in enumerate(per_seed):
            image = f"images/{method}/p0-s{seed}.png"
            (tmp_path / image).parent.mkdir(parents=True, exist_ok=True)
            world.draw(world.Scene("star", colour, "checker", "large", (0.5, 0.5), "stripes")).save(tmp_path / image)
            rows.append({"method": method, "prompt_index": 0, "prompt": prompt, "seed": seed, "image": image, "clip_text": 0.1})
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "run.json").write_text(json.dumps({"concepts": str(ASSETS / "concepts.toml"), "presence_model": str(ASSETS / "judge"),
                                                   "prompts": [prompt]}))
    summary = {entry["method"]: entry for entry in rejudge(tmp_path)}
    assert summary["mole"]["present_all"] == 1.0 and summary["mole"]["present_all_faithful"] == 0.5  # 2 of 4 red
    assert summary["sum"]["present_all_faithful"] == 0.75
    saved = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["present_prompt"] for r in saved] == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    assert "present_all_faithful" in (tmp_path / "report.md").read_text()
