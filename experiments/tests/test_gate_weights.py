"""experiments.gate_weights on the shipped world: its gates with trigger words weigh, on each concept's own prompts,
only that concept's LoRA, and on the composition prompts all three."""

from experiments import gate_weights


def test_the_shipped_gates_weigh_the_loras_each_prompt_set_names(capsys):
    gate_weights.main(["--steps", "2"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "prompts" not in line]
    assert [row.split(" | ")[0] for row in rows] == ["| star's own", "| stripes's own", "| checker's own", "| composition"]
    weights = [[float(cell) for cell in row.strip(" |").split(" | ")[1:]] for row in rows]
    for concept, own in enumerate(weights[:3]):  # both guidance halves follow the image's prompt
        assert len(own) == 3 and own[concept] > 0.2 and all(w == 0 for i, w in enumerate(own) if i != concept), own
    assert all(w > 0.2 for w in weights[3]), weights[3]
