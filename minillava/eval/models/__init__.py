"""lmms-eval plugin hook: with `LMMS_EVAL_PLUGINS=minillava.eval`, lmms-eval resolves `--model minillava`
to `minillava.eval.models.minillava.MiniLlavaLMMS` through this table."""

AVAILABLE_MODELS = {"minillava": "MiniLlavaLMMS"}
