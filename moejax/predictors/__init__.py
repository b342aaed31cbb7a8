"""Learned and baseline expert predictors: from a sequence's tokens, a probability for every (MoE layer,
expert), per token (SiDA) or per request (eMoE). One interface (`base.Predictor`) for the engine, the lab
and the scheduler; `store` saves and loads them; `quality` measures them on routing traces."""
