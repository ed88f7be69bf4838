"""The engine tests' fixtures (toy components, the tiny synthetic COCO set), shared with the robustness suite."""

from tests.engine.conftest import app, engine_toy_components, synth_data

__all__ = ["app", "engine_toy_components", "synth_data"]
