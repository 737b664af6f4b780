"""experiments.strengths and experiments.quality: what they hand the evaluator (the evaluator itself is faked)."""

import itertools

from experiments import quality, spatial, strengths
from mole_diffusion.demo import composition_prompts, world


def test_the_strengths_diagnostic_runs_nla_with_each_weight_triple(tmp_path, monkeypatch, capsys):
    configs = []

    def fake_evaluate(config):
        configs.append(config)
        return config.output_dir

    monkeypatch.setattr(strengths, "evaluate", fake_evaluate)
    monkeypatch.setattr(strengths, "read_summary", lambda run: [{"method": "nla", "n": 64, "present_all": 0.25,
                                                                 "present_all_low": 0.1, "present_all_high": 0.4}])
    strengths.main(["--out", str(tmp_path), "1.5,0.75,2", "1,1,1"])
    assert [c.nla_weights for c in configs] == [[1.5, 0.75, 2.0], [1.0, 1.0, 1.0]]
    assert all(c.methods == ["nla"] and c.prompts == composition_prompts() and len(c.seeds) == 16 for c in configs)
    assert configs[0].output_dir == tmp_path / "w1.5_0.75_2"
    assert "25.0% [10.0-40.0]" in capsys.readouterr().out


def test_the_grid_runs_every_triple_on_the_given_seeds_and_names_the_best(tmp_path, monkeypatch, capsys):
    configs = []
    monkeypatch.setattr(strengths, "evaluate", lambda config: configs.append(config) or config.output_dir)
    # present_all grows with the star's weight and falls with the checker's: the best is (1, *, 0.5)

    def summary(run):
        star, stripes, checker = configs[-1].nla_weights
        rate = (star - checker + stripes / 10 + 0.6) / 2
        return [{"method": "nla", "n": 8, "present_all": rate, "present_all_low": rate, "present_all_high": rate}]

    monkeypatch.setattr(strengths, "read_summary", summary)
    strengths.main(["--out", str(tmp_path), "--grid", "0.5", "1", "--seeds", "2", "--first-seed", "20"])
    assert len(configs) == 8 and {tuple(c.nla_weights) for c in configs} == set(itertools.product([0.5, 1.0], repeat=3))
    assert all(c.seeds == [20, 21] and c.prompts == composition_prompts() for c in configs)
    assert capsys.readouterr().out.splitlines()[-1].startswith("best: 1,1,0.5 ")

    configs.clear()
    strengths.main(["--out", str(tmp_path), "1,0,1", "--colours", "red"])
    assert [c.prompts for c in configs] == [[composition_prompts()[0]]] and "red" in configs[0].prompts[0]


def test_quality_hands_the_evaluator_the_colours_methods_and_constant_weightings_asked_for(tmp_path, monkeypatch):
    configs = []
    monkeypatch.setattr(quality, "evaluate", lambda config: configs.append(config) or config.output_dir)
    monkeypatch.setattr(quality, "read_summary", lambda run, label="": [])
    monkeypatch.setattr(quality, "read_rows", lambda run, label="": [])
    monkeypatch.setattr(quality, "round_trip_accuracy", lambda judge, vae, count, known: {"shape": 1.0})
    references = []
    monkeypatch.setattr(quality, "paired_lines", lambda rows, names, reference: references.append(reference) or [])
    quality.main(["--out", str(tmp_path), "--seeds", "2", "--skip-lift", "--colours", "green", "white",
                  "--methods", "sum", "single_{}", "mole", "--constant", "1,0.5,2", "--reference", "mole (sum-start)"])
    assert references == ["mole (sum-start)"]
    composition, constant = configs
    assert composition.prompts == composition_prompts(("green", "white")) == constant.prompts
    assert composition.methods == ["sum", "single_star", "single_stripes", "single_checker", "mole"]
    assert constant.methods == ["nla"] and constant.nla_weights == [1.0, 0.5, 2.0]


