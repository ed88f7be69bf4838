"""Assembly: recipe file -> validated :class:`~codetr.core.config.schema.Recipe` -> :class:`~codetr.core.detector.Detector`.

The layer above the components (heads, variants, backbones, necks) and the data package, below the
engine and the CLI; see docs/architecture.md.
"""

from codetr.assembly.build import aux_loss_scale, build_detector
from codetr.assembly.recipe import category_names, load_recipe, load_recipe_dict

__all__ = ["build_detector", "aux_loss_scale", "load_recipe", "load_recipe_dict", "category_names"]
