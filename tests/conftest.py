"""Tests run on JAX's CPU backend; several host devices are available for multi-device logic."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
