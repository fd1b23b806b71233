"""safelib: SAFE (Semantic-Aware FinE-tuning) for few-shot ResNet CLIP.

The library behind the SAFE book. Every public name the notebooks use is re-exported here.
"""
try:
    from ._version import __version__
except ImportError:  # a source checkout that was never built
    __version__ = "0+unknown"

# --- foundation (models, attention pooling, text classifier) ---
from .attnpool import attention_pool, attention_weights
from .models import RESNET_MODELS, ClipModel, load_clip, random_clip, weight_tags
from .text import IMAGENET_TEMPLATES, TEMPLATES, zero_shot_classifier

# --- data (registry, sampler, loaders) ---
from . import data
from .data import (
    DatasetMissingError,
    ImageSet,
    SplitDataset,
    ViewSpec,
    get_dataset,
    list_datasets,
    load_few_shot,
    sample_few_shot,
    save_few_shot,
    view_loader,
)
from .data import register as register_dataset

# --- mini-world and mini-CLIP (issue 5: generated scenes, target-among-distractors tasks, our small CLIP) ---
from . import miniclip
from .data import miniworld
from .data.miniworld_tasks import TargetTask, target_attention_mass, target_grid_masks

# --- features and SAFE (issue 3: cache, SAFE training, blending, SafeClassifier) ---
from .cache import CacheEntry, CacheError, open_entry
from .classifier import SafeClassifier
from .features import cache_features, cache_image_features, dense_features, feature_cache_fields, pooled_features
from .methods.blend import BlendChoice, blend_features, choose_blend, fixed_blend, sweep_blend
from .methods.safe import TRAINABLE_SETS, Safe, SafeConfig, train_safe, trainable_attnpool

# --- methods and runs (issue 6: one fit/predict protocol, run records, aggregation) ---
from . import methods
from .aggregate import aggregate, load_records, summary_table
from .methods import (
    METHODS,
    ClipHead,
    FewShotData,
    FewShotMethod,
    SplitFeatures,
    make_method,
    method_config,
)
from .runs import RunConfig, RunConfigError, run, run_grid

# --- performance (issue 7: cache placement planner, placed maps, calibration, ImageNet archive) ---
from .calibration import calibrate
from .data.imagenet_archive import archive_imageset, extract_images, index_train_archive
from .placement import place_maps
from .planner import PROFILES, CachePlan, DeviceProfile, PlanError, Workload, get_profile, plan_cache, profile_here
