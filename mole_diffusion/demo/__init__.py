"""The offline demo world: procedural images and captions with held-out concepts."""

from .world import CONCEPTS, Scene, base_world, composition_prompts, concept_scenes, draw, write_world

__all__ = ["CONCEPTS", "Scene", "base_world", "composition_prompts", "concept_scenes", "draw", "write_world"]
