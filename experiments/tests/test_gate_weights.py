"""experiments.gate_weights on the shipped world: its softmax gates' mean weights sum to 1 on every prompt set."""

from experiments import gate_weights


def test_the_shipped_softmax_gates_mean_weights_sum_to_one_per_prompt_set(capsys):
    gate_weights.main(["--steps", "2"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "prompts" not in line]
    assert [row.split(" | ")[0] for row in rows] == ["| star's own", "| stripes's own", "| checker's own", "| composition"]
    for row in rows:
        weights = [float(cell) for cell in row.strip(" |").split(" | ")[1:]]
        assert len(weights) == 3 and abs(sum(weights) - 1) < 0.02 and all(0 < w < 1 for w in weights)
