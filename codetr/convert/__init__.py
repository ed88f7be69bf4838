"""Weight converters from official checkpoints to codetr's state-dict layout (``backbone.*``, ``neck.*``,
``variant.*``)."""