def test_own_prompts_of_a_later_world_vary_every_other_factor():
    scenes = quality.own_scenes("stripes", world.V2)
    assert all(s.style == "stripes" for s in scenes) and len({s.shape for s in scenes}) > 1
    assert [s.caption for s in quality.own_scenes("star", world.V1)] == [s.caption for s in quality.lift_scenes("star")]


def test_quality_scores_a_spatial_sampler_on_the_methods_prompts_and_seeds(tmp_path, monkeypatch):
    """experiments.quality --layout: the spec's images are drawn on the composition prompts and the run's seeds, then
    handed to the same evaluator run as the methods (an image folder under the spec's label)."""
    configs, drawn = [], []
    monkeypatch.setattr(quality, "evaluate", lambda config: configs.append(config) or config.output_dir)
    monkeypatch.setattr(quality, "read_summary", lambda run, label="": [])
    monkeypatch.setattr(quality, "read_rows", lambda run, label="": [])
    monkeypatch.setattr(quality, "round_trip_accuracy", lambda judge, vae, count, known: {"shape": 1.0})
    monkeypatch.setattr(spatial, "load_world", lambda assets: ("pipe", "judge"))
    monkeypatch.setattr(spatial, "run", lambda pipe, judge, presence, out, spec, seeds, first_seed, **kw:
                        drawn.append((out, spec, seeds, first_seed, kw)))
    spec = "layout_without_star:split:4:0,1,2:inpaint-inside:1"
    quality.main(["--out", str(tmp_path), "--seeds", "3", "--first-seed", "100", "--skip-lift", "--layout", spec])
    assert drawn == [(tmp_path / "layout", spec, 3, 100, {"steps": 25, "guidance_scale": 5.0, "word": ""})]
    (composition,) = configs
    assert composition.seeds == [100, 101, 102] and composition.prompts == composition_prompts()
    assert composition.image_folders == {"layout_without_star": str(tmp_path / "layout" / "layout_without_star")}


def test_a_world_put_together_with_a_class_word_gets_it_in_every_checker_phrase(tmp_path, monkeypatch):
    """A set from ``experiments.known_pattern assets`` records its checker's class word; the composition prompts,
    each concept's own prompts and the strengths grid all carry it after the trigger, as its references did."""
    configs = []
    for module in (quality, strengths):
        monkeypatch.setattr(module, "evaluate", lambda config: configs.append(config) or config.output_dir)
        monkeypatch.setattr(module, "built_world", lambda assets: (world.V2, {"world": "v2", "class_word": "tiled"}))
    monkeypatch.setattr(quality, "read_summary", lambda run, label="": [])
    monkeypatch.setattr(quality, "read_rows", lambda run, label="": [])
    monkeypatch.setattr(quality, "round_trip_accuracy", lambda judge, vae, count, known: {"shape": 1.0})
    monkeypatch.setattr(quality, "paired_lines", lambda rows, names, reference: [])
    layouts = []
    monkeypatch.setattr(spatial, "load_world", lambda assets: ("pipe", "judge"))
    monkeypatch.setattr(spatial, "run", lambda *args, **kw: layouts.append(kw["word"]))
    quality.main(["--out", str(tmp_path), "--seeds", "1", "--methods", "sum", "--layout", "layout:split:4:1,1,2:inpaint-inside:1"])
    assert layouts == ["tiled"]
    composition, *own = configs
    assert composition.prompts == [p.replace("qkx", "qkx tiled") for p in composition_prompts()]
    assert [len(c.prompts) for c in own] == [6, 6, 6]
    phrases = [p for c in own for p in c.prompts if "qkx" in p]
    assert len(phrases) >= 6 and all("qkx tiled background" in p for p in phrases)

    configs.clear()
    monkeypatch.setattr(strengths, "read_summary", lambda run: [{"method": "nla", "n": 4, **{f"present_{c}{end}": 0.5 for c in (*world.CONCEPTS, "all") for end in ("", "_low", "_high")}}])
    strengths.main(["--out", str(tmp_path), "1,1,1"])
    assert configs[0].prompts == composition.prompts
