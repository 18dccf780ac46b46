"""in=text: the interactive chat shell and the single-shot answer."""
