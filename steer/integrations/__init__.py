"""Adapters that put steering where users already work; each needs its own optional dependency and is imported by
name (`steer.integrations.lm_eval`: lm-evaluation-harness, `pip install "steer-lm[lm_eval]"`)."""
