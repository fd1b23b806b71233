"""safelib: SAFE (Semantic-Aware FinE-tuning) for few-shot ResNet CLIP.

The library behind the SAFE book. Every public name the notebooks use is re-exported here.
"""
try:
    from ._version import __version__
except ImportError:  # a source checkout that was never built
    __version__ = "0+unknown"

# --- foundation (models, attention pooling, text classifier) ---
# (lead) filled in as the modules land

# --- data (registry, sampler, loaders) ---

# --- features and SAFE ---

# --- methods and runs ---
