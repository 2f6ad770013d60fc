"""What every page's charts share: the hook types' names and colours (the UI contract's:
purple residual, emerald MLP, sky attention; Tailwind's 400 shades). Django-free."""

HOOK_LABELS = {"residual": "Residual Stream", "mlp": "MLP Output", "attention": "Attention Output"}
HOOK_COLOURS = {"residual": "#c084fc", "mlp": "#34d399", "attention": "#38bdf8"}
