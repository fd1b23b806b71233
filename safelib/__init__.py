"""safelib: SAFE (Semantic-Aware FinE-tuning) for few-shot ResNet CLIP.

The library behind the SAFE book. The notebooks use only the names exported here (a test checks).
The package is built in wings, each importing only from the wings below it (a test checks that too):

    atomic       crash-safe file writes                                     (ground)
    clip/        the model: ResNet CLIP loading, exact attention pooling, zero-shot weights and logits, the mini-CLIP
    data/        datasets, splits, prompt templates, the few-shot sampler, view loaders, the mini-world
    features/    dense maps: trunk extraction, the on-disk cache, placement while training
    methods/     zero-shot, baselines, SAFE, SAFE-A under one fit/predict protocol; SafeClassifier
    perf/        the cache planner and the rates measured on this machine
    runs/        RunConfig -> run() -> one JSON record; aggregation into tables
    book/, experiments/   figures and widgets for the chapters; the mini-CLIP's pretraining and acceptance
    reproduce/   papermill grids of the notebooks, sharded and resumable            (top)

docs/ARCHITECTURE.md says more, and where to start reading for SAFE.
"""
from ._version import __version__

# --- model: loading, pooling, zero-shot weights ---
from . import clip
from .clip import (
    RESNET_MODELS,
    ClipModel,
    attention_pool,
    attention_weights,
    class_logits,
    load_clip,
    random_clip,
    spatial_attention,
    weight_tags,
    zero_shot_classifier,
)
from .clip import miniclip

# --- data: registry, splits, templates, sampler, loaders, the mini-world ---
from . import data
from .data import (
    IMAGENET_TEMPLATES,
    TEMPLATES,
    DatasetMissingError,
    ImageSet,
    SplitDataset,
    TargetTask,
    ViewSpec,
    dataset_spec,
    get_dataset,
    list_datasets,
    load_few_shot,
    preprocess_images,
    sample_few_shot,
    save_few_shot,
    view_loader,
)
from .data import miniworld
from .data import register as register_dataset
from .data.imagenet_archive import archive_imageset, extract_images, index_train_archive
from .data.miniworld_tasks import has_targets
from .data.targets import target_attention_mass, target_cells, target_grid_masks

# --- features: dense maps, their cache and placement ---
from . import features
from .features import (
    CacheEntry,
    CacheError,
    DenseMaps,
    cache_features,
    cache_image_features,
    dense_features,
    feature_cache_fields,
    open_entry,
    place_maps,
    pooled_features,
)

# --- methods: the protocol, SAFE, blending, the baselines, the deployable classifier ---
from . import methods
from .methods import (
    METHODS,
    ClipHead,
    FewShotData,
    FewShotMethod,
    SplitFeatures,
    TrainingDivergedError,
    TrainingWarning,
    accuracy,
    make_method,
    method_config,
)
from .methods.blend import BlendChoice, blend_features, choose_blend, fixed_blend, sweep_blend
from .methods.classifier import SafeClassifier
from .methods.reference import reference_method_configs
from .methods.safe import TRAINABLE_SETS, Safe, SafeConfig, train_safe, trainable_attnpool

# --- performance: where the cache lives, measured rates ---
from .perf import (PROFILES, CachePlan, DeviceProfile, NoFit, PlanError, Workload, calibrate, get_profile, plan_cache,
                   profile_here, try_plan_cache)

# --- runs: configs, records, tables ---
from .runs import RunConfig, RunConfigError, provenance, read_record, run, run_grid, write_record
from .runs.aggregate import aggregate, load_records, summary_table
from .runs.runner import RunWarning

# --- book: figures and explorers ---
from .book import ablations, plots, realcheck, widgets
