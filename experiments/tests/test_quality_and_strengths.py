"""experiments.strengths and experiments.quality: what they hand the evaluator (the evaluator itself is faked)."""

from experiments import quality, spatial, strengths
from mole_diffusion.demo import composition_prompts


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


def test_quality_scores_a_spatial_sampler_on_the_methods_prompts_and_seeds(tmp_path, monkeypatch):
    """experiments.quality --layout: the spec's images are drawn on the composition prompts and the run's seeds, then
    handed to the same evaluator run as the methods (an image folder under the spec's label)."""
    configs, drawn = [], []
    monkeypatch.setattr(quality, "evaluate", lambda config: configs.append(config) or config.output_dir)
    monkeypatch.setattr(quality, "read_summary", lambda run, label="": [])
    monkeypatch.setattr(quality, "read_rows", lambda run, label="": [])
    monkeypatch.setattr(quality, "round_trip_accuracy", lambda judge, vae, count: {"shape": 1.0})
    monkeypatch.setattr(spatial, "load_world", lambda assets: ("pipe", "judge"))
    monkeypatch.setattr(spatial, "run", lambda pipe, judge, presence, out, spec, seeds, first_seed, **kw:
                        drawn.append((out, spec, seeds, first_seed, kw)))
    spec = "layout_without_star:split:4:0,1,2:inpaint-inside:1"
    quality.main(["--out", str(tmp_path), "--seeds", "3", "--first-seed", "100", "--skip-lift", "--layout", spec])
    assert drawn == [(tmp_path / "layout", spec, 3, 100, {"steps": 25, "guidance_scale": 5.0})]
    (composition,) = configs
    assert composition.seeds == [100, 101, 102] and composition.prompts == composition_prompts()
    assert composition.image_folders == {"layout_without_star": str(tmp_path / "layout" / "layout_without_star")}
