"""Weight converters from official checkpoints to codetr's state-dict layout (``backbone.*``, ``neck.*``,
``variant.*``, ``collaborative.*``): :mod:`.official` (Deformable-DETR family), :mod:`.co_detr` (Sense-X
Co-Deformable-DETR), :mod:`.mmdet3` (MMDetection 3.x DINO and CO-DETR / Co-DINO)."""
