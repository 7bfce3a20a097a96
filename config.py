"""Every knob of train.py, one per line. train.py uses these as its command-line defaults.

The article's config.py held BATCH_SIZE and NUM_EPOCHS; the rest is the recipe that makes
ResNet18 train well on 32 px CIFAR-10 in 30 epochs (README, "Set up and run").
"""

# Data
DATA_ROOT = './data'          # where CIFAR-10 is downloaded (or cifar-10-python.tar.gz is placed)
IMAGE_SIZE = 32               # px fed to the model; the article resized to 224 (49x the compute)
ALEXNET_IMAGE_SIZE = 67       # px fed to AlexNet: the smallest it takes (AlexNet.MIN_INPUT_SIZE)
CROP_PADDING = 4              # random crop: reflect-pad by this many px, crop back to size
NUM_WORKERS = 0               # processes that decode an image folder; 0: one per CPU core
VALID_SPLIT = 0.1             # fraction of the training images held out to choose the best epoch
TEST_SPLIT = 0.2              # of a folder of class folders alone: the share drawn as test images
TEST_SEED = 0                 # draws them: the same test images whatever --seed

# Model
MODEL = 'resnet18'            # the network to train

# Optimisation: the fixed recipe (--recipe fixed, the default)
RECIPE = 'fixed'              # fixed | article | article+FIX+...: RESULTS.md, "What each fix buys"
NUM_EPOCHS = 30               # passes over the training set
SMALL_FOLDER_EPOCHS = 60      # for a folder of a few hundred images (options.train_defaults)
BATCH_SIZE = 512              # images per step (ResNet18; the table below has every model's)
LR = 0.2                      # peak learning rate (SGD); the article used 0.001 with no schedule
# --batch-size and peak --lr of each --model, and of a ResNet with --small-input; RESULTS.md
# holds the runs that chose them. A folder of a few hundred images gets a smaller batch
# (options.train_defaults); the recipes without the lr fix take ARTICLE_LR.
TRAIN_DEFAULTS = {
    'resnet18': (BATCH_SIZE, LR),
    'resnet18 --small-input': (256, LR),    # RESULTS.md says why
    'resnet34': (512, LR),
    'resnet34 --small-input': (256, LR),
    'resnet50': (128, LR),                  # at 512 its first epochs overshoot
    'resnet50 --small-input': (128, LR),
    'alexnet': (128, 0.02),                 # no BatchNorm to tame a large lr
    'resnet20': (128, 0.1),                 # the paper's CIFAR-10 nets: its batch and lr
    'resnet32': (128, 0.1),
    'resnet44': (128, 0.1),
    'resnet56': (128, 0.1),
    'resnet110': (128, 0.1),
}
WARMUP = 0.2                  # fraction of the steps spent rising linearly to the peak lr
# The fewest steps the lr takes to its peak: AlexNet, without BatchNorm, diverged when a short
# run's warm-up took a few dozen (RESULTS.md). A run too short for them peaks lower.
MIN_WARMUP_STEPS = {'alexnet': 100}
FLIPS = False                 # evaluate each image and its mirror image, their scores averaged
MOMENTUM = 0.9                # SGD momentum (Nesterov)
WEIGHT_DECAY = 5e-4           # L2 penalty on every parameter
LABEL_SMOOTHING = 0.1         # soften the one-hot targets of the loss
EVAL_BATCH_SIZE = 1024        # images per step when evaluating (at most twice --batch-size)
# The article's recipe (--recipe article): SGD at a constant lr, no normalisation, no augmentation
ARTICLE_LR = 0.001            # the article's lr, with momentum 0.9 and no schedule
ARTICLE_WEIGHT_DECAY = 1e-4   # the article's L2 penalty

# Starting from trained weights (--pretrained, --init; transfer.py)
PRETRAINED_IMAGE_SIZE = 224   # px fed with --pretrained: what torchvision's weights learned at
IMAGENET_MEAN = [0.485, 0.456, 0.406]  # the mean and std torchvision's weights were trained with
IMAGENET_STD = [0.229, 0.224, 0.225]
PRETRAINED_LR_FACTOR = 0.1    # lr of the layers that came with ImageNet's weights / the lr
INIT_LR_FACTOR = 0.3          # the same for --init's (RESULTS.md: chosen on a weak start)

# Run
DEVICE = 'auto'               # auto picks cuda, then mps, then cpu
PRECISION = 'auto'            # auto | bf16 | fp16 | fp32; auto: bf16 where the chip has it
CUDA_GRAPHS = True            # on CUDA, replay each ResNet training step as CUDA graphs
GRAPH_WHOLE_STEP = True       # on CUDA, graph the whole step (with loss and SGD), not the model
                              # (not in fp16, whose loss scaling a graph does not record)
SEED = 0                      # seeds the weights, the shuffling and the augmentation
OUT_PATH = 'weight.pth'       # best weights; .json, .csv, .png and .ckpt go beside it
SAVE_EVERY = 30.0             # seconds between writes of weights and checkpoint (and at the end)
