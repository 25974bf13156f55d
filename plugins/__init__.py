"""Built-in plugins. They use exactly the public hooks third-party plugins use;
the host registers these modules first, in this order."""

BUILTIN_PLUGINS = (
    "pyramidkd.plugins.schemes.basic",
    "pyramidkd.plugins.schemes.pyramid",
    "pyramidkd.plugins.losses.classification",
    "pyramidkd.plugins.losses.distillation",
    "pyramidkd.plugins.losses.features",
    "pyramidkd.plugins.models.vgg",
    "pyramidkd.plugins.models.pyramid",
    "pyramidkd.plugins.models.cifar_resnet",
    "pyramidkd.plugins.models.wide_resnet",
    "pyramidkd.plugins.models.vgg_bn",
    "pyramidkd.plugins.models.mobilenetv2",
    "pyramidkd.plugins.models.shufflenet",
    "pyramidkd.plugins.datasets.digits",
    "pyramidkd.plugins.datasets.synthetic",
    "pyramidkd.plugins.datasets.vision",
    "pyramidkd.plugins.datasets.imagefolder",
    "pyramidkd.plugins.loggers.console",
    "pyramidkd.plugins.loggers.files",
    "pyramidkd.plugins.loggers.tensorboard",
    "pyramidkd.plugins.launchers.local",
    "pyramidkd.plugins.launchers.ray_cluster",
    "pyramidkd.plugins.launchers.slurm",
)
